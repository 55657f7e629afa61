"""structlog set-up: JSON lines under systemd or when piped, coloured key=value on a terminal."""

from __future__ import annotations

import logging
import os
import sys

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def wants_json(fmt: str) -> bool:
    if fmt == "json":
        return True
    if fmt == "console":
        return False
    under_systemd = bool(os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM"))
    return under_systemd or not sys.stderr.isatty()


class _CurrentStderr:
    """Writes to `sys.stderr` as it is when a line is written, not as it was at set-up: a stream swapped in
    meanwhile (a test's capture, later closed) must not take the process's logging down with it."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure once at start-up; safe to call again (SIGHUP may change the level)."""
    numeric = LEVELS.get(level, logging.INFO)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if wants_json(fmt):
        processors = [*shared, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors = [*shared, structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=False,
    )
    # Route noisy libraries through the standard logging at warning level.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=_CurrentStderr())
    for name in ("httpx", "httpcore", "watchdog", "apscheduler", "transformers", "sentence_transformers"):
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


def get_logger(name: str = "embedtune"):
    return structlog.get_logger(name)
