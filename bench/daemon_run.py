"""The daemon run inside a benchmark's process: its loop in a thread, as `embedtune run` runs it, and a
connection to its database; stopped and closed on the way out, whatever happened."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def daemon_in_thread(settings, tick: float = 0.5) -> Iterator[tuple[object, object]]:
    """Yields (daemon, connection) once the daemon has started."""
    from daemon.service import Daemon
    from state.db import connect

    daemon = Daemon(settings)
    daemon.start()
    loop = threading.Thread(target=daemon.run_forever, kwargs={"tick": tick}, daemon=True)
    loop.start()
    conn = connect(daemon.layout.database)
    try:
        yield daemon, conn
    finally:
        daemon.stop_requested.set()
        loop.join(timeout=120)
        daemon.shutdown()
        conn.close()
