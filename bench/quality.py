"""Quality on real queries: run the pipeline on a BEIR-format corpus and score the models it produced on
the dataset's human-written queries (which the pipeline never sees).

The corpus is written into a fresh inbox as documents (title as a markdown heading), the daemon ingests,
synthesizes (embedded defaults: no LLM) and filters, one round runs to a decision, and the base, candidate,
merged and promoted models are scored on the real queries against the whole corpus. It also prints what
the gate saw on each of its sets.

    python -m bench.quality ../shared/data/dbpedia-5k [--pseudo-method heading] [--max-pairs 1000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def write_inbox(dataset: Path, inbox: Path) -> int:
    """Each corpus document as <id>.md (the title as a heading): `embedtune eval --mode` maps what the
    index serves back to the ids by these names."""
    from stages.evalsets import document_stem

    inbox.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(dataset / "corpus.jsonl", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            title = (row.get("title") or "").strip().replace("\n", " ")
            safe_id = document_stem(row["_id"])
            body = f"# {title}\n\n{row['text']}\n" if title else f"{row['text']}\n"
            (inbox / f"{safe_id}.md").write_text(body, encoding="utf-8")
            count += 1
    return count


def score(model_path: Path, eval_set, params) -> dict:
    """The gate's own evaluator and encoder (query instruction included) on the real queries."""
    from stages.encoder import Encoder
    from stages.evaluate import RetrievalEvaluator

    return RetrievalEvaluator(eval_set, "ndcg@10")(Encoder(model_path, params))


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def main() -> int:
    from daemon.logs import configure_logging
    from daemon.round_scheduler import RoundScheduler
    from daemon.service import Daemon
    from daemon.serving import base_model_path
    from daemon.settings import load_settings
    from stages.evalsets import load_beir
    from stages.merge import merge_with_base
    from state.db import connect
    from state.pipeline_progress import pipeline_progress
    from state.round_records import RoundStore
    from state.samples import SampleStore

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--config", help="start from this config instead of the embedded defaults")
    parser.add_argument("--pseudo-method", choices=["heading", "inverse_cloze", "span", "keyphrase"])
    parser.add_argument("--pseudo-per-chunk", type=int)
    parser.add_argument("--teacher", help="model.teacher: hybrid, none, a model folder or an ensemble")
    parser.add_argument("--loss", help="training.loss, e.g. mnrl, margin_mse, mnrl+margin_mse, kl")
    parser.add_argument("--label-repair", choices=["relabel", "drop", "none"])
    parser.add_argument("--max-pairs", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--hard-negatives", type=int)
    parser.add_argument("--featured-percentage", type=float)
    parser.add_argument("--keep", type=Path, help="keep the state folder here")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    configure_logging("warning", "console")
    settings = load_settings(args.config)
    work = Path(tempfile.mkdtemp(prefix="embedtune-quality-"))
    settings.paths.inbox = work / "inbox"
    settings.paths.state_dir = work / "state"
    settings.ingest.settle_seconds = 0.0
    settings.ingest.rescan_minutes = 0.0
    settings.training.min_new_samples = 10**9
    for value, section, key in (
        (args.pseudo_method, "synthesis", "pseudo_method"),
        (args.pseudo_per_chunk, "synthesis", "pseudo_per_chunk"),
        (args.teacher, "model", "teacher"),
        (args.loss, "training", "loss"),
        (args.label_repair, "training", "label_repair"),
        (args.max_pairs, "training", "max_pairs"),
        (args.learning_rate, "training", "learning_rate"),
        (args.epochs, "training", "epochs"),
        (args.hard_negatives, "training", "hard_negatives"),
        (args.featured_percentage, "synthesis", "featured_percentage"),
    ):
        if value is not None:
            setattr(getattr(settings, section), key, value)
    started = time.monotonic()
    documents = write_inbox(args.dataset, settings.paths.inbox)
    daemon = Daemon(settings)
    daemon.start()
    conn = connect(daemon.layout.database)
    try:
        while True:
            daemon.heartbeat()
            progress = pipeline_progress(conn)
            if (
                progress.documents_done >= documents
                and not progress.busy_jobs
                and not len(daemon.watcher.tracker)
            ):
                break
            time.sleep(1.0)
        prepared = time.monotonic() - started
        samples = SampleStore(conn)
        funnel = {1: samples.kept_count(), 0: samples.dropped_count()}
        manager = RoundScheduler(daemon.settings, daemon.layout)
        round_id = manager.start(conn, "bench")
        manager.wait(conn)
        row = RoundStore(conn).get(round_id)
    finally:
        daemon.stop_requested.set()
        daemon.shutdown()
    if row["state"] != "finished":
        print(f"round {round_id} {row['state']}: {row['error']}")
        print((daemon.layout.round_dir(round_id) / "child.log").read_text()[-3000:])
        return 1
    round_dir = daemon.layout.round_dir(round_id)
    metrics = json.loads((round_dir / "metrics.json").read_text())
    base_path = base_model_path(settings)
    real = load_beir(args.dataset, name="real")
    variants = {"base": base_path, "candidate": round_dir / "candidate"}
    for weight in settings.promotion.merge_weights:
        variants[f"merged-{weight:g}"] = merge_with_base(
            round_dir / "candidate", base_path, weight, round_dir / f"bench-merged-{weight:g}"
        )
    from daemon.step_params import encode_params
    from stages.gate import paired_bootstrap

    scored = {name: score(path, real, encode_params(settings)) for name, path in variants.items()}
    results = {name: result.metrics for name, result in scored.items()}
    real_ci = {
        name: paired_bootstrap(result.per_query["ndcg@10"], scored["base"].per_query["ndcg@10"])
        for name, result in scored.items()
        if name != "base"
    }
    promoted = row["decision"] == "promoted"
    served = metrics["best"] if promoted else "base"
    results["promoted" if promoted else "served (base kept)"] = results[served]
    print(
        f"\n{args.dataset.name}: {documents} documents, {len(real)} real queries; pseudo method "
        f"{settings.synthesis.pseudo_method}; samples kept/dropped {funnel.get(1, 0)}/{funnel.get(0, 0)}; "
        f"train pairs {row['n_train']}, held-out queries {row['n_heldout']}; "
        f"prep {prepared:.0f}s, total {time.monotonic() - started:.0f}s"
    )
    print(
        f"{'model':<22} {'real nDCG@10':>12} {'95% CI vs base':>18} {'real R@10':>10}   "
        f"gate sets ({settings.promotion.metric})"
    )
    for name, values in results.items():
        gate = metrics["variants"].get("current" if name == "base" else name, {})
        gate_text = "  ".join(
            f"{set_name} {v.get(settings.promotion.metric, 0):.4f}" for set_name, v in gate.items()
        )
        ci = real_ci.get(name)
        ci_text = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
        print(
            f"{name:<22} {values['ndcg@10']:>12.4f} {ci_text:>18} {values['recall@10']:>10.4f}   {gate_text}"
        )
    print(f"decision: {row['decision']} - {row['reason']}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "dataset": args.dataset.name,
                    "method": settings.synthesis.pseudo_method,
                    "real": results,
                    "real_ci_vs_base": real_ci,
                    "gate": metrics["variants"],
                    "gate_interval": metrics["interval"],
                    "decision": row["decision"],
                    "reason": row["reason"],
                    "n_train": row["n_train"],
                    "n_heldout": row["n_heldout"],
                    "teacher": settings.model.teacher,
                    "loss": settings.training.loss,
                    "labels": _read_json(round_dir / "labels.json"),
                    "train": metrics.get("train"),
                    "seconds": {"prepare": round(prepared), "total": round(time.monotonic() - started)},
                },
                indent=1,
            )
        )
    if args.keep:
        shutil.copytree(work, args.keep, symlinks=True, dirs_exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
