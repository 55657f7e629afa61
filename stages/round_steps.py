"""The steps of a training round, each a function over typed data: snapshot → negatives → train →
evaluate → merge → decide. The round process (daemon/round_process.py) only sequences them, records
progress and handles faults; promotion itself belongs to the registry in state/.

A step that finds the round cannot go on raises RoundRejected with a machine-readable cause. Each step
writes its artifacts into the round's folder (the audit trail of docs/promotion.md).

With a teacher (`model.teacher`), the label step replaces the student-only miner: the teacher judges each
training query against its source chunk and the student's top candidates (scores stored durably through
callables the round process passes in: stages never touch the database), repairs the labels and gives the
distillation losses their targets (stages/labels.py).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import structlog

from stages.embed_cache import text_key
from stages.encoder import Encoder
from stages.eval_pool import pool_indices, restrict
from stages.evalsets import EvalSet, load_eval_file, structure_set, without_copied_query
from stages.evaluate import EvalResult, RetrievalEvaluator
from stages.fusion import WEIGHT_GRID, choose_bm25_weight, pick_weight, served_default_share
from stages.gate import (
    ASKED,
    SERVED_SUFFIX,
    AskedEvidence,
    Decision,
    RejectionCause,
    decide,
    paired_bootstrap,
)
from stages.hybrid_eval import HybridEvaluator, served_name
from stages.labels import (
    LabelParams,
    LabelQuery,
    add_random_extras,
    label_examples,
    pair_texts,
    pairs_to_score,
    student_candidates,
    with_preferred,
)
from stages.negatives import build_index, mine_hard_negatives
from stages.real_queries import CLICKED_KIND
from stages.teacher import Teacher
from stages.text import detect_language
from stages.train import ProgressFn, TrainOutcome, TrainParams, train_model
from state.round_records import CorpusChunk, HeldoutSample, RoundInputs, TrainSample
from state.teacher_scores import PairKey

log = structlog.get_logger("embedtune.round")

CURRENT = "current"
CANDIDATE = "candidate"


class RoundRejected(Exception):
    """The round cannot produce a candidate worth judging; `cause` is for scripts, the message for people."""

    def __init__(self, cause: RejectionCause, reason: str) -> None:
        super().__init__(reason)
        self.cause = cause
        self.reason = reason


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


# --- snapshot ----------------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """The round's fixed view of the data: every later step reads this, never the database."""

    corpus: list[CorpusChunk]
    train: list[TrainSample]
    heldout: list[HeldoutSample]
    texts: list[str] = field(init=False)
    keys: list[str] = field(init=False)
    position: dict[int, int] = field(init=False)  # chunk id -> corpus index

    def __post_init__(self) -> None:
        self.texts = [chunk.text for chunk in self.corpus]
        self.keys = [text_key(text) for text in self.texts]
        self.position = {chunk.id: index for index, chunk in enumerate(self.corpus)}


def take_snapshot(inputs: RoundInputs, folder: Path) -> Snapshot:
    """Fix the round's data and write it down (corpus.jsonl, heldout.jsonl)."""
    active = {chunk.id for chunk in inputs.corpus}
    snapshot = Snapshot(inputs.corpus, inputs.train, [h for h in inputs.heldout if h.chunk_id in active])
    write_jsonl(
        folder / "corpus.jsonl",
        (
            {"chunk_id": c.id, "sha256": c.sha256, "split": c.split, "heading": c.heading, "text": c.text}
            for c in snapshot.corpus
        ),
    )
    write_jsonl(
        folder / "heldout.jsonl",
        (
            {"sample_id": h.id, "query": h.query, "chunk_id": h.chunk_id, "kind": h.kind}
            for h in snapshot.heldout
        ),
    )
    if len(snapshot.train) < 2:
        raise RoundRejected(RejectionCause.NOT_ENOUGH_SAMPLES, "not enough kept training samples")
    if not snapshot.heldout:
        raise RoundRejected(
            RejectionCause.NO_HELDOUT, "no held-out queries yet (need a held-out document with kept samples)"
        )
    return snapshot


# --- negatives ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NegativeParams:
    count: int = 3
    rank_range: tuple[int, int] = (2, 200)
    margin: float = 0.05
    seed: int = 42


@dataclass
class TrainingExample:
    query: str
    pos: str
    neg: list[str]
    sample_id: int
    pos_score: float | None = None  # the serving model's cosines of positive and negatives
    neg_scores: list[float] = field(default_factory=list)
    scores: list[float] | None = None  # the teacher's scores of [pos, *neg] (student scale), if labelled


@dataclass
class MinedSet:
    examples: list[TrainingExample]
    corpus_vectors: np.ndarray  # the serving model's passage vectors, reused by evaluation


def mine_negatives(
    snapshot: Snapshot,
    serving: Encoder,
    params: NegativeParams,
    folder: Path | None = None,
    preferred: dict[int, list[int]] | None = None,
) -> MinedSet:
    """Hard negatives for every training pair, retrieved by the model in service (hn_mine's recipe).
    The one miner: rounds and `embedtune export` both call it. `preferred` (sample id -> chunk ids): the
    hits a user skipped above the one they used; they come first among a clicked pair's negatives when
    they pass the same margin test as mined ones (a skipped hit can be relevant too)."""
    corpus_vectors = serving.passages(snapshot.texts, snapshot.keys)
    serving.save_cache()  # the corpus vectors survive even if mining is interrupted
    mined = None
    if params.count > 0 and len(snapshot.corpus) > 2 and snapshot.train:
        mined = mine_hard_negatives(
            serving.queries([s.query for s in snapshot.train]),
            [{snapshot.position.get(s.chunk_id, -1)} for s in snapshot.train],
            serving.passages([s.passage for s in snapshot.train]),
            build_index(corpus_vectors),
            params.count,
            params.rank_range,
            params.margin,
            params.seed,
        )
    if mined and preferred:
        mined = _prefer_skipped(snapshot, mined, preferred, corpus_vectors, serving, params)
    examples = [
        TrainingExample(
            sample.query,
            sample.passage,
            [snapshot.texts[j] for j in mined[i].negatives] if mined else [],
            sample.id,
            mined[i].positive_score if mined else None,
            mined[i].negative_scores if mined else [],
        )
        for i, sample in enumerate(snapshot.train)
    ]
    serving.save_cache()
    if folder is not None:
        write_jsonl(folder / "train.jsonl", (asdict(e) for e in examples))
    return MinedSet(examples, corpus_vectors)


def _prefer_skipped(
    snapshot: Snapshot, mined: list, preferred: dict[int, list[int]], corpus_vectors, serving, params
):
    """Put the vetted skipped hits first among each clicked pair's negatives (same count as mined)."""
    from stages.negatives import MinedNegatives

    rows = [i for i, sample in enumerate(snapshot.train) if preferred.get(sample.id)]
    if not rows:
        return mined
    vectors = serving.queries([snapshot.train[i].query for i in rows])
    out = list(mined)
    for row, vector in zip(rows, vectors, strict=True):
        found = mined[row]
        picked: list[tuple[int, float]] = []
        for position in skipped_positions(snapshot, snapshot.train[row], preferred):
            score = float(vector @ corpus_vectors[position])
            if (
                score <= found.positive_score - params.margin
            ):  # the miner's test: not too close to the positive
                picked.append((position, score))
        picked = picked[: params.count]
        taken = {p for p, _s in picked}
        rest = [(c, s) for c, s in zip(found.negatives, found.negative_scores, strict=True) if c not in taken]
        chosen = picked + rest[: max(0, len(found.negatives) - len(picked))]
        out[row] = MinedNegatives([c for c, _s in chosen], found.positive_score, [s for _c, s in chosen])
    return out


def skipped_positions(snapshot: Snapshot, sample, preferred: dict[int, list[int]] | None) -> list[int]:
    """The corpus positions of the hits a user skipped above this sample's chunk (none for other
    samples, and never the chunk itself)."""
    own = snapshot.position.get(sample.chunk_id)
    chunks = (preferred or {}).get(sample.id, [])
    return [p for p in dict.fromkeys(snapshot.position.get(c) for c in chunks) if p is not None and p != own]


# --- label (with a teacher) ---------------------------------------------------------------------------
@dataclass
class ScoreStorage:
    """How the label step reaches the durable score store (state/teacher_scores.py) without SQL."""

    lookup: Callable[[str, list[PairKey]], dict[PairKey, float]]
    save: Callable[[str, list[tuple[PairKey, float]]], object]
    batch: int = 1024


@dataclass
class LabelOutcome:
    examples: list[TrainingExample]
    stats: dict[str, object]


def label_with_teacher(
    snapshot: Snapshot,
    serving: Encoder,
    corpus_vectors: np.ndarray,
    teacher: Teacher,
    params: LabelParams,
    storage: ScoreStorage,
    progress: Callable[[int, int], None] | None = None,
    folder: Path | None = None,
    preferred: dict[int, list[int]] | None = None,
) -> LabelOutcome:
    """Teacher-labelled training examples: each query's source and the student's top candidates are judged
    (stored judgements reused, new ones saved batch by batch, so a killed round loses at most one batch),
    then labels are repaired and negatives chosen (stages.labels.label_examples). `preferred` (sample id
    -> chunk ids, the hits a user skipped above the one they used) joins each clicked pair's candidates
    and comes first among its negatives when the teacher and the student's margin let it."""
    samples = [s for s in snapshot.train if s.chunk_id in snapshot.position]
    if not samples:
        return LabelOutcome([], {"queries": 0, "examples": 0, "teacher": teacher.teacher_id})
    query_vectors = serving.queries([s.query for s in samples])
    passage_vectors = serving.passages([s.passage for s in samples])
    # The teacher judges the source as the whole chunk, like every other candidate: an inverse-cloze
    # positive (the chunk without the query's sentence) read against whole chunks would lose to any
    # sibling sharing the sentence, and nearly every candidate would be vetoed. The student's margin rule
    # keeps the miner's reference, the query against its training passage (what mine_hard_negatives uses).
    queries = [
        LabelQuery(
            s.query,
            snapshot.position[s.chunk_id],
            snapshot.texts[snapshot.position[s.chunk_id]],
            float(q @ p),
            made_by_user=s.kind == CLICKED_KIND,
            preferred=tuple(skipped_positions(snapshot, s, preferred)),
        )
        for s, q, p in zip(samples, query_vectors, passage_vectors, strict=True)
    ]
    found = student_candidates(query_vectors, corpus_vectors, max(params.rank_range[1], params.keep_rank) + 1)
    for row, query in enumerate(queries):
        if query.preferred:
            scores = [float(query_vectors[row] @ corpus_vectors[c]) for c in query.preferred]
            found[row] = with_preferred(found[row], query.preferred, scores, params.rank_range[0] - 1)
    add_random_extras(found, query_vectors, corpus_vectors, params.negatives, params.seed)
    pairs = pairs_to_score(queries, found, params)
    query_texts, passage_texts = pair_texts(queries, pairs, snapshot.texts)
    keys = [(text_key(q), text_key(p)) for q, p in zip(query_texts, passage_texts, strict=True)]
    known = storage.lookup(teacher.teacher_id, keys)
    missing = [k for k, key in enumerate(keys) if key not in known]
    reused = len(keys) - len(missing)
    if progress:
        progress(reused, len(keys))
    for start in range(0, len(missing), storage.batch):
        part = missing[start : start + storage.batch]
        scores = teacher.score_pairs([query_texts[k] for k in part], [passage_texts[k] for k in part])
        batch = [(keys[k], float(score)) for k, score in zip(part, scores, strict=True)]
        storage.save(teacher.teacher_id, batch)
        known.update(batch)
        if progress:
            progress(reused + start + len(part), len(keys))
    labelled = label_examples(
        queries, found, {pair: known[key] for pair, key in zip(pairs, keys, strict=True)}, params
    )
    stats = {**labelled.stats, "pairs": len(keys), "pairs_reused": reused, "teacher": teacher.teacher_id}
    examples = [
        TrainingExample(
            e.query,
            samples[e.index].passage if e.positive == e.source else snapshot.texts[e.positive],
            [snapshot.texts[c] for c in e.negatives],
            samples[e.index].id,
            e.student[0],
            e.student[1:],
            e.scores,
        )
        for e in labelled.examples
    ]
    if folder is not None:
        write_jsonl(folder / "train.jsonl", (asdict(e) for e in examples))
        (folder / "labels.json").write_text(json.dumps(stats, indent=2))
    return LabelOutcome(examples, stats)


# --- train -------------------------------------------------------------------------------------------
Trainer = Callable[[Path, Path, list[dict], TrainParams, ProgressFn | None], TrainOutcome]


def train_candidate(
    init_path: Path,
    folder: Path,
    examples: list[TrainingExample],
    params: TrainParams,
    progress: ProgressFn | None = None,
    trainer: Trainer = train_model,
) -> TrainOutcome:
    """Fine-tune from `init_path` into folder/candidate; a run that took no step is a rejection.
    `trainer` is train_model in this process, or a launcher that runs it on several devices."""
    outcome = trainer(init_path, folder / CANDIDATE, [asdict(e) for e in examples], params, progress)
    (folder / "train_outcome.json").write_text(json.dumps(asdict(outcome), indent=2))
    if outcome.steps == 0:
        raise RoundRejected(
            RejectionCause.NO_TRAINING_STEP, "training ran no step (too few distinct pairs for one batch)"
        )
    return outcome


# --- evaluate ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalPlan:
    """Which sets judge the variants, beside the synthetic held-out queries."""

    metric: str = "ndcg@10"
    use_structure: bool = True
    user_eval: str = ""
    user_query_key: str = "anchor"
    user_positive_key: str = "positive"
    guard_eval: str = ""
    pool_size: int = 0  # 0: whole corpus; else judge variants on a pool of about this many chunks
    pool_seed: int = 0
    served_mode: str = ""  # "hybrid": also judge the held-out and user sets as the index serves them
    analyzer: str = "auto"  # index.analyzer, to pick the served BM25 share as the index does
    bm25_weight: float | str = "auto"
    serving_model: str = ""  # the model in service: its chosen BM25 share, if a round chose one
    all_languages_share: float | None = None  # the base reads every language: this share, not by language
    candidates: int = 100  # index.candidates: each half's list before fusion, as `search` asks for it


HELDOUT = "heldout"


def snapshot_sets(snapshot: Snapshot, plan: EvalPlan) -> list[EvalSet]:
    """The sets whose corpus is the round's snapshot: held-out pseudo-queries, headings, the user's file."""
    sets = [heldout_set(snapshot)]
    structure = structure_set(snapshot.corpus)
    if plan.use_structure and len(structure) >= 3:
        sets.append(structure)
    if plan.user_eval:
        sets.append(
            load_eval_file(
                plan.user_eval, plan.user_query_key, plan.user_positive_key, "user", snapshot.texts
            )
        )
    return sets


def heldout_set(snapshot: Snapshot) -> EvalSet:
    """The held-out queries against the whole snapshot; a query copied from its chunk is judged on every
    chunk of its document that holds it, with the query taken out (stages.evalsets.without_copied_query)."""
    by_document: dict[int, list[int]] = {}
    for position, chunk in enumerate(snapshot.corpus):
        by_document.setdefault(chunk.document_id, []).append(position)
    relevant, stand_ins = [], []
    for sample in snapshot.heldout:
        own = snapshot.position[sample.chunk_id]
        judged, replaced = without_copied_query(
            sample.query, own, snapshot.texts, by_document[snapshot.corpus[own].document_id]
        )
        relevant.append(judged)
        stand_ins.append(replaced)
    return EvalSet(
        HELDOUT,
        [h.query for h in snapshot.heldout],
        snapshot.texts,
        relevant,
        snapshot.keys,
        stand_ins=stand_ins,
    )


def evaluation_pool(
    sets: list[EvalSet], plan: EvalPlan, serving: Encoder, corpus_vectors: np.ndarray
) -> np.ndarray | None:
    """The bounded corpus variants are judged on when the snapshot (the corpus of `sets`) is larger than
    `plan.pool_size` (stages/eval_pool.py); None when the whole corpus is used."""
    if plan.pool_size <= 0 or len(corpus_vectors) <= plan.pool_size:
        return None
    queries = [query for eval_set in sets for query in eval_set.queries]
    relevant = [judged for eval_set in sets for judged in eval_set.relevant]
    cutoff = int(plan.metric.rsplit("@", 1)[1])  # the model in service stays exact down to the metric's k
    return pool_indices(
        serving.queries(queries), relevant, corpus_vectors, plan.pool_size, plan.pool_seed, cutoff
    )


def build_evaluators(
    sets: list[EvalSet], plan: EvalPlan, pool: np.ndarray | None = None
) -> list[RetrievalEvaluator]:
    """Evaluators for the snapshot's sets (restricted to the pool when there is one) and the guard set,
    which has its own corpus."""
    if pool is not None:
        sets = [restrict(eval_set, pool) for eval_set in sets]
    if plan.guard_eval:
        sets = [*sets, load_eval_file(plan.guard_eval, name="guard")]
    evaluators: list = [RetrievalEvaluator(eval_set, plan.metric) for eval_set in sets]
    if plan.served_mode == "hybrid":
        weight = served_weight(plan)
        evaluators += [
            HybridEvaluator(
                eval_set,
                weight,
                plan.metric,
                candidates=plan.candidates,
                sweep=WEIGHT_GRID if eval_set.name == "user" else (),
            )
            for eval_set in sets
            if eval_set.name in (HELDOUT, "user")
        ]
    return evaluators


def served_weight(plan: EvalPlan) -> float | None:
    """The BM25 share the index serves the model in service with (None: by each query's language)."""
    serving = Path(plan.serving_model) if plan.serving_model else None
    return choose_bm25_weight(plan.bm25_weight, serving, plan.all_languages_share)


def corpus_default_weight(corpus_texts: list[str]) -> float:
    """The measured share of the corpus' main language (tie-breaks a sweep), on a sample of its texts."""
    sample = random.Random(0).sample(corpus_texts, min(500, len(corpus_texts)))
    languages = Counter(detect_language(text) for text in sample)
    return served_default_share("jieba" if languages.get("zh", 0) > languages.get("en", 0) else "standard")


def retrieval_choice(table: dict[str, dict], variant: str, default: float) -> dict | None:
    """The BM25 share to serve `variant` with, picked on the user's judged queries (its `user+served`
    sweep), else on the questions users asked (`asked+served`, judged on the pooled answers); None with
    neither. Written into the model's folder (stages/fusion.RETRIEVAL_FILE)."""
    sweep = (table.get(variant, {}).get(served_name("user")) or {}).get("bm25_sweep")
    if sweep:
        return {"bm25_weight": pick_weight(sweep, default), "chosen_on": "user", "sweep": sweep}
    asked = table.get(variant, {}).get(served_name(ASKED)) or {}
    if asked.get("gold_questions", 0) >= SWEEP_MIN_EVENTS and asked.get("bm25_sweep_events"):
        sweep = asked["bm25_sweep_events"]
        chosen = pick_weight(sweep, default)
        return {
            "bm25_weight": chosen,
            "chosen_on": "asked (events)",
            "sweep": sweep,
            "trial_shares": events_trial_shares(chosen, asked.get("bm25_sweep_events_alike") or []),
        }
    if asked.get("bm25_sweep") and not asked.get("judging", {}).get("weak_assessor", True):
        sweep = asked["bm25_sweep"]
        return {"bm25_weight": pick_weight(sweep, default), "chosen_on": "asked (assessor)", "sweep": sweep}
    return None  # a weak assessor mixes BM25 itself: its preference would choose its own share


def events_trial_shares(chosen: float, alike: list[str]) -> list[float]:
    """The shares an interleaved trial tries a candidate at when events chose its share: the chosen one,
    and the lowest the events cannot tell apart from it. The events only label what the model in service
    showed, so a candidate's dense gains beyond those hits cannot lift a low share's score on them; a
    tuned model wanted less BM25 than its round chose (zh-medqa, docs/benchmarks.md "Trials played
    through serve": level at the chosen 0.3, +0.03 at 0.05-0.1). The trial lets the users decide."""
    lowest = min((float(share) for share in alike), default=chosen)
    return [chosen, lowest] if lowest < chosen else [chosen]


SWEEP_MIN_EVENTS = 30  # asked questions with events before their sweep may choose the served share

Results = dict[str, dict[str, EvalResult]]  # variant -> evaluator name -> result


class EncodedOnce:
    """One variant's encoder as all of its evaluators see it: the dense and the served (hybrid)
    evaluation of a set ask for the same corpus, queries and stand-ins, and each is encoded once (a
    variant has no embedding cache; encoding the corpus twice doubled a round's evaluation time)."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self._done: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}

    def _once(self, kind: str, texts: Sequence[str], encode: Callable[[], np.ndarray]) -> np.ndarray:
        key = (kind, tuple(texts))
        if key not in self._done:
            self._done[key] = encode()
        return self._done[key]

    def passages(self, texts: Sequence[str], keys: Sequence[str] | None = None) -> np.ndarray:
        return self._once("passages", texts, lambda: self.encoder.passages(texts, keys))

    def queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._once("queries", texts, lambda: self.encoder.queries(texts))

    def __getattr__(self, name: str):
        return getattr(self.encoder, name)


def evaluate_variant(
    encoder: Encoder, evaluators: list[RetrievalEvaluator], heldout_vectors: np.ndarray | None = None
) -> dict[str, EvalResult]:
    """One model on every set; `heldout_vectors` are the model's own corpus vectors when known."""
    own = (HELDOUT, served_name(HELDOUT), ASKED)
    shared = EncodedOnce(encoder)
    return {e.name: e(shared, heldout_vectors if e.name in own else None) for e in evaluators}


# --- merge -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergeParams:
    weights: tuple[float, ...] = (0.5, 0.7)
    with_data: bool = False
    neg_number: int = 1


def merge_variants(
    candidate_dir: Path, base_path: Path, params: MergeParams, folder: Path, examples: list[TrainingExample]
) -> Iterator[tuple[str, Path]]:
    """LM-Cocktail merges of candidate and base, one at a time (the caller evaluates each before the next
    is made, so one model is in memory). A failed merge is logged and skipped: it must not cost the
    candidate."""
    from stages.merge import merge_with_base, merge_with_data

    for weight in params.weights:
        name = f"merged-{weight:g}"
        try:
            yield name, merge_with_base(candidate_dir, base_path, weight, folder / name)
        except Exception as exc:  # noqa: BLE001 - any merge fault; the candidate stands
            log.warning("merge_failed", weight=weight, error=str(exc))
    if params.with_data:
        try:
            merged, _weights = merge_with_data(
                candidate_dir,
                base_path,
                [asdict(e) for e in examples],
                folder / "merged-data",
                neg_number=params.neg_number,
            )
            yield "merged-data", merged
        except Exception as exc:  # noqa: BLE001
            log.warning("merge_with_data_failed", error=str(exc))


# --- decide ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateParams:
    metric: str = "ndcg@10"
    min_gain: float = 0.005
    human_tolerance: float = 0.0
    max_guard_drop: float = 0.01
    synthetic_only_min_gain: float = 0.01
    bootstrap_samples: int = 1000
    seed: int = 42
    asked_min_gain: float = 0.0  # with event labels (PPI++): the interval's low end must exceed this
    assessor_only_min_gain: float = 0.01  # the margin when only an assessor judged the asked questions
    ppi_min_gold: int = 50  # questions with events needed before they correct the assessor
    asked_min_queries: int = 30  # scored asked questions (after incomplete ones are left out) to act on


@dataclass
class Verdict:
    decision: Decision
    best: str  # the promoted variant, or the one closest to promotion
    interval: tuple[float, float] | None
    reason: str
    table: dict[str, dict[str, dict]]  # variant -> set -> metrics (JSON)

    @property
    def promote(self) -> bool:
        return self.decision.promote


def decide_round(
    results: Results, params: GateParams, folder: Path, train: TrainOutcome | None = None
) -> Verdict:
    """Apply the gate (stages.gate.decide) to the evaluators' primary results; write metrics.json and
    per_query.json."""
    scores = {
        variant: {name: r.primary for name, r in per_set.items() if r.n_queries}
        for variant, per_set in results.items()
    }
    per_query = {
        variant: {name: r.primary_per_query for name, r in per_set.items()}
        for variant, per_set in results.items()
    }
    gold = {  # the asked sets' per-question metric on the event labels (None: no events)
        variant: {
            name: r.extra["_gold_per_query"] for name, r in per_set.items() if "_gold_per_query" in r.extra
        }
        for variant, per_set in results.items()
    }
    (folder / "per_query.json").write_text(json.dumps(per_query))
    if any(gold.values()):
        (folder / "per_query_gold.json").write_text(json.dumps(gold))
    intervals = {
        variant: paired_bootstrap(
            per_query[variant][HELDOUT], per_query[CURRENT][HELDOUT], params.bootstrap_samples, params.seed
        )
        for variant in per_query
        if variant != CURRENT
    }
    served_intervals = {
        variant: {
            name: paired_bootstrap(values, per_query[CURRENT][name], params.bootstrap_samples, params.seed)
            for name, values in sets.items()
            # the asked sets are rule 0's: their grades may be the teacher's, which never decide
            if name.endswith(SERVED_SUFFIX) and name != served_name(ASKED) and name in per_query[CURRENT]
        }
        for variant, sets in per_query.items()
        if variant != CURRENT
    }
    asked = {
        variant: evidence
        for variant, per_set in results.items()
        if variant != CURRENT and (evidence := asked_evidence(per_set, results[CURRENT], params)) is not None
    }
    decision = decide(
        scores,
        params.metric,
        params.min_gain,
        params.human_tolerance,
        params.max_guard_drop,
        intervals=intervals,
        synthetic_only_min_gain=params.synthetic_only_min_gain,
        served_intervals=served_intervals,
        asked=asked,
    )
    table = {
        variant: {name: r.to_json() for name, r in per_set.items()} for variant, per_set in results.items()
    }
    best = decision.variant or max(
        (v for v in scores if v != CURRENT), key=lambda v: scores[v].get(HELDOUT, 0.0)
    )
    interval = intervals.get(best)
    reason = decision.reason
    if interval:
        reason += f" (95% CI of held-out gain for {best}: [{interval[0]:+.4f}, {interval[1]:+.4f}])"
    verdict = Verdict(decision, best, interval, reason, table)
    (folder / "metrics.json").write_text(
        json.dumps(
            {
                "metric": params.metric,
                "variants": table,
                "gains": decision.gains,
                "interval": interval,
                "best": best,
                "cause": decision.cause.value if decision.cause else None,
                "asked": {variant: asdict(evidence) for variant, evidence in asked.items()},
                "train": asdict(train) if train else None,
            },
            indent=2,
        )
    )
    return verdict


def asked_evidence(variant: dict[str, EvalResult], current: dict[str, EvalResult], params: GateParams):
    """The variant's gain on the asked questions as served (dense when the index serves dense), with its
    interval: when at least `ppi_min_gold` questions carry events, PPI++ over an LLM assessor's gains
    (the event-label gains correct its bias) or, with the weak assessor, the events' classical interval
    alone (stages/ppi.event_gain_interval); else a paired bootstrap of the assessor's gains with the
    assessor-only margin. None when the round has no usable asked set."""
    from stages.ppi import event_gain_interval

    name = next((n for n in (served_name(ASKED), ASKED) if n in variant and n in current), None)
    if name is None or not variant[name].n_queries:
        return None
    new, old = variant[name], current[name]
    if not new.extra.get("judging", {}).get("usable", False):
        return None
    if new.n_queries < params.asked_min_queries:
        # questions whose pool was not wholly graded were left out; too few left to act on
        log.info("asked_too_few_scored", scored=new.n_queries, needed=params.asked_min_queries)
        return None
    predicted = np.asarray(new.primary_per_query) - np.asarray(old.primary_per_query)
    gold_new, gold_old = new.extra["_gold_per_query"], old.extra["_gold_per_query"]
    labelled = [i for i, value in enumerate(gold_new) if value is not None and gold_old[i] is not None]
    weak = bool(new.extra["judging"].get("weak_assessor"))
    if len(labelled) >= params.ppi_min_gold:
        unlabelled = [i for i in range(len(predicted)) if i not in set(labelled)]
        gold = np.asarray([gold_new[i] - gold_old[i] for i in labelled])
        estimate = event_gain_interval(gold, predicted[labelled], predicted[unlabelled], weak=weak)
        return AskedEvidence(
            name,
            estimate.estimate,
            estimate.low,
            estimate.high,
            estimate.method,
            weak,
            len(predicted),
            len(labelled),
            params.asked_min_gain,
        )
    interval = paired_bootstrap(
        new.primary_per_query, old.primary_per_query, params.bootstrap_samples, params.seed
    )
    low, high = interval if interval else (float(predicted.mean()), float(predicted.mean()))
    return AskedEvidence(
        name,
        float(predicted.mean()),
        low,
        high,
        "assessor",
        weak,
        len(predicted),
        len(labelled),
        max(params.assessor_only_min_gain, params.asked_min_gain),
    )
