"""Interleaved searches for a running trial (state/trials.py): a share of `/v1/search` questions are also
asked of the trial's candidate, and the answer shows both models' hits, team-draft interleaved
(stages/interleaving.py). Each such answer remembers the trial and the model behind each hit, so the
query log can credit the application's events to the model whose hit was used (daemon/trials.py).

A trial with more than one arm (state/trials.py: BM25 shares to try the candidate at) gives each
mixed question one of its arms still running, at random.

The candidate never costs the answer: if it fails, is busy past the request's time, or has nothing to
add, the served model's answer stands as it was, logged as an ordinary search.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import AbstractContextManager

from daemon.logs import get_logger
from daemon.search import SearchAnswer, search_many
from daemon.serve_state import Loaded, Trial
from daemon.settings import Settings
from stages.interleaving import team_draft

log = get_logger("embedtune.serve")


def chosen_for_trial(answers: list[SearchAnswer], share: float, rng: random.Random) -> list[int]:
    """Which answers (by position) this trial mixes: each searched answer with probability `share`."""
    return [row for row, answer in enumerate(answers) if not answer.error and rng.random() < share]


def interleave(
    settings: Settings,
    answers: list[SearchAnswer],
    trial: Trial,
    *,
    depth: int,
    mode: str,
    k: int,
    keep: Callable[[SearchAnswer], None],
    hold: Callable[[Loaded], AbstractContextManager],
    time_left: Callable[[], bool] = lambda: True,
    rng: random.Random | None = None,
) -> int:
    """Mix the candidate's hits into a share of `answers` (in place); returns how many were mixed.
    `keep` trims an answer's hits as the request asked (path prefix, k) and is applied to both models'
    lists before they are mixed; `hold` takes the candidate's model lock within the request's time;
    `time_left` says whether the request may still spend time on the candidate (asked before each arm
    of a batch searches)."""
    rng = rng or random.Random()
    rows = chosen_for_trial(answers, trial.share, rng)
    arms = trial.record.active_arms
    if not rows or not arms:
        return 0
    by_arm: dict[int, list[int]] = {}
    for row in rows:  # each question tries one of the arms still in the trial, at random
        by_arm.setdefault(rng.choice(arms), []).append(row)
    mixed = 0
    for arm, arm_rows in sorted(by_arm.items()):
        if not time_left():  # a batch's next arm: past half the request's time, its answers stand
            break
        mixed += _mix_arm(
            settings,
            answers,
            trial,
            arm,
            arm_rows,
            depth=depth,
            mode=mode,
            k=k,
            keep=keep,
            hold=hold,
            rng=rng,
        )
    return mixed


def _mix_arm(
    settings: Settings,
    answers: list[SearchAnswer],
    trial: Trial,
    arm: int,
    rows: list[int],
    *,
    depth: int,
    mode: str,
    k: int,
    keep: Callable[[SearchAnswer], None],
    hold: Callable[[Loaded], AbstractContextManager],
    rng: random.Random,
) -> int:
    """The candidate, fused at `arm`'s BM25 share, answers `rows`; each is interleaved with the served
    answer. Returns how many were mixed."""
    candidate = trial.candidate
    replica = candidate.replica
    prepared = replica.prepared() if replica is not None else None
    try:
        with hold(candidate):
            theirs = search_many(
                settings,
                [answers[row].query for row in rows],
                "current" if prepared is not None else trial.record.version,
                depth,
                mode,
                encoder=candidate.encoder,
                replica=prepared,
                bm25_weight=trial.record.arm_shares[arm],
            )
    except Exception as exc:  # the served answers stand; the trial simply gets no question this time
        log.warning("serve_trial_search_failed", trial_id=trial.id, error=f"{type(exc).__name__}: {exc}")
        return 0
    mixed = 0
    for row, other in zip(rows, theirs, strict=True):
        if other.error:
            continue
        keep(other)
        answer = answers[row]
        hits = {hit.chunk_id: hit for hit in other.hits}
        hits.update({hit.chunk_id: hit for hit in answer.hits})  # a shared hit shows the served score
        shown = team_draft(
            [hit.chunk_id for hit in answer.hits], [hit.chunk_id for hit in other.hits], k, rng
        )
        answer.hits = [hits[chunk] for chunk, _team in shown]
        answer.trial_id = trial.id
        answer.trial_candidate = candidate.version
        answer.teams = [team for _chunk, team in shown]
        answer.trial_arm = arm
        mixed += 1
    return mixed
