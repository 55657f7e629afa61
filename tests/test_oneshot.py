"""One-shot mode, exports read back by the libraries that consume them, and the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_rounds import _corpus

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def once_run(tmp_path_factory, tiny_embedder):
    tmp = tmp_path_factory.mktemp("once")
    documents = tmp / "docs"
    documents.mkdir()
    _corpus(documents, documents=10)
    config = tmp / "c.toml"
    config.write_text(
        '[ingest]\nchunk_tokens = 64\nchunk_overlap = 8\n[model]\ndevice = "cpu"\n'
        "[synthesis]\nheldout_fraction = 0.3\n"
        "[training]\nbatch_size = 4\nhard_negatives = 1\nlearning_rate = 1e-3\n"
        "[promotion]\nmin_gain = 0.0\nsynthetic_only_min_gain = 0.0\nmerge_weights = [0.5]\nbootstrap_samples = 50\n"
        '[logging]\nformat = "json"\nlevel = "warning"\n'
    )
    output = tmp / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "--config",
            str(config),
            "once",
            "--documents",
            str(documents),
            "--output",
            str(output),
            "--embedding-model",
            str(tiny_embedder),
            "--featured-percentage",
            "1.0",
            "--max-iterations",
            "2",
            "--dataset-output",
            str(tmp / "dataset.jsonl"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The commands below leave model.base at "auto": they use the base the one-shot run recorded.
    state_config = tmp / "state.toml"
    state_config.write_text(
        config.read_text() + f'\n[paths]\nstate_dir = "{output / "state"}"\ninbox = "{documents}"\n'
    )
    return tmp, output, result.stdout, state_config


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


def test_once_runs_rounds_and_prints_a_summary(once_run):
    """What `once` prints and copies is what the rounds decided. Which decision a round reaches on this
    small corpus is the gate's business (its rules are tested on fixed inputs in test_gate_rounds.py and
    test_rounds.py::test_gate_branches); here every printed row must be its round's recorded outcome."""
    _tmp, output, stdout, _config = once_run
    assert "round" in stdout and "decision" in stdout
    lines = [line.split() for line in stdout.splitlines() if line.strip().split(" ")[0].isdigit()]
    assert 1 <= len(lines) <= 2
    assert (output / "state" / "embedtune.db").exists()
    from state.db import connect

    conn = connect(output / "state" / "embedtune.db", readonly=True)
    rounds = conn.execute("SELECT id, state, decision, reason FROM rounds ORDER BY id").fetchall()
    served = conn.execute("SELECT COUNT(*) FROM models WHERE promoted_at IS NOT NULL").fetchone()[0]
    conn.close()
    assert [(int(line[0]), line[1], line[2]) for line in lines] == [(r[0], r[1], r[2]) for r in rounds]
    assert all(
        r["state"] == "finished" and r["decision"] in ("promoted", "rejected") and r["reason"] for r in rounds
    )
    decisions = [r["decision"] for r in rounds]
    assert served == decisions.count("promoted")  # each promotion registered, nothing else
    if "promoted" in decisions:
        assert (output / "model" / "modules.json").exists() and "model in service copied to" in stdout
    else:
        assert not (output / "model").exists() and "no round promoted a model" in stdout


def test_dataset_output_and_flagembedding_export_load_in_flagembedding(once_run, tmp_path):
    from FlagEmbedding.abc.finetune.embedder.AbsArguments import AbsEmbedderDataArguments
    from FlagEmbedding.abc.finetune.embedder.AbsDataset import AbsEmbedderTrainDataset
    from transformers import AutoTokenizer

    tmp, _output, _stdout, config = once_run
    assert (tmp / "dataset.jsonl").stat().st_size > 0
    path = tmp_path / "fe.jsonl"
    result = _cli(config, "export", "--format", "flagembedding", "--output", str(path))
    assert result.returncode == 0, result.stderr
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"query", "pos", "neg", "pos_scores", "neg_scores", "prompt"}
    model_dir = json.loads((tmp / "out" / "state" / "rounds" / "1" / "settings.json").read_text())["model"][
        "base"
    ]
    args = AbsEmbedderDataArguments(train_data=[str(path)], train_group_size=2, knowledge_distillation=True)
    dataset = AbsEmbedderTrainDataset(args, AutoTokenizer.from_pretrained(model_dir))
    query, passages, teacher = dataset[0]
    assert query and len(passages) == 2 and len(teacher) == 2


def test_sentence_transformers_export_loads_with_datasets(once_run, tmp_path):
    from datasets import load_dataset

    _tmp, _output, _stdout, config = once_run
    path = tmp_path / "st.jsonl"
    assert _cli(config, "export", "--format", "sentence-transformers", "--output", str(path)).returncode == 0
    dataset = load_dataset("json", data_files=str(path), split="train")
    assert {"anchor", "positive"} <= set(dataset.column_names) and len(dataset) > 0


def test_rag_eval_export_round_trips(once_run, tmp_path):
    from stages.evalsets import load_eval_file

    _tmp, _output, _stdout, config = once_run
    path = tmp_path / "rag.json"
    assert _cli(config, "export", "--format", "rag-eval", "--output", str(path)).returncode == 0
    data = json.loads(path.read_text())
    assert set(data) == {"queries", "corpus", "relevant_docs"} and data["queries"]
    eval_set = load_eval_file(path)
    assert len(eval_set) == len(data["queries"])


def test_report_writes_html_and_png(once_run, tmp_path):
    _tmp, _output, _stdout, config = once_run
    result = _cli(config, "report", "--output", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<table>" in page and "data:image/png;base64," in page and "sample funnel" in page
    assert (tmp_path / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


CHROMIUM = "/usr/bin/chromium"
# Flags for a closed network (chromium's background connections are refused).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _browser_or_skip() -> str:
    """Debian's chromium, which `make test` installs. Under CI (EMBEDTUNE_REQUIRE_BROWSER=1, set by
    .ci/run) a missing browser fails the test instead of skipping it."""
    import os

    if Path(CHROMIUM).exists():
        return CHROMIUM
    if os.environ.get("EMBEDTUNE_REQUIRE_BROWSER") == "1":
        pytest.fail("chromium is not installed although EMBEDTUNE_REQUIRE_BROWSER=1 (make browser)")
    pytest.skip("chromium is not installed (make browser); see docs/report.md")


def test_report_renders_in_headless_chromium(once_run, tmp_path):
    """The report in a real browser: every chart decodes, the tables are there, and the console is clean."""
    browser_path = _browser_or_skip()
    from playwright.sync_api import sync_playwright

    _tmp, _output, _stdout, config = once_run
    assert _cli(config, "report", "--output", str(tmp_path / "report")).returncode == 0
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.goto((tmp_path / "report" / "index.html").as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])"
            )
            tables = page.eval_on_selector_all("table", "els => els.map(e => e.rows.length)")
            title = page.title()
            page.screenshot(path=str(tmp_path / "shot.png"), full_page=True)
        finally:
            browser.close()
    assert images and all(done and width > 100 and height > 100 for done, width, height in images), images
    assert tables and all(rows >= 2 for rows in tables), tables  # a header row and at least one row each
    assert title and not problems, problems
    assert (tmp_path / "shot.png").stat().st_size > 20_000


def _index_state(config: Path):
    """The alias target and its chunk ids, read from Milvus Lite, and the active chunk ids from SQLite."""
    from daemon.indexing import index_target
    from daemon.settings import load_settings
    from state.db import connect
    from state.vector_store import open_store

    settings = load_settings(config)
    conn = connect(settings.paths.state_dir / "embedtune.db", readonly=True)
    active = {row[0] for row in conn.execute("SELECT id FROM chunks WHERE active = 1")}
    rows = conn.execute("SELECT name, model_id, state FROM index_collections ORDER BY name").fetchall()
    serving = conn.execute(
        "SELECT id FROM models WHERE promoted_at IS NOT NULL AND retired_at IS NULL"
    ).fetchone()
    conn.close()
    with open_store(index_target(settings)) as store:
        target = store.alias_target(settings.index.alias)
        ids = store.ids(target, max(active)) if target else set()
    return target, ids, active, [tuple(r) for r in rows], serving[0] if serving else None


def test_once_leaves_the_index_serving_the_final_model(once_run):
    _tmp, _output, stdout, config = once_run
    assert "index alias embedtune_chunks ->" in stdout
    target, ids, active, rows, serving = _index_state(config)
    live = [r for r in rows if r[2] == "live"]
    assert len(live) == 1 and live[0][0] == target
    assert live[0][1] == serving  # built by the model in service (None: the base model)
    assert ids == active and active


def test_search_and_compare_answer_from_the_chunks(once_run):
    _tmp, _output, _stdout, config = once_run
    result = _cli(config, "search", "river database", "-k", "3", "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert len(answer["hits"]) == 3 and answer["source"].startswith("collection ")
    assert [h["score"] for h in answer["hits"]] == sorted((h["score"] for h in answer["hits"]), reverse=True)
    base = json.loads(_cli(config, "search", "river database", "--model", "base", "-k", "3", "--json").stdout)
    assert base["model"] == "base" and len(base["hits"]) == 3
    compare = _cli(config, "compare", "river database", "-k", "3", "--json")
    assert compare.returncode == 0, compare.stderr
    table = json.loads(compare.stdout)
    assert len(table["current"]["hits"]) == 3
    base_ids = [h["chunk_id"] for h in table["base"]["hits"]]
    for rank, hit in enumerate(table["current"]["hits"], 1):
        if hit["chunk_id"] in base_ids:
            moved = base_ids.index(hit["chunk_id"]) + 1 - rank
            assert hit["change"] == ("=" if moved == 0 else f"↑{moved}" if moved > 0 else f"↓{-moved}")
        else:
            assert hit["change"] == "new"
    assert "hits" in json.loads(compare.stdout)["current"]
    human = _cli(config, "compare", "river database", "-k", "3")
    assert human.returncode == 0 and "base" in human.stdout


def test_search_rejects_bad_requests_with_a_reason(once_run):
    _tmp, _output, _stdout, config = once_run
    empty = _cli(config, "search", "   ")
    assert empty.returncode == 2 and "query is empty" in empty.stderr
    unknown = _cli(config, "search", "river", "--model", "v999")
    assert unknown.returncode == 2 and "unknown model version v999" in unknown.stderr
    bad = _cli(config, "search", "river", "--model", "newest")
    assert bad.returncode == 2 and "use base, current or a version" in bad.stderr


def test_embeddings_export_is_parquet_of_the_active_chunks(once_run, tmp_path):
    import numpy as np
    import pyarrow.parquet as pq

    _tmp, _output, _stdout, config = once_run
    path = tmp_path / "chunks.parquet"
    result = _cli(config, "export", "--format", "embeddings", "--output", str(path))
    assert result.returncode == 0, result.stderr
    table = pq.read_table(path)
    assert table.column_names == ["chunk_id", "document_path", "text", "vector", "model_version"]
    _target, _ids, active, _rows, serving = _index_state(config)
    assert set(table.column("chunk_id").to_pylist()) == active
    vectors = np.array(table.column("vector").to_pylist(), dtype=np.float32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    assert set(table.column("model_version").to_pylist()) == {f"v{serving}" if serving else "base"}
