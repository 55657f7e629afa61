"""The gate on the questions users asked: rank the judge part of the log with every variant (dense and as
served), judge the pool of what any of them put in its top 10, then score every variant on the same
judgments.

Pooling, as TREC does: a passage no system ranked in its top 10 cannot change anyone's nDCG@10, so only
the union of the top 10s is judged, once, and each judgment is stored with its judge and reused in the
next rounds (the same questions and most of the same passages come back). The rankings at other BM25
shares (the sweep that picks the share served with a promoted model) are scored on the same judgments;
a passage only they bring up counts as not relevant, which can only understate those shares.

Two label sources per question: the assessor's grades for every pooled passage (an LLM in the manner of
UMBRELA, or the teacher as a weak assessor; stages/assessor.py), and, for questions whose answers the
application used, the event labels (stages/real_queries.py): the gold that corrects the assessor's bias in
the gate's interval (stages/ppi.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import structlog

from stages.embed_cache import text_key
from stages.evaluate import EvalResult, dense_rankings, evaluate_rankings
from stages.hybrid_eval import HybridEvaluator, served_name
from stages.real_queries import ASKED, AskedSet

log = structlog.get_logger("embedtune.asked")

POOL_DEPTH = 10  # the gate's metric is nDCG@10: deeper passages never change it
PENDING = "_pending_rankings"
MAX_UNJUDGED_SHARE = 0.1  # more pooled passages than this left unjudged: the set is not evidence

JudgmentKey = tuple[str, str]  # (question key, passage text key)


class AskedRanker:
    """Plays an evaluator's part for the asked set: for each variant it records the rankings (dense and
    served) and returns an unscored result carrying them; `judge_and_score` scores every variant once
    all are ranked. Its corpus vectors are the round's, like the held-out set's."""

    def __init__(self, asked: AskedSet, served: HybridEvaluator | None, metric: str = "ndcg@10") -> None:
        self.asked = asked
        self.eval_set = asked.eval_set
        self.name = ASKED
        self.served = served
        self.metric = metric

    def weights(self) -> list[float | None]:
        if self.served is None:
            return []
        return list(dict.fromkeys([self.served.bm25_weight, *self.served.sweep]))

    def __call__(self, encoder, corpus_vectors: np.ndarray | None = None) -> EvalResult:
        passages = (
            corpus_vectors
            if corpus_vectors is not None
            else encoder.passages(self.eval_set.corpus_texts, self.eval_set.corpus_keys)
        )
        dense = dense_rankings(encoder.queries(self.eval_set.queries), passages)
        served = self.served.rankings(encoder, passages, self.weights()) if self.served else {}
        return EvalResult({}, {}, 0, self.metric, extra={PENDING: {"dense": dense, "served": served}})


@dataclass
class JudgmentStorage:
    """How the asked set reaches the durable judgments (state/real_queries.JudgmentStore) without SQL."""

    lookup: Callable[[str, list[JudgmentKey]], dict[JudgmentKey, float]]
    save: Callable[[str, list[tuple[JudgmentKey, float]]], object]


@dataclass
class AskedJudging:
    """What judging the pool cost and found (the round's metrics.json and `status`)."""

    judge_id: str
    weak: bool
    pooled: int
    reused: int
    judged: int
    unjudged: int
    incomplete: int = 0  # questions left out: their pool could not be wholly graded

    @property
    def usable(self) -> bool:
        return self.pooled > 0 and self.unjudged <= MAX_UNJUDGED_SHARE * self.pooled

    def to_json(self) -> dict:
        return {
            "judge": self.judge_id,
            "weak_assessor": self.weak,
            "pooled": self.pooled,
            "reused": self.reused,
            "judged": self.judged,
            "unjudged": self.unjudged,
            "incomplete_questions": self.incomplete,
            "usable": self.usable,
        }


def pooled_positions(
    rankings: Sequence[dict], served_weight: float | None, depth: int = POOL_DEPTH
) -> list[list[int]]:
    """Per question, the union of every system's top `depth`: each variant dense and at the served share,
    in first-seen order."""
    count = len(rankings[0]["dense"]) if rankings else 0
    pools: list[list[int]] = []
    for row in range(count):
        seen: dict[int, None] = {}
        for ranked in rankings:
            seen.update(dict.fromkeys(ranked["dense"][row][:depth]))
            if ranked["served"]:
                seen.update(dict.fromkeys(ranked["served"][served_weight][row][:depth]))
        pools.append(list(seen))
    return pools


def judge_pools(
    asked: AskedSet,
    pools: list[list[int]],
    assessor,
    storage: JudgmentStorage,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict[int, float] | None], AskedJudging]:
    """The assessor's grade of every pooled passage, stored under its judge id.

    An assessor whose grades are absolute (the LLM reads one passage at a time) is asked only for the
    pairs no earlier round graded. One whose grades are relative to the pool (`pool_relative`: the
    teacher grades by rank within it) grades every whole pool afresh each round: cheap, and a rank grade
    stored from another pool would not mean the same beside new passages; its grades are stored for the
    audit. Returns each question's grades by corpus position (0 included), None for a question whose pool
    could not be wholly graded (it is left out of the scores: an ungraded passage counted as not relevant
    would bias the gain), and the judging's account."""
    texts = asked.eval_set.corpus_texts
    keys = [[(asked.keys[row], text_key(texts[p])) for p in pool] for row, pool in enumerate(pools)]
    relative = bool(getattr(assessor, "pool_relative", False))
    known = {} if relative else storage.lookup(assessor.judge_id, [key for row in keys for key in row])
    pooled = sum(len(pool) for pool in pools)
    reused = sum(1 for row in keys for key in row if key in known)
    todo = [row for row, row_keys in enumerate(keys) if any(key not in known for key in row_keys)]
    judged = 0
    for start in range(0, len(todo), 32):
        part = todo[start : start + 32]
        asked_for = [
            [(p, key) for p, key in zip(pools[row], keys[row], strict=True) if key not in known]
            for row in part
        ]
        grades = assessor.grade_pools(
            [asked.eval_set.queries[row] for row in part],
            [[texts[p] for p, _key in pairs] for pairs in asked_for],
        )
        fresh = [
            (key, float(grade))
            for pairs, row_grades in zip(asked_for, grades, strict=True)
            for (_p, key), grade in zip(pairs, row_grades, strict=True)
            if grade is not None
        ]
        storage.save(assessor.judge_id, fresh)
        known.update(fresh)
        judged += len(fresh)
        if progress:
            progress(reused + judged, pooled)
    labels: list[dict[int, float] | None] = [
        {p: known[key] for p, key in zip(pool, row_keys, strict=True)}
        if all(key in known for key in row_keys)
        else None
        for pool, row_keys in zip(pools, keys, strict=True)
    ]
    unjudged = pooled - reused - judged
    incomplete = sum(1 for row in labels if row is None)
    account = AskedJudging(
        assessor.judge_id,
        bool(getattr(assessor, "weak", False)),
        pooled,
        reused,
        judged,
        unjudged,
        incomplete,
    )
    log.info("asked_pool_judged", **account.to_json())
    return labels, account


EVENTS_JUDGE = "events"  # the judge id when the application's events stood in for a failed assessor


def events_only_labels(
    asked: AskedSet, pools: Sequence[Sequence[int]]
) -> tuple[list[dict[int, float] | None], AskedJudging]:
    """The asked set judged by the application's events alone, for when the assessor could not grade
    the pool (an LLM gone mid-way): each question with events gets its event labels over its pool (a
    pooled passage no event named counts 0, as a shown-and-unused hit does), every other question is
    left out. The gate then reads the events' own interval (the judging is marked weak, so no assessor
    number enters it)."""
    labels: list[dict[int, float] | None] = [
        {p: asked.eval_set.relevant[row].get(p, 0.0) for p in pools[row]} if asked.gold[row] else None
        for row in range(len(asked))
    ]
    pooled = sum(len(pools[row]) for row in range(len(asked)) if asked.gold[row])
    incomplete = sum(1 for row in labels if row is None)
    return labels, AskedJudging(EVENTS_JUDGE, True, pooled, 0, 0, 0, incomplete)


def condensed(ranked: list[list[int]], shown: list[frozenset[int]]) -> list[list[int]]:
    """Each list with the passages its question's answers never showed taken out: events can only have
    been about what was shown, so on the event labels a model is judged by how it orders those (a model
    that brings up a good passage nobody was shown is not counted down for it)."""
    return [[p for p in ranking if p in seen] for ranking, seen in zip(ranked, shown, strict=True)]


def score_asked(
    ranker: AskedRanker,
    pending: dict[str, dict],
    labels: list[dict[int, float] | None],
    account: AskedJudging,
) -> dict[str, dict[str, EvalResult]]:
    """Every variant's results on the asked set, dense (`asked`) and served (`asked+served`), scored on
    the assessor's grades over the wholly graded questions; each result also carries the per-question
    metric on the event labels (None for a question without events), the gold that stages/ppi.py weighs
    against the assessor, scored on condensed lists."""
    rows = [row for row, graded in enumerate(labels) if graded is not None]
    graded = [{p: g for p, g in labels[row].items() if g > 0} for row in rows]  # type: ignore[union-attr]
    gold = [ranker.eval_set.relevant[row] for row in rows]
    has_gold = [ranker.asked.gold[row] for row in rows]
    shown = [ranker.asked.shown[row] for row in rows]
    metric = ranker.metric
    out: dict[str, dict[str, EvalResult]] = {}
    for variant, rankings in pending.items():
        dense = [rankings["dense"][row] for row in rows]
        result = evaluate_rankings(dense, graded, metric)
        _attach(result, evaluate_rankings(condensed(dense, shown), gold, metric), has_gold, account)
        out[variant] = {ASKED: result}
        if ranker.served is not None and rankings["served"]:
            served = ranker.served
            lists = {w: [ranked[row] for row in rows] for w, ranked in rankings["served"].items()}
            result = served.score(lists, graded)
            on_gold = evaluate_rankings(condensed(lists[served.bm25_weight], shown), gold, metric)
            _attach(result, on_gold, has_gold, account)
            if served.sweep and any(has_gold):
                condensed_lists = {w: condensed(lists[w], shown) for w in served.sweep}
                sweep, alike = events_sweep(condensed_lists, gold, has_gold, served.sweep, metric)
                result.extra["bm25_sweep_events"] = sweep
                result.extra["bm25_sweep_events_alike"] = alike
            out[variant][served_name(ASKED)] = result
    return out


def _attach(result: EvalResult, on_gold: EvalResult, has_gold: list[bool], account: AskedJudging) -> None:
    values = on_gold.primary_per_query
    result.extra["_gold_per_query"] = [v if g else None for v, g in zip(values, has_gold, strict=True)]
    result.extra["gold_questions"] = sum(has_gold)
    if any(has_gold):
        result.extra["gold_" + result.primary_metric] = round(
            float(np.mean([v for v, g in zip(values, has_gold, strict=True) if g])), 5
        )
    result.extra["judging"] = account.to_json()


def events_sweep(
    served: dict, gold: list[dict[int, float]], has_gold: list[bool], weights, metric: str
) -> tuple[dict[str, float], list[str]]:
    """The sweep scored on the event labels of the questions that have them (the share chosen from what
    users used, not from what an assessor, perhaps the teacher and itself a BM25 mix, prefers), and the
    shares whose paired 95% interval against the sweep's best holds zero: those the events cannot tell
    apart from it (an interleaved trial tries the candidate at the lowest of them, daemon/trials.py)."""
    from stages.gate import paired_bootstrap

    rows = [row for row, flag in enumerate(has_gold) if flag]
    per_query = {
        f"{w:g}": evaluate_rankings(
            [served[w][row] for row in rows], [gold[row] for row in rows], metric
        ).primary_per_query
        for w in weights
    }
    sweep = {share: round(float(np.mean(values)), 5) for share, values in per_query.items()}
    best = max(sweep, key=lambda share: sweep[share])
    alike = []
    for share, values in per_query.items():
        interval = paired_bootstrap(values, per_query[best])
        if share == best or (interval is not None and interval[0] <= 0.0 <= interval[1]):
            alike.append(share)
    return sweep, alike
