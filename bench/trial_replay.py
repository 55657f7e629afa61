"""Does an interleaved trial decide what the truth says? (issue 37, docs/promotion.md "Interleaved trials")

`bench.gate_calibration` runs each round through the daemon's round process on a copy of one state; a
round whose candidate the gate could not tell from the base, with events in the log, opens a trial there
(daemon/trials.py). This bench takes such a round's state (a fresh copy of it), serves it with
`embedtune serve` in this process (the trial's candidate loaded beside the base, each with its memory
replica of the live collection), and plays the team's users: they ask the gate's part of the asked
questions (never trained on), drawn with replacement (each ask by another simulated user, as the trial
counts a question once per client), and the application acts on the interleaved top 10
as the calibration's did (`cited`: every relevant hit shown; `click`: the first). Every `--check-every`
questions the daemon's own check (daemon.trials.check_trial) tallies the events and ends the trial when
it is decided. Printed: the questions it took, the tally and the result, beside the truth the
calibration measured for that candidate (served hybrid on the truth questions, paired bootstrap).

    python -m bench.trial_replay /tmp/gc-zh-cited --calibration /tmp/gc-zh-cited.json --round 1 \\
        --share 1.0 --max-questions 4000

A trial whose round named two BM25 shares (state/trials.py arms) is replayed with both; `--candidate-share`
replaces them with one. `--share 1.0` interleaves every question (the daemon's default is 0.2 of the searches; the share only
scales how many searches a trial needs). Questions repeat when the trial needs more than the judge part
holds (zh-medqa: 134), so a decision comes sooner than on as many distinct questions.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path


def judge_part_questions(asked_rows: list[dict], judge_share: float) -> list[str]:
    """The asked questions the gate kept for itself (never trained on), as the calibration asked them."""
    from state.real_queries import JUDGE, question_key, split_for

    return [row["query"] for row in asked_rows if split_for(question_key(row["text"]), judge_share) == JUDGE]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="a bench.gate_calibration --work folder")
    parser.add_argument("--calibration", type=Path, help="that run's --out JSON (for the truth beside)")
    parser.add_argument("--round", type=int, default=1, help="the calibration round whose trial to run")
    parser.add_argument("--share", type=float, default=1.0, help="share of the searches interleaved")
    parser.add_argument("--max-questions", type=int, default=4000, help="promotion.trial_max_questions")
    parser.add_argument("--check-every", type=int, default=25, help="questions between the daemon's checks")
    parser.add_argument("--events", choices=("cited", "click"), default="cited")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--candidate-share",
        type=float,
        help="serve the candidate at this BM25 share instead of its round's choice (written into the "
        "replay's own copy of it)",
    )
    args = parser.parse_args()
    source = args.work / f"round-{args.round}" / "state"
    if not (args.work / "config.toml").is_file() or not source.is_dir():
        parser.error(f"{args.work} holds no bench.gate_calibration round {args.round} (no {source})")
    if args.calibration is not None and not args.calibration.is_file():
        parser.error(f"--calibration {args.calibration}: no such file")

    import httpx

    from bench.gate_calibration import CLIENT, Beir, act_on, relevant_hits
    from daemon.logs import configure_logging
    from daemon.serve import serve_in_thread
    from daemon.serving import served_bm25_weight
    from daemon.settings import load_settings
    from daemon.trials import check_trial
    from stages.evalsets import document_stem
    from state.db import connect
    from state.index_records import IndexRecords
    from state.layout import StateLayout
    from state.trials import TrialStore

    configure_logging("warning", "console")
    report = json.loads(args.calibration.read_text()) if args.calibration else {"rounds": []}
    calibrated = {r["number"]: r for r in report["rounds"]}.get(args.round, {})
    asked_rows = json.loads((args.work / "prepared.json").read_text())["asked_rows"]
    settings = load_settings(str(args.work / "config.toml"))
    state = args.work / f"trial-{args.round}" / "state"
    shutil.rmtree(state.parent, ignore_errors=True)
    shutil.copytree(source, state, symlinks=True)
    settings.paths.state_dir = state
    settings.promotion.trial_share = args.share
    settings.promotion.trial_max_questions = args.max_questions
    settings.promotion.trial_max_days = 365.0
    layout = StateLayout(state)
    conn = connect(layout.database)
    live = IndexRecords(conn).live()
    if live is not None and live.model_id is None:
        # the live collection names the base by the folder it was converted into when the calibration
        # ingested (its prepared state); a copied state would resolve the packaged base into its own
        # folder, which the collection does not name, and serve would answer without its replicas
        settings.model.base = live.model_path
    store = TrialStore(conn)
    trial = store.running()
    if trial is None:
        print(
            f"round {args.round} opened no trial ({calibrated.get('decision')}: {calibrated.get('reason')})"
        )
        return 2
    # The copied database names the calibration's own version folder: the replay registers the round's
    # candidate (from the copy's round folder) anew in its own state, so whatever the trial's end
    # discards is the replay's, never the calibration's.
    from stages.fusion import RETRIEVAL_FILE
    from state.registry import ModelRegistry

    source = layout.round_dir(trial.round_id) / trial.variant
    if not source.is_dir():  # a merge is written only into its version folder (this copy's)
        source = layout.versions / str(trial.model_id)
    copy = ModelRegistry(conn, layout).register(source, round_id=trial.round_id, metrics={"trial": True})
    arms = list(trial.arms)  # the shares its round named for the trial (two arms, or none)
    if args.candidate_share is not None:
        choice = {"bm25_weight": args.candidate_share, "chosen_on": "bench.trial_replay --candidate-share"}
        (copy.path / RETRIEVAL_FILE).write_text(json.dumps(choice))
        arms = []
    trial, _ = store.open(
        round_id=trial.round_id,
        model_id=copy.id,
        path=str(copy.path),
        replacing_id=trial.replacing_id,
        variant=trial.variant,
        share=args.share,
        arms=arms,
    )
    share = list(trial.arms) or served_bm25_weight(settings, Path(trial.path), conn)
    data = Beir.read(args.work / "data")
    stem_to_id = {document_stem(str(row["_id"])): str(row["_id"]) for row in data.corpus}
    questions = judge_part_questions(asked_rows, settings.query_log.judge_share)
    known = calibrated.get("truth") or {}
    truth = {
        "hybrid": known.get("hybrid"),
        **{k: v for k, v in known.items() if k == "hybrid_at_trial_shares"},
    }
    print(
        f"round {args.round}: trial {trial.id} of {trial.version} ({trial.variant}, BM25 share {share}) against "
        f"{'the base' if trial.replacing_id is None else f'v{trial.replacing_id}'}; {len(questions)} judge-part "
        f"questions; truth {json.dumps(truth)}",
        flush=True,
    )
    rng = random.Random(args.seed)
    window = settings.promotion.trial_event_window_s
    started = time.monotonic()
    server, serving, thread, url = serve_in_thread(settings)
    asked = mixed = 0
    outcome = None
    try:
        with httpx.Client(base_url=url, timeout=300, headers={"X-Client-Id": CLIENT}) as client:
            while client.get("/health").status_code != 200 or serving.trial_for(serving.current) is None:
                if serving.trial_problem:
                    raise SystemExit(f"the trial cannot start: {serving.trial_problem}")
                time.sleep(1)
            ready = time.monotonic() - started
            print(f"served with the candidate beside the base after {ready:.0f} s", flush=True)
            while outcome is None or outcome.result == "running":
                qid = rng.choice(questions)
                # each ask by another simulated user: the trial counts a question once per client
                answer = client.post(
                    "/v1/search",
                    json={"query": data.queries[qid], "k": 10},
                    headers={"X-Client-Id": f"user-{asked}"},
                )
                answer.raise_for_status()
                body = answer.json()
                asked += 1
                mixed += "trial" in body
                act_on(client, body, relevant_hits(body, data.qrels[qid], stem_to_id), args.events)
                if asked % args.check_every == 0:
                    # the simulated application posts its events at once: judge as the daemon would
                    # once the event window has passed
                    later = datetime.now(UTC) + timedelta(seconds=window)
                    outcome = check_trial(settings, layout, conn, now=later)
                    if asked % (args.check_every * 8) == 0:
                        print(f"  {asked} questions: {outcome.reason}", flush=True)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        serving.stop()
    seconds = time.monotonic() - started
    ended = store.get(trial.id)
    result = {
        "round": args.round,
        "candidate_share": share,
        "arms_out": list(ended.arms_out),
        "questions": asked,
        "interleaved": mixed,
        "result": ended.result,
        "reason": ended.reason,
        "truth": truth,
        "seconds": round(seconds, 1),
        "ready_seconds": round(ready, 1),
        "command": " ".join(["python -m bench.trial_replay", *sys.argv[1:]]),
    }
    conn.close()
    print(f"{ended.result} after {asked} questions ({mixed} interleaved), {seconds:.0f} s: {ended.reason}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
