"""Jobs that load a model (the filter pass, the index sync) run in a child process, one per job.

Why: torch alone costs a process ~220 MB, a loaded model and its caches several hundred more, pymilvus
with Milvus Lite's embedded server ~150 MB; a daemon that ran these jobs itself stayed near 1 GB after
the first one. In a child they are gone the moment the job ends, so the idle daemon stays small
(issue 14), and a crash in native code (an OOM kill, a CUDA fault) fails one job instead of the daemon.
The price is loading the model per job (seconds), paid by jobs that run for seconds to minutes anyway.

The parent's worker thread keeps the lease (its pool's LeaseKeeper heartbeats while the child works),
starts `python -m daemon.job_process`, and turns the child's outcome back into what an in-process handler
would have raised, so the queue's rules (retry later without an attempt, back-off, dead letters) are the
same. The child finishes the job itself on success, inside the handler's own transaction.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from daemon.child_process import child_env, die_with_parent, stop_between_batches
from daemon.logs import configure_logging, get_logger
from daemon.settings import Settings
from daemon.workers import Handler, JobContext, JobFailed, PermanentFailure, RetryLater
from state.layout import StateLayout
from state.queue import JobQueue, LeaseLost

log = get_logger("embedtune.jobs")
STOP_GRACE_S = 5.0  # then SIGKILL; the daemon passes what is left of its own stop budget


class ChildJobs:
    """Parent side: one handler for every model job kind; each call runs one child to completion."""

    def __init__(self, settings: Settings, layout: StateLayout) -> None:
        self.settings = settings  # the daemon's object: a SIGHUP's live changes reach the next child
        self.layout = layout
        self._children: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()  # set by stop(): a child ended by it is not a failed attempt

    def handle(self, ctx: JobContext) -> None:
        job = ctx.job
        with tempfile.TemporaryDirectory(prefix=f"job-{job.id}-") as tmp:
            settings_file, result_file = Path(tmp) / "settings.json", Path(tmp) / "result.json"
            settings_file.write_text(json.dumps(self.settings.model_dump(mode="json")))
            with self._lock:  # started and listed at once, or not at all once the daemon stops
                if self._stopping.is_set():
                    raise RetryLater("the daemon is stopping; the job runs after the restart", 0.0)
                process = subprocess.Popen(
                    self.command(settings_file, job.id, job.lease_owner, result_file),
                    stdin=subprocess.DEVNULL,
                    env=child_env(),
                    cwd=os.getcwd(),
                )
                self._children.add(process)
            try:
                code = process.wait()
            finally:
                with self._lock:
                    self._children.discard(process)
            result = json.loads(result_file.read_text()) if result_file.exists() else None
        if result is None and self._stopping.is_set():
            # The daemon is stopping and ended the child: the job was interrupted, it did not fail. Back
            # to the queue without an attempt, or five restarts would dead-letter a healthy filter pass.
            raise RetryLater("the daemon stopped while the job ran; it runs again after the restart", 0.0)
        if result is not None:
            log.info("model_job_process", job_id=job.id, kind=job.kind, **result.get("process", {}))
        raise_outcome(result, code)

    def command(self, settings_file: Path, job_id: int, owner: str, result_file: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "daemon.job_process",
            "--settings",
            str(settings_file),
            "--job-id",
            str(job_id),
            "--owner",
            owner,
            "--result",
            str(result_file),
        ]

    def interrupt(self) -> list[subprocess.Popen]:
        """Daemon shutdown: start no child from now on and SIGTERM the running ones (an index fill ends
        after its batch; their jobs go back to the queue, no attempt counted)."""
        with self._lock:
            first = not self._stopping.is_set()
            self._stopping.set()
            children = list(self._children)
        for process in children if first else ():  # once: a second SIGTERM would cut the batch
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        return children

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Interrupt, then SIGKILL what outlives `grace` (a batch too long for the stop budget)."""
        children = self.interrupt()
        deadline = time.monotonic() + grace
        for process in children:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def raise_outcome(result: dict | None, code: int) -> None:
    """Map the child's report onto the exceptions the worker pool understands."""
    if result is None:
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        raise JobFailed(f"job process {how} before reporting an outcome")
    outcome = result.get("outcome")
    if outcome == "done":
        return
    if outcome == "retry_later":
        raise RetryLater(result["message"], float(result["delay"]))
    if outcome == "lease_lost":
        raise LeaseLost(result["message"])
    if result.get("retry", True):
        raise JobFailed(result["message"], result.get("raw_reply"))
    raise PermanentFailure(result["message"], result.get("raw_reply"))


# --- child side -------------------------------------------------------------------------------------
def build_handler(kind: str, settings: Settings, layout: StateLayout) -> Handler:
    if kind == "filter":
        from daemon.filtering import FilterService
        from daemon.serving import model_in_service

        return FilterService(
            settings, lambda conn: (model_in_service(conn, layout, settings).path, layout.cache)
        ).handle
    if kind == "index":
        from daemon.indexing import IndexService

        return IndexService(settings, layout).handle
    if kind == "onnx_export":
        from daemon.onnx_jobs import ExportJobs

        return ExportJobs(settings, layout).handle
    raise ValueError(f"no child handler for job kind {kind!r}")


def run_job(settings: Settings, job_id: int, owner: str) -> dict:
    from state.db import Database

    layout = StateLayout(settings.paths.state_dir)
    db = Database(layout.database)
    try:
        queue = JobQueue(db.conn)
        job = queue.get(job_id)
        if job is None or job.lease_owner != owner:
            return {"outcome": "lease_lost", "message": f"job {job_id} is no longer leased to {owner}"}
        try:
            build_handler(job.kind, settings, layout)(JobContext(job, queue))
        except RetryLater as exc:
            return {"outcome": "retry_later", "message": str(exc), "delay": exc.delay}
        except LeaseLost as exc:
            return {"outcome": "lease_lost", "message": str(exc)}
        except JobFailed as exc:
            return {"outcome": "failed", "message": str(exc), "retry": exc.retry, "raw_reply": exc.raw_reply}
        except Exception as exc:
            log.exception("job_failed_in_child", job_id=job_id, kind=job.kind)
            return {"outcome": "failed", "message": f"{type(exc).__name__}: {exc}", "retry": True}
        return {"outcome": "done"}
    finally:
        db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run one embedtune job that loads a model")
    parser.add_argument("--settings", required=True)
    parser.add_argument("--job-id", type=int, required=True)
    parser.add_argument("--owner", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    die_with_parent()
    stop_between_batches()  # a daemon stop ends an index fill between two batches, not inside one
    settings = Settings.model_validate(json.loads(Path(args.settings).read_text()))
    configure_logging(settings.logging.level, settings.logging.format)
    started = time.monotonic()
    result = run_job(settings, args.job_id, args.owner)
    result["process"] = {
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "seconds": round(time.monotonic() - started, 2),
    }
    tmp = Path(args.result + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, args.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
