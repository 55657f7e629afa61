"""Is the gate on logged questions right? Rounds judged on questions an application asked, next to the
truth on questions the pipeline never saw (issue 37, "Calibrated, not asserted").

For one BEIR set: its real queries are split by a seeded shuffle into "asked", "truth" and unused. The
corpus goes into a fresh inbox and a daemon on embedded defaults (no LLM) ingests it until the pipeline is
idle and the index live. Every asked query then goes through `/v1/search` of a real `embedtune serve`
process (k=10), and for `--click-share` of them the application posts events (no relevant hit shown: no
event). `--events click` (default): the first shown hit the qrels mark relevant gets a `click`, as a user
who scans down and opens the right answer. `--events cited`: every shown hit the qrels mark relevant gets
a `cited` event, as a RAG application whose reader was given all k hits and cited the ones it used. Then
`--rounds` rounds
(different seeds and recipes) each run from a copy of that same state through the daemon's round process,
so every round is judged against the base on the same log. For each round: the gate's verdict and its
`asked` evidence, and the truth: served hybrid (and dense) nDCG@10 of the candidate against the base on
the truth queries over the whole (subset) corpus, with a paired bootstrap 95% interval.

    python -m bench.gate_calibration ../shared/data/nfcorpus --documents 600 --asked-share 0.7 \
        --truth-share 0.3 --rounds 4 --max-pairs 200 --ppi-min-gold 30 --work /tmp/gc-nf --out /tmp/gc-nf.json
    python -m bench.gate_calibration ../shared/data/zh-medqa --documents 1000 --rounds 5 --max-pairs 100

`--work DIR --reuse` runs more rounds (`--recipes 4,5`) on the state and query log an earlier run of the
same command prepared in DIR.

`--documents N` keeps a smaller corpus: every document relevant to a query when those are at most N (plus
random others up to N, as bench/beir_subset.py does), else N documents drawn at random and the queries
left with a relevant one. Scores on a subset compare models; they are not the full set's.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLIENT = "calibration-app"
# Recipes the rounds cycle through: a gentle, a strong and a destructive learning rate, and the strong
# one without the clicked pairs (synthetic pairs only), then longer training, then the gentle one with
# the word embeddings trained (the "auto" default freezes them for large vocabularies).
RECIPES: list[dict[str, Any]] = [
    {"learning_rate": 3e-5, "train_on_clicks": True},
    {"learning_rate": 2e-4, "train_on_clicks": True},
    {"learning_rate": 1e-3, "train_on_clicks": True},
    {"learning_rate": 2e-4, "train_on_clicks": False},
    {"learning_rate": 3e-5, "train_on_clicks": True, "epochs": 3.0},
    {"learning_rate": 3e-5, "train_on_clicks": True, "freeze_word_embeddings": False},
]


# --- the data set ----------------------------------------------------------------------------------
@dataclass
class Beir:
    """A BEIR folder read whole: corpus rows, query texts, relevant documents (score > 0) per query."""

    corpus: list[dict]
    queries: dict[str, str]
    qrels: dict[str, dict[str, float]]

    @classmethod
    def read(cls, folder: Path) -> Beir:
        with open(folder / "corpus.jsonl", encoding="utf-8") as handle:
            corpus = [json.loads(line) for line in handle if line.strip()]
        with open(folder / "queries.jsonl", encoding="utf-8") as handle:
            queries = {str(row["_id"]): row["text"] for row in map(json.loads, handle) if row}
        qrels: dict[str, dict[str, float]] = {}
        with open(folder / "qrels" / "test.tsv", encoding="utf-8") as handle:
            for row in csv.reader(handle, delimiter="\t"):
                try:
                    score = float(row[-1])
                except (ValueError, IndexError):
                    continue  # the header line
                if score > 0:
                    qrels.setdefault(row[0], {})[row[1]] = score
        return cls(corpus, queries, {q: r for q, r in qrels.items() if q in queries})

    def write(self, folder: Path, query_ids: list[str] | None = None) -> None:
        """As a BEIR folder (only `query_ids`, when given)."""
        keep = set(self.qrels) if query_ids is None else set(query_ids)
        (folder / "qrels").mkdir(parents=True, exist_ok=True)
        with open(folder / "corpus.jsonl", "w", encoding="utf-8") as handle:
            for row in self.corpus:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        with open(folder / "queries.jsonl", "w", encoding="utf-8") as handle:
            for qid, text in self.queries.items():
                if qid in keep:
                    handle.write(json.dumps({"_id": qid, "text": text}, ensure_ascii=False) + "\n")
        with open(folder / "qrels" / "test.tsv", "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t")
            writer.writerow(["query-id", "corpus-id", "score"])
            for qid in self.qrels:
                if qid in keep:
                    writer.writerows([qid, doc, f"{score:g}"] for doc, score in self.qrels[qid].items())


def subset(data: Beir, documents: int, seed: int) -> tuple[Beir, str]:
    """At most `documents` documents (0: all). Sparse judgments (one answer per question) keep every
    relevant document and fill with random others; dense ones (nfcorpus: 3,128 of 3,633 documents are
    relevant to something) take a random sample and keep the queries left with a relevant document."""
    if documents <= 0 or documents >= len(data.corpus):
        return data, "whole corpus"
    rng = random.Random(seed)
    ids = [str(row["_id"]) for row in data.corpus]
    relevant = {doc for docs in data.qrels.values() for doc in docs}
    if len(relevant) <= documents:
        others = [doc for doc in ids if doc not in relevant]
        rng.shuffle(others)
        keep = relevant | set(others[: documents - len(relevant)])
        how = f"every relevant document ({len(relevant)}) plus random others"
    else:
        keep = set(rng.sample(ids, documents))
        how = "a random sample (relevant documents are too many to keep all)"
    qrels = {
        q: {d: s for d, s in docs.items() if d in keep} for q, docs in data.qrels.items() if set(docs) & keep
    }
    corpus = [row for row in data.corpus if str(row["_id"]) in keep]
    return Beir(corpus, data.queries, qrels), how


def split_queries(query_ids: list[str], asked: float, truth: float, seed: int) -> dict[str, list[str]]:
    """A seeded shuffle cut into asked, truth and unused (shares of the queries with judgments)."""
    order = sorted(query_ids)
    random.Random(seed).shuffle(order)
    n_asked = round(asked * len(order))
    n_truth = min(len(order) - n_asked, round(truth * len(order)))
    return {
        "asked": order[:n_asked],
        "truth": order[n_asked : n_asked + n_truth],
        "unused": order[n_asked + n_truth :],
    }


# --- the daemon ------------------------------------------------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """The config the daemon, `embedtune serve` and the rounds share (embedded defaults but these)."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def ingest(settings, documents: int) -> dict:
    """Run the daemon until every document is ingested, no job is pending (synthesis and filter done) and,
    with the index on, the live collection holds every active chunk."""
    from bench.daemon_run import daemon_in_thread
    from daemon.indexing import IndexService
    from state.index_records import IndexRecords
    from state.pipeline_progress import pipeline_progress
    from state.samples import SampleStore

    started = time.monotonic()
    with daemon_in_thread(settings) as (daemon, conn):
        service = IndexService(settings, daemon.layout) if settings.index.enabled else None
        while True:
            progress = pipeline_progress(conn)
            idle = (
                progress.documents_done >= documents
                and not progress.busy_jobs
                and not len(daemon.watcher.tracker)
            )
            live = service is None or (IndexRecords(conn).live() is not None and not service.needs_sync(conn))
            if idle and live:
                break
            time.sleep(2.0)
        samples = SampleStore(conn)
        chunks = conn.execute("SELECT COUNT(*) FROM chunks WHERE active = 1").fetchone()[0]
        out = {
            "documents": documents,
            "chunks": int(chunks),
            "samples_kept": samples.kept_count(),
            "samples_dropped": samples.dropped_count(),
        }
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class AskedLog:
    """What the application did: per asked query, its query_id, the rank of the first relevant hit shown
    (None: none shown), whether it posted events (`clicked`) and the ranks they named (`used`)."""

    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, judge_share: float) -> dict:
        from state.real_queries import JUDGE, question_key, split_for

        shown = [r for r in self.rows if r["first_relevant"] is not None]
        clicked = [r for r in self.rows if r["clicked"]]
        judge = [r for r in self.rows if split_for(question_key(r["text"]), judge_share) == JUDGE]
        judge_ids = {id(r) for r in judge}
        train_events = sum(len(_used(r)) for r in clicked if id(r) not in judge_ids)
        return {
            "asked": len(self.rows),
            "relevant_shown_top10": len(shown),
            "with_events": len(clicked),
            "events": sum(len(_used(r)) for r in clicked),
            "judge_part": len(judge),
            "judge_part_with_events (gold)": sum(1 for r in judge if r["clicked"]),
            "train_part_events (training pairs)": train_events,
            "seconds": round(self.seconds, 1),
        }


def _used(row: dict) -> list[int]:
    """The ranks a row's events named (a log from before `--events` clicked the first relevant only)."""
    return row.get("used", [row["first_relevant"]] if row["clicked"] else [])


def relevant_hits(body: dict, relevant: dict, stem_to_id: dict[str, str]) -> list[tuple[int, dict]]:
    """(1-based rank, hit) of the hits of one `/v1/search` answer whose document the qrels mark relevant."""
    return [
        (rank, hit)
        for rank, hit in enumerate(body["hits"], 1)
        if stem_to_id.get(Path(hit["path"]).stem) in relevant
    ]


def act_on(client, body: dict, found: list[tuple[int, dict]], events: str) -> list[tuple[int, dict]]:
    """The application's events on an answer: a `cited` on every relevant hit shown, or a `click` on the
    first; returns the hits they named."""
    used = found if events == "cited" else found[:1]
    for rank, hit in used:
        event = client.post(
            "/v1/events",
            json={
                "query_id": body["query_id"],
                "action_name": events,
                "event_attributes": {
                    "object": {"object_id": str(hit["chunk_id"])},
                    "position": {"ordinal": rank},
                },
            },
        )
        event.raise_for_status()
    return used


def ask(config: Path, data: Beir, asked: list[str], click_share: float, seed: int, events: str) -> AskedLog:
    """Every asked query through `/v1/search` of an `embedtune serve` process, one request each (k=10);
    for `click_share` of them, events on the relevant hits shown: a `click` on the first (`events`
    "click"), or a `cited` on each ("cited")."""
    import httpx

    from stages.evalsets import document_stem

    stem_to_id = {document_stem(str(row["_id"])): str(row["_id"]) for row in data.corpus}
    port = _free_port()
    command = [sys.executable, "-m", "daemon.cli", "--config", str(config), "serve", "--port", str(port)]
    log_path = config.parent / "serve.log"
    with open(log_path, "ab") as log_file:  # a file, not a pipe: a full pipe would stall the server
        server = subprocess.Popen(command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(seed)
    result = AskedLog()
    started = time.monotonic()
    try:
        _wait_ready(server, url, log_path)
        with httpx.Client(base_url=url, timeout=120, headers={"X-Client-Id": CLIENT}) as client:
            for qid in asked:
                answer = client.post("/v1/search", json={"query": data.queries[qid], "k": 10})
                answer.raise_for_status()
                body = answer.json()
                found = relevant_hits(body, data.qrels[qid], stem_to_id)
                clicked = bool(found) and rng.random() < click_share
                used = act_on(client, body, found, events) if clicked else []
                result.rows.append(
                    {
                        "query": qid,
                        "text": data.queries[qid],
                        "query_id": body["query_id"],
                        "first_relevant": found[0][0] if found else None,
                        "clicked": clicked,
                        "used": [rank for rank, _ in used],
                    }
                )
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    result.seconds = time.monotonic() - started
    return result


def _wait_ready(server: subprocess.Popen, url: str, log_path: Path, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(
                f"embedtune serve exited ({server.returncode}): {log_path.read_text()[-2000:]}"
            )
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"embedtune serve not ready after {timeout:.0f} s")


# --- rounds ----------------------------------------------------------------------------------------
def run_round(settings, prepared: Path, folder: Path, recipe: dict, seed: int) -> dict:
    """One round from a copy of the prepared state, through the daemon's round process."""
    from daemon.round_scheduler import RoundScheduler
    from state.db import connect
    from state.layout import StateLayout
    from state.round_records import RoundStore
    from state.trials import TrialStore

    state = folder / "state"
    shutil.copytree(prepared, state, symlinks=True)
    settings = settings.model_copy(deep=True)
    settings.paths.state_dir = state
    settings.training.seed = seed
    if "learning_rate" in recipe:  # absent: the product's defaults (--defaults)
        settings.training.learning_rate = recipe["learning_rate"]
    settings.training.epochs = recipe.get("epochs", settings.training.epochs)
    settings.query_log.train_on_clicks = recipe.get("train_on_clicks", settings.query_log.train_on_clicks)
    if "freeze_word_embeddings" in recipe:
        settings.training.freeze_word_embeddings = recipe["freeze_word_embeddings"]
    settings.logging.level = "info"
    layout = StateLayout(state).ensure()
    conn = connect(layout.database)
    started = time.monotonic()
    try:
        scheduler = RoundScheduler(settings, layout)
        round_id = scheduler.start(conn, "calibration")
        scheduler.wait(conn)
        row = dict(RoundStore(conn).get(round_id))
        trial = TrialStore(conn).running()  # an undecided candidate's interleaved trial (daemon/trials.py)
    finally:
        conn.close()
    round_dir = layout.round_dir(round_id)
    metrics_file = round_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    steps_file = round_dir / "steps.json"
    return {
        "recipe": {
            **recipe,
            "seed": seed,
            "epochs": settings.training.epochs,
            "learning_rate": settings.training.learning_rate,
            "train_on_clicks": settings.query_log.train_on_clicks,
        },
        "state": row["state"],
        "decision": row["decision"],
        "cause": row["cause"],
        "reason": row["reason"] or row["error"],
        "n_train": row["n_train"],
        "n_heldout": row["n_heldout"],
        "asked": metrics.get("asked", {}),
        "best": metrics.get("best"),
        "heldout_gain": (metrics.get("gains", {}).get("candidate") or {}).get("heldout"),
        "clicked_pairs": _count_lines(round_dir / "clicked.jsonl"),
        "steps": json.loads(steps_file.read_text()) if steps_file.exists() else [],
        # the model a trial tries (a merge is kept only in its version folder), else the candidate
        "candidate": trial.path if trial is not None else str(round_dir / "candidate"),
        "trial": {"id": trial.id, "variant": trial.variant, "model": trial.version, "arms": list(trial.arms)}
        if trial
        else None,
        "seconds": round(time.monotonic() - started, 1),
    }


def _count_lines(path: Path) -> int:
    return sum(1 for _ in open(path, encoding="utf-8")) if path.exists() else 0


# --- the truth -------------------------------------------------------------------------------------
class Truth:
    """Served hybrid and dense nDCG@10 on the truth queries over the whole corpus. BM25's lists are
    computed once (HybridEvaluator keeps them) and each model encodes the corpus once for both."""

    def __init__(self, folder: Path, settings) -> None:
        from stages.evalsets import load_beir
        from stages.hybrid_eval import HybridEvaluator

        self.settings = settings
        self.eval_set = load_beir(folder, name="truth")
        self.hybrid = HybridEvaluator(self.eval_set, None, "ndcg@10", candidates=settings.index.candidates)

    def score(self, model: Path, weights: list[float | None]) -> dict[str, Any]:
        """Per-query nDCG@10: dense, and the hybrid at each BM25 share (None: by the query's language)."""
        from daemon.step_params import torch_encode_params
        from stages.encoder import Encoder
        from stages.evaluate import RetrievalEvaluator, evaluate_rankings

        encoder = Encoder(model, torch_encode_params(self.settings))
        try:
            vectors = encoder.passages(self.eval_set.corpus_texts, self.eval_set.corpus_keys)
            dense = RetrievalEvaluator(self.eval_set, "ndcg@10")(encoder, vectors)
            ranked = self.hybrid.rankings(encoder, vectors, list(weights))
        finally:
            encoder.release()
        hybrid = {
            _share_name(w): evaluate_rankings(ranked[w], self.eval_set.relevant, "ndcg@10").primary_per_query
            for w in dict.fromkeys(weights)
        }
        return {"dense": dense.primary_per_query, "hybrid": hybrid}


def _share_name(weight: float | None) -> str:
    return "by language" if weight is None else f"{weight:g}"


def compare(new: list[float], old: list[float]) -> dict:
    """Mean gain, paired bootstrap 95% interval, and the verdict it supports."""
    import numpy as np

    from stages.gate import paired_bootstrap

    low, high = paired_bootstrap(new, old, samples=1000, seed=0)
    verdict = "gain" if low > 0 else "loss" if high < 0 else "noise"
    return {
        "new": round(float(np.mean(new)), 4),
        "old": round(float(np.mean(old)), 4),
        "gain": round(float(np.mean(new) - np.mean(old)), 4),
        "ci95": [round(low, 4), round(high, 4)],
        "verdict": verdict,
    }


def truth_for_round(truth: Truth, base: dict, base_share: float | None, candidate: Path, share_of) -> dict:
    """The candidate against the base on the truth queries: the hybrid at the share it would be served
    with (`share_of`: the one its round chose, when it chose one) and at the base's, and dense."""
    if not (candidate / "config.json").exists():
        return {}
    from stages.fusion import model_trial_shares

    share = share_of(candidate)
    arms = model_trial_shares(candidate)  # the shares a trial would try it at (the round named them)
    scored = truth.score(candidate, list(dict.fromkeys([share, base_share, *arms])))
    base_hybrid = base["hybrid"][_share_name(base_share)]
    out = {
        "served_share": _share_name(share),
        "hybrid": compare(scored["hybrid"][_share_name(share)], base_hybrid),
        "hybrid_at_base_share": compare(scored["hybrid"][_share_name(base_share)], base_hybrid),
        "dense": compare(scored["dense"], base["dense"]),
    }
    if len(arms) > 1:
        out["hybrid_at_trial_shares"] = {
            _share_name(arm): compare(scored["hybrid"][_share_name(arm)], base_hybrid) for arm in arms
        }
    return out


def share_it_would_get(settings, candidate: Path, conn, base_share: float | None) -> float | None:
    """The BM25 share the candidate is (or, rejected, would have been) served with: the one its round
    chose from the sweep on the logged questions (daemon.round_process writes it only on promotion),
    else the configured one."""
    from daemon.serving import served_bm25_weight
    from stages.fusion import RETRIEVAL_FILE
    from stages.round_steps import retrieval_choice

    metrics_file = candidate.parent / "metrics.json"
    if not (candidate / RETRIEVAL_FILE).exists() and metrics_file.exists():
        variants = json.loads(metrics_file.read_text()).get("variants", {})
        default = base_share if base_share is not None else 0.2
        choice = retrieval_choice(variants, candidate.name, default)
        if choice is not None and settings.index.bm25_weight == "auto":
            return float(choice["bm25_weight"])
    return served_bm25_weight(settings, candidate, conn)


# --- report ----------------------------------------------------------------------------------------
def gate_verdict(result: dict) -> str:
    if result["decision"] == "promoted":
        return "promoted"
    return f"rejected ({result['cause'] or result['state']})"


def evidence_text(result: dict) -> str:
    evidence = result["asked"].get("candidate")
    if not evidence:
        return "no asked evidence"
    return (
        f"{evidence['method']} {evidence['estimate']:+.4f} [{evidence['low']:+.4f}, {evidence['high']:+.4f}]"
        f" gold {evidence['gold']}/{evidence['questions']}"
    )


def print_rounds(name: str, rounds: list[dict]) -> None:
    print(f"\n{name}: rounds")
    print(
        f"{'#':<3} {'recipe':<28} {'gate':<38} {'asked evidence (candidate)':<46} "
        f"{'truth hybrid [95% CI]':<32} {'truth dense [95% CI]':<32} verdict"
    )
    for result in rounds:
        number = result["number"]
        recipe = result["recipe"]
        label = f"lr {recipe['learning_rate']:g} ep {recipe['epochs']:g} clicks {'on' if recipe['train_on_clicks'] else 'off'}"
        if "freeze_word_embeddings" in recipe:
            label += f" freeze {recipe['freeze_word_embeddings']}"
        truth = result.get("truth") or {}
        cells = []
        for key in ("hybrid", "dense"):
            value = truth.get(key)
            cells.append(
                f"{value['gain']:+.4f} [{value['ci95'][0]:+.4f}, {value['ci95'][1]:+.4f}]" if value else "-"
            )
        verdict = truth.get("hybrid", {}).get("verdict", "-")
        print(
            f"{number:<3} {label:<28} {gate_verdict(result):<38} {evidence_text(result):<46} "
            f"{cells[0]:<32} {cells[1]:<32} {verdict}"
        )


def confusion(rounds: list[dict]) -> dict[str, dict[str, int]]:
    table = {gate: {"gain": 0, "noise": 0, "loss": 0} for gate in ("promoted", "rejected")}
    for result in rounds:
        verdict = (result.get("truth") or {}).get("hybrid", {}).get("verdict")
        if verdict:
            table["promoted" if result["decision"] == "promoted" else "rejected"][verdict] += 1
    return table


def print_confusion(title: str, table: dict[str, dict[str, int]]) -> None:
    print(f"\n{title}: gate x truth (served hybrid, paired 95% CI on the truth queries)")
    print(f"{'':<10} {'gain':>6} {'noise':>6} {'loss':>6}")
    for gate, row in table.items():
        print(f"{gate:<10} {row['gain']:>6} {row['noise']:>6} {row['loss']:>6}")


# --- main ------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--documents", type=int, default=0, help="corpus subset size (0: whole corpus)")
    parser.add_argument("--asked-share", type=float, default=0.6)
    parser.add_argument("--truth-share", type=float, default=0.4)
    parser.add_argument("--click-share", type=float, default=0.7, help="share of answers with events")
    parser.add_argument(
        "--events",
        choices=("click", "cited"),
        default="click",
        help="click: the first relevant hit shown; cited: every relevant hit shown (a RAG reader's citations)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--recipes", help="run these rounds only (1-based numbers into the recipe cycle, e.g. 4,5)"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="with --work: reuse the state and query log an earlier run of the same command prepared",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", help="model.base (default: auto, chosen from the corpus language)")
    parser.add_argument("--max-pairs", type=int, default=200, help="training.max_pairs")
    parser.add_argument("--max-minutes", type=float, default=4.0, help="training.max_minutes")
    parser.add_argument("--asked-min-queries", type=int, default=30, help="promotion.asked_min_queries")
    parser.add_argument("--ppi-min-gold", type=int, default=50, help="promotion.ppi_min_gold")
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="train and merge on the product's defaults (learning rate, pairs, minutes, merges, clicks): "
        "--max-pairs, --max-minutes and the recipes' settings are not applied; only the rounds' seeds vary",
    )
    parser.add_argument("--work", type=Path, help="work folder, kept (default: a temporary one, removed)")
    parser.add_argument("--out", type=Path, help="write every number as JSON here")
    return parser


def main() -> int:
    from daemon.logs import configure_logging
    from daemon.serving import base_model_path, served_bm25_weight
    from daemon.settings import load_settings
    from state.db import connect
    from state.layout import StateLayout

    args = _parser().parse_args()
    configure_logging("warning", "console")
    started = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="embedtune-calibration-"))
    work.mkdir(parents=True, exist_ok=True)
    data, how = subset(Beir.read(args.dataset), args.documents, args.seed)
    data.write(work / "data")
    parts = split_queries(list(data.qrels), args.asked_share, args.truth_share, args.seed)
    data.write(work / "truth", parts["truth"])
    print(
        f"{args.dataset.name}: {len(data.corpus)} documents ({how}), {len(data.qrels)} queries with a "
        f"relevant document: asked {len(parts['asked'])}, truth {len(parts['truth'])}, "
        f"unused {len(parts['unused'])}",
        flush=True,
    )
    sections: dict[str, dict[str, Any]] = {
        "paths": {"inbox": str(work / "inbox"), "state_dir": str(work / "state")},
        "ingest": {"settle_seconds": 0.0, "rescan_minutes": 0.0},
        "training": {
            "min_new_samples": 10**9,  # no round while the daemon ingests: the bench starts them
            "max_pairs": args.max_pairs,
            "max_minutes": args.max_minutes,
        },
        "promotion": {
            "merge_weights": [],  # the candidate is the only variant, so it can be scored afterwards
            "asked_min_queries": args.asked_min_queries,
            "ppi_min_gold": args.ppi_min_gold,
        },
        "logging": {"level": "warning", "format": "console"},
    }
    if args.defaults:  # only what the bench needs: it starts the rounds itself
        sections["training"] = {"min_new_samples": 10**9}
        sections["promotion"] = {}
    if args.base:
        sections["model"] = {"base": args.base}
    config = write_config(work / "config.toml", sections)
    settings = load_settings(str(config))

    from bench.quality import write_inbox

    saved = work / "prepared.json"
    if args.reuse and saved.exists():  # the state and its query log from an earlier run of this command
        kept = json.loads(saved.read_text())
        prepared, asked = kept["prepared"], AskedLog(kept["asked_rows"], kept["asked_seconds"])
    else:
        documents = write_inbox(work / "data", settings.paths.inbox)
        prepared = ingest(settings, documents)
        print(f"ingested: {json.dumps(prepared)}", flush=True)
        asked = ask(config, data, parts["asked"], args.click_share, args.seed, args.events)
        saved.write_text(
            json.dumps({"prepared": prepared, "asked_rows": asked.rows, "asked_seconds": asked.seconds})
        )
    asked_summary = asked.summary(settings.query_log.judge_share)
    print(f"asked through /v1/search: {json.dumps(asked_summary)}", flush=True)

    conn = connect(StateLayout(settings.paths.state_dir).database)  # read only, for the base and shares
    base_path = base_model_path(settings, conn)
    base_share = served_bm25_weight(settings, base_path, conn)
    truth = Truth(work / "truth", settings)
    base_scores = truth.score(base_path, [base_share])
    print(
        f"base {base_path.name}: truth hybrid (share {_share_name(base_share)}) and dense scored", flush=True
    )

    rounds = []
    numbers = [int(n) for n in args.recipes.split(",")] if args.recipes else range(1, args.rounds + 1)
    for number in numbers:
        recipe = {} if args.defaults else RECIPES[(number - 1) % len(RECIPES)]
        folder = work / f"round-{number}"
        shutil.rmtree(folder, ignore_errors=True)
        result = run_round(settings, settings.paths.state_dir, folder, recipe, args.seed + number)
        result["number"] = number
        result["truth"] = truth_for_round(
            truth,
            base_scores,
            base_share,
            Path(result["candidate"]),
            lambda path: share_it_would_get(settings, path, conn, base_share),
        )
        rounds.append(result)
        print(
            f"round {number}: {gate_verdict(result)}; {evidence_text(result)}; truth "
            f"{json.dumps(result['truth'].get('hybrid'))}; {result['seconds']:.0f} s",
            flush=True,
        )
    print_rounds(args.dataset.name, rounds)
    table = confusion(rounds)
    print_confusion(args.dataset.name, table)
    import numpy as np

    report = {
        "dataset": args.dataset.name,
        "command": " ".join(["python -m bench.gate_calibration", *sys.argv[1:]]),
        "corpus": {"documents": len(data.corpus), "how": how, "queries": len(data.qrels)},
        "split": {name: len(ids) for name, ids in parts.items()},
        "settings": sections,
        "base": {"model": str(base_path), "bm25_share": _share_name(base_share)},
        "base_truth": {
            "hybrid": round(float(np.mean(base_scores["hybrid"][_share_name(base_share)])), 4),
            "dense": round(float(np.mean(base_scores["dense"])), 4),
        },
        "prepared": prepared,
        "asked": asked_summary,
        "asked_rows": asked.rows,
        "rounds": rounds,
        "confusion": table,
        "seconds": round(time.monotonic() - started, 1),
        "load_average": os.getloadavg(),
    }
    conn.close()
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    print(f"\ntotal {report['seconds']:.0f} s", flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
