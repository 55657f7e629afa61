"""Team-draft interleaving as bench/interleaving_power.py simulates it: a fair mix of two rankings whose
every hit is credited to the model that picked it."""

from __future__ import annotations

import random

from bench.interleaving_power import BASE, CANDIDATE, outcome, team_draft


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
