"""Round management in the daemon: when to start one, the child process, and what happens when it dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, tzinfo
from pathlib import Path

from daemon.child_process import child_env
from daemon.logs import get_logger
from daemon.settings import Settings
from state.db import Database
from state.layout import StateLayout
from state.queue import JobQueue
from state.round_records import RoundOutcome, RoundState, RoundStore
from state.samples import SampleStore

log = get_logger("embedtune.rounds")
REQUEST_KIND = "round_request"
STOP_GRACE_S = 20.0


def window_trigger(window: str, timezone: tzinfo | None = None):
    """The cron trigger whose fire times are the moments a scheduled round may start; None for 'always'.

    Why fire times and not "is this minute in the cron": a check every `check_minutes` almost never lands
    in the one minute that `0 2 * * *` names, so nightly rounds never ran. Each fire time now runs a round
    check of its own (`* 0-6 * * *` fires every minute of the night: a range works the same way)."""
    if window == "always":
        return None
    from apscheduler.triggers.cron import CronTrigger

    return CronTrigger.from_crontab(window, timezone=timezone or datetime.now().astimezone().tzinfo)


class RoundScheduler:
    def __init__(self, settings: Settings, layout: StateLayout, config_file: str | None = None) -> None:
        self.settings = settings
        self.layout = layout
        self.config_file = config_file
        self.process: subprocess.Popen | None = None
        self.round_id: int | None = None
        self.started_at = 0.0

    # --- decisions ------------------------------------------------------------------------------
    def request_pending(self, conn) -> bool:
        return JobQueue(conn).has_pending(REQUEST_KIND)

    def maybe_start(self, conn, window_open: bool | None = None) -> int | None:
        """Start a round if one was asked for, or if enough new samples wait and the window is open.

        `window_open` is True at a cron window's fire time; None means "open when the window is always"."""
        if self.process is not None or RoundStore(conn).running() is not None:
            return None
        if JobQueue(conn).take_pending(REQUEST_KIND):
            return self.start(conn, "manual")
        unused = SampleStore(conn).unused_train_count()
        if unused < self.settings.training.min_new_samples:
            return None
        if window_open is None:
            window_open = self.settings.training.window == "always"
        if not window_open:
            return None
        return self.start(conn, "schedule")

    def _base_reference(self, conn) -> str:
        from daemon.serving import base_reference

        # "" for auto before any document: the round records "auto", fails on it and says so
        return base_reference(self.settings, conn) or self.settings.model.base

    # --- child process --------------------------------------------------------------------------
    def start(self, conn, trigger: str) -> int:
        round_id = RoundStore(conn).create(trigger, self._base_reference(conn))
        folder = self.layout.round_dir(round_id)
        folder.mkdir(parents=True, exist_ok=True)
        settings_file = folder / "settings.json"
        settings_file.write_text(json.dumps(self.settings.model_dump(mode="json"), indent=2))
        log_file = open(folder / "child.log", "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daemon.round_process",
                "--settings",
                str(settings_file),
                "--round-id",
                str(round_id),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(),
            cwd=os.getcwd(),
        )
        log_file.close()
        self.round_id = round_id
        self.started_at = time.monotonic()
        RoundStore(conn).set_pid(round_id, self.process.pid)
        log.info("round_started", round_id=round_id, trigger=trigger, pid=self.process.pid)
        return round_id

    def poll(self, conn) -> str | None:
        """Reap a finished child; a child that died without finishing its round aborts it."""
        if self.process is None:
            return None
        code = self.process.poll()
        if code is None:
            return None
        round_id = self.round_id
        self.process, self.round_id = None, None
        if RoundStore(conn).abort(
            round_id,
            f"round process exited with code {code}"
            + (" (killed by a signal)" if code < 0 else "")
            + f"; see {self.layout.round_dir(round_id) / 'child.log'}",
        ):
            log.error("round_aborted", round_id=round_id, returncode=code)
            return RoundState.ABORTED
        row = RoundStore(conn).get(round_id)
        log.info("round_reaped", round_id=round_id, decision=row["decision"] if row else None)
        return row["decision"] if row else None

    def wait(self, conn, timeout: float | None = None) -> str | None:
        if self.process is None:
            return None
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.poll(conn)

    def stop(self, conn, reason: str = "daemon shutting down", grace: float = STOP_GRACE_S) -> None:
        if self.process is None:
            return
        if self.process.poll() is not None:
            self.poll(conn)  # it finished on its own: record that, not an abort
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        RoundStore(conn).abort(self.round_id, reason)
        log.info("round_stopped", round_id=self.round_id, reason=reason)
        self.process, self.round_id = None, None

    def abort_orphans(self) -> int:
        """At start-up: rounds left 'running' by a previous daemon are aborted (their child is killed). The
        recorded pid is killed only while it is still a round child: after a hard stop or a reboot the
        number may belong to any other program by now (pids are reused)."""
        db = Database(self.layout.database)
        store = RoundStore(db.conn)
        count = 0
        for row in store.running_rounds():
            if round_process_alive(row["pid"]):
                try:
                    os.kill(row["pid"], signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            count += store.abort(row["id"], "daemon restarted while the round was running")
        db.close()
        return count

    def describe(self) -> str:
        if self.process is None:
            return ""
        return f"round {self.round_id} running {time.monotonic() - self.started_at:.0f}s"


def round_outlook(settings: Settings) -> str:
    """`embedtune train` without --now: when would the next round start, and what is it waiting for."""
    from state.status import read_status

    status = read_status(StateLayout(settings.paths.state_dir), settings.llm.url)
    training = settings.training
    unused = status["samples"].get("unused_train", 0)
    running = [r for r in status["rounds"] if r["state"] == RoundState.RUNNING]
    lines = [f"new kept training pairs: {unused} (a scheduled round needs {training.min_new_samples})"]
    if running:
        lines.append(f"round {running[0]['id']} is running ({running[0]['stage']})")
    elif unused < training.min_new_samples:
        lines.append("waiting for more pairs")
    if training.window == "always":
        lines.append(f"window: always (the daemon checks every {training.check_minutes:g} min)")
    else:
        trigger = window_trigger(training.window)
        now = datetime.now().astimezone()
        fire = trigger.get_next_fire_time(None, now)
        lines.append(f"window: '{training.window}', next opening {fire.isoformat(timespec='minutes')}")
    if not status["daemon"]["alive"]:
        lines.append("the daemon is not running")
    lines.append("start one now, whatever the schedule: embedtune train --now")
    return "\n".join(lines)


def round_process_alive(pid: int | None) -> bool:
    """Is `pid` a live round child? A pid of a dead process may have been reused by another program,
    so the command line must name the round module too."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"daemon.round_process" in cmdline


def _round_in_the_way(store: RoundStore) -> str:
    """Why a round cannot start now ("" when it can). A 'running' row whose child is gone (the daemon
    was killed before it could record the end) is aborted here, as a daemon start-up would."""
    for row in store.running_rounds():
        if round_process_alive(row["pid"]):
            return (
                f"round {row['id']} is already running (pid {row['pid']}, stage {row['stage']}); "
                "follow it with `embedtune status`"
            )
        store.abort(row["id"], f"its process ({row['pid'] or 'no pid'}) is gone: the daemon was stopped hard")
    return ""


def train_now(settings: Settings, foreground: bool = False, config_file: str | None = None) -> int:
    """`embedtune train --now`: ask the running daemon, or run a round here when none runs."""
    from state.status import read_status

    layout = StateLayout(settings.paths.state_dir).ensure()
    status = read_status(layout, settings.llm.url)
    db = Database(layout.database)
    if status["daemon"]["alive"] and not foreground:
        JobQueue(db.conn).enqueue(REQUEST_KIND, f"{REQUEST_KIND}:{time.time()}", {}, priority=0)
        print(
            f"round requested from the running daemon (pid {status['daemon']['pid']}); "
            "follow it with `embedtune status`"
        )
        return 0
    busy = _round_in_the_way(RoundStore(db.conn))
    if busy:
        print(f"embedtune: {busy}", file=sys.stderr)
        return 2
    manager = RoundScheduler(settings, layout, config_file)
    try:
        round_id = manager.start(db.conn, "manual")
    except RuntimeError as exc:  # a daemon started one in between
        print(f"embedtune: {exc}; follow it with `embedtune status`", file=sys.stderr)
        return 2
    print(f"round {round_id} running in the foreground (log: {layout.round_dir(round_id) / 'child.log'})")
    try:
        outcome = manager.wait(db.conn)
    except KeyboardInterrupt:
        manager.stop(db.conn, "interrupted")
        return 130
    row = RoundStore(db.conn).get(round_id)
    print(f"round {round_id}: {row['state']} {row['decision'] or ''} {row['reason'] or row['error'] or ''}")
    return 0 if outcome in (RoundOutcome.PROMOTED, RoundOutcome.REJECTED) else 1
