"""Inbox watching: watchdog events and scans feed a settle tracker; settled files become ingest jobs.

The watcher thread never reads file contents. A file is handed on only after its size and mtime have
stayed the same for `settle_seconds` on a monotonic clock and it still exists (a copy in progress is
never half-read). A periodic rescan covers events the OS dropped.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from daemon.logs import get_logger
from stages.extract import SUPPORTED_SUFFIXES

log = get_logger("embedtune.watcher")

IGNORED_SUFFIXES = {".part", ".tmp", ".swp", ".swo", ".crdownload", ".download", ".partial", ".lock"}


def is_ignored_name(name: str) -> bool:
    """Temp and hidden files that are never documents: dot-files, Office lock files, partial copies."""
    lower = name.lower()
    return (
        name.startswith(".")
        or name.startswith("~$")
        or name.endswith("~")
        or any(lower.endswith(suffix) for suffix in IGNORED_SUFFIXES)
    )


def path_is_valid_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class _Tracked:
    size: int
    mtime: float
    stable_since: float


class InboxCallbacks:
    """What the watcher reports; the daemon implements these against the database."""

    def settled(self, path: str, size: int, mtime: float) -> None: ...
    def deleted(self, path: str) -> None: ...
    def moved(self, src: str, dest: str) -> None: ...
    def rejected(self, path: str, reason: str) -> None: ...
    def deleted_tree(self, folder: str) -> None: ...
    def moved_tree(self, src: str, dest: str) -> None: ...


class SettleTracker:
    def __init__(self, settle_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.settle_seconds = settle_seconds
        self.clock = clock
        self._tracked: dict[str, _Tracked] = {}
        self._handing_off: set[str] = set()  # settled, returned by poll(), not yet handed_off()
        self._lock = threading.Lock()

    def touch(self, path: str) -> None:
        with self._lock:
            self._tracked.pop(path, None)
            self._tracked[path] = _Tracked(-1, -1.0, self.clock())

    def forget(self, path: str) -> None:
        with self._lock:
            self._tracked.pop(path, None)

    def forget_tree(self, folder: str) -> None:
        prefix = folder.rstrip(os.sep) + os.sep
        with self._lock:
            for path in [p for p in self._tracked if p.startswith(prefix)]:
                del self._tracked[path]

    def __len__(self) -> int:
        """Files not yet turned into jobs: still settling, or settled and being handed over. A settled
        file counts until handed_off(): otherwise there is a moment where it is neither tracked nor a job,
        and whoever waits for "no jobs and nothing tracked" (`once`, tests) sees an idle pipeline early."""
        with self._lock:
            return len(self._tracked) + len(self._handing_off)

    def handed_off(self, path: str) -> None:
        with self._lock:
            self._handing_off.discard(path)

    def poll(self) -> list[tuple[str, int, float]]:
        """Re-stat every tracked path; return those that have been unchanged for the settle period."""
        now = self.clock()
        ready: list[tuple[str, int, float]] = []
        with self._lock:
            items = list(self._tracked.items())
        for path, entry in items:
            try:
                info = os.stat(path)
            except OSError:
                self.forget(path)  # vanished (its delete event will say so) or unreadable metadata
                continue
            if not stat.S_ISREG(info.st_mode):
                ready.append((path, info.st_size, info.st_mtime))  # ingestion rejects it with a reason
                self._hand_off(path)
                continue
            if info.st_size != entry.size or info.st_mtime != entry.mtime:
                with self._lock:
                    if path in self._tracked:
                        self._tracked[path] = _Tracked(info.st_size, info.st_mtime, now)
                continue
            if now - entry.stable_since >= self.settle_seconds:
                ready.append((path, info.st_size, info.st_mtime))
                self._hand_off(path)
        return ready

    def _hand_off(self, path: str) -> None:
        with self._lock:
            self._tracked.pop(path, None)
            self._handing_off.add(path)


class InboxWatcher(FileSystemEventHandler):
    """Owns the watchdog observer and the settle loop thread."""

    def __init__(
        self, inbox: Path, callbacks: InboxCallbacks, settle_seconds: float, poll_interval: float = 0.25
    ) -> None:
        self.inbox = Path(os.path.realpath(inbox))
        self.callbacks = callbacks
        self.tracker = SettleTracker(settle_seconds)
        self.poll_interval = poll_interval
        self._observer: Observer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- classification -------------------------------------------------------------------------
    def classify(self, path: str) -> str:
        """'track', 'ignore', or a rejection reason for files that are in the inbox but unusable."""
        relative = os.path.relpath(path, self.inbox)
        if relative.startswith(".."):
            return "ignore"
        if any(is_ignored_name(part) for part in Path(relative).parts):
            return "ignore"
        if os.path.islink(path):
            real = os.path.realpath(path)
            if not (real == str(self.inbox) or real.startswith(str(self.inbox) + os.sep)):
                return "ignore"
        if not path_is_valid_utf8(path):
            return "file name is not valid UTF-8: rename it"
        suffix = Path(path).suffix.lower()
        if suffix not in SUPPORTED_SUFFIXES:
            return f"unsupported file type {suffix or '(no extension)'}; supported: " + " ".join(
                sorted(SUPPORTED_SUFFIXES)
            )
        return "track"

    def offer(self, path: str) -> None:
        verdict = self.classify(path)
        if verdict == "track":
            self.tracker.touch(path)
        elif verdict != "ignore":
            self.callbacks.rejected(safe_path(path), verdict)

    # --- scanning -------------------------------------------------------------------------------
    def iter_inbox(self) -> Iterator[str]:
        """Every entry worth offering, recursively; symlinked folders are not followed."""
        stack = [str(self.inbox)]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError as exc:
                log.warning("scan_folder_failed", folder=safe_path(folder), error=str(exc))
                continue
            for entry in entries:
                if is_ignored_name(entry.name):
                    continue
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if is_dir:
                    stack.append(entry.path)
                    if Path(entry.name).suffix.lower() in SUPPORTED_SUFFIXES:
                        self.callbacks.rejected(safe_path(entry.path), "is a directory, not a file")
                else:
                    yield entry.path

    def scan(self) -> set[str]:
        """Offer everything in the inbox to the settle tracker (start-up reconciliation and rescans);
        the paths seen, in the printable form document rows hold for undecodable names."""
        seen = set()
        for path in self.iter_inbox():
            seen.add(safe_path(path))
            self.offer(path)
        return seen

    # --- watchdog events ------------------------------------------------------------------------
    def on_created(self, event: FileSystemEvent) -> None:
        self._on_change(event)

    def on_modified(self, event: FileSystemEvent) -> None:
        self._on_change(event)

    def on_closed(self, event: FileSystemEvent) -> None:
        self._on_change(event)

    def _on_change(self, event: FileSystemEvent) -> None:
        path = _decode(event.src_path)
        if event.is_directory:
            if event.event_type == "created":
                name = os.path.basename(path)
                if Path(name).suffix.lower() in SUPPORTED_SUFFIXES and not is_ignored_name(name):
                    self.callbacks.rejected(safe_path(path), "is a directory, not a file")
                # A folder moved or copied in whole may carry files whose own events we never get.
                for inner in self._walk(path):
                    self.offer(inner)
            return
        self.offer(path)

    def on_deleted(self, event: FileSystemEvent) -> None:
        path = _decode(event.src_path)
        self.tracker.forget(path)
        self.tracker.forget_tree(path)
        if not path_is_valid_utf8(path):
            self.callbacks.deleted(safe_path(path))
            return
        if event.is_directory:
            self.callbacks.deleted_tree(path)
        else:
            self.callbacks.deleted(path)
            self.callbacks.deleted_tree(path)  # watchdog may report a deleted folder as a file

    def on_moved(self, event: FileSystemEvent) -> None:
        src, dest = _decode(event.src_path), _decode(event.dest_path)
        self.tracker.forget(src)
        dest_inside = self.classify(dest) != "ignore" or event.is_directory
        if event.is_directory:
            self.tracker.forget_tree(src)
            self.callbacks.moved_tree(src, dest)
            for inner in self._walk(dest):
                self.offer(inner)
            return
        if dest_inside and self.classify(dest) == "track" and self.classify(src) == "track":
            self.callbacks.moved(src, dest)
            self.tracker.touch(dest)  # confirms (size, mtime); unchanged content is not re-ingested
        else:
            if self.classify(src) == "track":
                self.callbacks.deleted(src)
            self.offer(dest)

    def _walk(self, folder: str) -> Iterator[str]:
        for root, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if not is_ignored_name(d)]
            for name in files:
                yield os.path.join(root, name)

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.inbox.mkdir(parents=True, exist_ok=True)
        self._observer = Observer()
        self._observer.schedule(self, str(self.inbox), recursive=True)
        self._observer.start()
        self._stop.clear()
        self._thread = threading.Thread(target=self._settle_loop, name="settle", daemon=True)
        self._thread.start()

    def _settle_loop(self) -> None:
        while not self._stop.wait(self.poll_interval):
            for path, size, mtime in self.tracker.poll():
                try:
                    self.callbacks.settled(path, size, mtime)
                except Exception as exc:
                    # e.g. the database is locked or the disk is full: keep the file, retry after it
                    # settles again, and say why. Dropping it here would lose it until the next rescan.
                    self.tracker.touch(path)
                    log.exception(
                        "settle_callback_failed",
                        path=safe_path(path),
                        will_retry=True,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                finally:
                    self.tracker.handed_off(path)

    def stop(self) -> None:
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)


def _decode(path: str | bytes) -> str:
    return os.fsdecode(path)


def safe_path(path: str) -> str:
    """Printable, storable form of a path that may hold undecodable bytes."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")
