"""ONNX Runtime encoding (issue 26): each model version is exported once, checked against torch on its own
corpus, used by every encoder when the check passed, and torch encodes (with the reason in `status`)
when it did not; a removed version takes its export with it. Real tiny models, real exports, a real
database and a real daemon."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from tests.conftest import settings_for, wait_for
from tests.tiny_models import build_tiny_embedder

TEXTS = [
    "rivers flow through the old city and feed the harbour",
    "solar panels convert sunlight into electric power",
    "the library opens early on weekdays and closes late",
    "a storm warning was issued for the northern coast",
    "fresh bread is baked every morning in the village",
    "the committee approved the budget for new schools",
]


def _state(tmp_path, model: Path, **model_settings):
    """Settings that want exports, and a real database holding one document's chunks and held-out queries."""
    from state.db import Database
    from state.documents import DocumentStore, NewChunk
    from state.layout import StateLayout
    from state.queue import JobQueue

    settings = settings_for(tmp_path, model, model={"backend": "auto", **model_settings})
    layout = StateLayout(settings.paths.state_dir).ensure()
    db = Database(layout.database)
    queue = JobQueue(db.conn)
    store = DocumentStore(db.conn, queue)
    store.file_seen("/inbox/a.txt", 1, 1.0)
    job = queue.claim("w", ["ingest"])
    store.store_version(
        job, 1, "sha", 1, 1.0, "en", [NewChunk(i, t, "", f"sha{i}", "en") for i, t in enumerate(TEXTS)], 0.1
    )
    ids = [row[0] for row in db.conn.execute("SELECT id FROM chunks ORDER BY id")]
    db.conn.executemany(
        "INSERT INTO samples (chunk_id, query, kind, split, kept, created) VALUES (?, ?, 'question', 'heldout', 1, 'now')",
        [(ids[0], "where does the river flow"), (ids[1], "how is sunlight turned into power")],
    )
    db.conn.commit()
    return settings, layout, db


def _run_export_job(settings, layout, db) -> None:
    """What the index pool's child does with an export job, in this process."""
    from daemon.onnx_jobs import JOB_KIND, ExportJobs
    from daemon.workers import JobContext
    from state.queue import JobQueue

    queue = JobQueue(db.conn)
    job = queue.claim("test", [JOB_KIND])
    assert job is not None, "no export job was queued"
    ExportJobs(settings, layout).handle(JobContext(job, queue))


def test_export_is_made_once_per_version_checked_and_used(tmp_path, tiny_embedder):
    from daemon.onnx_jobs import describe_encoder, enqueue_export
    from daemon.step_params import encode_params, torch_encode_params
    from stages.encoder import Encoder
    from stages.onnx_export import RECORD, export_dir, read_record

    settings, layout, db = _state(tmp_path, tiny_embedder)
    assert "no ONNX export yet" in describe_encoder(db.conn, settings, layout)
    assert enqueue_export(db.conn, settings, layout)
    assert not enqueue_export(db.conn, settings, layout), "one job per version"
    assert "queued" in describe_encoder(db.conn, settings, layout)
    _run_export_job(settings, layout, db)

    record = read_record(layout.exports, tiny_embedder)
    assert record is not None and not record.failed
    fp32 = record.variants["fp32"]
    assert fp32.passed and fp32.min_cosine > 0.999, fp32
    assert fp32.queries == 2 and fp32.passages == len(TEXTS)  # the held-out queries and the corpus
    assert fp32.ndcg is not None and abs(fp32.ndcg - fp32.ndcg_torch) < 1e-6
    assert "int8" in record.variants
    made = (export_dir(layout.exports, tiny_embedder) / RECORD).stat().st_mtime_ns

    # every encoder built from the settings now uses it, and its vectors are torch's
    encoder = Encoder(tiny_embedder, encode_params(settings))
    assert encoder.runtime.startswith("onnx"), encoder.runtime_reason
    torch_encoder = Encoder(tiny_embedder, torch_encode_params(settings))
    assert torch_encoder.runtime == "torch"
    cosine = (encoder.passages(TEXTS) * torch_encoder.passages(TEXTS)).sum(axis=1)
    assert cosine.min() > 0.98
    # what `search` asks of a model (its window and a query's token count) agrees with torch's
    long_text = " ".join(TEXTS * 20)
    assert encoder.model.max_seq_length == torch_encoder.model.max_seq_length
    hf_tokenizer = torch_encoder.model.tokenizer
    assert encoder.model.token_count(long_text) == len(hf_tokenizer(long_text, truncation=False)["input_ids"])
    assert describe_encoder(db.conn, settings, layout).startswith("onnx")

    # the version is exported once: no second job, the export is not made again
    assert not enqueue_export(db.conn, settings, layout)
    assert (export_dir(layout.exports, tiny_embedder) / RECORD).stat().st_mtime_ns == made
    # quantize = none keeps fp32; backend = torch ignores the export
    assert Encoder(tiny_embedder, replace(encode_params(settings), quantize="none")).runtime == "onnx fp32"
    db.close()


def test_a_mismatching_or_failed_export_falls_back_to_torch_with_the_reason(tmp_path, tiny_embedder):
    from daemon.onnx_jobs import describe_encoder
    from daemon.step_params import encode_params, torch_encode_params
    from stages.backend_check import CheckSample, check_variants
    from stages.encoder import Encoder
    from stages.onnx_export import FP32, VARIANT_FILES, export_dir, export_model

    settings, layout, db = _state(tmp_path, tiny_embedder)
    params = torch_encode_params(settings)
    sample = CheckSample(TEXTS, ["where does the river flow"], [0])
    other = build_tiny_embedder(tmp_path / "other", seed=7)  # same shapes, other weights

    def check_a_wrong_graph(model_path, files):
        # the graph of another model in place of this one's: the check must catch what it encodes
        other_record = export_model(other, tmp_path / "other-exports", lambda p, f: {}, quantize=False)
        assert not other_record.failed
        for file in files.values():
            shutil.copy(export_dir(tmp_path / "other-exports", other) / VARIANT_FILES[FP32], file)
        return check_variants(model_path, files, sample, params)

    record = export_model(tiny_embedder, layout.exports, check_a_wrong_graph)
    assert record.variants and not any(check.passed for check in record.variants.values())
    assert "cosine" in record.variants[FP32].reason
    encoder = Encoder(tiny_embedder, encode_params(settings))
    assert encoder.runtime == "torch"
    assert "does not match torch" in encoder.runtime_reason and "cosine" in encoder.runtime_reason
    line = describe_encoder(db.conn, settings, layout)
    assert line.startswith("torch (ONNX export does not match torch") and "cosine" in line
    # model.backend = "onnx" is the user's choice: the export is used all the same (fp32, the nearer to
    # torch), and both the encoder and `status` say what the check found
    insisted = settings.model_copy(update={"model": settings.model.model_copy(update={"backend": "onnx"})})
    encoder = Encoder(tiny_embedder, encode_params(insisted))
    assert encoder.runtime == "onnx fp32" and "although it does not match torch" in encoder.runtime_reason
    assert describe_encoder(db.conn, insisted, layout) == encoder.runtime_reason

    # an export that cannot be checked (nothing to check it on) is a failed export, said so
    record = export_model(
        tiny_embedder, layout.exports, lambda p, f: check_variants(p, f, CheckSample([], [], []), params)
    )
    assert record.failed.startswith("ValueError: no passages")
    assert not list(export_dir(layout.exports, tiny_embedder).glob("*.onnx"))
    assert "ONNX export failed: ValueError: no passages" in describe_encoder(db.conn, settings, layout)
    assert Encoder(tiny_embedder, encode_params(settings)).runtime == "torch"

    # a damaged export file: torch encodes, and says why
    record = export_model(tiny_embedder, layout.exports, lambda p, f: check_variants(p, f, sample, params))
    assert record.variants[FP32].passed
    for file in export_dir(layout.exports, tiny_embedder).glob("*.onnx"):
        file.write_bytes(b"not an onnx graph")
    encoder = Encoder(tiny_embedder, encode_params(settings))
    assert encoder.runtime == "torch" and "could not be loaded" in encoder.runtime_reason
    assert describe_encoder(db.conn, settings, layout) == f"torch ({encoder.runtime_reason})"
    assert np.allclose(
        encoder.passages(TEXTS[:2]), Encoder(tiny_embedder, params).passages(TEXTS[:2]), atol=1e-5
    )
    db.close()


def test_a_removed_version_takes_its_export_with_it(tmp_path, tiny_embedder):
    from daemon.onnx_jobs import prune_exports, remove_version_export
    from daemon.step_params import torch_encode_params
    from stages.backend_check import CheckSample, check_variants
    from stages.onnx_export import export_dir, export_model
    from state.registry import ModelRegistry

    settings, layout, db = _state(tmp_path, tiny_embedder)
    params = torch_encode_params(settings)
    sample = CheckSample(TEXTS, [], [])
    registry = ModelRegistry(db.conn, layout)
    kept, dropped, gone = (registry.register(tiny_embedder) for _ in range(3))
    for version in (kept, dropped, gone):
        export_model(
            version.path, layout.exports, lambda p, f: check_variants(p, f, sample, params), quantize=False
        )
        assert export_dir(layout.exports, version.path).is_dir()

    registry.discard(dropped.id)  # a version that never served (what a round does when promotion fails)
    remove_version_export(layout, dropped.path)
    assert not export_dir(layout.exports, dropped.path).exists()

    shutil.rmtree(gone.path)  # a version folder removed behind the daemon's back: the start-up sweep
    (layout.exports / ".0123456789abcdef.tmp-1-2").mkdir()  # and an export a crash left half-built
    removed = prune_exports(db.conn, layout)
    assert len(removed) == 2
    assert not export_dir(layout.exports, gone.path).exists()
    assert export_dir(layout.exports, kept.path).is_dir(), "a live version keeps its export"
    db.close()


def test_the_daemon_exports_the_model_in_service_and_status_says_what_encodes(tmp_path, start_daemon):
    """Embedded wiring: the main loop queues the export once chunks exist, a child process makes it (one
    job, its check passed) and `embedtune status`, in a process of its own, names ONNX as what encodes.
    The index is off here (the export then runs in the filter's pool); encoding with the export is
    test_export_is_made_once_per_version_checked_and_used's."""
    import subprocess
    import sys

    from stages.onnx_export import read_record

    model = build_tiny_embedder(tmp_path / "model")
    settings = settings_for(tmp_path, model, model={"backend": "auto"}, index={"enabled": False})
    daemon = start_daemon(settings)
    (settings.paths.inbox / "notes.txt").write_text("\n\n".join(TEXTS * 3))
    layout = daemon.daemon.layout
    wait_for(lambda: read_record(layout.exports, model), timeout=120, message="the export of the base model")
    wait_for(daemon.idle, timeout=60, message="the daemon to be idle")
    assert daemon.scalar("SELECT COUNT(*) FROM jobs WHERE kind='onnx_export'") == 1
    record = read_record(layout.exports, model)
    assert record.variants["fp32"].passed, record

    config = tmp_path / "config.toml"
    config.write_text(
        f'[paths]\ninbox = "{settings.paths.inbox}"\nstate_dir = "{settings.paths.state_dir}"\n'
        f'[model]\nbase = "{model}"\ndevice = "cpu"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--config", str(config), "status"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "encoder   onnx" in out, out


def test_onnx_token_batches_embed_the_encodings_they_were_cut_from(tmp_path, tiny_embedder):
    """The ONNX path tokenizes once: the encoder cuts its token-budget batches from the embedder's own
    encodings and hands them back; the vectors equal one plain `encode` call, and torch's."""
    from stages.encoder import EncodeParams, Encoder
    from stages.onnx_encoder import OnnxEmbedder
    from stages.onnx_export import export_fp32

    onnx_file = tmp_path / "model.onnx"
    export_fp32(tiny_embedder, onnx_file)
    embedder = OnnxEmbedder(onnx_file, tiny_embedder)
    texts = [("river " * n).strip() for n in (1, 40, 3, 25, 7, 60, 2, 500)]  # the last one truncated
    calls: list[int] = []
    embed = embedder.embed_encodings
    embedder.embed_encodings = lambda encodings, **kw: calls.append(len(encodings)) or embed(encodings, **kw)

    budget = Encoder(tiny_embedder, EncodeParams(device="cpu", batch_tokens=64), model=embedder)
    vectors = budget.passages(texts)
    assert len(calls) > 1 and sum(calls) == len(texts), calls  # cut into several batches, each text once
    assert np.allclose(vectors, embedder.encode(texts, batch_size=64), atol=1e-5)
    torch_vectors = Encoder(tiny_embedder, EncodeParams(device="cpu", backend="torch")).passages(texts)
    assert (vectors * torch_vectors).sum(axis=1).min() > 0.999


def _worker(layout, handler):
    """The index pool's claim-and-run step (RetryLater, back-off and dead letters as in the daemon)."""
    from daemon.onnx_jobs import JOB_KIND
    from daemon.workers import WorkerPool

    return WorkerPool("index", layout.database, {JOB_KIND: handler}, threads=1)


def test_passing_faults_are_told_from_refusals(tmp_path, tiny_embedder):
    """Out of memory or disk is no verdict on the model: export_model raises ExportInterrupted and installs
    nothing; a model the exporter refuses is a failed record."""
    import errno

    import pytest

    from stages.onnx_export import ExportInterrupted, export_model, is_transient, read_record

    def out_of_memory(model_path, files):
        np.ones((1 << 40, 1 << 20), dtype=np.float32)  # a real MemoryError: 4 EiB
        return {}

    def disk_full(model_path, files):
        with open("/dev/full", "wb") as handle:  # a real ENOSPC
            handle.write(b"vectors")
            handle.flush()
        return {}

    root = tmp_path / "exports"
    for fault in (out_of_memory, disk_full):
        with pytest.raises(ExportInterrupted):
            export_model(tiny_embedder, root, fault, quantize=False)
        assert read_record(root, tiny_embedder) is None, "an interrupted try installs no verdict"
        assert not [p for p in root.iterdir() if ".tmp-" in p.name], "the half-built folder is removed"
    assert is_transient(OSError(errno.ENOMEM, "Cannot allocate memory"))
    assert is_transient(
        RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")
    )
    assert not is_transient(FileNotFoundError(errno.ENOENT, "config.json"))

    def refused(model_path, files):
        raise RuntimeError("Exporting the operator 'aten::unfold' to ONNX opset version 17 is not supported")

    record = export_model(tiny_embedder, root, refused, quantize=False)
    assert record.failed.startswith("RuntimeError: Exporting the operator") and not record.interrupted
    assert read_record(root, tiny_embedder).failed == record.failed


def test_an_export_interrupted_by_a_passing_fault_is_tried_again_later(tmp_path, tiny_embedder, monkeypatch):
    """Issue 35 (5): an out-of-memory export was recorded as failed and never tried again. Now the job
    gives itself back with a back-off, `status` says why and when, and the later try makes the export."""
    import time

    import stages.backend_check
    from daemon.onnx_jobs import EXPORT_RETRY_S, ExportJobs, describe_encoder, enqueue_export, export_key
    from daemon.step_params import encode_params
    from stages.encoder import Encoder
    from stages.onnx_export import read_record
    from state.queue import JobQueue

    settings, layout, db = _state(tmp_path, tiny_embedder)
    real_check, calls = stages.backend_check.check_variants, []

    def check_once_out_of_memory(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            np.ones((1 << 40, 1 << 20), dtype=np.float32)  # the first try runs out of memory (for real)
        return real_check(*args, **kwargs)

    monkeypatch.setattr(stages.backend_check, "check_variants", check_once_out_of_memory)
    assert enqueue_export(db.conn, settings, layout)
    pool = _worker(layout, ExportJobs(settings, layout).handle)
    started = time.time()
    assert pool.work_once(JobQueue(db.conn), "w")

    key = export_key(tiny_embedder)
    state, error = JobQueue(db.conn).state_of(key)
    assert state == "pending" and error.startswith("transient: MemoryError"), (state, error)
    record = read_record(layout.exports, tiny_embedder)
    assert record is not None and record.interrupted.startswith("MemoryError") and not record.failed
    assert record.tries == 1 and record.retry_after >= started + EXPORT_RETRY_S - 1
    line = describe_encoder(db.conn, settings, layout)
    assert line.startswith("torch (ONNX export interrupted: MemoryError") and "tried again after" in line
    assert Encoder(tiny_embedder, encode_params(settings)).runtime == "torch"
    assert not enqueue_export(db.conn, settings, layout), "the job waits for its back-off"
    assert not pool.work_once(JobQueue(db.conn), "w"), "not before the back-off has passed"

    later = JobQueue(db.conn, clock=lambda: time.time() + EXPORT_RETRY_S + 1)
    assert pool.work_once(later, "w")
    assert JobQueue(db.conn).state_of(key)[0] == "done"
    record = read_record(layout.exports, tiny_embedder)
    assert not record.interrupted and record.variants["fp32"].passed
    assert describe_encoder(db.conn, settings, layout).startswith("onnx")
    db.close()


def test_an_export_child_killed_mid_export_is_asked_for_again_after_its_back_off(
    tmp_path, tiny_embedder, monkeypatch
):
    """Issue 35 (5): a child killed mid-export (the OOM killer) dead-lettered the job for good. The try's
    record, written as it began, says what happened; the main loop re-asks once its back-off has passed."""
    import signal
    import threading
    import time

    import daemon.onnx_jobs
    from daemon.job_process import ChildJobs
    from daemon.onnx_jobs import KILLED, describe_encoder, enqueue_export, export_key
    from stages.onnx_export import read_record
    from state.db import connect
    from state.queue import JobQueue

    settings, layout, db = _state(tmp_path, tiny_embedder)
    monkeypatch.setattr(daemon.onnx_jobs, "MAX_ATTEMPTS", 1)  # dead at the first kill, as after the second
    assert enqueue_export(db.conn, settings, layout)
    jobs = ChildJobs(settings, layout)
    pool = _worker(layout, jobs.handle)

    def work() -> None:
        conn = connect(layout.database)
        try:
            pool.work_once(JobQueue(conn), "w")
        finally:
            conn.close()

    thread = threading.Thread(target=work)
    thread.start()
    child = wait_for(lambda: next(iter(jobs._children), None), timeout=60, message="the export child")

    def try_recorded():
        record = read_record(layout.exports, tiny_embedder)
        return (record is not None and record.interrupted == KILLED) or not thread.is_alive()

    wait_for(try_recorded, timeout=120, message="the try's record")
    child.send_signal(signal.SIGKILL)
    thread.join(timeout=60)
    assert not thread.is_alive()

    key = export_key(tiny_embedder)
    assert JobQueue(db.conn).state_of(key)[0] == "dead"
    record = read_record(layout.exports, tiny_embedder)
    assert record is not None and record.interrupted == KILLED and record.tries == 1, record
    line = describe_encoder(db.conn, settings, layout)
    assert line.startswith(f"torch (ONNX export interrupted: {KILLED}; tried again after"), line
    assert not enqueue_export(db.conn, settings, layout, now=time.time()), "not before the back-off"
    assert enqueue_export(db.conn, settings, layout, now=record.retry_after + 1)
    assert JobQueue(db.conn).state_of(key)[0] == "pending"

    _run_export_job(settings, layout, db)  # the next try is not killed
    record = read_record(layout.exports, tiny_embedder)
    assert not record.interrupted and record.variants["fp32"].passed
    assert describe_encoder(db.conn, settings, layout).startswith("onnx")
    assert not enqueue_export(db.conn, settings, layout, now=time.time() + 10**6), "made: never again"
    db.close()


def test_status_reads_the_device_the_encoder_picks_and_a_damaged_export(tmp_path, tiny_embedder, monkeypatch):
    """Issue 35 (6): with model.device = "auto", `status` passed "auto" on as the device, so on a GPU
    host it named an ONNX export the encoder does not use (torch runs the GPU); and a damaged export's
    torch fallback was not shown. Both are now the encoder's own decision, found without torch."""
    import stages.onnx_export
    from daemon.onnx_jobs import describe_encoder
    from daemon.step_params import encode_params, torch_encode_params
    from stages.backend_check import CheckSample, check_variants
    from stages.encoder import Encoder
    from stages.models import pick_device
    from stages.onnx_export import INT8, VARIANT_FILES, export_dir, export_model, guess_device

    settings, layout, db = _state(tmp_path, tiny_embedder, device="auto")
    params = torch_encode_params(settings)
    sample = CheckSample(TEXTS, ["where does the river flow"], [0])
    record = export_model(tiny_embedder, layout.exports, lambda p, f: check_variants(p, f, sample, params))
    assert record.variants[INT8].passed
    assert guess_device("auto") == pick_device("auto"), "the torch-free answer is torch's on this host"
    assert describe_encoder(db.conn, settings, layout).startswith("onnx int8")

    # a host with an NVIDIA GPU and a CUDA build of torch: the encoder would run torch on the GPU
    devices, version = tmp_path / "dev", tmp_path / "torch-version.py"
    devices.mkdir()
    (devices / "nvidia0").touch()
    version.write_text(
        "__version__ = '2.13.0+cu128'\ncuda: Optional[str] = '12.8'\nhip: Optional[str] = None\n"
    )
    monkeypatch.setattr(stages.onnx_export, "GPU_DEVICES", devices)
    monkeypatch.setattr(stages.onnx_export, "TORCH_VERSION", version)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert guess_device("auto") == "cuda"
    line = describe_encoder(db.conn, settings, layout)
    assert line.startswith("torch (device cuda: ONNX Runtime is used on the CPU only"), line
    assert describe_encoder(db.conn, settings, layout, device="cpu").startswith("onnx int8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the GPU hidden from this process
    assert describe_encoder(db.conn, settings, layout).startswith("onnx int8")
    monkeypatch.undo()

    # a truncated export file (a full disk, a half copy): the encoder and `status` both say torch, and why
    file = export_dir(layout.exports, tiny_embedder) / VARIANT_FILES[INT8]
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    encoder = Encoder(tiny_embedder, encode_params(settings))
    assert encoder.runtime == "torch" and "could not be loaded" in encoder.runtime_reason
    assert describe_encoder(db.conn, settings, layout) == f"torch ({encoder.runtime_reason})"
    assert "model-int8.onnx is damaged" in encoder.runtime_reason
    # the same size, other bytes (overwritten in place): seen too, without loading the graph
    file.write_bytes(b"\0" * int(record.files[INT8].split(":")[0]))
    line = describe_encoder(db.conn, settings, layout)
    assert line.startswith("torch (ONNX export could not be loaded") and "contents changed" in line
    assert Encoder(tiny_embedder, encode_params(settings)).runtime_reason == line[len("torch (") : -1]
    db.close()


def test_an_older_database_keeps_its_export_jobs_under_the_new_kind(tmp_path):
    """The ONNX job's kind was "export" (beside `embedtune export`'s training data); the migration renames
    the kind and the key, so a version exported (or refused) before is not exported again."""
    from daemon.onnx_jobs import JOB_KIND, export_key
    from state.db import connect, migrate, utcnow

    conn = connect(tmp_path / "old.db")
    migrate(conn, 14)  # the schema before migration 15 renamed the kind
    old_key = export_key(tmp_path).replace(f"{JOB_KIND}:", "export:", 1)
    conn.execute(
        "INSERT INTO jobs (kind, key, state, created, updated) VALUES ('export', ?, 'done', ?, ?)",
        (old_key, utcnow(), utcnow()),
    )
    migrate(conn)
    assert [tuple(row) for row in conn.execute("SELECT kind, key FROM jobs")] == [
        (JOB_KIND, export_key(tmp_path))
    ]
