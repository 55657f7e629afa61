"""systemd's notify protocol: one datagram to $NOTIFY_SOCKET (an '@' prefix is an abstract socket).

Sends never block: the main loop that sends STATUS= and WATCHDOG=1 is also the loop that notices SIGTERM,
so a reader that stops draining the socket must cost a dropped message, not a daemon that cannot stop.
STATUS= is sent only when its text changes.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        self.watchdog_interval: float | None = None
        if usec and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2  # ping at half the timeout, as systemd advises
        self._last_status: str | None = None
        self.dropped = 0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> bool:
        if not self.address:
            return False
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]
        message = "\n".join(fields).encode()
        try:
            with socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            ) as sock:
                sock.connect(target)
                sock.send(message)  # one datagram: all or nothing; EAGAIN when the reader is behind
        except OSError:
            self.dropped += 1
            return False
        return True

    def ready(self, status: str = "") -> bool:
        sent = self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")
        if sent:
            self._last_status = status
        return sent

    def status(self, text: str) -> bool:
        """Send STATUS= when the text changed since the last one sent; False when nothing was sent."""
        if text == self._last_status:
            return False
        sent = self.send(f"STATUS={text}")
        if sent:
            self._last_status = text
        return sent

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def reloading(self) -> bool:
        return self.send("RELOADING=1")
