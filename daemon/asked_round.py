"""A round's use of the questions users asked: read them once with the round's snapshot, add the
clicked pairs of the train part to its training samples, and judge the variants on the judge part
(stages/real_queries.py, stages/asked_eval.py). The round process calls these; the work is in stages/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from daemon.logs import get_logger
from daemon.settings import Settings
from state.db import Database
from state.real_queries import JudgmentStore, LoggedQuestion, RealQueryStore
from state.round_records import RoundInputs

log = get_logger("embedtune.round")


@dataclass
class LoggedForRound:
    """The logged questions as the round read them, and what it made of them."""

    questions: list[LoggedQuestion] = field(default_factory=list)
    judged_pairs: set[str] = field(default_factory=set)  # training queries that are gate questions
    clicked: int = 0  # clicked pairs added to training
    skipped: dict[int, list[int]] = field(default_factory=dict)  # clicked sample id -> skipped chunk ids

    @property
    def judge_count(self) -> int:
        from state.real_queries import JUDGE

        return sum(1 for q in self.questions if q.split == JUDGE)


def read_logged(settings: Settings, db: Database, inputs: RoundInputs) -> LoggedForRound:
    """The most recent distinct questions (splits assigned to new ones, for good), and which of the
    round's training queries are questions of the gate's part (asked at any time); nothing read when the
    log is off for rounds (`query_log.questions = 0`)."""
    store = RealQueryStore(db.conn)
    limit = settings.query_log.questions
    questions = store.questions(limit, settings.query_log.judge_share) if limit > 0 else []
    return LoggedForRound(questions, store.judged_among([s.query for s in inputs.train]))


def with_clicked_pairs(
    settings: Settings, inputs: RoundInputs, logged: LoggedForRound, folder: Path
) -> RoundInputs:
    """The round's inputs with the train part's clicked pairs first (real pairs before synthetic ones),
    the whole still at most `training.max_pairs`; the pairs are written to clicked.jsonl. A synthetic
    pair whose question is one the gate judges on is left out: the judge part is never trained on."""
    from stages.real_queries import clicked_pairs, clicked_samples

    kept = [s for s in inputs.train if s.query not in logged.judged_pairs]
    if len(kept) < len(inputs.train):
        log.info("round_left_out_judged_questions", pairs=len(inputs.train) - len(kept))
        inputs = replace(inputs, train=kept)
    if not settings.query_log.train_on_clicks or not logged.questions:
        return inputs
    # Chunks of held-out documents are never trained on: the held-out set still judges when a round has
    # no usable asked set, and breaks ties.
    trainable = {chunk.id: position for position, chunk in enumerate(inputs.corpus) if chunk.split == "train"}
    pairs = clicked_pairs(logged.questions, trainable)
    if not pairs:
        return inputs
    texts = [chunk.text for chunk in inputs.corpus]
    samples = clicked_samples(pairs, texts, trainable)[: settings.training.max_pairs]
    logged.clicked = len(samples)
    logged.skipped = {
        s.id: list(pair.skipped) for s, pair in zip(samples, pairs, strict=False) if pair.skipped
    }
    with open(folder / "clicked.jsonl", "w", encoding="utf-8") as handle:
        for pair in pairs[: len(samples)]:
            handle.write(json.dumps(pair.__dict__, ensure_ascii=False) + "\n")
    log.info("round_clicked_pairs", pairs=len(samples))
    train = [*samples, *inputs.train][: max(settings.training.max_pairs, len(samples))]
    return replace(inputs, train=train)


def asked_set_for(settings: Settings, logged: LoggedForRound, snapshot):
    """The judge part as an evaluation set over the snapshot, or None below `promotion.asked_min_queries`
    questions (the round then judges as it did before there was a log)."""
    from stages.real_queries import asked_set

    if logged.judge_count < settings.promotion.asked_min_queries:
        return None
    asked = asked_set(logged.questions, snapshot.texts, snapshot.keys, snapshot.position)
    return asked if len(asked) >= settings.promotion.asked_min_queries else None


def build_assessor(settings: Settings, layout, corpus_texts: list[str], base_path: Path, base_vectors=None):
    """The LLM assessor when `promotion.assessor` allows and `llm.url` is set, else the teacher
    (`model.teacher`, or the hybrid of the base model and BM25 over the round's corpus: a weak
    assessor). `base_vectors`: the base model's corpus vectors when the round has them. Returns
    (assessor, a function that releases what it holds)."""
    from daemon.step_params import llm_config, torch_encode_params
    from stages.assessor import LlmAssessor, TeacherAssessor

    choice = settings.promotion.assessor
    if choice == "llm" or (choice == "auto" and settings.llm.enabled):
        if settings.llm.enabled:
            from stages.llm import CircuitBreaker, LlmClient

            client = LlmClient(
                llm_config(settings),
                CircuitBreaker(settings.llm.breaker_failures, settings.llm.breaker_reset_s),
            )
            return LlmAssessor(client, settings.llm.model), client.close
        log.warning("asked_assessor_without_llm", reason="promotion.assessor = 'llm' but llm.url is empty")
    from daemon.serving import converted_models_root
    from stages.encoder import Encoder
    from stages.teacher import load_teacher
    from stages.text import detect_language

    base = Encoder(base_path, torch_encode_params(settings), layout.cache)
    spec = settings.model.teacher if settings.model.teacher != "none" else "hybrid"
    teacher = load_teacher(
        spec,
        corpus_texts,
        base,
        detect_language(" ".join(corpus_texts[:200])),
        base_vectors,
        settings.model.teacher_bm25_weight,
        settings.model.device,
        converted_models_root(settings),
    )
    return TeacherAssessor(teacher), base.release


def judgment_storage(db: Database):
    from stages.asked_eval import JudgmentStorage

    store = JudgmentStore(db.conn)
    return JudgmentStorage(store.get_many, store.put_many)
