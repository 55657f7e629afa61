"""Progress of long work: a tqdm bar on a terminal, a structured log line now and then elsewhere.

Under systemd (or with output piped to a file) a redrawn bar is noise in the journal, so the same
updates become `progress` log events at most every `log_every_s` seconds, plus one at the end.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from daemon.logs import get_logger

log = get_logger("embedtune.progress")


def on_terminal(stream: TextIO | None = None) -> bool:
    """True for an interactive terminal; False under systemd (INVOCATION_ID / JOURNAL_STREAM) or a pipe."""
    stream = stream or sys.stderr
    if os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """`update(n)` as work is done; `close()` at the end (also as a context manager)."""

    def __init__(
        self,
        what: str,
        total: int | None,
        unit: str = "it",
        *,
        log_every_s: float = 10.0,
        bar: bool | None = None,
    ) -> None:
        self.what = what
        self.total = total
        self.unit = unit
        self.done = 0
        self.log_every_s = log_every_s
        self.started = time.monotonic()
        self._last_log = self.started
        self._bar = None
        if on_terminal() if bar is None else bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=what, unit=unit, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last_log >= self.log_every_s:
            self._last_log = now
            self._log("progress")

    def advance(self, n: int, total: int) -> None:
        """An encoder's callback: (0, total) when a call over `total` texts begins, then (n, total) as
        each slice of n texts is done; the bar's total is the sum over calls."""
        if n == 0:
            self.total = (self.total or 0) + total
            if self._bar is not None:
                self._bar.total = self.total
                self._bar.refresh()
            return
        self.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            self._log("progress_done")

    def _log(self, event: str) -> None:
        elapsed = time.monotonic() - self.started
        log.info(
            event,
            what=self.what,
            done=self.done,
            total=self.total,
            unit=self.unit,
            elapsed_s=round(elapsed, 1),
            rate=round(self.done / elapsed, 2) if elapsed > 0 else None,
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
