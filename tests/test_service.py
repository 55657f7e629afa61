"""The daemon as systemd runs it: notify protocol, single instance, signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.lock import AlreadyRunning, InstanceLock
from daemon.notify import Notifier
from tests.conftest import wait_for
from tests.docs_factory import ENGLISH

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    yield path, sock
    sock.close()


def _drain(sock) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            return messages


class _Listener:
    """Reads the notify socket on a thread for as long as a daemon runs, as systemd does: the kernel keeps
    only 10 unread datagrams (net.unix.max_dgram_qlen) and the notifier never blocks, so a test that read
    only at the start and the end lost STOPPING=1 whenever the run took more than ~10 watchdog pings."""

    def __init__(self, sock) -> None:
        import threading

        self.sock = sock
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def test_notifier_sends_datagrams(notify_socket, monkeypatch):
    path, sock = notify_socket
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    notifier = Notifier(str(path))
    assert notifier.watchdog_interval == 10.0
    assert notifier.ready("watching")
    assert notifier.watchdog() and notifier.status("busy")
    messages = _drain(sock)
    assert messages[0].startswith("READY=1\nSTATUS=watching\nMAINPID=")
    assert messages[1:] == ["WATCHDOG=1", "STATUS=busy"]
    assert not Notifier("").ready()


def _stall(sock) -> int:
    """Fill a reader's receive queue, as a systemd that stopped draining its socket leaves it."""
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    sent = 0
    try:
        while True:
            sender.sendto(b"STATUS=filler", sock.getsockname())
            sent += 1
    except BlockingIOError:
        return sent
    finally:
        sender.close()


def test_notifier_never_blocks_on_a_stalled_reader(notify_socket):
    path, sock = notify_socket
    assert _stall(sock) > 0
    notifier = Notifier(str(path))
    started = time.monotonic()
    results = [notifier.status(f"busy {i}") for i in range(200)] + [notifier.watchdog()]
    assert time.monotonic() - started < 2.0
    assert not any(results) and notifier.dropped == 201
    _drain(sock)
    assert notifier.status("busy 199") and not notifier.status("busy 199")  # only changes are sent
    assert _drain(sock) == ["STATUS=busy 199"]


def test_daemon_stops_on_sigterm_whatever_the_notify_socket_does(tmp_path, tiny_embedder, notify_socket):
    path, sock = notify_socket
    _stall(sock)
    config = _config(tmp_path, tiny_embedder)
    env = dict(os.environ, NOTIFY_SOCKET=str(path), WATCHDOG_USEC="2000000")
    with open(tmp_path / "daemon.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "--config", str(config), "run"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(
                lambda: _status(config)["daemon"]["activity"].startswith("watching"),
                timeout=60,
                message="daemon running with a stalled notify reader",
            )
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()


def test_abstract_socket_address():
    name = f"embedtune-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(1)
    try:
        assert Notifier("@" + name).send("READY=1")
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_second_instance_is_refused_with_the_holder(tmp_path):
    first = InstanceLock(tmp_path / "embedtune.lock").acquire()
    with pytest.raises(AlreadyRunning) as error:
        InstanceLock(tmp_path / "embedtune.lock").acquire()
    assert str(os.getpid()) in error.value.holder
    first.release()
    InstanceLock(tmp_path / "embedtune.lock").acquire().release()


def _config(tmp_path: Path, tiny_embedder: Path, extra: str = "") -> Path:
    config = tmp_path / "embedtune.toml"
    config.write_text(
        f'[paths]\ninbox = "{tmp_path / "inbox"}"\nstate_dir = "{tmp_path / "state"}"\n'
        f"[ingest]\nsettle_seconds = 0.3\nchunk_tokens = 64\nchunk_overlap = 8\n"
        f'[model]\nbase = "{tiny_embedder}"\ndevice = "cpu"\n'
        f'[logging]\nformat = "json"\n{extra}'
    )
    (tmp_path / "inbox").mkdir(exist_ok=True)
    return config


def _status(config: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--config", str(config), "status", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return json.loads(result.stdout)


def test_daemon_process_notify_lock_sighup_and_sigterm(tmp_path, tiny_embedder, notify_socket):
    path, sock = notify_socket
    config = _config(tmp_path, tiny_embedder)
    env = dict(os.environ, NOTIFY_SOCKET=str(path), WATCHDOG_USEC="2000000")
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "--config", str(config), "run"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    listener = _Listener(sock)
    messages = listener.messages
    try:
        wait_for(lambda: any(m.startswith("READY=1") for m in messages), timeout=60, message="READY=1")
        wait_for(lambda: "WATCHDOG=1" in messages, timeout=10, message="watchdog ping")
        assert any("STATUS=" in m for m in messages)
        assert _status(config)["daemon"]["alive"] is True

        second = subprocess.run(
            [sys.executable, "-m", "daemon.cli", "--config", str(config), "run"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1 and str(process.pid) in second.stdout

        for i in range(5):
            (tmp_path / "inbox" / f"f{i}.txt").write_text(f"File {i}. " + ENGLISH)
        wait_for(lambda: _status(config)["documents"]["ingested"] == 5, timeout=60, message="ingested")

        text = config.read_text().replace("chunk_overlap = 8\n", "chunk_overlap = 8\nworkers = 3\n")
        config.write_text(text + "\n[synthesis]\njudge_threshold = 0.9\n")
        process.send_signal(signal.SIGHUP)
        wait_for(
            lambda: b"settings_reloaded" in (tmp_path / "daemon.log").read_bytes(),
            timeout=20,
            message="reload logged",
        )
        line = next(
            json.loads(x)
            for x in (tmp_path / "daemon.log").read_bytes().splitlines()
            if b"settings_reloaded" in x
        )
        assert set(line["changed"]) == {"synthesis.judge_threshold"}  # ingest.workers is not applied live
        assert line["restart_needed"] == ["ingest.workers"]
        wait_for(
            lambda: _status(config)["daemon"]["restart_needed"] == ["ingest.workers"],
            timeout=10,
            message="status says a restart is needed",
        )

        (tmp_path / "inbox" / "late.txt").write_text("Late file. " + ENGLISH)
        wait_for(
            lambda: sum(_status(config)["documents"][k] for k in ("pending", "ingested")) == 6,
            timeout=30,
            message="late file recorded",
        )
        process.send_signal(signal.SIGTERM)  # while the late file may still be in ingestion
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    status = _status(config)
    assert status["daemon"]["alive"] is False
    assert status["jobs"]["running"] == 0  # leases released
    # the file that arrived just before SIGTERM is kept: ingested, or pending for the next start
    assert status["documents"]["pending"] + status["documents"]["ingested"] == 6
    wait_for(lambda: "STOPPING=1" in messages, timeout=5, message="STOPPING=1")
    listener.close()


def test_a_model_job_ended_by_a_daemon_stop_goes_back_without_an_attempt(tmp_path):
    """Stopping the daemon SIGTERMs its model-job children: that is an interruption, not a failure, or
    five restarts during one filter pass would dead-letter it."""
    import threading

    from daemon.job_process import ChildJobs
    from daemon.settings import Settings
    from daemon.workers import JobContext, RetryLater
    from state.db import Database
    from state.layout import StateLayout
    from state.queue import JobQueue

    class SlowChild(ChildJobs):  # the real spawn and stop; a child that takes long, as a filter pass does
        def command(self, settings_file, job_id, owner, result_file):
            return [sys.executable, "-c", "import time; time.sleep(120)"]

    settings = Settings.model_validate(
        {"paths": {"state_dir": str(tmp_path / "state"), "inbox": str(tmp_path / "in")}}
    )
    layout = StateLayout(settings.paths.state_dir).ensure()
    queue = JobQueue(Database(layout.database).conn)
    queue.enqueue("filter", "filter", {})
    job = queue.claim("test", ["filter"])
    children = SlowChild(settings, layout)
    outcome: dict = {}

    def run():
        try:
            children.handle(JobContext(job, queue))
        except Exception as exc:  # noqa: BLE001 - what the worker pool would see
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    wait_for(lambda: children._children, message="the child to start")
    children.stop()
    worker.join(timeout=60)
    assert isinstance(outcome.get("error"), RetryLater), outcome


def test_a_child_dies_with_the_process_that_started_it(tmp_path):
    """The death signal is asked for by the child after exec (no Python between fork and exec in the
    threaded daemon): SIGKILL the parent and the child goes too."""
    parent_code = (
        "import subprocess, sys, time\n"
        "from daemon.child_process import child_env\n"
        "child = subprocess.Popen([sys.executable, '-c', 'from daemon.child_process import die_with_parent; "
        "die_with_parent(); import time; time.sleep(120)'], env=child_env())\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    child_pid = int(parent.stdout.readline())
    wait_for(lambda: b"child_process" in Path(f"/proc/{child_pid}/cmdline").read_bytes(), message="the child")
    parent.kill()
    parent.wait()

    def gone() -> bool:
        try:
            state = Path(f"/proc/{child_pid}/stat").read_text().split()[2]
        except OSError:
            return True
        return state == "Z"  # exited, waiting for init to reap it

    wait_for(gone, timeout=20, message="the child to die with its parent")
