"""One training round, run in a child process: the steps of stages/round_steps.py in order.

The daemon starts it with `python -m daemon.round_process`; an OOM, a CUDA fault or a SIGKILL here cannot
take the daemon down, and the model in service changes only through the registry's atomic promotion.
This module sequences the steps and records progress and outcome; daemon/step_params.py turns settings
into each step's parameters; the work itself is in stages/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.asked_round import asked_set_for, read_logged, with_clicked_pairs
from daemon.child_process import die_with_parent
from daemon.logs import configure_logging, get_logger
from daemon.onnx_jobs import remove_version_export
from daemon.settings import Settings
from daemon.step_params import (
    eval_plan,
    gate_params,
    label_params,
    merge_params,
    negative_params,
    torch_encode_params,
    train_params,
)
from state.db import Database
from state.layout import StateLayout
from state.registry import ModelRegistry
from state.round_records import RoundOutcome, RoundStore

log = get_logger("embedtune.round")
HOOK_TIMEOUT_S = 600


class RoundProgress:
    """Stage and progress lines for `status` and the log, and each step's cost: when a step ends, its
    wall time and its own peak resident memory go to `steps.json` in the round folder (rewritten per
    step, so a killed round keeps what it measured) and to the log."""

    def __init__(self, records: RoundStore, round_id: int, folder: Path | None = None) -> None:
        self.records = records
        self.round_id = round_id
        self.started = time.monotonic()
        self.folder = folder
        self.steps: list[dict] = []
        self._current: tuple[str, float] | None = None

    def stage(self, name: str, **progress) -> None:
        self._close_step()
        self._current = (name, time.monotonic())
        reset_peak_rss()
        self.records.set_stage(self.round_id, name, elapsed_s=self.elapsed(), **progress)
        log.info("round_stage", round_id=self.round_id, stage=name, **progress)

    def training(self, step: int, total: int, loss: float | None) -> None:
        self.records.set_stage(
            self.round_id, "train", step=step, total=total, loss=loss, elapsed_s=self.elapsed()
        )

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def finish(self) -> None:
        self._close_step()

    def _close_step(self) -> None:
        if self._current is None:
            return
        name, started = self._current
        self._current = None
        step = {"step": name, "seconds": round(time.monotonic() - started, 2), "peak_rss_mb": peak_rss_mb()}
        self.steps.append(step)
        log.info("round_step_finished", round_id=self.round_id, **step)
        if self.folder is not None:
            (self.folder / "steps.json").write_text(json.dumps(self.steps, indent=1))
        self.records.update(self.round_id, steps=self.steps)


def reset_peak_rss() -> None:
    """Start a new high-water mark for this process (Linux: writing 5 to clear_refs resets VmHWM), so
    each step reports its own peak rather than the round's so far."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not permitted: the peak then includes earlier steps


def peak_rss_mb() -> int:
    """VmHWM since the last reset; the process's lifetime peak where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


@dataclass
class JudgedRound:
    """What a round's steps produced, for recording and promotion."""

    verdict: Any
    current: Any  # the registry record the round was judged against (None: the base model)
    plan: Any
    sets: list
    set_names: list[str]
    variant_dirs: dict[str, Path]
    used: list[int]  # the training samples the round consumed
    corpus: int
    pool: int | None


def run_round(settings: Settings, layout: StateLayout, round_id: int) -> RoundOutcome:
    from stages.round_steps import RoundRejected

    db = Database(layout.database)
    records = RoundStore(db.conn)
    registry = ModelRegistry(db.conn, layout)
    folder = layout.round_dir(round_id)
    folder.mkdir(parents=True, exist_ok=True)
    progress = RoundProgress(records, round_id, folder)
    try:
        judged = judge_round(settings, layout, db, registry, round_id, folder, progress)
    except RoundRejected as rejected:
        records.finish(round_id, RoundOutcome.REJECTED, rejected.reason, None, [], cause=rejected.cause.value)
        log.info(
            "round_finished",
            round_id=round_id,
            decision=RoundOutcome.REJECTED.value,
            cause=rejected.cause.value,
        )
        return RoundOutcome.REJECTED
    finally:
        progress.finish()  # the last step's cost, also when it failed
    return settle_round(settings, layout, registry, records, round_id, judged)


def judge_round(
    settings: Settings,
    layout: StateLayout,
    db: Database,
    registry: ModelRegistry,
    round_id: int,
    folder: Path,
    progress: RoundProgress,
) -> JudgedRound:
    """snapshot -> negatives -> (labels) -> train -> evaluate -> merge -> decide; raises RoundRejected."""
    from daemon.serving import base_model_path, resolve_served
    from stages.encoder import Encoder
    from stages.round_steps import (
        CURRENT,
        build_evaluators,
        decide_round,
        evaluate_variant,
        evaluation_pool,
        mine_negatives,
        snapshot_sets,
        take_snapshot,
        train_candidate,
    )

    records = progress.records
    base_path = base_model_path(settings, registry.conn)
    current = registry.current()
    serving_path = resolve_served(registry.conn, settings, layout, convert=True).folder()
    init_path = serving_path if settings.training.init == "current" else base_path
    encode = torch_encode_params(settings)
    progress.stage("snapshot")
    inputs = records.inputs(settings.training.max_pairs, settings.promotion.heldout_queries)
    logged = read_logged(settings, db, inputs)
    snapshot = take_snapshot(with_clicked_pairs(settings, inputs, logged, folder), folder)
    asked = asked_set_for(settings, logged, snapshot)
    records.update(
        round_id, n_train=len(snapshot.train), n_heldout=len(snapshot.heldout), base_model=str(base_path)
    )

    progress.stage("negatives", queries=len(snapshot.train), corpus=len(snapshot.corpus))
    serving = Encoder(serving_path, encode, layout.cache)
    with_teacher = settings.model.teacher != "none"
    mined = mine_negatives(
        snapshot,
        serving,
        negative_params(settings, with_teacher),
        None if with_teacher else folder,
        preferred=logged.skipped,
    )
    examples = mined.examples
    if with_teacher:
        examples = label_round(
            settings, layout, db, snapshot, serving, mined, base_path, progress, folder, logged.skipped
        )

    progress.stage("train", step=0, total=0)
    trained = train_candidate(
        init_path, folder, examples, train_params(settings), progress.training, trainer_for(settings)
    )

    progress.stage("evaluate")
    plan = eval_plan(settings, serving_path)
    sets = snapshot_sets(snapshot, plan)
    pool = evaluation_pool([*sets, *([asked.eval_set] if asked else [])], plan, serving, mined.corpus_vectors)
    evaluators = build_evaluators(sets, plan, pool)
    ranker = asked_ranker(asked, plan, pool) if asked else None
    if ranker is not None:
        evaluators.append(ranker)
    serving_vectors = mined.corpus_vectors if pool is None else mined.corpus_vectors[pool]
    results = {CURRENT: evaluate_variant(serving, evaluators, serving_vectors)}
    serving.release()
    variant_dirs = evaluate_variants(settings, folder, base_path, examples, evaluators, progress, results)
    if ranker is not None:
        progress.stage("judge_asked", questions=len(ranker.asked), gold=ranker.asked.gold_count)
        same_base = Path(serving_path) == Path(base_path)
        base_vectors = mined.corpus_vectors if same_base else None
        judge_asked(settings, layout, db, snapshot, base_path, base_vectors, ranker, results)

    progress.stage("decide")
    return JudgedRound(
        verdict=decide_round(results, gate_params(settings), folder, trained),
        current=current,
        plan=plan,
        sets=sets,
        set_names=list(dict.fromkeys(name for per_set in results.values() for name in per_set)),
        variant_dirs=variant_dirs,
        used=[s.id for s in snapshot.train if s.id > 0],  # clicked pairs are not sample rows
        corpus=len(snapshot.texts),
        pool=None if pool is None else len(pool),
    )


def asked_ranker(asked, plan, pool):
    """The evaluator-like ranker of the asked set (restricted to the pool when there is one), ranking
    as served with the served share and the sweep that may pick a new one."""
    from stages.asked_eval import AskedRanker
    from stages.fusion import WEIGHT_GRID
    from stages.hybrid_eval import HybridEvaluator
    from stages.real_queries import restrict_asked
    from stages.round_steps import served_weight

    if pool is not None:
        asked = restrict_asked(asked, pool)
    served = None
    if plan.served_mode == "hybrid":
        served = HybridEvaluator(
            asked.eval_set, served_weight(plan), plan.metric, candidates=plan.candidates, sweep=WEIGHT_GRID
        )
    return AskedRanker(asked, served, plan.metric)


def judge_asked(settings, layout, db, snapshot, base_path, base_vectors, ranker, results) -> None:
    """Judge the pool of every variant's top 10 on the asked questions and put the scored results in
    `results` (or take the asked set out when too much of the pool went unjudged: an LLM gone mid-way)."""
    from daemon.asked_round import build_assessor, judgment_storage
    from stages.asked_eval import PENDING, events_only_labels, judge_pools, pooled_positions, score_asked
    from stages.real_queries import ASKED

    pending = {variant: per_set.pop(ASKED).extra[PENDING] for variant, per_set in results.items()}
    weight = ranker.served.bm25_weight if ranker.served is not None else None
    pools = pooled_positions(list(pending.values()), weight)
    assessor, release = build_assessor(settings, layout, snapshot.texts, base_path, base_vectors)
    try:
        labels, account = judge_pools(ranker.asked, pools, assessor, judgment_storage(db))
    finally:
        release()
    if not account.usable:
        if ranker.asked.gold_count < settings.promotion.ppi_min_gold:
            log.warning("asked_set_not_judged", **account.to_json())
            return
        # enough questions carry events to decide on their own, as they would beside the teacher
        log.warning("asked_set_judged_on_events_alone", assessor=account.to_json())
        labels, account = events_only_labels(ranker.asked, pools)
    for variant, scored in score_asked(ranker, pending, labels, account).items():
        results[variant].update(scored)


def evaluate_variants(
    settings: Settings,
    folder: Path,
    base_path: Path,
    examples: list,
    evaluators: list,
    progress: RoundProgress,
    results: dict,
) -> dict[str, Path]:
    """The candidate, then each LM-Cocktail merge as it is made, into `results`: one model in memory at
    a time. Returns each variant's folder."""
    from stages.encoder import Encoder
    from stages.round_steps import CANDIDATE, evaluate_variant, merge_variants

    def evaluate_model(path: Path) -> dict:
        encoder = Encoder(path, torch_encode_params(settings))
        try:
            return evaluate_variant(encoder, evaluators)
        finally:
            encoder.release()

    variant_dirs = {CANDIDATE: folder / CANDIDATE}
    results[CANDIDATE] = evaluate_model(variant_dirs[CANDIDATE])
    for name, path in merge_variants(
        variant_dirs[CANDIDATE], base_path, merge_params(settings), folder, examples
    ):
        progress.stage("merge", variant=name)
        results[name] = evaluate_model(path)
        variant_dirs[name] = path
    return variant_dirs


def settle_round(
    settings: Settings,
    layout: StateLayout,
    registry: ModelRegistry,
    records: RoundStore,
    round_id: int,
    judged: JudgedRound,
) -> RoundOutcome:
    """Record the verdict; promote (with the hook) or reject; drop the merges (the candidate stays)."""
    from stages.round_steps import CANDIDATE, CURRENT

    verdict = judged.verdict
    table = verdict.table
    records.update(
        round_id,
        candidate_metrics=table[CANDIDATE],
        current_metrics=table[CURRENT],
        merged_metrics={k: v for k, v in table.items() if k.startswith("merged")},
        eval_sets={
            "sets": judged.set_names,
            "gains": verdict.decision.gains,
            "interval": verdict.interval,
            "best": verdict.best,
            "corpus": judged.corpus,
            "pool": judged.pool,
        },
    )
    if verdict.promote:
        variant = verdict.decision.variant
        write_retrieval_choice(settings, judged.plan, judged.sets, table, variant, judged.variant_dirs)
        outcome = promote(
            registry, records, round_id, judged.variant_dirs[variant], verdict, judged.current, judged.used
        )
        promoted = registry.current()  # the version folder: `models/current` moves with the next rollback
        if outcome == RoundOutcome.PROMOTED:
            run_on_promote_hook(
                settings.promotion.on_promote,
                promoted.path if promoted else layout.current,
                table[variant],
                records,
                round_id,
            )
    else:
        outcome = RoundOutcome.REJECTED
        cause = verdict.decision.cause.value if verdict.decision.cause else None
        records.finish(round_id, outcome, verdict.reason, None, judged.used, cause=cause)
        maybe_open_trial(settings, registry, round_id, judged)
    for name, path in judged.variant_dirs.items():
        if name != CANDIDATE:
            shutil.rmtree(path, ignore_errors=True)  # keep the candidate for audit; merges are reproducible
    log.info("round_finished", round_id=round_id, decision=outcome.value, reason=verdict.reason)
    return outcome


def maybe_open_trial(settings: Settings, registry: ModelRegistry, round_id: int, judged: JudgedRound) -> None:
    """A candidate the gate could not tell from the model in service gets an interleaved trial where the
    application posts events (daemon/trials.py); the round's own decision stays as recorded. Opening one
    never fails the round."""
    from daemon.trials import open_trial, trial_refusal

    verdict = judged.verdict
    if settings.promotion.trial_share <= 0:
        return
    cause = verdict.decision.cause.value if verdict.decision.cause else None
    why = trial_refusal(cause, verdict.interval, verdict.best)
    if why:
        log.info("trial_not_opened", round_id=round_id, reason=why)
        return
    try:
        write_retrieval_choice(
            settings, judged.plan, judged.sets, verdict.table, verdict.best, judged.variant_dirs
        )
        open_trial(
            settings,
            registry.conn,
            registry,
            round_id,
            verdict.best,
            Path(judged.variant_dirs[verdict.best]),
            judged.current.id if judged.current else None,
        )
    except Exception:
        log.exception("trial_open_failed", round_id=round_id)


def trainer_for(settings: Settings):
    """train_model in this process, or the torchrun launcher (daemon/distributed.py)."""
    from stages.train import train_model

    if settings.training.launcher == "torchrun":
        from daemon.distributed import TorchrunTrainer

        return TorchrunTrainer.from_settings(settings)
    return train_model


def label_round(
    settings: Settings,
    layout: StateLayout,
    db: Database,
    snapshot,
    serving,
    mined,
    base_path,
    progress: RoundProgress,
    folder: Path,
    preferred: dict[int, list[int]] | None = None,
):
    """The label step: load the teacher `model.teacher` names, judge (reusing stored judgements), repair
    labels (a clicked pair's skipped hits, `preferred`, offered first as its negatives). The teacher is
    released before training starts: a cross-encoder must not share memory with it."""
    from daemon.serving import converted_models_root
    from stages.encoder import Encoder
    from stages.round_steps import ScoreStorage, label_with_teacher
    from stages.teacher import load_teacher
    from stages.text import detect_language
    from state.teacher_scores import TeacherScoreStore

    progress.stage("label", scored=0, total=0)
    same_base = Path(serving.path) == Path(base_path)
    base = serving if same_base else Encoder(base_path, torch_encode_params(settings), layout.cache)
    teacher = load_teacher(
        settings.model.teacher,
        snapshot.texts,
        base,
        detect_language(" ".join(snapshot.texts[:200])),
        mined.corpus_vectors if same_base else None,
        settings.model.teacher_bm25_weight,
        settings.model.device,
        converted_models_root(settings),
    )
    store = TeacherScoreStore(db.conn)
    try:
        outcome = label_with_teacher(
            snapshot,
            serving,
            mined.corpus_vectors,
            teacher,
            label_params(settings),
            ScoreStorage(store.get_many, store.put_many),
            lambda done, total: progress.stage("label", scored=done, total=total),
            folder,
            preferred,
        )
    finally:
        del teacher
        if not same_base:
            base.release()
    log.info("round_labelled", round_id=progress.round_id, **outcome.stats)
    return outcome.examples


def write_retrieval_choice(
    settings: Settings, plan, sets, table: dict, variant: str, variant_dirs: dict
) -> None:
    """With the user's judged queries, the BM25 share they rank best goes into the promoted model's folder
    (`index.bm25_weight = "auto"` serves it; a rollback serves the previous folder's)."""
    from stages.fusion import RETRIEVAL_FILE
    from stages.round_steps import corpus_default_weight, retrieval_choice

    if settings.index.bm25_weight != "auto" or not sets:
        return
    choice = retrieval_choice(table, variant, corpus_default_weight(sets[0].corpus_texts))
    if choice is None:
        return
    (Path(variant_dirs[variant]) / RETRIEVAL_FILE).write_text(json.dumps(choice, indent=2))
    log.info("retrieval_weight_chosen", variant=variant, bm25_weight=choice["bm25_weight"])


def promote(
    registry: ModelRegistry,
    records: RoundStore,
    round_id: int,
    variant_dir: Path,
    verdict,
    current,
    used_sample_ids: list[int],
) -> RoundOutcome:
    """Serve the variant and record the round as promoted, with its used pairs, in the registry's serving
    transaction (before the link swap and any hook): no kill can leave a new model in service with an
    'aborted' round whose pairs count as new."""
    from stages.gate import RejectionCause
    from state.registry import ServingChanged

    record = registry.register(
        variant_dir,
        round_id=round_id,
        parent_id=current.id if current else None,
        metrics={"variant": verdict.decision.variant, **verdict.table[verdict.decision.variant]["heldout"]},
    )
    try:
        registry.promote(
            record.id,
            note=f"round {round_id}",
            replacing=current.id if current else None,
            with_serving=lambda: records.write_finish(
                round_id, RoundOutcome.PROMOTED, verdict.reason, record.id, used_sample_ids
            ),
        )
    except ServingChanged as exc:
        # A rollback (or another promotion) ran while this round trained: its verdict compared against
        # a model that no longer serves, so it must not undo what the user just did.
        reason = f"not promoted: the model in service changed during the round ({exc}); {verdict.reason}"
        records.finish(
            round_id, RoundOutcome.REJECTED, reason, None, [], cause=RejectionCause.SERVING_CHANGED.value
        )
        registry.discard(record.id)  # the round folder keeps the candidate; no orphan version
        remove_version_export(registry.layout, record.path)
        log.warning("round_not_promoted_serving_changed", round_id=round_id, error=str(exc))
        return RoundOutcome.REJECTED
    return RoundOutcome.PROMOTED


def run_on_promote_hook(
    command: str, model_path: Path, metrics: dict, records: RoundStore, round_id: int
) -> dict:
    """Run `promotion.on_promote` after the promotion is recorded; its outcome is stored for `status`."""
    if not command:
        return {}
    env = dict(os.environ, EMBEDTUNE_MODEL_PATH=str(model_path), EMBEDTUNE_METRICS=json.dumps(metrics))
    try:
        result = subprocess.run(
            command, shell=True, env=env, timeout=HOOK_TIMEOUT_S, capture_output=True, text=True
        )
        outcome = {"command": command, "returncode": result.returncode, "stderr": result.stderr[-500:]}
    except subprocess.TimeoutExpired:
        outcome = {"command": command, "returncode": None, "stderr": f"timed out after {HOOK_TIMEOUT_S}s"}
    outcome["ok"] = outcome["returncode"] == 0
    records.set_hook(round_id, outcome)
    if outcome["ok"]:
        log.info("on_promote_ran", round_id=round_id, returncode=0)
    else:
        log.error(
            "on_promote_failed", round_id=round_id, returncode=outcome["returncode"], stderr=outcome["stderr"]
        )
    return outcome


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
    die_with_parent()
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
