"""Children the daemon starts (a training round, a model job) must not outlive it.

Linux delivers a chosen signal to a process whose parent dies once the process asks for it
(prctl PR_SET_PDEATHSIG). Asking from `preexec_fn`, between fork and exec, runs Python code in the forked
copy of a threaded process, which Python's documentation warns can deadlock. So the child asks itself,
first thing after exec, in its own single-threaded interpreter; the parent's pid travels in the
environment so that the child can tell whether the parent died before the request (then no signal would
ever come, and it exits at once).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

PARENT_ENV = "EMBEDTUNE_PARENT_PID"
PR_SET_PDEATHSIG = 1


def child_env() -> dict[str, str]:
    """The environment for a child that should die with this process."""
    return dict(os.environ, **{PARENT_ENV: str(os.getpid())})


def die_with_parent() -> None:
    """Child side: SIGTERM when the parent dies. Without the variable (run by hand), nothing to do."""
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent.isdigit():
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        return  # not Linux: the parent's own shutdown still stops its children
    if os.getppid() != int(parent):
        sys.exit("embedtune: the daemon that started this process is gone")


# --- a SIGTERM that waits for the end of a batch ------------------------------------------------------
# A model-job child killed mid-write can leave its store half-written; one stopped between two batches
# leaves whole batches that the next job reuses (the index fill resumes from what the store holds). So a
# child asks for this handler: a SIGTERM inside `stop_deferred()` only raises a flag that the loop reads
# between batches (`stop_requested()`); anywhere else it ends the process at once, as by default.
_stop = {"deferred": 0, "requested": False}


def stop_between_batches() -> None:
    """Child side: take SIGTERM over (in the main thread, before any work)."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: object) -> None:
    _stop["requested"] = True
    if not _stop["deferred"]:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


@contextmanager
def stop_deferred() -> Iterator[None]:
    """A loop whose steps must not be cut in half: SIGTERM waits for its check between two steps. Where
    nothing took SIGTERM over (the daemon's own threads, a test), nothing changes."""
    _stop["deferred"] += 1
    try:
        yield
    finally:
        _stop["deferred"] -= 1


def stop_requested() -> bool:
    """A SIGTERM arrived inside `stop_deferred()`: end the loop now, between two steps."""
    return bool(_stop["requested"])
