"""The quality engine's parts on tiny real models: teachers (hybrid, cross-encoder, ensemble), the durable
teacher-score store across a restart, label repair, each training loss, and the settings that name them."""

from __future__ import annotations

import numpy as np
import pytest

from stages.encoder import EncodeParams, Encoder
from stages.labels import Candidates, LabelParams, LabelQuery, label_examples
from stages.losses import LossSpecError, needs_teacher, parse_loss
from stages.teacher import (
    CrossEncoderTeacher,
    EnsembleTeacher,
    HybridTeacher,
    is_cross_encoder,
    load_teacher,
    parse_teacher_spec,
)

CORPUS = [
    "The river flows through the city and its history is long.",
    "Solar power and energy from the sun feed the grid.",
    "A database server stores files in a folder.",
    "Music and history of the city.",
    "Machine learning models learn from data with neural networks.",
    "The search index holds document embeddings for retrieval.",
]


@pytest.fixture(scope="module")
def encoder(tiny_embedder):
    return Encoder(tiny_embedder, EncodeParams(device="cpu"))


# --- teachers -------------------------------------------------------------------------------------------
def test_cross_encoder_teacher_scores_pairs(tiny_reranker, encoder):
    assert is_cross_encoder(tiny_reranker) and not is_cross_encoder(encoder.path)
    teacher = load_teacher(str(tiny_reranker), CORPUS, encoder, "en", device="cpu")
    assert isinstance(teacher, CrossEncoderTeacher) and teacher.teacher_id.startswith("cross:")
    scores = teacher.score_pairs(["river city", "solar energy"], [CORPUS[0], CORPUS[1]])
    assert scores.shape == (2,) and np.isfinite(scores).all()
    again = teacher.score_pairs(["river city"], [CORPUS[0]])
    assert again[0] == pytest.approx(scores[0], abs=1e-5)  # the same pair, the same judgement
    assert teacher.score_pairs([], []).shape == (0,)


def test_hybrid_scores_pairs_in_and_outside_the_corpus(encoder):
    teacher = HybridTeacher(CORPUS, encoder, bm25_weight=0.5)
    matrix = teacher.corpus_scores(["database server files"])
    inside = teacher.score_pairs(["database server files"] * 2, [CORPUS[2], CORPUS[1]])
    assert inside == pytest.approx(matrix[0, [2, 1]])
    # A passage not in the corpus (an inverse-cloze positive) is put on the same per-query scale.
    outside = teacher.score_pairs(["database server files"], ["a database server stores files"])
    assert np.isfinite(outside).all() and outside[0] > matrix[0, 1]


def test_teacher_specs_and_ensembles(tiny_reranker, encoder):
    assert parse_teacher_spec("hybrid") == [("hybrid", 1.0)]
    assert parse_teacher_spec("hybrid*0.3 + /m/rr*0.7") == [("hybrid", 0.3), ("/m/rr", 0.7)]
    ensemble = load_teacher(f"hybrid*0.5 + {tiny_reranker}*0.5", CORPUS, encoder, "en", device="cpu")
    assert isinstance(ensemble, EnsembleTeacher) and ensemble.teacher_id.startswith("ensemble:")
    scores = ensemble.score_pairs(["river city"] * 3, CORPUS[:3])
    assert scores.shape == (3,) and np.isfinite(scores).all()


# --- label repair ----------------------------------------------------------------------------------------
def _query(source: int, student: float = 1.0) -> LabelQuery:
    return LabelQuery(f"query {source}", source, CORPUS[source], student)


CANDIDATES = [Candidates([0, 1, 2, 3, 4, 5], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4])]


def _scores(values: dict[int, float]) -> dict[tuple[int, int], float]:
    return {(0, c): s for c, s in values.items()}


def test_a_query_the_teacher_disowns_is_relabelled_or_dropped():
    # Source 5 is ranked 6th by the teacher (keep_rank 3): chunk 1 is the teacher's choice.
    teacher = _scores({0: 0.1, 1: 0.9, 2: 0.3, 3: 0.4, 4: 0.5, 5: 0.2})
    params = LabelParams(negatives=2, rank_range=(1, 6), keep_rank=3, repair="relabel")
    relabelled = label_examples([_query(5)], CANDIDATES, teacher, params)
    (example,) = relabelled.examples
    assert example.positive == 1 and example.relabelled and relabelled.stats["relabelled"] == 1
    assert 1 not in example.negatives and 5 not in example.negatives
    dropped = label_examples([_query(5)], CANDIDATES, teacher, LabelParams(2, (1, 6), 3, "drop"))
    assert not dropped.examples and dropped.stats["dropped"] == 1
    # Kept as it is: only chunk 0 scores below the source, so it is the one negative left.
    kept = label_examples([_query(5)], CANDIDATES, teacher, LabelParams(1, (1, 6), 3, "none"))
    assert kept.examples[0].positive == 5 and kept.examples[0].negatives == [0]


def test_a_pair_a_user_made_keeps_its_positive_whatever_the_teacher_says():
    """A clicked/cited pair (issue 37): the application's event outranks the teacher, so neither repair
    mode moves or drops its positive; the teacher still vetoes negatives it ranks above it."""
    teacher = _scores({0: 0.1, 1: 0.9, 2: 0.3, 3: 0.4, 4: 0.5, 5: 0.2})
    clicked = LabelQuery("query 5", 5, CORPUS[5], 1.0, made_by_user=True)
    for repair in ("relabel", "drop"):
        labelled = label_examples([clicked], CANDIDATES, teacher, LabelParams(1, (1, 6), 3, repair))
        (example,) = labelled.examples
        assert example.positive == 5 and not example.relabelled, repair
        assert labelled.stats["relabelled"] == labelled.stats["dropped"] == 0
        assert example.negatives == [0]


def test_hits_a_user_skipped_come_first_among_negatives_when_the_teacher_lets_them():
    """Issue 37: the hits shown above a clicked one and not used join the candidates and are offered
    first; one the teacher rates with the positive is still vetoed."""
    from dataclasses import replace

    from stages.labels import Candidates, with_preferred

    moved = with_preferred(Candidates([0, 1, 2, 3], [0.9, 0.8, 0.7, 0.6]), [3, 7], [0.6, 0.5], 1)
    assert moved.indices == [0, 3, 7, 1, 2] and moved.student == [0.9, 0.6, 0.5, 0.8, 0.7]
    teacher = _scores({0: 0.9, 1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.95})
    params = LabelParams(negatives=2, rank_range=(1, 6), keep_rank=3, repair="relabel")
    for seed in range(5):
        clicked = LabelQuery("query 0", 0, CORPUS[0], 1.0, made_by_user=True, preferred=(4, 5))
        (example,) = label_examples([clicked], CANDIDATES, teacher, replace(params, seed=seed)).examples
        assert example.positive == 0 and example.negatives[0] == 4 and 5 not in example.negatives


def test_negatives_the_teacher_ranks_with_the_positive_are_vetoed():
    # Source 0 is the teacher's 2nd (kept); chunks 1 and 2 score at or above it: never negatives.
    teacher = _scores({0: 0.8, 1: 0.9, 2: 0.8, 3: 0.1, 4: 0.2, 5: 0.3})
    params = LabelParams(negatives=3, rank_range=(1, 6), keep_rank=3, repair="relabel")
    labelled = label_examples([_query(0)], CANDIDATES, teacher, params)
    (example,) = labelled.examples
    assert example.positive == 0 and sorted(example.negatives) == [3, 4, 5]
    assert labelled.stats["negatives_vetoed"] == 2
    # Labels follow [positive, *negatives] and keep the teacher's order after calibration.
    assert example.scores[0] > max(example.scores[1:]) and labelled.stats["label_scale"] > 0


def test_the_teacher_adds_to_the_students_margin_rule():
    # Every candidate is below the positive for the teacher, but chunks 1 and 2 are within the student's
    # margin of the positive (0.85): the teacher's veto never loosens the miner's own rule.
    teacher = _scores({0: 0.9, 1: 0.5, 2: 0.4, 3: 0.3, 4: 0.2, 5: 0.1})
    params = LabelParams(negatives=3, rank_range=(1, 6), keep_rank=3, student_margin=0.2)
    labelled = label_examples([_query(0, 0.85)], CANDIDATES, teacher, params)
    assert sorted(labelled.examples[0].negatives) == [3, 4, 5]
    assert labelled.stats["negatives_too_close"] == 2 and labelled.stats["negatives_vetoed"] == 0


def test_without_a_teacher_the_student_margin_guards_the_negatives():
    params = LabelParams(negatives=2, rank_range=(1, 6), student_margin=0.15)
    labelled = label_examples([LabelQuery("q", 0, CORPUS[0], 0.75)], CANDIDATES, None, params)
    (example,) = labelled.examples
    assert example.scores is None and all(c in (3, 4, 5) for c in example.negatives)  # cosine < 0.6


# --- the score store and the label step across a restart -------------------------------------------------
class CountingTeacher:
    """A real hybrid teacher that counts the pairs it is asked to judge (and can fail after some)."""

    def __init__(self, inner, fail_after: int | None = None) -> None:
        self.inner = inner
        self.teacher_id = inner.teacher_id
        self.judged = 0
        self.fail_after = fail_after

    def score_pairs(self, queries, passages):
        if self.fail_after is not None and self.judged >= self.fail_after:
            raise RuntimeError("teacher died")
        self.judged += len(queries)
        return self.inner.score_pairs(queries, passages)


def _snapshot():
    from stages.round_steps import Snapshot
    from state.round_records import CorpusChunk, TrainSample

    corpus = [CorpusChunk(i + 1, i + 1, text, "", f"sha{i}", "train") for i, text in enumerate(CORPUS)]
    queries = ["river city history", "solar energy", "database files", "city music", "neural data"]
    train = [TrainSample(100 + i, q, CORPUS[i], i + 1, "pseudo") for i, q in enumerate(queries)]
    return Snapshot(corpus, train, [])


def test_scores_are_stored_and_reused_after_a_restart(tmp_path, encoder):
    from stages.round_steps import ScoreStorage, label_with_teacher
    from state.db import Database
    from state.teacher_scores import TeacherScoreStore

    snapshot = _snapshot()
    vectors = encoder.passages(snapshot.texts)
    hybrid = HybridTeacher(snapshot.texts, encoder, 0.5, vectors)
    params = LabelParams(negatives=2, rank_range=(1, 5), keep_rank=2, seed=1)

    def run(teacher, progress=None):
        db = Database(tmp_path / "embedtune.db")  # a fresh connection, as a restarted round has
        store = TeacherScoreStore(db.conn)
        try:
            return label_with_teacher(
                snapshot,
                encoder,
                vectors,
                teacher,
                params,
                ScoreStorage(store.get_many, store.put_many, batch=7),
                progress,
            ), store.count(teacher.teacher_id)
        finally:
            db.close()

    # A teacher that dies part-way: the batches already judged are kept.
    dying = CountingTeacher(hybrid, fail_after=7)
    with pytest.raises(RuntimeError):
        run(dying)
    assert TeacherScoreStore(Database(tmp_path / "embedtune.db").conn).count(hybrid.teacher_id) == 7

    resumed = CountingTeacher(hybrid)
    seen: list[tuple[int, int]] = []
    first, stored = run(resumed, lambda done, total: seen.append((done, total)))
    total = first.stats["pairs"]
    assert resumed.judged == total - 7 and first.stats["pairs_reused"] == 7 and stored == total
    assert seen[0] == (7, total) and seen[-1] == (total, total)

    again = CountingTeacher(hybrid)
    second, _ = run(again)
    assert again.judged == 0 and second.stats["pairs_reused"] == total
    assert [e.scores for e in second.examples] == [e.scores for e in first.examples]
    assert first.examples and all(len(e.neg) == 2 and len(e.scores) == 3 for e in first.examples)
    assert {e.sample_id for e in first.examples} <= {s.id for s in snapshot.train}


# --- losses ------------------------------------------------------------------------------------------------
def test_loss_specs():
    assert [(t.name, t.weight) for t in parse_loss("mnrl+0.5*margin_mse")] == [
        ("mnrl", 1.0),
        ("margin_mse", 0.5),
    ]
    assert needs_teacher("kl") and needs_teacher("mnrl + margin_mse") and not needs_teacher("mnrl")
    for bad in ("mse", "mnrl+mnrl", "0*kl", "mnrl+"):
        with pytest.raises(LossSpecError):
            parse_loss(bad)


def _labelled_examples() -> list[dict]:
    rows = []
    for i, text in enumerate(CORPUS):
        negatives = [CORPUS[(i + 1) % len(CORPUS)], CORPUS[(i + 2) % len(CORPUS)]]
        rows.append(
            {"query": " ".join(text.split()[:3]), "pos": text, "neg": negatives, "scores": [0.9, 0.3, 0.1]}
        )
    return rows * 3


@pytest.mark.parametrize("loss", ["mnrl", "margin_mse", "kl", "mnrl+0.5*margin_mse", "mnrl+kl"])
def test_each_loss_trains_the_tiny_model(tmp_path, tiny_embedder, loss):
    from sentence_transformers import SentenceTransformer

    from stages.train import TrainParams, train_model

    params = TrainParams(batch_size=6, learning_rate=3e-4, device="cpu", loss=loss, precision="fp32")
    outcome = train_model(tiny_embedder, tmp_path / "out", _labelled_examples(), params)
    assert outcome.steps >= 2 and outcome.final_loss is not None and np.isfinite(outcome.final_loss)
    trained = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    before = SentenceTransformer(str(tiny_embedder), device="cpu")
    assert not np.allclose(trained.encode(CORPUS[:2]), before.encode(CORPUS[:2]))  # it learned something


def test_a_teacher_loss_without_scores_is_refused(tmp_path, tiny_embedder):
    from stages.train import TrainParams, train_model

    rows = [{k: v for k, v in row.items() if k != "scores"} for row in _labelled_examples()]
    with pytest.raises(ValueError, match="needs teacher scores"):
        train_model(tiny_embedder, tmp_path / "out", rows, TrainParams(batch_size=6, device="cpu", loss="kl"))


# --- settings -----------------------------------------------------------------------------------------------
def test_settings_name_the_new_keys(make_settings):
    from daemon.settings import Settings

    def error(**sections) -> str:
        with pytest.raises(ValueError) as caught:
            Settings.model_validate(sections)
        return str(caught.value)

    assert "training.loss" in error(training={"distill": True})
    assert "model.teacher" in error(model={"teacher": "none"}, training={"loss": "margin_mse"})
    assert "training.loss" in error(training={"loss": "contrastive"})
    assert "not supported" in error(model={"teacher": "llm"})
    assert "weight" in error(model={"teacher": "hybrid*x + /m/rr"})
    settings = Settings.model_validate(
        {"model": {"teacher": ""}, "synthesis": {"pseudo_method": "keyphrase"}}
    )
    assert settings.model.teacher == "none" and settings.training.loss == "mnrl"


def test_keyphrase_queries_are_short_and_ordered():
    from stages.pseudo import pseudo_queries

    text = (
        "Hydroelectric dams turn the river's flow into electricity. The turbines of a dam spin as water "
        "falls, and the generators feed the regional grid with electricity at night and by day."
    )
    queries = pseudo_queries(text, "", "en", "sha", "keyphrase", 3)
    assert queries and len({q.query for q in queries}) == len(queries)
    for candidate in queries:
        words = candidate.query.split()
        assert 2 <= len(words) <= 4 and all(w in text.lower() for w in words)
        positions = [text.lower().find(w) for w in words]
        assert positions == sorted(positions)  # in the order they appear


def test_status_shows_the_teachers_progress():
    from state.status import empty_status, format_status

    status = empty_status()
    status["rounds"] = [
        {
            "id": 3,
            "state": "running",
            "stage": "label",
            "decision": None,
            "reason": "",
            "progress": {"scored": 1024, "total": 4810, "elapsed_s": 12.0},
        }
    ]
    assert "label      teacher 1024/4810 pairs" in format_status(status)


@pytest.mark.parametrize(
    ("precision", "device", "cuda", "bf16", "expected"),
    [
        ("auto", "cpu", True, True, "fp32"),  # a CUDA host told to train on the CPU: no half precision
        ("bf16", "cpu", True, True, "fp32"),
        ("auto", "auto", False, False, "fp32"),
        ("auto", "auto", True, True, "bf16"),
        ("auto", "cuda:1", True, False, "fp16"),
        ("fp16", "cuda", True, True, "fp16"),
    ],
)
def test_precision_follows_the_training_device(precision, device, cuda, bf16, expected):
    from stages.train import choose_precision

    assert choose_precision(precision, device, cuda, bf16) == expected


def test_far_chunks_top_up_the_negatives_unless_the_teacher_objects():
    found = [Candidates([0, 1, 2], [0.9, 0.88, 0.87], extras=[4, 5], extras_student=[0.1, 0.2])]
    params = LabelParams(negatives=2, rank_range=(1, 3), keep_rank=3, student_margin=0.1)
    # The window's chunks are all within the student's margin; far chunk 5 is vetoed by the teacher.
    teacher = _scores({0: 0.9, 1: 0.2, 2: 0.2, 4: 0.1, 5: 0.95})
    labelled = label_examples([_query(0, 0.9)], found, teacher, params)
    assert not labelled.examples and labelled.stats["topped_up"] == 1  # one safe far chunk, two needed
    labelled = label_examples(
        [_query(0, 0.9)], found, _scores({0: 0.9, 1: 0.2, 2: 0.2, 4: 0.1, 5: 0.3}), params
    )
    assert labelled.examples[0].negatives == [4, 5]
