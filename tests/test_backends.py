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
    from daemon.backends import JOB_KIND, ExportJobs
    from daemon.workers import JobContext
    from state.queue import JobQueue

    queue = JobQueue(db.conn)
    job = queue.claim("test", [JOB_KIND])
    assert job is not None, "no export job was queued"
    ExportJobs(settings, layout).handle(JobContext(job, queue))


def test_export_is_made_once_per_version_checked_and_used(tmp_path, tiny_embedder):
    from daemon.backends import describe_encoder, enqueue_export
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
    from daemon.backends import describe_encoder
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
    assert np.allclose(
        encoder.passages(TEXTS[:2]), Encoder(tiny_embedder, params).passages(TEXTS[:2]), atol=1e-5
    )
    db.close()


def test_a_removed_version_takes_its_export_with_it(tmp_path, tiny_embedder):
    from daemon.backends import prune_exports, remove_version_export
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
    """Embedded wiring: the main loop queues the export once chunks exist, a child process makes it, the
    index sync that follows encodes with it, and `embedtune status` names the runtime."""
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
    assert daemon.scalar("SELECT COUNT(*) FROM jobs WHERE kind='export'") == 1
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
