"""`embedtune once`: the classic one-off fine-tuning script as one foreground run of the same stages.

Ingests a documents folder, synthesizes and filters pairs, then runs up to --max-iterations rounds over
successive slices of the kept pairs (each round takes the pairs no earlier round used), stopping early
once the gain over the base model reaches --increase-rate. Progress bars while it works, a summary table
at the end, and the model in service copied to --output.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

from daemon.settings import Settings


def add_once_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--documents", required=True, help="folder of documents (read recursively)")
    parser.add_argument("--output", default="embedtune-output", help="where the final model and state go")
    parser.add_argument("--dataset-output", help="also write the kept pairs as FlagEmbedding JSON lines here")
    parser.add_argument(
        "--llm-url", help="OpenAI-compatible endpoint (default: config llm.url; empty = no LLM)"
    )
    parser.add_argument("--llm-model", help="model name for the endpoint")
    parser.add_argument("--embedding-model", help="base embedding model folder (or packaged:...)")
    parser.add_argument("--reranker-model", help="cross-encoder folder used by the filter")
    parser.add_argument("--featured-percentage", type=float)
    parser.add_argument("--judge-threshold", type=float)
    parser.add_argument("--questions-per-chunk", type=int)
    parser.add_argument("--rewrites", type=int, help="rewrites per question")
    parser.add_argument("--eval-data", help="your evaluation file (anchor/positive lines or RAG JSON)")
    parser.add_argument("--max-iterations", type=int, default=1, help="rounds at most")
    parser.add_argument(
        "--increase-rate",
        type=float,
        default=0.0,
        help="stop once the model beats the base by this much on the gate metric",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def once_settings(settings: Settings, args: argparse.Namespace) -> Settings:
    data = settings.model_dump(mode="json")
    output = Path(args.output).resolve()
    data["paths"] = {"inbox": str(Path(args.documents).resolve()), "state_dir": str(output / "state")}
    data["ingest"]["settle_seconds"] = 0.0
    data["ingest"]["rescan_minutes"] = 0.0
    data["training"]["min_new_samples"] = 10**9  # rounds are started here, not by the scheduler
    overrides = {
        ("llm", "url"): args.llm_url,
        ("llm", "model"): args.llm_model,
        ("model", "base"): args.embedding_model,
        ("model", "reranker"): args.reranker_model,
        ("synthesis", "featured_percentage"): args.featured_percentage,
        ("synthesis", "judge_threshold"): args.judge_threshold,
        ("synthesis", "questions_per_chunk"): args.questions_per_chunk,
        ("synthesis", "rewrites_per_question"): args.rewrites,
        ("promotion", "user_eval"): args.eval_data,
    }
    for (section, key), value in overrides.items():
        if value is not None:
            data[section][key] = value
    return Settings.model_validate(data)


def _bars(enabled: bool):
    from tqdm import tqdm

    names = ("documents", "chunks synthesized", "pairs filtered")
    return {name: tqdm(desc=name, unit="", disable=not enabled, leave=True) for name in names}


def run_once(settings: Settings, args: argparse.Namespace) -> int:
    from daemon.service import Daemon
    from state.db import connect

    settings = once_settings(settings, args)
    documents = Path(args.documents)
    if not documents.is_dir():
        print(f"embedtune: {documents} is not a folder")
        return 2
    daemon = Daemon(settings)
    daemon.start()
    conn = connect(daemon.layout.database)
    try:
        _wait_until_prepared(daemon, conn, _bars(not args.no_progress))
        daemon.watcher.stop()
        summary = _run_rounds(daemon, conn, args)
        _print_summary(summary, settings.promotion.metric)
        _write_outputs(settings, daemon, conn, args)
    finally:
        daemon.stop_requested.set()
        daemon.shutdown()
    return 0


def _wait_until_prepared(daemon, conn, bars) -> None:
    """Ingest, synthesis and filter, with a bar each, until no job is left and no file is settling."""
    from state.pipeline_progress import pipeline_progress

    quiet_since = None
    while True:
        daemon.heartbeat()
        now = pipeline_progress(conn)
        for bar, (done, total) in zip(
            bars.values(),
            (
                (now.documents_done, now.documents_total),
                (now.synthesized, now.synthesize_jobs),
                (now.filtered, now.samples),
            ),
            strict=True,
        ):
            bar.total = total
            bar.n = done
            bar.refresh()
        busy = now.busy_jobs or len(daemon.watcher.tracker)
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 1.0:
            break
        time.sleep(0.3)
    for bar in bars.values():
        bar.close()


def _run_rounds(daemon, conn, args: argparse.Namespace) -> list[tuple]:
    """Up to --max-iterations rounds over the kept pairs, each from the model the last one left; stops
    early at --increase-rate or when no unused pair is left. One summary row per round."""
    from daemon.round_scheduler import RoundScheduler
    from state.round_records import RoundOutcome, RoundStore
    from state.samples import SampleStore

    settings = daemon.settings
    kept = SampleStore(conn).kept_train_count()
    iterations = max(1, args.max_iterations)
    daemon.rounds.settings.training.max_pairs = max(2, math.ceil(kept / iterations))
    manager = RoundScheduler(daemon.rounds.settings, daemon.layout)
    base_score = None
    metric = settings.promotion.metric
    summary = []
    for iteration in range(iterations):
        if iteration:
            manager.settings.training.init = "current"
        round_id = manager.start(conn, "once")
        print(f"round {round_id} ({iteration + 1}/{iterations}) ...", flush=True)
        manager.wait(conn)
        row = RoundStore(conn).get(round_id)
        current = json.loads(row["current_metrics"] or "{}").get("heldout", {})
        if base_score is None and current:
            base_score = current.get(metric)
        best = {}
        if row["eval_sets"]:
            best_name = json.loads(row["eval_sets"]).get("best")
            variants = {
                "candidate": json.loads(row["candidate_metrics"] or "{}"),
                **json.loads(row["merged_metrics"] or "{}"),
            }
            best = variants.get(best_name, {}).get("heldout", {})
        summary.append(
            (
                round_id,
                row["state"],
                row["decision"] or "-",
                current.get(metric),
                best.get(metric),
                row["reason"] or row["error"] or "",
            )
        )
        if (
            row["decision"] == RoundOutcome.PROMOTED
            and base_score is not None
            and best.get(metric) is not None
        ):
            if best[metric] - base_score >= args.increase_rate > 0:
                print(f"gain over the base reached --increase-rate ({args.increase_rate}); stopping")
                break
        if SampleStore(conn).unused_train_count() < 2:
            break
    return summary


def _write_outputs(settings: Settings, daemon, conn, args: argparse.Namespace) -> None:
    """The promoted model (if any) into --output, the index on the final model, the dataset export."""
    from state.registry import ModelRegistry

    output = Path(args.output).resolve()
    if ModelRegistry(conn, daemon.layout).current() is not None:
        target = output / "model"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(daemon.layout.current.resolve(), target)
        print(f"model in service copied to {target}")
    else:
        print("no round promoted a model; the base model stays the best one")
    if settings.index.enabled:
        _sync_index(settings, daemon.layout, conn, show_progress=not args.no_progress)
    if args.dataset_output:
        from daemon.exports import export

        export(settings, "flagembedding", Path(args.dataset_output))


def _sync_index(settings: Settings, layout, conn, show_progress: bool) -> None:
    """Leave the vector store serving the final model, as the daemon would after a promotion."""
    from daemon.indexing import IndexService
    from state.vector_store import IndexUnavailable

    try:
        report = IndexService(settings, layout, show_progress=show_progress and None).sync(conn)
    except IndexUnavailable as exc:
        print(f"embedtune: the index was not updated: {exc}")
        return
    print(
        f"index alias {settings.index.alias} -> {report.collection} "
        f"({report.chunks} chunks embedded by the {report.version} model)"
    )


def _print_summary(rows, metric: str) -> None:
    print()
    print(
        f"{'round':>5}  {'state':<9} {'decision':<9} {'served ' + metric:>16} {'best ' + metric:>14}  reason"
    )
    for round_id, state, decision, served, best, reason in rows:
        served_text = f"{served:.4f}" if served is not None else "-"
        best_text = f"{best:.4f}" if best is not None else "-"
        print(f"{round_id:>5}  {state:<9} {decision:<9} {served_text:>16} {best_text:>14}  {reason[:100]}")
