"""Progress of long work: structured log lines off a terminal, and an encoder that reports each slice."""

from __future__ import annotations

from structlog.testing import capture_logs


def test_progress_logs_structured_lines_when_not_on_a_terminal():
    from daemon.progress import Progress

    with capture_logs() as logs:
        with Progress("index x", 10, "chunks", log_every_s=0.0, bar=False) as progress:
            progress.update(4)
            progress.update(6)
    events = [entry for entry in logs if entry["event"].startswith("progress")]
    assert [e["done"] for e in events] == [4, 10, 10] and events[-1]["event"] == "progress_done"
    assert all(e["what"] == "index x" and e["total"] == 10 and e["unit"] == "chunks" for e in events)


def test_progress_under_systemd_is_never_a_bar(monkeypatch):
    from daemon.progress import on_terminal

    monkeypatch.setenv("INVOCATION_ID", "abc")
    assert on_terminal() is False


def test_encoder_reports_every_slice_and_the_total(tiny_embedder):
    from daemon.progress import Progress
    from stages.encoder import EncodeParams, Encoder

    with Progress("encode", None, "texts", bar=False, log_every_s=1e9) as progress:
        encoder = Encoder(tiny_embedder, EncodeParams(device="cpu", batch_size=64), progress=progress.advance)
        encoder.PROGRESS_SLICE = 100
        vectors = encoder.passages([f"river city {i}" for i in range(250)])
        encoder.queries(["river"])
    assert vectors.shape[0] == 250
    assert progress.total == 251 and progress.done == 251
