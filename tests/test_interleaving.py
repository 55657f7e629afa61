"""Team-draft interleaving (stages/interleaving.py, which `serve` runs and bench/interleaving_power.py
simulates): a fair mix of two rankings whose every hit is credited to the model that picked it, and a
sequential decision that stays within alpha however often it is looked at."""

from __future__ import annotations

import math
import random

from bench.interleaving_power import outcome
from stages.interleaving import (
    CANDIDATE,
    GAIN,
    LOSS,
    SERVED,
    UNDECIDED,
    Tally,
    judge_tally,
    log_bayes_factor,
    team_draft,
)

BASE = SERVED


def test_each_model_contributes_half_and_no_hit_twice():
    rng = random.Random(0)
    first, second = list(range(10)), [5, 11, 12, 0, 13, 14, 15, 16, 17, 18]
    for _ in range(200):
        shown = team_draft(first, second, 10, rng)
        hits = [hit for hit, _ in shown]
        assert len(hits) == len(set(hits)) == 10
        teams = [team for _, team in shown]
        assert teams.count(BASE) == teams.count(CANDIDATE) == 5
        # each team's hits keep that team's order
        for team, ranking in ((BASE, first), (CANDIDATE, second)):
            own = [hit for hit, t in shown if t == team]
            assert own == sorted(own, key=ranking.index)


def test_identical_rankings_never_decide_and_the_first_pick_is_a_coin():
    rng = random.Random(1)
    firsts = set()
    for _ in range(100):
        shown = team_draft(list(range(10)), list(range(10)), 10, rng)
        assert [hit for hit, _ in shown] == list(range(10))
        firsts.add(shown[0][1])
    assert firsts == {BASE, CANDIDATE}


def test_a_list_used_up_leaves_the_other_to_fill():
    shown = team_draft([1, 2], [1, 2, 3, 4, 5], 5, random.Random(2))
    assert sorted(hit for hit, _ in shown) == [1, 2, 3, 4, 5]


def test_events_credit_the_team_that_picked_the_hit():
    shown = [(7, BASE), (8, CANDIDATE), (9, CANDIDATE), (10, BASE)]
    assert outcome(shown, {8: 1, 9: 1}, "cited") == 1
    assert outcome(shown, {7: 1, 9: 1}, "cited") == 0
    assert outcome(shown, {7: 1, 9: 1}, "click") == -1  # the first relevant hit only
    assert outcome(shown, {}, "cited") == 0


def test_the_bayes_factor_matches_the_beta_binomial_by_hand():
    # the uniform prior: 3 wins, 1 loss: B(4, 2) / B(1, 1) = 1/20 against (1/2)^4 = 1/16 -> 16/20
    assert math.isclose(math.exp(log_bayes_factor(3, 1, prior=1)), 16 / 20)
    assert math.isclose(math.exp(log_bayes_factor(0, 0)), 1.0)
    # a clean sweep of 10: (1/11) / (1/1024)
    assert math.isclose(math.exp(log_bayes_factor(10, 0, prior=1)), 1024 / 11)
    # Beta(2, 2): 1 win, 0 losses: B(3, 2) / B(2, 2) = (1/12) / (1/6) = 1/2 against 1/2 -> 1
    assert math.isclose(math.exp(log_bayes_factor(1, 0, prior=2)), 1.0)
    # the default prior is centred: a balanced record is evidence for the coin, a lopsided one against
    assert log_bayes_factor(500, 500) < 0 < log_bayes_factor(600, 400)


def test_the_verdict_needs_enough_decided_questions_and_strong_evidence():
    assert judge_tally(Tally(40, 10, 100), 0.05, 30).result == GAIN
    assert judge_tally(Tally(10, 40, 100), 0.05, 30).result == LOSS
    assert judge_tally(Tally(28, 22, 100), 0.05, 30).result == UNDECIDED  # a coin could do that
    verdict = judge_tally(Tally(12, 0, 5), 0.05, 30)
    assert verdict.result == UNDECIDED and "fewer than 30 decided" in verdict.reason


def test_watching_a_fair_coin_after_every_question_rarely_declares_a_winner():
    """The point of the sequential test: a trial between equal models, looked at after every question
    up to 2,000, declares a winner in at most about alpha of trials (a fixed-sample sign test looked at
    as often would in far more)."""
    rng = random.Random(3)
    declared = 0
    trials = 300
    for _ in range(trials):
        wins = losses = 0
        for _ in range(2000):
            if rng.random() < 0.5:
                wins += 1
            else:
                losses += 1
            if judge_tally(Tally(wins, losses), 0.05, 30).result != UNDECIDED:
                declared += 1
                break
    assert declared / trials <= 0.05


def test_a_real_difference_is_found():
    rng = random.Random(4)
    found = 0
    for _ in range(50):
        wins = losses = 0
        for _ in range(3000):
            wins, losses = (wins + 1, losses) if rng.random() < 0.6 else (wins, losses + 1)
            if judge_tally(Tally(wins, losses), 0.05, 30).result == GAIN:
                found += 1
                break
    assert found >= 45
