"""The log set-up writes to the stderr of the moment: a CLI command run under one test's capture (which is
closed after it) must not break the logging of every later test or thread (it failed a pool's job claim
with "I/O operation on closed file" before)."""

from __future__ import annotations

import io
import sys


def test_log_lines_go_to_the_stderr_of_the_moment(monkeypatch):
    from daemon.logs import configure_logging, get_logger

    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging("info", "json")
    first.close()  # the capture the set-up ran under is gone
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    get_logger("embedtune.test").info("after_the_swap")
    assert "after_the_swap" in second.getvalue()
