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
    state_config = tmp / "state.toml"
    state_config.write_text(
        config.read_text()
        + f'\n[paths]\nstate_dir = "{output / "state"}"\ninbox = "{documents}"\n'.replace(
            "[model]\n", f'[model]\nbase = "{tiny_embedder}"\n'
        )
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
    _tmp, output, stdout, _config = once_run
    assert "round" in stdout and "decision" in stdout
    lines = [line for line in stdout.splitlines() if line.strip().split(" ")[0].isdigit()]
    assert 1 <= len(lines) <= 2
    assert (output / "state" / "embedtune.db").exists()
    from state.db import connect

    conn = connect(output / "state" / "embedtune.db", readonly=True)
    decisions = [row[0] for row in conn.execute("SELECT decision FROM rounds ORDER BY id")]
    conn.close()
    assert len(decisions) == len(lines) and all(d in ("promoted", "rejected") for d in decisions)
    # whichever way the rounds went, the output says so and matches the files
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


@pytest.mark.skipif(
    not __import__("shutil").which("chromium"),
    reason="chromium is not installed (apt-get install chromium); see docs/report.md",
)
def test_report_renders_in_headless_chromium(once_run, tmp_path):
    _tmp, _output, _stdout, config = once_run
    assert _cli(config, "report", "--output", str(tmp_path / "report")).returncode == 0
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1400,1000",
            f"--screenshot={shot}",
            (tmp_path / "report" / "index.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
    )
    assert shot.exists() and shot.stat().st_size > 20_000
