"""Issue 37: what the logged questions say (event labels, clicked pairs, the asked set), the pooled
judging of the asked set, and the gate's rule on it (rule 0, docs/promotion.md)."""

from __future__ import annotations

import numpy as np
import pytest

from stages.asked_eval import AskedJudging, JudgmentStorage, judge_pools, pooled_positions
from stages.gate import AskedEvidence, RejectionCause, decide
from stages.real_queries import ASKED, asked_set, clicked_pairs, clicked_samples, event_labels
from state.real_queries import JUDGE, TRAIN, LoggedAnswer, LoggedEventRef, LoggedQuestion


def _answer(hits, *events, query_id="q") -> LoggedAnswer:
    return LoggedAnswer(query_id, list(hits), [LoggedEventRef(*e) for e in events], "v1", "hybrid", "t")


def _question(text, split, *answers) -> LoggedQuestion:
    return LoggedQuestion(f"key-{text}", text, split, list(answers), "t")


def test_event_labels_grade_used_hits_and_mark_the_skipped_ones_above():
    question = _question(
        "how do I rotate keys",
        TRAIN,
        _answer([10, 11, 12, 13], ("click", "12", 3), ("impression", "13", 4)),
        _answer([11, 12, 14], ("cited", None, 1)),  # by position: chunk 11
    )
    labels = event_labels(question)
    assert labels.relevant == {12: 2.0, 11: 3.0}
    # 10 was shown above a clicked hit and not used; 11 was skipped once but cited later: relevant wins
    assert labels.skipped == frozenset({10})
    assert not event_labels(_question("nothing used", TRAIN, _answer([1, 2], ("impression", "1", 1))))


def test_an_event_about_a_chunk_the_answer_did_not_show_is_no_label():
    question = _question("q", TRAIN, _answer([1, 2], ("click", "99", None), ("click", "not-a-chunk", 9)))
    assert event_labels(question).relevant == {}
    # an application's own document id in object_id: the position still names the hit
    own_id = _question("q", TRAIN, _answer([1, 2], ("click", "doc-7", 2), ("cited", "99", 1)))
    assert event_labels(own_id).relevant == {2: 2.0, 1: 3.0}
    assert event_labels(_question("q", TRAIN, _answer([1, 2], ("click", "2٠", None)))).relevant == {}


def test_clicked_pairs_come_only_from_the_train_part_and_active_chunks():
    questions = [
        _question("trained on", TRAIN, _answer([1, 2, 3], ("click", "2", 2))),
        _question("judged only", JUDGE, _answer([1, 2, 3], ("cited", "3", 3))),
        _question("edited away", TRAIN, _answer([7], ("click", "7", 1))),
    ]
    active = {1: 0, 2: 1, 3: 2}
    pairs = clicked_pairs(questions, active)
    assert [(p.query, p.chunk_id, p.skipped) for p in pairs] == [("trained on", 2, (1,))]
    samples = clicked_samples(pairs, ["one", "two", "three"], active)
    assert samples[0].passage == "two" and samples[0].id < 0 and samples[0].kind == "clicked"


def test_the_asked_set_holds_the_judge_part_with_event_labels_by_position():
    questions = [
        _question("judged with a click", JUDGE, _answer([3, 1], ("click", "1", 2))),
        _question("judged without events", JUDGE, _answer([3, 1])),
        _question("trained on", TRAIN, _answer([1], ("click", "1", 1))),
    ]
    asked = asked_set(questions, ["a", "b", "c"], ["ka", "kb", "kc"], {1: 0, 2: 1, 3: 2})
    assert asked.eval_set.name == ASKED
    assert asked.eval_set.queries == ["judged with a click", "judged without events"]
    assert asked.eval_set.relevant == [{0: 2.0}, {}]
    assert asked.gold == [True, False] and asked.gold_count == 1
    assert "trained on" not in asked.eval_set.queries  # the split keeps them apart


class _PoolGrader:
    """A real, deterministic assessor: grades a passage by the words it shares with the question."""

    judge_id = "overlap"
    weak = True

    def __init__(self) -> None:
        self.graded = 0

    def grade_pools(self, questions, pools):
        out = []
        for question, pool in zip(questions, pools, strict=True):
            words = set(question.split())
            self.graded += len(pool)
            out.append([float(min(3, len(words & set(p.split())))) for p in pool])
        return out


def test_the_pool_is_every_systems_top_ten_and_judgments_are_stored_and_reused():
    questions = [_question(f"alpha beta q{i}", JUDGE, _answer([1])) for i in range(2)]
    texts = [f"alpha passage {i}" if i % 3 else f"gamma {i}" for i in range(30)]
    asked = asked_set(questions, texts, [f"k{i}" for i in range(30)], {1: 0})
    ranked_a = {"dense": [list(range(0, 20)), list(range(5, 25))], "served": {0.3: [list(range(10, 30))] * 2}}
    ranked_b = {"dense": [list(range(20, 30)), list(range(5, 25))], "served": {}}
    pools = pooled_positions([ranked_a, ranked_b], 0.3)
    assert sorted(pools[0]) == list(range(30))  # 0-9 (a dense), 10-19 (a served), 20-29 (b dense)
    assert sorted(pools[1]) == list(range(5, 20))

    stored: dict = {}
    storage = JudgmentStorage(
        lambda judge, keys: {k: stored[(judge, k)] for k in keys if (judge, k) in stored},
        lambda judge, items: stored.update({(judge, k): g for k, g in items}),
    )
    grader = _PoolGrader()
    labels, account = judge_pools(asked, pools, grader, storage)
    assert account == AskedJudging("overlap", True, 45, 0, 45, 0) and account.usable
    assert labels[0][1] == 1.0 and labels[0][0] == 0.0  # "alpha passage 1" shares "alpha"; "gamma 0" nothing
    again, second = judge_pools(asked, pools, grader, storage)
    assert (second.reused, second.judged, grader.graded) == (45, 0, 45) and again == labels


def _evidence(low, method="ppi++", required=0.0, weak=False, estimate=None):
    return AskedEvidence(
        "asked+served",
        estimate if estimate is not None else low + 0.02,
        low,
        low + 0.04,
        method,
        weak,
        300,
        60,
        required,
    )


def test_asked_questions_decide_eligibility_instead_of_the_synthetic_rules():
    scores = {
        "current": {"heldout": 0.50},
        "candidate": {"heldout": 0.49},  # would fail rule 1: the asked questions decide instead
        "merged-0.5": {"heldout": 0.60},  # would pass rule 1, but the asked interval reaches zero
    }
    decision = decide(
        scores,
        "ndcg@10",
        min_gain=0.005,
        synthetic_only_min_gain=0.01,
        asked={"candidate": _evidence(0.004), "merged-0.5": _evidence(-0.001)},
    )
    assert decision.promote and decision.variant == "candidate"
    assert "asked questions: asked+served" in decision.reason and "ppi++" in decision.reason


def test_assessor_only_evidence_needs_the_margin_and_a_rejection_names_its_cause():
    scores = {"current": {"heldout": 0.5}, "candidate": {"heldout": 0.6}}
    thin = {"candidate": _evidence(0.004, method="assessor", required=0.01)}  # an LLM's grades alone
    decision = decide(scores, "ndcg@10", 0.0, asked=thin)
    assert not decision.promote and decision.cause == RejectionCause.ASKED_NOT_CONVINCING
    assert "(assessor, assessor;" in decision.reason and "reach 0.01" in decision.reason
    clear = {"candidate": _evidence(0.012, method="assessor", required=0.01)}
    assert decide(scores, "ndcg@10", 0.0, asked=clear).promote


def test_the_teachers_grades_alone_are_shown_not_acted_on():
    """The weak assessor rates the model in service near its ceiling: without events its verdict must
    neither promote nor refuse; the held-out rules decide and the reason shows what it said."""
    scores = {"current": {"heldout": 0.5}, "candidate": {"heldout": 0.6}}
    loss = {"candidate": _evidence(-0.05, method="assessor", required=0.01, weak=True)}
    decision = decide(scores, "ndcg@10", 0.005, asked=loss)
    assert (
        decision.promote and "shown, not acted on" in decision.reason and "weak assessor" in decision.reason
    )
    rejected = decide(scores, "ndcg@10", 0.5, asked=loss)
    assert rejected.cause == RejectionCause.BELOW_MIN_GAIN and "shown, not acted on" in rejected.reason
    # with the application's events the round decides (beside the teacher, on the events alone)
    corrected = {"candidate": _evidence(-0.05, method="classical", weak=True)}
    assert decide(scores, "ndcg@10", 0.005, asked=corrected).cause == RejectionCause.ASKED_NOT_CONVINCING


def test_vetoes_still_apply_with_asked_evidence():
    scores = {"current": {"heldout": 0.5, "user": 0.8}, "candidate": {"heldout": 0.5, "user": 0.7}}
    decision = decide(scores, "ndcg@10", 0.0, asked={"candidate": _evidence(0.05)})
    assert not decision.promote and decision.cause == RejectionCause.HUMAN_VETO


@pytest.mark.parametrize("gold_questions", [0, 60])
def test_the_round_evidence_uses_ppi_only_with_enough_gold(gold_questions):
    from stages.evaluate import EvalResult
    from stages.round_steps import GateParams, asked_evidence

    rng = np.random.default_rng(0)
    n = 200
    old = rng.uniform(0, 1, n)
    new = np.clip(old + rng.normal(0.05, 0.05, n), 0, 1)

    def result(values, gold_shift):
        gold = [float(v + gold_shift) if i < gold_questions else None for i, v in enumerate(values)]
        extra = {"_gold_per_query": gold, "judging": {"usable": True, "weak_assessor": False}}  # an LLM
        return {
            "asked+served": EvalResult(
                {"ndcg@10": float(np.mean(values))}, {"ndcg@10": list(values)}, n, extra=extra
            )
        }

    evidence = asked_evidence(result(new, 0.01), result(old, 0.0), GateParams(ppi_min_gold=50))
    assert evidence is not None and evidence.questions == n and evidence.gold == gold_questions
    if gold_questions:
        assert evidence.method == "ppi++" and evidence.required == 0.0
        assert evidence.low < evidence.estimate < evidence.high
    else:
        assert evidence.method == "assessor" and evidence.required == 0.01
        assert evidence.estimate == pytest.approx(float(np.mean(new - old)))


def test_beside_the_teacher_the_round_evidence_is_the_events_alone():
    """The teacher says the variant lost 0.25 where no events exist and 0.02 where they do, and the
    events say no change: the interval is the events' own (classical), not PPI's carried-over one."""
    from stages.evaluate import EvalResult
    from stages.round_steps import GateParams, asked_evidence

    rng = np.random.default_rng(1)
    n, gold_questions = 120, 60
    old = rng.uniform(0.3, 0.7, n)
    shift = np.where(np.arange(n) < gold_questions, -0.02, -0.25) + rng.normal(0, 0.03, n)
    gold_old = [float(v) if i < gold_questions else None for i, v in enumerate(old)]
    gold_new = [v + float(rng.normal(0, 0.05)) if v is not None else None for v in gold_old]

    def result(values, gold):
        extra = {"_gold_per_query": gold, "judging": {"usable": True, "weak_assessor": True}}
        return {
            "asked+served": EvalResult(
                {"ndcg@10": float(np.mean(values))}, {"ndcg@10": list(values)}, n, extra=extra
            )
        }

    evidence = asked_evidence(
        result(old + shift, gold_new), result(old, gold_old), GateParams(ppi_min_gold=50)
    )
    assert evidence is not None and evidence.method == "classical" and evidence.gold == gold_questions
    assert evidence.low < 0.0 < evidence.high
    assert "events alone" in evidence.describe()


def test_the_served_share_is_chosen_on_events_or_a_real_assessor_never_on_the_teacher_alone():
    from stages.round_steps import SWEEP_MIN_EVENTS, retrieval_choice

    def table(gold_questions, weak, events=None, graded=None):
        served = {
            "gold_questions": gold_questions,
            "judging": {"weak_assessor": weak},
            "bm25_sweep": graded or {"0.3": 0.5, "0.7": 0.6},
        }
        if events is not None:
            served["bm25_sweep_events"] = events
        return {"candidate": {"asked+served": served}}

    by_events = retrieval_choice(table(SWEEP_MIN_EVENTS, True, {"0.3": 0.7, "0.7": 0.4}), "candidate", 0.5)
    assert by_events["bm25_weight"] == 0.3 and by_events["chosen_on"] == "asked (events)"
    by_llm = retrieval_choice(table(3, False, {"0.3": 0.7, "0.7": 0.4}), "candidate", 0.5)
    assert by_llm["bm25_weight"] == 0.7 and by_llm["chosen_on"] == "asked (assessor)"
    assert retrieval_choice(table(3, True, {"0.3": 0.7}), "candidate", 0.5) is None
    user = {"candidate": {"user+served": {"bm25_sweep": {"0.1": 0.9}}, **table(99, False)["candidate"]}}
    assert retrieval_choice(user, "candidate", 0.5)["chosen_on"] == "user"  # the user's file comes first


def test_a_question_not_wholly_graded_is_left_out_and_gold_is_scored_on_what_was_shown():
    from stages.asked_eval import AskedRanker, score_asked

    questions = [
        _question("alpha one", JUDGE, _answer([1, 2], ("click", "2", 2))),  # shown 1 and 2, used 2
        _question("alpha two", JUDGE, _answer([1])),
        _question("alpha three", JUDGE, _answer([3])),
    ]
    texts = ["alpha a", "alpha b", "gamma c", "alpha d"]
    asked = asked_set(questions, texts, ["ka", "kb", "kc", "kd"], {1: 0, 2: 1, 3: 2, 4: 3})

    class Gaps(_PoolGrader):
        pool_relative = False

        def grade_pools(self, questions, pools):
            out = super().grade_pools(questions, pools)
            out[2] = [None] * len(out[2])  # the assessor could not grade the third question
            return out

    stored: dict = {}
    storage = JudgmentStorage(
        lambda judge, keys: {k: stored[(judge, k)] for k in keys if (judge, k) in stored},
        lambda judge, items: stored.update({(judge, k): g for k, g in items}),
    )
    # the candidate puts an unshown passage (3: "alpha d") first, then the used one
    pending = {
        "current": {"dense": [[0, 1, 2, 3]] * 3, "served": {}},
        "candidate": {"dense": [[3, 1, 0, 2]] * 3, "served": {}},
    }
    pools = pooled_positions(list(pending.values()), None, depth=4)
    labels, account = judge_pools(asked, pools, Gaps(), storage)
    assert labels[2] is None and account.incomplete == 1 and account.unjudged == 4
    scored = score_asked(AskedRanker(asked, None), pending, labels, account)
    assert scored["current"][ASKED].n_queries == 2  # the third question is out of both models' scores
    gold_current = scored["current"][ASKED].extra["_gold_per_query"]
    gold_candidate = scored["candidate"][ASKED].extra["_gold_per_query"]
    # on the condensed lists (shown passages only) the candidate ranks the used passage first: its
    # unshown passage 3 does not count against it
    assert gold_candidate[0] == 1.0 and gold_current[0] < 1.0 and gold_current[1] is None


def _asked_result(values, *, weak, gold=None):
    from stages.evaluate import EvalResult

    values = [float(v) for v in values]
    extra = {
        "_gold_per_query": gold or [None] * len(values),
        "judging": {"usable": True, "weak_assessor": weak},
    }
    return EvalResult({"ndcg@10": float(np.mean(values))}, {"ndcg@10": values}, len(values), extra=extra)


def test_the_teachers_grades_never_veto_through_the_served_rule(tmp_path):
    """Review: the asked+served set is rule 0's. With the teacher's grades alone (no events) a variant
    the teacher calls a loss is still judged by rules 1-4, not vetoed by rule 3a on those grades."""
    from stages.evaluate import EvalResult
    from stages.round_steps import GateParams, decide_round

    rng = np.random.default_rng(0)
    held_old = rng.uniform(0.3, 0.7, 200)
    asked_old = rng.uniform(0.8, 1.0, 60)

    def heldout(values):
        return EvalResult({"ndcg@10": float(np.mean(values))}, {"ndcg@10": list(values)}, len(values))

    results = {
        "current": {"heldout": heldout(held_old), "asked+served": _asked_result(asked_old, weak=True)},
        "candidate": {
            "heldout": heldout(held_old + 0.05),
            "asked+served": _asked_result(asked_old - 0.1, weak=True),
        },
    }
    verdict = decide_round(results, GateParams(), tmp_path)
    assert verdict.decision.promote, verdict.decision.reason
    assert "not acted on" in verdict.decision.reason


def test_too_few_wholly_graded_questions_leave_the_decision_to_rules_1_to_4():
    """Review: questions whose pool was not wholly graded are left out; when fewer than
    `asked_min_queries` remain, there is no asked evidence at all (two questions must not promote)."""
    from stages.round_steps import GateParams, asked_evidence

    new = {"asked+served": _asked_result([0.6, 0.9], weak=False)}
    old = {"asked+served": _asked_result([0.5, 0.8], weak=False)}
    assert asked_evidence(new, old, GateParams(asked_min_queries=30)) is None
    assert asked_evidence(new, old, GateParams(asked_min_queries=2)) is not None


def test_the_events_sweep_names_the_shares_its_questions_cannot_tell_from_the_best():
    """Paired 95% intervals against the best share: one wrong on every question is told apart, one that
    differs on a single question of forty is not."""
    from stages.asked_eval import events_sweep

    questions = 40
    gold = [{1: 1.0} for _ in range(questions)]
    right = [[1, 2, 3] for _ in range(questions)]
    once_wrong = [[2, 1, 3]] + right[1:]
    always_wrong = [[2, 3, 1] for _ in range(questions)]
    served = {0.05: once_wrong, 0.3: right, 0.7: always_wrong}
    sweep, alike = events_sweep(served, gold, [True] * questions, (0.05, 0.3, 0.7), "ndcg@10")
    assert sweep["0.3"] == 1.0 and sweep["0.7"] < sweep["0.05"] < 1.0
    assert alike == ["0.05", "0.3"]
