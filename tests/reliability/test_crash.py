"""Crash campaign: SIGKILL the real daemon at random moments (ingestion, synthesis, a training round),
restart it each time, then check that nothing was lost, duplicated or half-written."""

from __future__ import annotations

import json
import os
import random
import time

import pytest

from daemon.settings import load_settings
from tests.docs_factory import generate_corpus
from tests.llm_server import FakeLlm
from tests.reliability.harness import (
    DaemonProcess,
    campaign_scale,
    check_invariants,
    query,
    scalar,
    settled,
    wait,
    write_config,
)

SCALES = {"reduced": {"files": 40, "kills": 20}, "full": {"files": 300, "kills": 30}}


def _phase(state, landed) -> set[str]:
    phases = set()
    known = {row[0] for row in query(state, "SELECT path FROM documents WHERE status != 'pending'")}
    if any(str(path) not in known for path in landed):
        phases.add("ingest")  # landed but not yet ingested: settling, queued or being extracted
    for kind, count in query(
        state, "SELECT kind, COUNT(*) FROM jobs WHERE state IN ('pending','running','failed') GROUP BY kind"
    ):
        if count:
            phases.add(kind)
    if scalar(state, "SELECT COUNT(*) FROM rounds WHERE state='running'"):
        phases.add("round")
    return phases


def expected_pairs_with(server_url: str):
    """Pairs a clean synthesis of a chunk makes (the fake LLM is deterministic)."""
    from stages.llm import LlmClient, LlmConfig
    from stages.synthesize import synthesize_chunk
    from stages.text import detect_language

    client = LlmClient(LlmConfig(url=server_url, model="m"))

    def count(text: str) -> int:
        return len(synthesize_chunk(client, text, detect_language(text), 2, 1))

    return count


@pytest.mark.parametrize("scale", [pytest.param("reduced"), pytest.param("full", marks=pytest.mark.slow)])
def test_sigkill_campaign(tmp_path, tiny_embedder, scale):
    if scale == "full" and campaign_scale() != "full":
        pytest.skip("full campaign: EMBEDTUNE_CAMPAIGN=full")
    sizes = SCALES[scale]
    rng = random.Random(20261122)
    with FakeLlm(latency=0.15) as server:
        config = write_config(
            tmp_path / "c.toml", tmp_path, tiny_embedder, server.url, {"training": {"epochs": 3.0}}
        )
        settings = load_settings(config, env=False)
        state, inbox = settings.paths.state_dir, settings.paths.inbox
        staging = tmp_path / "staging"
        files = generate_corpus(
            staging, sizes["files"], kinds=("txt", "md", "docx", "pdf"), sentences=(4, 20)
        )
        batches = [files[i::8] for i in range(8)]
        landed = []
        phases_hit: dict[str, int] = {}
        log = tmp_path / "daemon.log"
        kills = 0
        round_kill_done = False
        while kills < sizes["kills"]:
            daemon = DaemonProcess(config, log).start()
            wait(
                lambda d=daemon: (
                    d.pid == scalar(state, "SELECT pid FROM daemon")
                    and scalar(state, "SELECT activity FROM daemon") != "starting"
                ),
                timeout=120,
                message="daemon ready",
            )
            if batches:  # files land while the daemon runs, so some kills hit ingestion
                for path in batches.pop(0):
                    target = inbox / path.name
                    os.utime(path)  # fresh mtime, as a copy would leave: the file must settle first
                    path.rename(target)
                    landed.append(target)
            if kills in (0, 2, 4):
                # Kills aimed at ingestion: right after a batch lands, while it settles or is extracted.
                time.sleep(rng.uniform(0.0, 0.15))  # under settle_seconds
            elif not round_kill_done and kills >= sizes["kills"] // 2:
                # One kill aimed at a round in training, so the campaign surely covers it.
                try:
                    wait(
                        lambda: scalar(
                            state, "SELECT COUNT(*) FROM rounds WHERE state='running' AND stage='train'"
                        ),
                        timeout=180,
                        message="a round in training",
                        interval=0.1,
                    )
                    round_kill_done = True
                except AssertionError:
                    pass
            else:
                time.sleep(rng.uniform(0.3, 4.0))
            for phase in _phase(state, landed):
                phases_hit[phase] = phases_hit.get(phase, 0) + 1
            assert daemon.alive(), log.read_text()[-2000:]
            daemon.kill()
            kills += 1
        daemon = DaemonProcess(config, log).start()
        wait(
            lambda: settled(state) and scalar(state, "SELECT COUNT(*) FROM documents") >= len(files),
            timeout=600,
            message="the daemon to finish all work",
        )
        wait(
            lambda: (
                settled(state)
                and (
                    scalar(state, "SELECT COUNT(*) FROM rounds WHERE state='finished'")
                    or scalar(
                        state,
                        "SELECT COUNT(*) FROM samples WHERE kept=1 AND split='train' AND round_id IS NULL",
                    )
                    < 30
                )
            ),
            timeout=600,
            message="a round to finish after the last restart",
        )
        assert daemon.terminate() == 0
        summary = check_invariants(settings, landed, expected_pairs_with(server.url))
    assert {"ingest", "synthesize"} <= set(phases_hit), phases_hit
    assert round_kill_done or "round" in phases_hit, phases_hit
    aborted = summary["rounds"].get("aborted", 0)
    assert aborted >= 1 and summary["rounds"].get("finished", 0) >= 1, summary
    report = {"scale": scale, "kills": kills, "phases_at_kill": phases_hit, **summary}
    (tmp_path / "crash-summary.json").write_text(json.dumps(report, indent=1))
    print("CRASH CAMPAIGN", json.dumps(report))
