"""The ONNX export of the model in service: asked for by the main loop, made by a child-process job.

Once per model version (the base and each promoted one): the main loop enqueues an `export` job keyed
by the folder's weights (a key the queue keeps, so a version is exported once, also across restarts);
the job exports, checks against torch on the corpus (stages/backend_check.py) and installs the export
with its record. Every encoder built from `encode_params` then finds it (stages/encoder.py) and uses it
when the check passed, torch otherwise; `status` says which and why. The job runs in the index pool at a
better priority than a sync, so a fresh daemon's first fill waits for the export instead of racing it.

A refusal (the graph cannot be exported, the check found other vectors) is recorded for good. A passing
fault is not: out of memory or disk, the job records the interruption and gives itself back with a
back-off (`export_retry_delay`); a child killed mid-export (the OOM killer) leaves the record written
as the try began, and once the job is dead the main loop re-asks after the same back-off.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.settings import Settings
from state.layout import StateLayout
from state.queue import JobQueue

if TYPE_CHECKING:
    from daemon.serving import Served
    from daemon.workers import JobContext


def _log():
    """The logger, imported when something is logged: `status` imports this module and must stay light."""
    from daemon.logs import get_logger

    return get_logger("embedtune.onnx")


JOB_KIND = "onnx_export"
PRIORITY = 140  # before an index sync (150): the sync after it encodes with the export
CHECK_PASSAGES = 256
CHECK_QUERIES = 64
MAX_ATTEMPTS = 2  # a crash outside the export proper is tried once more at once; then the back-off
EXPORT_RETRY_S = 600.0
MAX_EXPORT_RETRY_S = 6 * 3600.0
# What the record written as a try begins says if nothing replaces it: the child died mid-export
KILLED = "the export process ended before it finished (killed, e.g. out of memory)"


def export_retry_delay(tries: int) -> float:
    """Wait after the n-th interrupted try: 10 minutes, doubling, at most 6 hours (an export that runs
    out of memory each time costs minutes of the host's CPU per try)."""
    return min(MAX_EXPORT_RETRY_S, EXPORT_RETRY_S * 2 ** max(0, tries - 1))


def exports_wanted(settings: Settings) -> bool:
    return settings.model.backend != "torch"


def export_key(model_path: Path) -> str:
    from stages.models import model_key

    return f"{JOB_KIND}:{model_key(model_path)}"


def enqueue_export(
    conn: sqlite3.Connection, settings: Settings, layout: StateLayout, *, now: float | None = None
) -> bool:
    """Ask for the serving model's export once there is a corpus to check it on, and again when its job
    died on an interrupted try whose back-off has passed; True when a job was added or re-armed."""
    from daemon.serving import served_model_path
    from state.index_records import has_active_chunks

    if not exports_wanted(settings) or not has_active_chunks(conn):
        return False
    path = served_model_path(conn, settings, layout)  # a lookup: the main loop never converts a model
    if path is None:
        return False
    key, queue = export_key(path), JobQueue(conn)
    state = queue.state_of(key)  # asked for before (made, refused or under way): a read, not a write
    if state is not None and not (state[0] == "dead" and _retry_due(layout, path, now)):
        return False
    return queue.enqueue(
        JOB_KIND,
        key,
        {"path": str(path)},
        priority=PRIORITY,
        max_attempts=MAX_ATTEMPTS,
        requeue_finished=state is not None,
    )


def _retry_due(layout: StateLayout, path: Path, now: float | None) -> bool:
    """The last try was interrupted (not refused) and its back-off has passed."""
    from stages.onnx_export import read_record

    record = read_record(layout.exports, path)
    return bool(record and record.interrupted) and record.retry_after <= (time.time() if now is None else now)


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
        from stages.models import pick_device

        path = Path(ctx.job.payload["path"])
        if not path.is_dir():
            _log().info("export_skipped", model=str(path), reason="the model folder is gone")
        elif pick_device(self.settings.model.device) != "cpu":
            _log().info("export_skipped", model=str(path), reason="torch encodes on the GPU")
        else:
            self._try(ctx, path)
        ctx.queue.complete(ctx.job)

    def _try(self, ctx: JobContext, path: Path) -> None:
        """One try: recorded as interrupted before it starts (a killed child leaves that), replaced by
        the export or the refusal; a passing fault gives the job back for later (RetryLater)."""
        from stages.onnx_export import ExportInterrupted, is_transient, mark_interrupted, read_record

        previous = read_record(self.layout.exports, path)
        tries = (previous.tries if previous is not None and previous.interrupted else 0) + 1
        delay = export_retry_delay(tries)
        try:
            mark_interrupted(self.layout.exports, path, KILLED, tries, time.time() + delay)
            self._export(ctx, path)
        except ExportInterrupted as exc:
            self._interrupted(path, str(exc), tries, delay)
        except OSError as exc:  # the record could not be written (a full disk): a passing fault too
            if not is_transient(exc):
                raise
            self._interrupted(path, f"{type(exc).__name__}: {exc}", tries, delay)

    def _interrupted(self, path: Path, reason: str, tries: int, delay: float) -> None:
        from daemon.workers import RetryLater
        from stages.onnx_export import mark_interrupted

        try:
            mark_interrupted(self.layout.exports, path, reason, tries, time.time() + delay)
        except OSError:  # still no room: the queue's wait stands in for the record
            pass
        _log().warning("export_interrupted", model=str(path), reason=reason, tries=tries, retry_in_s=delay)
        raise RetryLater(f"transient: {reason}; tried again in {delay / 60:.0f} min", delay)

    def _export(self, ctx: JobContext, path: Path) -> None:
        from daemon.step_params import torch_encode_params
        from stages.backend_check import CheckSample, check_variants
        from stages.onnx_export import export_model
        from state.samples import kept_pairs_sample

        passages, queries, relevant = kept_pairs_sample(ctx.conn, CHECK_PASSAGES, CHECK_QUERIES)
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


def describe_encoder(
    conn: sqlite3.Connection | None,
    settings: Settings,
    layout: StateLayout,
    *,
    device: str | None = None,
    served: Served | None = None,
) -> str:
    """One status line: what encodes for the model in service and why (no torch, no model loaded). The
    decision is the encoder's own (stages.onnx_export.runtime_choice, a damaged export file included)
    on the device the encoder picks: `device` when the caller knows it, else guess_device's torch-free
    answer for `model.device`; the export job's state explains a missing or interrupted export."""
    from daemon.serving import resolve_served
    from stages.onnx_export import INTERRUPTED, NO_EXPORT, guess_device, runtime_choice

    model = settings.model
    if not exports_wanted(settings):
        return "torch (model.backend = torch)"
    if conn is None:
        return "torch (no ONNX export yet: it is made once the first chunks are in)"
    path = (served or resolve_served(conn, settings, layout)).path  # a lookup: status never converts
    if path is None:
        return "torch (no model in service yet)"
    device = guess_device(model.device) if device is None else device
    variant, reason = runtime_choice(layout.exports, path, model.backend, model.quantize, device)
    if variant is not None:
        return reason
    if reason == NO_EXPORT or reason.startswith(INTERRUPTED):
        job = JobQueue(conn).state_of(export_key(path))
        if job is None:
            return "torch (no ONNX export yet: it is made once the first chunks are in)"
        if job[0] == "running":
            return "torch (ONNX export running)"
        if reason != NO_EXPORT:  # an interrupted try: why, and when the next one is
            return f"torch ({reason})"
        if job[0] == "dead":
            return f"torch (the ONNX export job failed: {job[1]})"
        if job[0] == "done":  # it made no export: the job found a GPU (see ExportJobs.handle)
            return "torch (a GPU encodes here; ONNX Runtime is used on the CPU only)"
        return "torch (ONNX export queued)"
    return f"torch ({reason})"
