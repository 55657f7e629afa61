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
) -> tuple[list[dict[int, float]], AskedJudging]:
    """The assessor's grade of every pooled passage (stored ones reused; a question with any new passage
    is graded as a whole pool, since a teacher grades by rank within the pool, and only its new grades are
    stored). Returns each question's grades by corpus position (0 included) and the judging's account."""
    texts = asked.eval_set.corpus_texts
    keys = [[(asked.keys[row], text_key(texts[p])) for p in pool] for row, pool in enumerate(pools)]
    known = storage.lookup(assessor.judge_id, [key for row in keys for key in row])
    pooled = sum(len(pool) for pool in pools)
    reused = sum(1 for row in keys for key in row if key in known)
    todo = [row for row, row_keys in enumerate(keys) if any(key not in known for key in row_keys)]
    judged = 0
    for start in range(0, len(todo), 32):
        part = todo[start : start + 32]
        grades = assessor.grade_pools(
            [asked.eval_set.queries[row] for row in part], [[texts[p] for p in pools[row]] for row in part]
        )
        fresh = [
            (key, float(grade))
            for row, row_grades in zip(part, grades, strict=True)
            for key, grade in zip(keys[row], row_grades, strict=True)
            if grade is not None and key not in known
        ]
        storage.save(assessor.judge_id, fresh)
        known.update(fresh)
        judged += len(fresh)
        if progress:
            progress(reused + judged, pooled)
    labels = [
        {p: known[key] for p, key in zip(pool, row_keys, strict=True) if key in known}
        for pool, row_keys in zip(pools, keys, strict=True)
    ]
    unjudged = pooled - sum(len(row) for row in labels)
    account = AskedJudging(
        assessor.judge_id, bool(getattr(assessor, "weak", False)), pooled, reused, judged, unjudged
    )
    log.info("asked_pool_judged", **account.to_json())
    return labels, account


def score_asked(
    ranker: AskedRanker, pending: dict[str, dict], labels: list[dict[int, float]], account: AskedJudging
) -> dict[str, dict[str, EvalResult]]:
    """Every variant's results on the asked set, dense (`asked`) and served (`asked+served`), scored on
    the assessor's grades; each result also carries the per-question metric on the event labels (None
    for a question without events), the gold that stages/ppi.py weighs against the assessor."""
    graded = [{p: g for p, g in row.items() if g > 0} for row in labels]
    gold = ranker.eval_set.relevant
    has_gold = ranker.asked.gold
    out: dict[str, dict[str, EvalResult]] = {}
    for variant, rankings in pending.items():
        out[variant] = {ASKED: _scored(rankings["dense"], graded, gold, has_gold, ranker.metric, account)}
        if ranker.served is not None and rankings["served"]:
            served = ranker.served
            result = served.score(rankings["served"], graded)
            served_gold = evaluate_rankings(rankings["served"][served.bm25_weight], gold, ranker.metric)
            _attach(result, served_gold, has_gold, account)
            if served.sweep and any(has_gold):
                result.extra["bm25_sweep_events"] = events_sweep(
                    rankings["served"], gold, has_gold, served.sweep, ranker.metric
                )
            out[variant][served_name(ASKED)] = result
    return out


def _scored(
    ranked: list[list[int]],
    graded: list[dict[int, float]],
    gold: list[dict[int, float]],
    has_gold: list[bool],
    metric: str,
    account: AskedJudging,
) -> EvalResult:
    result = evaluate_rankings(ranked, graded, metric)
    _attach(result, evaluate_rankings(ranked, gold, metric), has_gold, account)
    return result


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
) -> dict[str, float]:
    """The sweep scored on the event labels of the questions that have them: the share chosen from
    what users used, not from what an assessor (perhaps the teacher, itself a BM25 mix) prefers."""
    rows = [row for row, flag in enumerate(has_gold) if flag]
    return {
        f"{w:g}": round(
            evaluate_rankings([served[w][row] for row in rows], [gold[row] for row in rows], metric).primary,
            5,
        )
        for w in weights
    }
