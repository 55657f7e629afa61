"""Teacher labels for training queries: which chunk is the positive, which are safe negatives, and the
teacher's scores that the distillation losses learn from.

Label repair (GPL's lesson: the teacher makes noisy pseudo-queries usable):
- a query whose source chunk the teacher ranks below `keep_rank` is relabelled to the teacher's top chunk
  (`repair = "relabel"`) or dropped (`"drop"`);
- a mined negative that the teacher scores at or above the positive is never used as a negative (it is
  most likely relevant too).
Negatives come from the student's own top ranks (what it confuses), as GPL mines them.

Teacher scores are put on a cosine scale (one factor per set): their pooled spread over each query's
candidates becomes `target_spread`, the contrastive loss's temperature, so a teacher score difference of
one spread is one unit of the student's logits (cosine / temperature). MarginMSE's margins and the KL's
softmax then mean the same for any teacher: hybrid z-scores, cross-encoder logits or LLM grades. (Scaling
to the student's own spread was tried first: on Chinese text the English student's spread is a fifth of
a competent model's, and MarginMSE then taught it to keep its margins that small; docs/benchmarks.md.)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

REPAIR_MODES = ("none", "drop", "relabel")


@dataclass(frozen=True)
class LabelParams:
    negatives: int = 3
    # Student ranks (1-based, inclusive low, exclusive high) negatives are drawn from.
    rank_range: tuple[int, int] = (1, 30)
    keep_rank: int = 3
    repair: str = "relabel"
    # Without a teacher: skip candidates the student scores within this margin of the positive.
    student_margin: float = 0.05
    # The teacher's pooled score spread after calibration (the contrastive temperature).
    target_spread: float = 0.05
    seed: int = 0


@dataclass
class LabelledExample:
    query: str
    source: int  # corpus index the query was made from
    positive: int  # corpus index used as the positive (the source, or the teacher's choice)
    negatives: list[int]
    scores: list[float] | None  # teacher scores of [positive, *negatives] on the student's scale
    relabelled: bool = False
    student: list[float] = field(default_factory=list)  # the student's cosines of the same chunks
    index: int = -1  # position of the query in the list label_examples was given


@dataclass
class LabelledSet:
    examples: list[LabelledExample]
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class Candidates:
    """What the student retrieves for one query: corpus indices best first, with its cosines; `extras` are
    random chunks from beyond that window (hn_mine's top-up when the window has too few negatives)."""

    indices: list[int]
    student: list[float]
    extras: list[int] = field(default_factory=list)
    extras_student: list[float] = field(default_factory=list)


def add_random_extras(
    candidates: Sequence[Candidates],
    query_vectors: np.ndarray,
    corpus_vectors: np.ndarray,
    count: int,
    seed: int = 0,
) -> None:
    """Give each query `count` random chunks outside its retrieved window, with the student's cosines.
    Far chunks are almost never relevant; the teacher still judges them before one becomes a negative."""
    from stages.negatives import random_others

    rng = random.Random(seed)
    size = len(corpus_vectors)
    for row, found in enumerate(candidates):
        taken = set(found.indices)
        if size - len(taken) < count:
            taken = set()  # a corpus no larger than the window: any chunk, as hn_mine tops up
        if count <= 0 or size - len(taken) <= 0:
            continue
        extras = random_others(rng, size, taken, count)
        found.extras = extras
        found.extras_student = [float(query_vectors[row] @ corpus_vectors[c]) for c in extras]


def with_preferred(
    found: Candidates, preferred: Sequence[int], scores: Sequence[float], at: int
) -> Candidates:
    """The student's candidates with `preferred` (corpus indices, their cosines in `scores`) moved to
    rank `at` (0-based, the start of the negatives' window), so the teacher judges them and the window
    offers them; each appears once."""
    moved = set(preferred)
    kept = [(c, x) for c, x in zip(found.indices, found.student, strict=True) if c not in moved]
    ordered = kept[:at] + list(zip(preferred, scores, strict=True)) + kept[at:]
    return Candidates(
        [c for c, _ in ordered], [x for _, x in ordered], list(found.extras), list(found.extras_student)
    )


def student_candidates(query_vectors: np.ndarray, corpus_vectors: np.ndarray, depth: int) -> list[Candidates]:
    """The student's top `depth` chunks per query (faiss inner product on normalised vectors)."""
    from stages.negatives import build_index, search_depth

    depth = min(depth, len(corpus_vectors))
    if depth == 0:
        return [Candidates([], []) for _ in range(len(query_vectors))]
    index = build_index(corpus_vectors)
    search_depth(index, depth)
    scores, ids = index.search(np.ascontiguousarray(query_vectors, dtype=np.float32), depth)
    return [
        Candidates(
            [int(i) for i in row_ids if i >= 0],
            [float(x) for x, i in zip(row, row_ids, strict=True) if i >= 0],
        )
        for row, row_ids in zip(scores, ids, strict=True)
    ]


@dataclass(frozen=True)
class LabelQuery:
    query: str
    source: int  # corpus index of the chunk the query was made from
    passage: str  # the training passage (the chunk, or for inverse cloze the chunk without the query)
    source_student: float  # the student's cosine of the query and its training passage
    made_by_user: bool = False  # a clicked/cited pair: the user chose the positive, the teacher may not
    preferred: tuple[int, ...] = ()  # corpus indices a user skipped above it: first among its negatives


def pair_texts(
    queries: Sequence[LabelQuery], pairs: Sequence[tuple[int, int]], corpus_texts: Sequence[str]
) -> tuple[list[str], list[str]]:
    """The (query, passage) texts the teacher reads for each pair; a source is read as its training passage."""
    texts = [
        (queries[i].query, queries[i].passage if c == queries[i].source else corpus_texts[c])
        for i, c in pairs
    ]
    return [q for q, _ in texts], [p for _, p in texts]


def pairs_to_score(queries: Sequence[LabelQuery], candidates: Sequence[Candidates], params: LabelParams):
    """(query index, corpus index) pairs the teacher must judge: each source and the candidates within the
    window that negatives and relabelling draw from."""
    depth = max(params.rank_range[1], params.keep_rank)
    pairs: list[tuple[int, int]] = []
    for i, (query, found) in enumerate(zip(queries, candidates, strict=True)):
        wanted = dict.fromkeys([query.source, *found.indices[:depth], *found.extras])
        pairs.extend((i, c) for c in wanted)
    return pairs


def _teacher_positive(
    source: int, judged: dict[int, float], params: LabelParams, counts: dict, made_by_user: bool = False
) -> tuple[int, bool] | None:
    """(positive, relabelled): the source while the teacher ranks it within `keep_rank`, else by the
    repair mode the teacher's best candidate, or None (the query is dropped). A pair a user made keeps
    its positive: the application's event outranks the teacher, a weaker judge of this question."""
    if made_by_user:
        counts["kept_source"] += 1
        return source, False
    source_score = judged[source]
    source_rank = 1 + sum(1 for c, s in judged.items() if c != source and s > source_score)
    if source_rank <= params.keep_rank or params.repair == "none":
        counts["kept_source"] += 1
        return source, False
    if params.repair == "relabel":
        counts["relabelled"] += 1
        return max(judged, key=lambda c: judged[c]), True
    counts["dropped"] += 1
    return None


def _teacher_window(
    window_ids: Sequence[int],
    positive: int,
    query: LabelQuery,
    judged: dict[int, float],
    student: dict[int, float],
    params: LabelParams,
    counts: dict,
) -> list[int]:
    """Negative candidates: the teacher adds a veto to the miner's own rule, never loosens it. A candidate
    the student already scores within `student_margin` of the positive stays out too (on corpora where a
    topic has dozens of relevant documents, the student's top ranks are full of them)."""
    floor = student.get(positive, query.source_student) - params.student_margin
    window = []
    for c in window_ids:
        if c in (positive, query.source) or c not in judged:
            continue
        if judged[c] >= judged[positive]:
            counts["negatives_vetoed"] += 1  # the teacher says it is as relevant: not a negative
            continue
        if student[c] >= floor:
            counts["negatives_too_close"] += 1
            continue
        window.append(c)
    return window


def _top_up(
    negatives: list[int],
    extras: Sequence[int],
    positive: int,
    source: int,
    judged: dict[int, float],
    with_teacher: bool,
    params: LabelParams,
    counts: dict,
) -> None:
    """Fill `negatives` from far chunks, as hn_mine does, unless the teacher objects."""
    for c in extras:
        if len(negatives) >= params.negatives:
            break
        if c in (positive, source) or c in negatives:
            continue
        if with_teacher and (c not in judged or judged[c] >= judged[positive]):
            continue
        negatives.append(c)
        counts["topped_up"] += 1


def label_examples(
    queries: Sequence[LabelQuery],
    candidates: Sequence[Candidates],
    teacher_scores: dict[tuple[int, int], float] | None,
    params: LabelParams,
) -> LabelledSet:
    """Positives, negatives and teacher labels for each query. `teacher_scores` maps (query index, corpus
    index) to the teacher's score (see pairs_to_score); None keeps the sources and mines with the student
    alone (the no-teacher recipe)."""
    if params.repair not in REPAIR_MODES:
        raise ValueError(f"repair must be one of {REPAIR_MODES}")
    rng = random.Random(params.seed)
    low, high = params.rank_range
    examples: list[LabelledExample] = []
    counts = {
        "queries": len(queries),
        "kept_source": 0,
        "relabelled": 0,
        "dropped": 0,
        "negatives_vetoed": 0,
        "negatives_too_close": 0,
        "topped_up": 0,
    }
    for i, (query, found) in enumerate(zip(queries, candidates, strict=True)):
        student = dict(zip(found.indices, found.student, strict=True))
        student.update(zip(found.extras, found.extras_student, strict=True))
        student[query.source] = query.source_student
        window_ids = found.indices[low - 1 : high]
        judged: dict[int, float] = {}
        if teacher_scores is None:
            positive, relabelled = query.source, False
            floor = query.source_student - params.student_margin
            window = [c for c in window_ids if c != query.source and student[c] < floor]
        else:
            judged = {
                c: teacher_scores[(i, c)]
                for c in [query.source, *found.indices, *found.extras]
                if (i, c) in teacher_scores
            }
            chosen = _teacher_positive(query.source, judged, params, counts, query.made_by_user)
            if chosen is None:
                continue
            positive, relabelled = chosen
            window = _teacher_window(window_ids, positive, query, judged, student, params, counts)
        first = [c for c in query.preferred if c in window][: params.negatives]
        rest = [c for c in window if c not in first]
        negatives = first + rng.sample(rest, k=min(params.negatives - len(first), len(rest)))
        _top_up(
            negatives,
            found.extras,
            positive,
            query.source,
            judged,
            teacher_scores is not None,
            params,
            counts,
        )
        if len(negatives) < params.negatives:
            continue  # every row needs the same number of negatives; a tiny corpus may not have them
        labels = None
        if teacher_scores is not None:
            labels = [judged[positive]] + [judged[c] for c in negatives]
        student_scores = [student.get(positive, 0.0)] + [student[c] for c in negatives]
        examples.append(
            LabelledExample(
                query.query, query.source, positive, negatives, labels, relabelled, student_scores, i
            )
        )
    if teacher_scores is not None:
        counts["label_scale"] = calibrate(examples, params.target_spread)
    counts["examples"] = len(examples)
    return LabelledSet(examples, counts)


def spread(rows: Sequence[Sequence[float]]) -> float:
    """Pooled standard deviation of scores around each row's own mean (only differences matter)."""
    centred = [np.asarray(row, dtype=np.float64) - np.mean(row) for row in rows if len(row) > 1]
    return float(np.sqrt(np.mean(np.concatenate(centred) ** 2))) if centred else 0.0


def calibrate(examples: list[LabelledExample], target_spread: float) -> float:
    """Rescale teacher scores so their pooled spread is `target_spread`; returns the factor."""
    teacher_spread = spread([e.scores for e in examples if e.scores])
    factor = target_spread / teacher_spread if teacher_spread > 0 else 1.0
    for example in examples:
        if example.scores:
            example.scores = [s * factor for s in example.scores]
    return factor
