"""The daemon process stays light: model work (the filter pass, the index sync) runs in child processes,
so torch, the model and Milvus Lite never enter the daemon (issue 14's idle-memory target; the number
itself is measured in bench/, not asserted here)."""

from __future__ import annotations

from tests.reliability.harness import DaemonProcess, scalar, settled, wait, write_config
from tests.test_rounds import _corpus


def _mapped(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as handle:
        return handle.read()


def test_filter_and_index_jobs_never_load_torch_into_the_daemon(tmp_path, tiny_embedder):
    # the default backend: an ONNX export job beside the filter and the index, also in a child process
    extra = {"training": {"min_new_samples": 10_000}, "model": {"backend": "auto"}}
    config = write_config(tmp_path / "c.toml", tmp_path, tiny_embedder, extra=extra)
    _corpus(tmp_path / "inbox", documents=4)
    state = tmp_path / "state"
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        wait(
            lambda: (
                scalar(state, "SELECT COUNT(*) FROM jobs WHERE kind = 'filter' AND state = 'done'")
                and scalar(state, "SELECT COUNT(*) FROM index_collections WHERE state = 'live'")
                and settled(state)
            ),
            timeout=180,
            message="a filter pass and a live index",
        )
        wait(
            lambda: scalar(state, "SELECT COUNT(*) FROM jobs WHERE kind = 'onnx_export' AND state = 'done'"),
            timeout=180,
            message="the ONNX export",
        )
        assert scalar(state, "SELECT COUNT(*) FROM samples WHERE kept IS NOT NULL") > 0
        maps = _mapped(daemon.pid)
        assert "libtorch" not in maps and "cygrpc" not in maps, "torch or gRPC loaded into the daemon"
        assert daemon.alive()
    finally:
        assert daemon.terminate() == 0, (tmp_path / "daemon.log").read_text()[-3000:]
