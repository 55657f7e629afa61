"""Ingest jobs in worker processes, so chunking uses every core instead of the daemon's one GIL.

Why: the ingest job is Python work proportional to text (sentence splitting, token counts, SQLite
inserts). In the daemon's threads it shares one interpreter lock with the watcher and the built-in
synthesis, so ingest stopped at one core (bench/ingest.py: the daemon process at 93% of a core, 2.1-2.3
MB/s); in two processes it ran 3.0-3.4 MB/s on the same 2 cores (docs/benchmarks.md). Each process runs
the same `WorkerPool` and handler as the threads did and claims from the same SQLite queue, so the
queue's rules (leases, attempts, dead letters) do not change.

Processes start when ingest jobs wait and end after `IDLE_EXIT_S` with nothing to claim, so an idle
daemon stays one small process (issue 14). A process that dies (an OOM kill, a crash in a native
parser) costs the job it held one attempt, with the exit status as its error; the job is claimable at
once, and a file that kills every process it meets ends dead-lettered like any failing file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from daemon.child_process import child_env, die_with_parent
from daemon.logs import configure_logging, get_logger
from daemon.settings import Settings
from state.layout import StateLayout
from state.queue import JobQueue

log = get_logger("embedtune.ingest")
JOB_KIND = "ingest"
IDLE_EXIT_S = 30.0  # a process with nothing to claim this long ends; the next file starts one again
CLAIM_POLL_S = 0.2  # an idle process looks for work this often (one indexed SELECT)
STOP_GRACE_S = 5.0  # a process finishes its file this long, then gives it back (within the stop budget)
MAX_BACKOFF_S = 60.0  # after crashes in a row, the next start waits 1, 2, 4 ... up to this many seconds


def ingest_process_count(settings: Settings) -> int:
    """`ingest.processes`: "auto" is one per core up to 4 (none on a single core, where threads do as
    well and a process would only add memory); 0 keeps ingest in the daemon's threads."""
    wanted = settings.ingest.processes
    if wanted != "auto":
        return int(wanted)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if cores < 2 else min(cores, 4)


def owner_of(pid: int) -> str:
    """The lease-owner prefix of a process's workers (daemon.workers.owner_prefix, seen from outside)."""
    return f"{socket.gethostname()}:{pid}:"


class IngestProcesses:
    """Parent side: keeps up to `count` ingest processes while ingest jobs wait, and answers for the
    jobs of any that died."""

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings  # the daemon's live object: a reload reaches the next process started
        self.count = count
        self.idle_exit_s = IDLE_EXIT_S
        self._children: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._crashes = 0  # in a row; a clean exit resets it
        self._not_before = 0.0  # no new process before this (monotonic) after a crash

    @property
    def alive(self) -> int:
        with self._lock:
            return sum(1 for child in self._children.values() if child.poll() is None)

    def wake(self) -> None:
        """A file was recorded (watcher thread): make sure one process is there to take it. More start
        from `check()` while more jobs wait: one file is one process, not `count`."""
        with self._lock:
            if not self._stopping:
                self._fill(1)

    def check(self, conn) -> None:
        """Main loop: answer for processes that died, and start processes while ingest jobs wait (a
        start-up backlog, a rescan, a job a dead process gave back): one per job ready or running, up to
        `count` (a process still starting counts, so its job does not start a second)."""
        queue = JobQueue(conn)
        with self._lock:
            for pid, child in list(self._children.items()):
                code = child.poll()
                if code is None:
                    continue
                del self._children[pid]
                if code == 0 or self._stopping:
                    self._crashes = 0
                    continue
                error = f"the ingest process died (exit status {code}) while it held this job"
                recovered = queue.recover_owner(owner_of(pid), error)
                self._crashes += 1
                backoff = min(MAX_BACKOFF_S, 2.0 ** (self._crashes - 1)) if self._crashes > 1 else 0.0
                self._not_before = time.monotonic() + backoff
                log.error(
                    "ingest_process_died",
                    pid=pid,
                    exit_status=code,
                    jobs_recovered=recovered,
                    crashes_in_a_row=self._crashes,
                    next_start_in_s=backoff,
                )
            if not self._stopping and len(self._children) < self.count and queue.has_ready(JOB_KIND):
                self._fill(queue.demand(JOB_KIND, self.count))

    def _fill(self, wanted: int) -> None:
        """Start processes up to `wanted` alive, at most `count` (one that ended stays listed until check()
        answers for it)."""
        if time.monotonic() < self._not_before:
            return  # crashing: the back-off spaces the next start (a broken install must not spin)
        alive = sum(1 for child in self._children.values() if child.poll() is None)
        for _ in range(min(wanted, self.count) - alive):
            child = subprocess.Popen(
                [sys.executable, "-m", "daemon.ingest_process"],
                stdin=subprocess.PIPE,
                env=child_env(),
                cwd=os.getcwd(),
            )
            orders = {"settings": self.settings.model_dump(mode="json"), "idle_exit_s": self.idle_exit_s}
            self._children[child.pid] = child  # listed first: if it dies at once, check() answers for it
            try:
                child.stdin.write(json.dumps(orders).encode())
                child.stdin.close()
            except OSError as exc:  # it died before reading its orders (check() logs its exit)
                log.warning("ingest_process_orders_lost", pid=child.pid, error=str(exc))
            log.info("ingest_process_started", pid=child.pid)

    def interrupt(self) -> list[subprocess.Popen]:
        """Start no process from now on; SIGTERM every one (each finishes or gives back its job)."""
        with self._lock:
            first = not self._stopping
            self._stopping = True
            children = list(self._children.values())
        for child in children if first else ():
            if child.poll() is None:
                child.terminate()
        return children

    def stop(self, grace: float = STOP_GRACE_S + 1.0) -> None:
        """Interrupt, then SIGKILL what outlives `grace`. The daemon's shutdown then releases any lease
        still held, as for its own threads."""
        children = self.interrupt()
        deadline = time.monotonic() + grace
        for child in children:
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def run(settings: Settings, idle_exit_s: float) -> int:
    """Child side: one worker claiming ingest jobs until SIGTERM or `idle_exit_s` without work."""
    from daemon.ingest import chunker_for, make_ingest_handler
    from daemon.serving import converted_models_root
    from daemon.workers import WorkerPool, owner_prefix
    from state.db import connect

    layout = StateLayout(settings.paths.state_dir)
    handler = make_ingest_handler(settings, chunker_for(settings, converted_models_root(settings)))
    pool = WorkerPool("ingest", layout.database, {JOB_KIND: handler}, 1, idle_poll=CLAIM_POLL_S)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    pool.start()
    while not stop.wait(1.0):
        if not pool.busy and time.monotonic() - pool.last_active > idle_exit_s:
            break
    finished = pool.stop(STOP_GRACE_S)
    conn = connect(layout.database)
    try:  # a job still running after the grace goes back without an attempt, as at a daemon stop
        released = JobQueue(conn).release_owner(owner_prefix())
    finally:
        conn.close()
    log.info("ingest_process_stopped", idle=not stop.is_set(), finished=finished, released_jobs=released)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # a worker thread stuck in a parser must not hold the exit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="embedtune ingest worker (its orders as JSON on stdin)")
    parser.parse_args(argv)
    die_with_parent()
    orders = json.loads(sys.stdin.read())
    settings = Settings.model_validate(orders["settings"])
    configure_logging(settings.logging.level, settings.logging.format)
    return run(settings, float(orders["idle_exit_s"]))


if __name__ == "__main__":
    sys.exit(main())
