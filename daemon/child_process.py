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
