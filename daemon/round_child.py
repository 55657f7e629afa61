"""One training round, run in a child process: snapshot, negatives, train, evaluate, merge, decide.

The daemon starts it with `python -m daemon.round_child`; an OOM, a CUDA fault or a SIGKILL here cannot
take the daemon down, and the model in service changes only through the registry's atomic promotion.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from daemon.logs import configure_logging, get_logger
from daemon.settings import Settings
from stages.embed_cache import text_key
from state.db import Database
from state.layout import StateLayout
from state.registry import ModelRegistry
from state.rounds import RoundStore

log = get_logger("embedtune.round")


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


class Encoder:
    """Encodes with one model; chunk vectors go through the embedding cache when one is given."""

    def __init__(self, path: Path, settings: Settings, cache_root: Path | None) -> None:
        from stages.embed_cache import EmbeddingCache, model_key
        from stages.models import load_embedder

        self.path = path
        self.model = load_embedder(path, settings.model.device)
        self.instruction = settings.model.query_instruction
        self.batch = settings.model.encode_batch_size
        self.cache = EmbeddingCache(cache_root, model_key(path))

    def queries(self, texts: list[str]):
        return self.model.encode([self.instruction + t for t in texts], batch_size=self.batch,
                                 normalize_embeddings=True, convert_to_numpy=True)

    def passages(self, keys: list[str], texts: list[str]):
        vectors = self.cache.get_many(keys, texts, lambda missing: self.model.encode(
            missing, batch_size=self.batch, normalize_embeddings=True, convert_to_numpy=True))
        self.cache.save()
        return vectors

    def release(self) -> None:
        del self.model


def structure_set(corpus, name: str = "structure"):
    """Document-structure queries: headings of held-out documents as queries for the text under them."""
    from stages.evalsets import EvalSet

    groups: dict[tuple[int, str], list[int]] = {}
    for index, chunk in enumerate(corpus):
        if chunk["split"] == "heldout" and chunk["heading"]:
            groups.setdefault((chunk["document_id"], chunk["heading"]), []).append(index)
    queries, relevant = [], []
    for (_doc, heading), members in sorted(groups.items()):
        query = heading.split(" > ")[-1].strip()
        if len(query) >= 3:
            queries.append(query)
            relevant.append({m: 1.0 for m in members})
    texts = [c["text"] for c in corpus]
    return EvalSet(name, queries, texts, relevant, [text_key(t) for t in texts])


def run_round(settings: Settings, layout: StateLayout, round_id: int) -> str:
    from stages.evalsets import EvalSet, load_eval_file
    from stages.evaluate import evaluate_retrieval
    from stages.models import resolve_model_path
    from stages.negatives import build_index, mine_hard_negatives
    from stages.promote import decide, paired_bootstrap
    from stages.train import TrainParams, train_model

    db = Database(layout.database)
    conn = db.conn
    rounds = RoundStore(conn)
    registry = ModelRegistry(conn, layout)
    folder = layout.round_dir(round_id)
    folder.mkdir(parents=True, exist_ok=True)
    metric = settings.promotion.metric
    started = time.monotonic()

    def stage(name: str, **progress) -> None:
        rounds.set_stage(round_id, name, elapsed_s=round(time.monotonic() - started, 1), **progress)
        log.info("round_stage", round_id=round_id, stage=name, **progress)

    # --- snapshot ---------------------------------------------------------------------------------
    stage("snapshot")
    base_path = resolve_model_path(settings.model.base)
    current = registry.current()
    current_path = current.path if current else base_path
    init_path = current_path if settings.training.init == "current" else base_path
    corpus = conn.execute(
        "SELECT id, document_id, text, heading, sha256, split FROM chunks WHERE active=1 ORDER BY id"
    ).fetchall()
    train_rows, heldout_rows = rounds.snapshot_rows(settings.training.max_pairs)
    corpus_index = {chunk["id"]: i for i, chunk in enumerate(corpus)}
    heldout_rows = [row for row in heldout_rows if row["chunk_id"] in corpus_index]
    _write_jsonl(folder / "corpus.jsonl", ({"chunk_id": c["id"], "sha256": c["sha256"], "split": c["split"],
                                            "heading": c["heading"], "text": c["text"]} for c in corpus))
    _write_jsonl(folder / "heldout.jsonl", ({"sample_id": r["id"], "query": r["query"], "chunk_id": r["chunk_id"],
                                             "kind": r["kind"]} for r in heldout_rows))
    rounds.update(round_id, n_train=len(train_rows), n_heldout=len(heldout_rows),
                  base_model=str(base_path))
    if len(train_rows) < 2:
        rounds.finish(round_id, "rejected", "not enough kept training samples", None, [])
        return "rejected"
    if not heldout_rows:
        rounds.finish(round_id, "rejected", "no held-out queries yet (need a held-out document with kept samples)",
                      None, [])
        return "rejected"

    # --- negatives --------------------------------------------------------------------------------
    stage("negatives", queries=len(train_rows), corpus=len(corpus))
    serving = Encoder(current_path, settings, layout.cache)
    corpus_texts = [c["text"] for c in corpus]
    corpus_keys = [text_key(t) for t in corpus_texts]
    corpus_vectors = serving.passages(corpus_keys, corpus_texts)
    examples = []
    if settings.training.hard_negatives > 0 and len(corpus) > 2:
        query_vectors = serving.queries([r["query"] for r in train_rows])
        positive_vectors = serving.model.encode([r["passage"] for r in train_rows],
                                                batch_size=serving.batch, normalize_embeddings=True,
                                                convert_to_numpy=True)
        mined = mine_hard_negatives(
            query_vectors, [{corpus_index.get(r["chunk_id"], -1)} for r in train_rows], positive_vectors,
            build_index(corpus_vectors), settings.training.hard_negatives,
            tuple(settings.training.negative_range), settings.training.negative_margin, settings.training.seed,
        )
    else:
        mined = None
    for i, row in enumerate(train_rows):
        negatives = [corpus_texts[j] for j in mined[i].negatives] if mined else []
        examples.append({
            "query": row["query"], "pos": row["passage"], "neg": negatives, "sample_id": row["id"],
            "pos_score": mined[i].positive_score if mined else None,
            "neg_scores": mined[i].negative_scores if mined else [],
        })
    _write_jsonl(folder / "train.jsonl", examples)

    # --- train ------------------------------------------------------------------------------------
    training = settings.training
    params = TrainParams(
        epochs=training.epochs, batch_size=training.batch_size, learning_rate=training.learning_rate,
        warmup_ratio=training.warmup_ratio, temperature=training.temperature, cached_batch=training.cached_batch,
        precision=training.precision, gradient_checkpointing=training.gradient_checkpointing,
        max_minutes=training.max_minutes, query_instruction=settings.model.query_instruction,
        seed=training.seed, device=settings.model.device,
    )
    stage("train", step=0, total=0)

    def progress(step: int, total: int, loss: float | None) -> None:
        rounds.set_stage(round_id, "train", step=step, total=total, loss=loss,
                         elapsed_s=round(time.monotonic() - started, 1))

    candidate_dir = folder / "candidate"
    outcome = train_model(init_path, candidate_dir, examples, params, progress)
    (folder / "train_outcome.json").write_text(json.dumps(outcome.__dict__, indent=2))
    if outcome.steps == 0:
        rounds.finish(round_id, "rejected", "training ran no step (too few distinct pairs for one batch)",
                      None, [])
        return "rejected"

    # --- evaluate ---------------------------------------------------------------------------------
    stage("evaluate")
    sets: list[EvalSet] = [EvalSet(
        "heldout", [r["query"] for r in heldout_rows], corpus_texts,
        [{corpus_index[r["chunk_id"]]: 1.0} for r in heldout_rows], corpus_keys,
    )]
    structure = structure_set(corpus)
    if len(structure) >= 3 and (settings.llm.enabled or settings.synthesis.pseudo_method != "heading"):
        sets.append(structure)
    if settings.promotion.user_eval:
        sets.append(load_eval_file(settings.promotion.user_eval, settings.promotion.user_eval_query_key,
                                   settings.promotion.user_eval_positive_key, "user", corpus_texts))
    if settings.promotion.guard_eval:
        sets.append(load_eval_file(settings.promotion.guard_eval, name="guard"))

    def evaluate_model(encoder: Encoder) -> dict[str, dict]:
        out = {}
        for eval_set in sets:
            if eval_set.name == "heldout":
                passages = corpus_vectors if encoder is serving else encoder.passages(corpus_keys, corpus_texts)
            else:
                passages = encoder.passages(eval_set.corpus_keys, eval_set.corpus_texts)
            out[eval_set.name] = evaluate_retrieval(encoder.queries(eval_set.queries), passages,
                                                    eval_set.relevant)
        return out

    results = {"current": evaluate_model(serving)}
    serving.release()
    candidate = Encoder(candidate_dir, settings, None)
    results["candidate"] = evaluate_model(candidate)
    candidate.release()

    # --- merge ------------------------------------------------------------------------------------
    from stages.merge import merge_with_base, merge_with_data

    variant_dirs = {"candidate": candidate_dir}
    for weight in settings.promotion.merge_weights:
        stage("merge", weight=weight)
        name = f"merged-{weight:g}"
        try:
            merged_dir = merge_with_base(candidate_dir, base_path, weight, folder / name)
        except Exception as exc:  # a merge failure must not cost the candidate
            log.warning("merge_failed", weight=weight, error=str(exc))
            continue
        encoder = Encoder(merged_dir, settings, None)
        results[name] = evaluate_model(encoder)
        encoder.release()
        variant_dirs[name] = merged_dir
    if settings.promotion.merge_with_data:
        stage("merge", method="with_data")
        try:
            merged_dir, weights = merge_with_data(candidate_dir, base_path, examples, folder / "merged-data",
                                                  neg_number=max(1, min(3, training.hard_negatives)))
            encoder = Encoder(merged_dir, settings, None)
            results["merged-data"] = evaluate_model(encoder)
            encoder.release()
            variant_dirs["merged-data"] = merged_dir
        except Exception as exc:
            log.warning("merge_with_data_failed", error=str(exc))

    # --- decide -----------------------------------------------------------------------------------
    stage("decide")
    scores = {variant: {name: r.metrics[metric] for name, r in per_set.items() if r.n_queries}
              for variant, per_set in results.items()}
    per_query = {variant: {name: r.per_query.get(metric, []) for name, r in per_set.items()}
                 for variant, per_set in results.items()}
    (folder / "per_query.json").write_text(json.dumps(per_query))
    intervals = {variant: paired_bootstrap(per_query[variant]["heldout"], per_query["current"]["heldout"],
                                           settings.promotion.bootstrap_samples, settings.training.seed)
                 for variant in per_query if variant != "current"}
    decision = decide(scores, metric, settings.promotion.min_gain, settings.promotion.human_tolerance,
                      settings.promotion.max_guard_drop, intervals=intervals,
                      synthetic_only_min_gain=settings.promotion.synthetic_only_min_gain)
    table = {variant: {name: r.to_json() for name, r in per_set.items()} for variant, per_set in results.items()}
    best = decision.variant or max((v for v in scores if v != "current"),
                                   key=lambda v: scores[v].get("heldout", 0.0))
    interval = intervals.get(best)
    reason = decision.reason
    if interval:
        reason += f" (95% CI of held-out gain for {best}: [{interval[0]:+.4f}, {interval[1]:+.4f}])"
    merged_table = {k: v for k, v in table.items() if k.startswith("merged")}
    metrics_doc = {"metric": metric, "variants": table, "gains": decision.gains, "interval": interval,
                   "best": best, "train": outcome.__dict__}
    (folder / "metrics.json").write_text(json.dumps(metrics_doc, indent=2))
    rounds.update(round_id, candidate_metrics=table["candidate"], merged_metrics=merged_table,
                  current_metrics=table["current"], eval_sets={"sets": [s.name for s in sets],
                                                               "gains": decision.gains, "interval": interval,
                                                               "best": best})
    model_id = None
    if decision.promote:
        record = registry.register(variant_dirs[decision.variant], round_id=round_id,
                                   parent_id=current.id if current else None,
                                   metrics={"variant": decision.variant, **table[decision.variant]["heldout"]})
        registry.promote(record.id, note=f"round {round_id}")
        model_id = record.id
        run_on_promote(settings.promotion.on_promote, layout.current, table[decision.variant])
    rounds.finish(round_id, "promoted" if decision.promote else "rejected", reason, model_id,
                  [e["sample_id"] for e in examples])
    for name, path in variant_dirs.items():
        if name != "candidate":
            shutil.rmtree(path, ignore_errors=True)  # keep the candidate for audit; merges are reproducible
    log.info("round_finished", round_id=round_id, decision="promoted" if decision.promote else "rejected",
             reason=reason)
    return "promoted" if decision.promote else "rejected"


def run_on_promote(command: str, model_path: Path, metrics: dict) -> None:
    if not command:
        return
    env = dict(os.environ, EMBEDTUNE_MODEL_PATH=str(model_path), EMBEDTUNE_METRICS=json.dumps(metrics))
    try:
        result = subprocess.run(command, shell=True, env=env, timeout=600, capture_output=True, text=True)
        log.info("on_promote_ran", returncode=result.returncode, stderr=result.stderr[-500:])
    except subprocess.TimeoutExpired:
        log.error("on_promote_timeout", command=command)


def _quiet_libraries() -> None:
    """Progress bars belong to interactive use; the round's log should hold our own lines."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run one embedtune training round")
    parser.add_argument("--settings", required=True, help="settings JSON written by the daemon")
    parser.add_argument("--round-id", type=int, required=True)
    args = parser.parse_args(argv)
    settings = Settings.model_validate(json.loads(Path(args.settings).read_text()))
    _quiet_libraries()
    configure_logging(settings.logging.level, settings.logging.format)
    layout = StateLayout(settings.paths.state_dir)
    try:
        run_round(settings, layout, args.round_id)
    except Exception as exc:
        log.exception("round_failed", round_id=args.round_id)
        db = Database(layout.database)
        RoundStore(db.conn).abort(args.round_id, f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
