"""The pieces `search`, the index job and the gate share (stages/fusion.py) and the one report both forms of
`embedtune eval` print (daemon/eval_report.py): written once, so what the gate judges is what is served."""

from __future__ import annotations

import numpy as np
import pytest

WORDS = "river city history music energy solar power water system computer science database".split()


def _unmatched_set(size: int):
    """Every passage relevant to a query none of whose words is in the corpus: BM25 finds nothing, so what
    the served evaluator can return is the dense half's list, and recall@100 measures its length."""
    from stages.evalsets import EvalSet
    from stages.round_steps import HELDOUT

    corpus = [f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7 + 3) % len(WORDS)]} number {i}" for i in range(size)]
    return EvalSet(HELDOUT, ["violin orchestra"], corpus, [dict.fromkeys(range(size), 1.0)])


@pytest.mark.parametrize(("candidates", "metric", "reach"), [(12, "ndcg@10", 12), (100, "ndcg@10", 30)])
def test_the_gates_served_evaluator_ranks_with_the_index_candidate_depth(
    tiny_embedder, candidates, metric, reach
):
    """Defect 10: `search` asks each half for `index.candidates` hits; the gate asked for 100 whatever it
    was set to. The plan carries the setting to the evaluator, which lists as many."""
    from stages.encoder import EncodeParams, Encoder
    from stages.hybrid_eval import HybridEvaluator
    from stages.round_steps import EvalPlan, build_evaluators

    eval_set = _unmatched_set(30)
    plan = EvalPlan(metric=metric, served_mode="hybrid", bm25_weight=0.0, candidates=candidates)
    served = [e for e in build_evaluators([eval_set], plan) if isinstance(e, HybridEvaluator)]
    assert len(served) == 1
    result = served[0](Encoder(tiny_embedder, EncodeParams(device="cpu")))
    assert result.metrics["recall@100"] == pytest.approx(reach / 30)


def test_the_candidate_depth_is_searchs_rule():
    """Each half returns `index.candidates`, never fewer than the k asked for (search -k 100, or a gate
    whose metric reaches 100)."""
    from stages.fusion import candidate_depth
    from stages.hybrid_eval import HybridEvaluator

    assert candidate_depth(10, 40) == 40
    assert candidate_depth(100, 40) == 100
    eval_set = _unmatched_set(5)
    assert HybridEvaluator(eval_set, 0.2, "ndcg@10", candidates=40).depth == 40
    assert HybridEvaluator(eval_set, 0.2, "recall@100", candidates=40).depth == 100


def test_the_stats_sample_is_every_row_or_a_fixed_draw():
    from stages.fusion import STATS_SAMPLE, stats_sample

    assert stats_sample(0).size == 0
    assert sorted(stats_sample(7).tolist()) == list(range(7))
    drawn = stats_sample(STATS_SAMPLE + 500)
    assert len(drawn) == len(set(drawn.tolist())) == STATS_SAMPLE
    assert np.array_equal(drawn, stats_sample(STATS_SAMPLE + 500))  # the same rows every time
    assert not np.array_equal(drawn, stats_sample(STATS_SAMPLE + 500, seed=1))


def test_the_sample_is_the_one_the_three_copies_drew():
    """Switching the index job (a draw of chunk ids) and exact search (a draw of matrix rows) to the
    helper keeps the sample they drew before, so stored statistics stay valid."""
    from stages.fusion import STATS_SAMPLE, sample_covariance, stats_sample, vector_covariance

    count = STATS_SAMPLE + 321
    matrix = np.random.default_rng(5).normal(size=(count, 4)).astype(np.float32)
    rows = np.random.default_rng(0).choice(count, size=STATS_SAMPLE, replace=False)
    assert np.allclose(sample_covariance(matrix), vector_covariance(matrix[rows]))
    chunk_ids = np.arange(count) * 3 + 11
    old_ids = np.random.default_rng(0).choice(chunk_ids, size=STATS_SAMPLE, replace=False)
    assert np.array_equal(chunk_ids[stats_sample(count)], old_ids)
    small = matrix[:50]
    assert np.allclose(sample_covariance(small), vector_covariance(small))  # every row: the exact covariance


def test_the_teacher_and_the_served_fusion_each_keep_their_own_measured_share(tiny_embedder):
    """Two different mixes, each with its share measured for it (stages/teacher.py, stages/fusion.py): the
    teacher's stays in its id (stored judgements), the served one decides an English query's share."""
    from stages.encoder import EncodeParams, Encoder
    from stages.fusion import READS_ALL_LANGUAGES_SHARE, query_bm25_weight, served_default_share
    from stages.teacher import load_teacher, teacher_bm25_share

    assert (teacher_bm25_share("en"), teacher_bm25_share("zh"), teacher_bm25_share("fr")) == (0.3, 0.7, 0.3)
    assert (served_default_share("standard"), served_default_share("jieba")) == (0.2, 0.7)
    assert query_bm25_weight("how are database backups made") == served_default_share("standard")
    assert query_bm25_weight("数据库怎么备份") == served_default_share("jieba")
    assert READS_ALL_LANGUAGES_SHARE == served_default_share("standard")
    encoder = Encoder(tiny_embedder, EncodeParams(device="cpu"))
    teacher = load_teacher("hybrid", ["river water", "solar power"], encoder, "en")
    assert teacher.teacher_id.startswith("hybrid:w=0.3:")


def _result(values: list[float]):
    from stages.evaluate import METRICS, EvalResult

    per_query = {name: list(values) for name in METRICS}
    return EvalResult({name: float(np.mean(values)) for name in METRICS}, per_query, len(values))


def test_one_gain_rule_and_one_layout_for_both_evals(capsys):
    from daemon.eval_report import paired_gain, print_report, verdict

    results = {"v2": _result([1.0, 1.0, 0.5, 1.0]), "base": _result([0.0, 0.5, 0.5, 0.0])}
    gain = paired_gain(results, "v2", "base", 200, 42)
    assert (gain["row"], gain["over"], gain["value"]) == ("v2", "base", 0.625)
    low, high = gain["ci95"]
    assert 0 < low <= 0.625 <= high
    assert verdict([0.1, 0.2]) == "above zero"
    assert verdict([-0.2, -0.1]) == "below zero"
    assert verdict([-0.1, 0.1]) == "includes zero"
    print_report("data.jsonl: 4 queries", ["nothing promoted yet"], results, "ndcg@10", [gain])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "data.jsonl: 4 queries"
    assert lines[1] == "  note: nothing promoted yet"
    assert lines[2].startswith("  v2    ndcg@10 0.8750") and "recall@10" in lines[2] and "mrr@10" in lines[2]
    assert lines[3].startswith("  base  ndcg@10 0.2500")
    assert lines[4] == f"  v2: ndcg@10 gain over base +0.6250, 95% CI [{low:+.4f}, {high:+.4f}] (above zero)"
