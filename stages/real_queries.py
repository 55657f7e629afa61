"""What the logged questions say, as a round uses them: event labels (the application's clicks and
citations), clicked pairs to train on, and the `asked` evaluation set only the gate sees.

The application's events are the strongest judge the loop has: a `cited` hit is what the application
answered with, a `click` is what its user opened. A hit shown above a used one and not used is a weak
negative (the user read past it); nothing is said about hits below. Labels are derived from the log each
round (the log is their store); chunks no longer active are dropped, so an edited document's old chunks
never count for or against a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from stages.evalsets import EvalSet
from state.real_queries import JUDGE, TRAIN, LoggedAnswer, LoggedQuestion
from state.round_records import TrainSample

# UMBRELA's scale (stages/assessor.py): what the application answered with is the answer (3); what the
# user opened answers it at least in part (2).
EVENT_GRADES: Mapping[str, float] = {"cited": 3.0, "click": 2.0}
ASKED = "asked"
CLICKED_KIND = "clicked"


@dataclass(frozen=True)
class EventLabels:
    """One question's labels from its events, by chunk id."""

    relevant: dict[int, float] = field(default_factory=dict)  # chunk id -> grade
    skipped: frozenset[int] = frozenset()  # shown above a used hit and not used: weak negatives

    def __bool__(self) -> bool:
        return bool(self.relevant)


def used_chunks(answer: LoggedAnswer) -> dict[int, float]:
    """The hits of one answer its events used, with the strongest grade any event gave each. An event
    names its hit by chunk id (object_id) or by 1-based position; one naming neither, or a chunk the
    answer did not show, is not a label (an application may log events about other things)."""
    used: dict[int, float] = {}
    for event in answer.events:
        grade = EVENT_GRADES.get(event.action.strip().lower())
        if grade is None:
            continue
        chunk = _event_chunk(answer, event.object_id, event.position)  # a shown hit, or None
        if chunk is not None:
            used[chunk] = max(used.get(chunk, 0.0), grade)
    return used


def _event_chunk(answer: LoggedAnswer, object_id: str | None, position: int | None) -> int | None:
    """The chunk an event names: its object_id when that is a chunk the answer showed, else the hit at
    its position (an application may put its own document id in object_id)."""
    if object_id is not None:
        text = str(object_id).strip()
        if text.isascii() and text.isdigit() and int(text) in answer.hit_ids:
            return int(text)
    if position is not None and 1 <= position <= len(answer.hit_ids):
        return answer.hit_ids[position - 1]
    return None


def event_labels(question: LoggedQuestion) -> EventLabels:
    """Every answer's used hits (the strongest grade across answers) and the hits shown above a used
    one that no answer used."""
    relevant: dict[int, float] = {}
    skipped: set[int] = set()
    for answer in question.answers:
        used = used_chunks(answer)
        for chunk, grade in used.items():
            relevant[chunk] = max(relevant.get(chunk, 0.0), grade)
        if used:
            deepest = max(answer.hit_ids.index(chunk) for chunk in used)
            skipped.update(chunk for chunk in answer.hit_ids[:deepest] if chunk not in used)
    return EventLabels(relevant, frozenset(skipped - set(relevant)))


@dataclass(frozen=True)
class ClickedPair:
    """A logged question and the chunk its application used: a training pair made by a user."""

    query: str
    chunk_id: int
    grade: float
    skipped: tuple[int, ...]  # shown above it and not used: hard-negative candidates (still vetted)


def clicked_pairs(questions: Sequence[LoggedQuestion], active: Mapping[int, int]) -> list[ClickedPair]:
    """Training pairs from the train part of the log: each question with its used chunks that are still
    active (`active`: chunk id -> corpus position), most recent question first, strongest grade first.
    Judge-part questions never appear here: that is what keeps the gate's questions unseen."""
    pairs: list[ClickedPair] = []
    for question in questions:
        if question.split != TRAIN:
            continue
        labels = event_labels(question)
        skipped = tuple(sorted(c for c in labels.skipped if c in active))
        for chunk, grade in sorted(labels.relevant.items(), key=lambda item: -item[1]):
            if chunk in active:
                pairs.append(ClickedPair(question.text, chunk, grade, skipped))
    return pairs


def clicked_samples(
    pairs: Sequence[ClickedPair], texts: Sequence[str], active: Mapping[int, int]
) -> list[TrainSample]:
    """The pairs as the round's training samples (kind `clicked`). Their ids are negative: they are not
    rows of the samples table, so a round never marks them used (a question is asked again; its pair
    stays a pair)."""
    return [
        TrainSample(-(number + 1), pair.query, texts[active[pair.chunk_id]], pair.chunk_id, CLICKED_KIND)
        for number, pair in enumerate(pairs)
    ]


@dataclass
class AskedSet:
    """The judge part of the log as an evaluation set over the round's corpus.

    `eval_set.relevant` holds the event labels by corpus position (empty for a question without events);
    `gold[i]` says whether question i has events (its labels are then the gold the assessor is checked
    against; a hit they do not name counts as not relevant, as one shown above a used hit is); `keys`
    are the questions' keys, under which assessor judgments are stored."""

    eval_set: EvalSet
    keys: list[str]
    gold: list[bool]
    shown: list[frozenset[int]]  # positions any answer to the question showed (the events' condensed lists)

    @property
    def gold_count(self) -> int:
        return sum(self.gold)

    def __len__(self) -> int:
        return len(self.keys)


def asked_set(
    questions: Sequence[LoggedQuestion],
    texts: Sequence[str],
    corpus_keys: Sequence[str],
    active: Mapping[int, int],
) -> AskedSet:
    """The judge-part questions against the round's corpus (`active`: chunk id -> position)."""
    queries, keys, relevant, gold, shown = [], [], [], [], []
    for question in questions:
        if question.split != JUDGE:
            continue
        labels = event_labels(question)
        judged = {active[c]: grade for c, grade in labels.relevant.items() if c in active}
        queries.append(question.text)
        keys.append(question.key)
        relevant.append(judged)
        gold.append(bool(judged))
        hits = {chunk for answer in question.answers for chunk in answer.hit_ids}
        shown.append(frozenset(active[c] for c in hits if c in active))
    eval_set = EvalSet(ASKED, queries, list(texts), relevant, list(corpus_keys))
    return AskedSet(eval_set, keys, gold, shown)


def restrict_asked(asked: AskedSet, pool) -> AskedSet:
    """The asked set against the evaluation pool only (positions re-indexed as stages.eval_pool.restrict
    does for the set itself)."""
    from stages.eval_pool import restrict

    position = {int(old): new for new, old in enumerate(pool)}
    shown = [frozenset(position[p] for p in seen if p in position) for seen in asked.shown]
    return AskedSet(restrict(asked.eval_set, pool), asked.keys, asked.gold, shown)
