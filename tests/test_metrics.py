"""The Prometheus textfile: written by a real daemon, read back with prometheus_client's own parser."""

from __future__ import annotations

from tests.conftest import wait_for
from tests.test_rounds import _corpus


def _families(path):
    from prometheus_client.parser import text_string_to_metric_families

    return {family.name: family for family in text_string_to_metric_families(path.read_text())}


def _value(family, **labels) -> float:
    for sample in family.samples:
        if all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    raise AssertionError(f"no sample {labels} in {family.name}")


def test_daemon_writes_metrics_that_prometheus_parses(make_settings, start_daemon, tmp_path):
    path = tmp_path / "textfile" / "embedtune.prom"
    settings = make_settings(metrics={"textfile": str(path), "interval_s": 1}, index={"enabled": False})
    _corpus(settings.paths.inbox, documents=4)
    running = start_daemon(settings)
    wait_for(lambda: running.scalar("SELECT COUNT(*) FROM documents WHERE status = 'ingested'") == 4)
    wait_for(running.idle, timeout=60)

    def counted():
        if not path.exists():
            return None
        families = _families(path)
        return families if _value(families["embedtune_documents"], state="ingested") == 4 else None

    families = wait_for(counted, timeout=30, message="the metrics file to count the documents")
    assert _value(families["embedtune_up"]) == 1
    assert _value(families["embedtune_chunks"], state="active") == running.scalar(
        "SELECT COUNT(*) FROM chunks WHERE active = 1"
    )
    assert _value(families["embedtune_jobs"], kind="ingest", state="done") == 4
    assert _value(families["embedtune_model_version"]) == 0
    assert _value(families["embedtune_llm_breaker_state"], state="closed") == 1
    assert {"embedtune_samples", "embedtune_rounds"} <= set(families)
    running.stop()
    assert _value(_families(path)["embedtune_up"]) == 0  # a clean stop says so
    assert not list(path.parent.glob("*.prom.*"))  # no temporary file left behind


def test_metrics_textfile_must_be_a_prom_file():
    import pytest

    from daemon.settings import Settings

    with pytest.raises(ValueError, match="metrics.textfile"):
        Settings.model_validate({"metrics": {"textfile": "/var/lib/node_exporter/embedtune.txt"}})


def test_the_served_hybrid_score_is_exported_next_to_the_dense_one(tmp_path):
    """After a finished round: the held-out nDCG@10 of the model in service, alone and as served."""
    import json

    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from daemon.metrics import build_registry
    from state.db import Database
    from state.round_records import RoundStore

    conn = Database(tmp_path / "embedtune.db").conn
    round_id = RoundStore(conn).create("schedule", "base")
    metrics = {"heldout": {"ndcg@10": 0.41}, "heldout+served": {"ndcg@10": 0.47}}
    conn.execute(
        "UPDATE rounds SET state='finished', decision='rejected', finished=started, current_metrics=? WHERE id=?",
        (json.dumps(metrics), round_id),
    )
    conn.commit()
    text = generate_latest(build_registry(conn)).decode()
    family = {f.name: f for f in text_string_to_metric_families(text)}["embedtune_heldout_ndcg_at_10"]
    assert {s.labels["retrieval"]: s.value for s in family.samples} == {"dense": 0.41, "hybrid": 0.47}
