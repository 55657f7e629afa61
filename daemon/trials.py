"""Interleaved trials, the daemon's part: open one for a round's undecided candidate, and end it.

A round whose gate could not tell the candidate from the model in service (its interval straddles zero:
too few questions, or gains the events cannot see because they are only about the served model's own
hits) would otherwise throw the candidate away. Where the team's application posts events, the round
registers the candidate (a version that has never served) and opens a trial: `serve` mixes its hits into
`promotion.trial_share` of the searches (daemon/serve_trial.py). Every minute the daemon tallies which
model's hits the events used (stages/interleaving.py) and ends the trial:

- gain: the candidate is promoted through the registry, in one transaction with the trial's end and its
  round's record, only if the model it was judged against still serves;
- loss, or undecided after `trial_max_questions` questions or `trial_max_days`: the version is discarded;
- the model in service changed (a rollback, a promotion): the trial compared against a model that no
  longer serves, so it ends and its version is discarded.
"""

from __future__ import annotations

import shutil
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from daemon.logs import get_logger
from daemon.settings import Settings
from state.layout import StateLayout
from state.registry import ModelRegistry, RegistryError, ServingChanged
from state.round_records import RoundStore
from state.trials import EXPIRED, GAIN, LOSS, SERVING_CHANGED, STOPPED, TrialRecord, TrialStore

log = get_logger("embedtune.trials")

# Rejections that say "no evidence either way", not "worse": only these candidates get a trial.
TRIAL_CAUSES = ("below_min_gain", "synthetic_gain_not_convincing", "asked_gain_not_convincing")


def trial_refusal(cause: str | None, interval: tuple[float, float] | None, best: str) -> str:
    """Why a rejected round's candidate gets no trial, or "" when it may have one."""
    if best == "current":
        return "no variant ranked above the model in service"
    if cause not in TRIAL_CAUSES:
        return f"the round was rejected for {cause}, not for want of evidence"
    if interval is not None and interval[1] <= 0:
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
    )
    if before is not None:
        discard_version(registry, before.model_id)
    log.info("trial_opened", trial_id=trial.id, round_id=round_id, candidate=trial.version, share=trial.share)
    return trial


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
    counts = tally(
        [outcome(a.teams, used_positions(a.answer.hit_ids, used_chunks(a.answer))) for a in answers]
    )
    verdict = judge_tally(counts, promotion.trial_alpha, promotion.trial_min_decided)
    if verdict.result == GAIN:
        return _promote(settings, layout, registry, store, trial, verdict.reason)
    if verdict.result == LOSS:
        return _end(
            registry, store, trial, LOSS, f"the model in service's hits were used more: {verdict.reason}"
        )
    days = (now - datetime.fromisoformat(trial.started)).total_seconds() / 86400
    if counts.questions >= promotion.trial_max_questions or days >= promotion.trial_max_days:
        return _end(
            registry, store, trial, EXPIRED, f"no difference found in {days:.1f} days: {verdict.reason}"
        )
    if verdict.reason != trial.reason:
        store.note(trial.id, verdict.reason)
    return TrialCheck(trial.id, "running", verdict.reason)


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
) -> TrialCheck:
    """Serve the candidate, recording the trial's end and its round's new decision in the serving
    transaction; the promotion hook runs after, as for a round's own promotion."""
    records = RoundStore(registry.conn)
    said = f"the candidate's hits were used more: {reason}"

    def with_serving() -> None:
        if not store.write_end(trial.id, GAIN, said):  # superseded or ended meanwhile: nothing serves
            raise TrialEnded(f"trial {trial.id} ended before its promotion")
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
    except RegistryError as exc:  # its folder went between the check and the promotion
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
