"""Fault campaign: the LLM test server injects latency spikes, 429s, 500s, hangs, truncated and non-JSON
bodies and an outage; synthesis completes once the faults stop and the invariants hold."""

from __future__ import annotations

import json
import time

import pytest

from daemon.settings import load_settings
from tests.docs_factory import generate_corpus
from tests.llm_server import FakeLlm
from tests.reliability.harness import (
    DaemonProcess,
    campaign_scale,
    check_invariants,
    scalar,
    settled,
    wait,
    write_config,
)
from tests.reliability.test_crash import expected_pairs_with

SCALES = {"reduced": {"files": 24, "outage_s": 6.0}, "full": {"files": 200, "outage_s": 30.0}}
WEIGHTS = {
    "ok": 10,
    "latency:1.5": 2,
    "429:0.5": 2,
    "500": 2,
    "hang": 1,
    "truncated": 2,
    "nonjson": 2,
    "html": 1,
}


@pytest.mark.parametrize("scale", [pytest.param("reduced"), pytest.param("full", marks=pytest.mark.slow)])
def test_llm_fault_campaign(tmp_path, tiny_embedder, scale):
    if scale == "full" and campaign_scale() != "full":
        pytest.skip("full campaign: EMBEDTUNE_CAMPAIGN=full")
    sizes = SCALES[scale]
    with FakeLlm(weights=WEIGHTS, seed=11) as server, FakeLlm() as clean:
        server.hang_seconds = 4.0  # past the client's 2 s read timeout
        config = write_config(
            tmp_path / "c.toml",
            tmp_path,
            tiny_embedder,
            server.url,
            {
                "llm": {"max_retries": 3, "reask_invalid": 3, "breaker_failures": 4},
                "training": {"min_new_samples": 10**6},
            },
        )
        settings = load_settings(config, env=False)
        state = settings.paths.state_dir
        files = generate_corpus(settings.paths.inbox, sizes["files"], sentences=(4, 16))
        daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
        wait(lambda: scalar(state, "SELECT COUNT(*) FROM samples"), timeout=120, message="first samples")
        server.down = True  # the outage: the breaker opens, jobs wait without burning attempts
        wait(
            lambda: scalar(state, "SELECT breaker FROM daemon") == "open", timeout=60, message="breaker open"
        )
        time.sleep(sizes["outage_s"])
        assert scalar(state, "SELECT COUNT(*) FROM jobs WHERE state='dead'") == 0
        server.down = False
        wait(
            lambda: (
                settled(state) and scalar(state, "SELECT COUNT(*) FROM documents WHERE status='pending'") == 0
            ),
            timeout=600,
            message="synthesis to complete after the faults",
        )
        assert daemon.alive()
        assert scalar(state, "SELECT breaker FROM daemon") == "closed"
        assert daemon.terminate() == 0
        injected = dict(server.faults)
        summary = check_invariants(settings, files, expected_pairs_with(clean.url))
    faults = sum(count for name, count in injected.items() if name != "ok")
    assert faults >= 10 and injected.get("down", 0) >= 1, injected
    report = {"scale": scale, "faults_injected": injected, **summary}
    print("FAULT CAMPAIGN", json.dumps(report))
