"""Interleaved trials, the daemon's part: open one for a round's undecided candidate, and end it.

A round whose gate could not tell the candidate from the model in service (its interval straddles zero:
too few questions, or gains the events cannot see because they are only about the served model's own
hits) would otherwise throw the candidate away. Where the team's application posts events, the round
registers the candidate (a version that has never served) and opens a trial: `serve` mixes its hits into
`promotion.trial_share` of the searches (daemon/serve_trial.py). Every minute the daemon tallies which
model's hits the events used (stages/interleaving.py) and ends the trial:

- gain: the candidate is promoted through the registry, in one transaction with the trial's end and its
  round's record, only if the model it was judged against still serves;
- a trial whose round chose the candidate's BM25 share on the events alone has two arms (that share and
  the lowest the events could not tell from it): each question tries one, each arm is its own test at
  half the alpha, a lost arm is taken out, and a winning arm's share is written into the candidate's
  folder before it is promoted;
- loss (of every arm), or undecided after `trial_max_questions` questions or `trial_max_days`: the version is discarded;
- the model in service changed (a rollback, a promotion): the trial compared against a model that no
  longer serves, so it ends and its version is discarded.
"""

from __future__ import annotations

import shutil
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.logs import get_logger
from daemon.settings import Settings
from state.layout import StateLayout
from state.registry import ModelRegistry, RegistryError, ServingChanged
from state.round_records import RoundStore
from state.trials import EXPIRED, GAIN, LOSS, SERVING_CHANGED, STOPPED, TrialRecord, TrialStore

if TYPE_CHECKING:
    from stages.interleaving import TrialVerdict

log = get_logger("embedtune.trials")

# Rejections that say "no evidence either way", not "worse": only these candidates get a trial.
TRIAL_CAUSES = ("below_min_gain", "synthetic_gain_not_convincing", "asked_gain_not_convincing")


def trial_refusal(cause: str | None, interval: tuple[float, float] | None, best: str) -> str:
    """Why a rejected round's candidate gets no trial, or "" when it may have one."""
    if best == "current":
        return "no variant ranked above the model in service"
    if cause not in TRIAL_CAUSES:
        return f"the round was rejected for {cause}, not for want of evidence"
    # a point interval at zero (the held-out set ranks both models alike) is no evidence either way
    if interval is not None and interval[1] <= 0 and interval[0] < 0:
        return "its interval lies at or below zero"
    return ""


def open_trial(
    settings: Settings,
    conn: sqlite3.Connection,
    registry: ModelRegistry,
    round_id: int,
    variant: str,
    folder: Path,
    replacing_id: int | None,
) -> TrialRecord | None:
    """Register `folder` as a version that has not served and start its trial. None when trials are
    off, no application posts events, or a trial against the same model still runs (one against a model
    that no longer serves is ended, its version discarded)."""
    from state.query_log import QueryLog

    promotion = settings.promotion
    if promotion.trial_share <= 0:
        return None
    with_events = QueryLog(conn).counts()["queries_with_events"]
    if with_events < promotion.trial_min_decided:
        log.info(
            "trial_not_opened",
            round_id=round_id,
            reason=f"events on {with_events} logged questions, fewer than trial_min_decided "
            f"({promotion.trial_min_decided}): a trial would never decide",
        )
        return None
    running = TrialStore(conn).running()
    if running is not None and running.replacing_id == replacing_id:
        # a trial needs weeks of questions; one replaced by every new round would never end
        log.info(
            "trial_not_opened",
            round_id=round_id,
            reason=f"trial {running.id} of {running.version} is still running against the same model",
        )
        return None
    record = registry.register(
        folder, round_id=round_id, parent_id=replacing_id, metrics={"variant": variant, "trial": True}
    )
    trial, before = TrialStore(conn).open(
        round_id=round_id,
        model_id=record.id,
        path=str(record.path),
        replacing_id=replacing_id,
        variant=variant,
        share=promotion.trial_share,
        arms=trial_arms(settings, record.path),
    )
    if before is not None:
        discard_version(registry, before.model_id)
    log.info(
        "trial_opened",
        trial_id=trial.id,
        round_id=round_id,
        candidate=trial.version,
        share=trial.share,
        arms=list(trial.arms),
    )
    return trial


def trial_arms(settings: Settings, folder: Path) -> list[float]:
    """The BM25 shares to try the candidate at: those its round named (the share it chose on the events
    and the lowest they cannot tell from it, stages/round_steps.py `events_trial_shares`) when the index
    serves each model with its own share (`index.bm25_weight = "auto"`); [] tries its folder's share."""
    from stages.fusion import model_trial_shares

    if settings.index.bm25_weight != "auto":
        return []  # a configured share serves every model: there is no share to choose
    shares = model_trial_shares(folder)
    return shares if len(shares) > 1 else []


def discard_version(registry: ModelRegistry, model_id: int) -> None:
    """A trial's version that never served goes (row and folder); one that served stays (history)."""
    from daemon.onnx_jobs import remove_version_export
    from stages.embed_cache import cache_folder
    from stages.models import model_key

    try:
        record = registry.get(model_id)
        key = model_key(record.path)  # before the folder goes: the key reads its weights' file
        registry.discard(model_id)
    except RegistryError as exc:
        log.info("trial_version_kept", model_id=model_id, reason=str(exc))
        return
    remove_version_export(registry.layout, record.path)
    shutil.rmtree(cache_folder(registry.layout.cache, key), ignore_errors=True)  # its corpus vectors


def sweep_unserved_versions(conn: sqlite3.Connection, layout: StateLayout) -> list[int]:
    """At start-up (no round runs then): every version that never served and is not the running trial's
    candidate was left by a kill between registering it and promoting it or opening its trial; each is
    discarded. Returns their ids."""
    registry = ModelRegistry(conn, layout)
    running = TrialStore(conn).running()
    kept = running.model_id if running is not None else None
    swept = [model_id for model_id in registry.never_served() if model_id != kept]
    for model_id in swept:
        discard_version(registry, model_id)
    if swept:
        log.warning("unserved_versions_removed", versions=[f"v{model_id}" for model_id in swept])
    return swept


class TrialEnded(Exception):
    """The trial was no longer running when its promotion was to be written (rolls the promotion back)."""


@dataclass(frozen=True)
class TrialCheck:
    trial_id: int
    result: str  # "gain", "loss", ... or "running"
    reason: str


def check_trial(
    settings: Settings, layout: StateLayout, conn: sqlite3.Connection, now: datetime | None = None
) -> TrialCheck | None:
    """Tally the running trial's settled questions and end it when it is decided or spent; None: no
    trial runs. `now`: the time to judge at (tests look an hour ahead instead of waiting)."""
    from stages.interleaving import judge_tally, outcome, tally, used_positions
    from stages.real_queries import used_chunks

    store = TrialStore(conn)
    trial = store.running()
    if trial is None:
        return None
    registry = ModelRegistry(conn, layout)
    current = registry.current()
    serving_id = current.id if current else None
    if serving_id != trial.replacing_id:
        now_serving = f"v{serving_id}" if serving_id is not None else "the base model"
        return _end(registry, store, trial, SERVING_CHANGED, f"the model in service changed to {now_serving}")
    promotion = settings.promotion
    if promotion.trial_share <= 0:
        return _end(registry, store, trial, STOPPED, "promotion.trial_share is 0: trials are off")
    if not Path(trial.path).is_dir():
        return _end(registry, store, trial, STOPPED, f"the candidate's folder {trial.path} is gone")
    now = now or datetime.now(UTC)
    answers = store.settled_answers(trial.id, now, promotion.trial_event_window_s)
    outcomes: dict[int, list[int]] = {arm: [] for arm in range(len(trial.arm_shares))}
    for a in answers:
        if a.arm in outcomes:
            outcomes[a.arm].append(outcome(a.teams, used_positions(a.answer.hit_ids, used_chunks(a.answer))))
    # each arm is its own sequential test at alpha split between the arms (a union bound: the chance
    # that any arm declares by luck stays within alpha, however often each is looked at)
    alpha = promotion.trial_alpha / len(outcomes)
    counts = {arm: tally(found) for arm, found in outcomes.items()}
    verdicts = {
        arm: judge_tally(counts[arm], alpha, promotion.trial_min_decided) for arm in trial.active_arms
    }
    reason = _standing(trial, verdicts)
    gains = [arm for arm, verdict in verdicts.items() if verdict.result == GAIN]
    if gains:
        arm = max(gains, key=lambda a: verdicts[a].bayes_factor)
        return _promote(settings, layout, registry, store, trial, _arm_reason(trial, arm, verdicts[arm]), arm)
    losses = [arm for arm, verdict in verdicts.items() if verdict.result == LOSS]
    if losses and len(losses) == len(verdicts):
        return _end(registry, store, trial, LOSS, f"the model in service's hits were used more: {reason}")
    for arm in losses:  # the trial goes on with its other arms
        store.take_out_arm(trial.id, arm, f"arm {arm} lost: {reason}")
        log.info("trial_arm_out", trial_id=trial.id, arm=arm, share=trial.arm_shares[arm])
    days = (now - datetime.fromisoformat(trial.started)).total_seconds() / 86400
    # the cap is each arm's: an arm gets its share of the questions, and two arms need about twice those
    # of one (docs/promotion.md, "Two shares")
    spent = all(counts[arm].questions >= promotion.trial_max_questions for arm in verdicts)
    if spent or days >= promotion.trial_max_days:
        return _end(registry, store, trial, EXPIRED, f"no difference found in {days:.1f} days: {reason}")
    if reason != trial.reason and not losses:
        store.note(trial.id, reason)
    return TrialCheck(trial.id, "running", reason)


def _arm_reason(trial: TrialRecord, arm: int, verdict: TrialVerdict) -> str:
    if len(trial.arm_shares) == 1:
        return verdict.reason
    return f"at BM25 share {trial.arm_shares[arm]:g} (arm {arm}): {verdict.reason}"


def _standing(trial: TrialRecord, verdicts: dict) -> str:
    """The tally of each arm judged at this check (those not taken out before it), as `embedtune
    status` shows it."""
    return "; ".join(_arm_reason(trial, arm, verdict) for arm, verdict in sorted(verdicts.items()))


def stop_trial(conn: sqlite3.Connection, layout: StateLayout, reason: str) -> TrialCheck | None:
    """End the running trial now (an operator's decision), its version discarded; None: none runs."""
    store = TrialStore(conn)
    trial = store.running()
    if trial is None:
        return None
    return _end(ModelRegistry(conn, layout), store, trial, STOPPED, reason)


def _end(
    registry: ModelRegistry, store: TrialStore, trial: TrialRecord, result: str, reason: str
) -> TrialCheck:
    if store.end(trial.id, result, reason):
        discard_version(registry, trial.model_id)
        log.info("trial_ended", trial_id=trial.id, result=result, reason=reason)
    return TrialCheck(trial.id, result, reason)


def _promote(
    settings: Settings,
    layout: StateLayout,
    registry: ModelRegistry,
    store: TrialStore,
    trial: TrialRecord,
    reason: str,
    arm: int = 0,
) -> TrialCheck:
    """Serve the candidate, recording the trial's end and its round's new decision in the serving
    transaction; the promotion hook runs after, as for a round's own promotion. A winning arm's BM25
    share is written into the candidate's folder in that transaction, once the trial is known to be
    still running (nothing can end it or discard the folder meanwhile), before anything serves it."""
    from stages.fusion import write_model_bm25_weight

    records = RoundStore(registry.conn)
    said = f"the candidate's hits were used more: {reason}"
    share = trial.arm_shares[arm]

    def with_serving() -> None:
        if not store.write_end(trial.id, GAIN, said):  # superseded or ended meanwhile: nothing serves
            raise TrialEnded(f"trial {trial.id} ended before its promotion")
        if share is not None:
            write_model_bm25_weight(Path(trial.path), share, f"interleaved trial {trial.id}, arm {arm}")
        if trial.round_id is not None:
            records.write_trial_promotion(
                trial.round_id, trial.model_id, f"promoted by interleaved trial {trial.id}: {said}"
            )

    try:
        registry.promote(
            trial.model_id,
            note=f"trial {trial.id} (round {trial.round_id})",
            replacing=trial.replacing_id,
            with_serving=with_serving,
        )
    except TrialEnded as exc:
        log.info("trial_not_promoted", trial_id=trial.id, reason=str(exc))
        return TrialCheck(trial.id, store.get(trial.id).result or "ended", str(exc))
    except ServingChanged as exc:
        return _end(registry, store, trial, SERVING_CHANGED, f"not promoted: {exc}")
    except (RegistryError, OSError) as exc:  # its folder went, or its share could not be written
        return _end(registry, store, trial, STOPPED, f"not promoted: {exc}")
    log.info("trial_promoted", trial_id=trial.id, version=trial.version, reason=said)
    if settings.promotion.on_promote and trial.round_id is not None:
        from daemon.round_process import run_on_promote_hook

        run_on_promote_hook(
            settings.promotion.on_promote,
            Path(trial.path),
            {"trial": trial.id, "reason": said},
            records,
            trial.round_id,
        )
    return TrialCheck(trial.id, GAIN, said)
