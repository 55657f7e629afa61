"""The ONNX export of the model in service: asked for by the main loop, made by a child-process job.

Once per model version (the base and each promoted one): the main loop enqueues an `export` job keyed
by the folder's weights (a key the queue keeps, so a version is exported once, also across restarts);
the job exports, checks against torch on the corpus (stages/backend_check.py) and installs the export
with its record. Every encoder built from `encode_params` then finds it (stages/encoder.py) and uses it
when the check passed, torch otherwise; `status` says which and why. The job runs in the index pool at a
better priority than a sync, so a fresh daemon's first fill waits for the export instead of racing it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.settings import Settings
from state.layout import StateLayout
from state.queue import JobQueue

if TYPE_CHECKING:
    from daemon.workers import JobContext


def _log():
    """The logger, imported when something is logged: `status` imports this module and must stay light."""
    from daemon.logs import get_logger

    return get_logger("embedtune.backends")


JOB_KIND = "export"
PRIORITY = 140  # before an index sync (150): the sync after it encodes with the export
CHECK_PASSAGES = 256
CHECK_QUERIES = 64


def exports_wanted(settings: Settings) -> bool:
    return settings.model.backend != "torch"


def export_key(model_path: Path) -> str:
    from stages.models import model_key

    return f"{JOB_KIND}:{model_key(model_path)}"


def enqueue_export(conn: sqlite3.Connection, settings: Settings, layout: StateLayout) -> bool:
    """Ask for the serving model's export once there is a corpus to check it on; True when a job was added."""
    from daemon.serving import model_in_service
    from state.index_records import has_active_chunks

    if not exports_wanted(settings) or not has_active_chunks(conn):
        return False
    path = model_in_service(conn, layout, settings).path
    key, queue = export_key(path), JobQueue(conn)
    if queue.state_of(key) is not None:  # asked for before (made, failed or under way): a read, not a write
        return False
    return queue.enqueue(JOB_KIND, key, {"path": str(path)}, priority=PRIORITY, max_attempts=2)


def remove_version_export(layout: StateLayout, model_path: Path) -> None:
    """A removed version takes its export with it."""
    from stages.onnx_export import remove_export

    if remove_export(layout.exports, model_path):
        _log().info("export_removed", model=str(model_path))


def prune_exports(conn: sqlite3.Connection, layout: StateLayout) -> list[str]:
    """Start-up sweep: export folders whose model folder is gone (or half-built ones) are removed."""
    import shutil

    from stages.onnx_export import RECORD, ExportRecord

    removed = []
    if not layout.exports.is_dir():
        return removed
    for folder in layout.exports.iterdir():
        record = folder / RECORD
        model_folder = ""
        if record.exists():
            try:
                model_folder = ExportRecord.from_json(record.read_text()).model
            except (ValueError, TypeError):
                model_folder = ""
        if (
            ".tmp-" in folder.name
            or ".old-" in folder.name
            or not model_folder
            or not Path(model_folder).is_dir()
        ):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


class ExportJobs:
    """Child side of an export job (daemon/job_process.py runs it)."""

    def __init__(self, settings: Settings, layout: StateLayout) -> None:
        self.settings = settings
        self.layout = layout

    def handle(self, ctx: JobContext) -> None:

        from daemon.step_params import torch_encode_params
        from stages.backend_check import CheckSample, check_variants
        from stages.models import pick_device
        from stages.onnx_export import export_model
        from state.samples import backend_check_texts

        path = Path(ctx.job.payload["path"])
        if not path.is_dir():
            _log().info("export_skipped", model=str(path), reason="the model folder is gone")
        elif pick_device(self.settings.model.device) != "cpu":
            _log().info("export_skipped", model=str(path), reason="torch encodes on the GPU")
        else:
            passages, queries, relevant = backend_check_texts(ctx.conn, CHECK_PASSAGES, CHECK_QUERIES)
            sample = CheckSample(passages, queries, relevant)
            params = torch_encode_params(self.settings)
            record = export_model(
                path,
                self.layout.exports,
                lambda model, files: check_variants(model, files, sample, params),
                quantize=self.settings.model.quantize != "none",
            )
            _log().info(
                "model_exported",
                model=str(path),
                failed=record.failed or None,
                seconds=record.seconds,
                **{f"{name}_passed": check.passed for name, check in record.variants.items()},
                **{f"{name}_min_cosine": check.min_cosine for name, check in record.variants.items()},
            )
        ctx.queue.complete(ctx.job)


def describe_encoder(conn: sqlite3.Connection | None, settings: Settings, layout: StateLayout) -> str:
    """One status line: what encodes for the model in service and why (no torch, no model loaded); the
    decision is the encoder's own (stages.onnx_export.runtime_choice), the export job's state explains
    a missing export."""
    from daemon.serving import model_in_service
    from stages.models import ModelNotFound
    from stages.onnx_export import NO_EXPORT, runtime_choice

    model = settings.model
    if not exports_wanted(settings):
        return "torch (model.backend = torch)"
    if conn is None:
        return "torch (no ONNX export yet: it is made once the first chunks are in)"
    try:
        path = model_in_service(conn, layout, settings).path
    except ModelNotFound:
        return "torch (no model in service yet)"
    variant, reason = runtime_choice(layout.exports, path, model.backend, model.quantize, model.device)
    if variant is not None:
        return reason
    if reason == NO_EXPORT:
        job = JobQueue(conn).state_of(export_key(path))
        if job is None:
            return "torch (no ONNX export yet: it is made once the first chunks are in)"
        if job[0] == "dead":
            return f"torch (the ONNX export job failed: {job[1]})"
        if job[0] == "done":  # it made no export: the job found a GPU (see ExportJobs.handle)
            return "torch (a GPU encodes here; ONNX Runtime is used on the CPU only)"
        return f"torch (ONNX export {'running' if job[0] == 'running' else 'queued'})"
    return f"torch ({reason})"
