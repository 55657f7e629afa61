"""Would interleaving see what the events on the model in service's own answers cannot? (issue 37)

The gate's events are only about the top 10 the model in service showed, so a candidate's gains on the
questions that model failed stay invisible (docs/promotion.md, "What the events cannot see"). Team-draft
interleaving (Radlinski, Kurup, Joachims, CIKM 2008) shows each user one list drawn alternately from both
models' rankings, and credits each event to the model that contributed the hit: the events are then about
both models' answers. This bench measures, before anything is built into `serve`, whether that would
decide the rounds `bench.gate_calibration` left: for each round's candidate and the base, both served as
hybrid, on the truth queries (never seen by the pipeline), simulated users ask `--queries` questions
drawn with replacement and act on the interleaved top 10 from the qrels (`cited`: every relevant hit;
`click`: the first relevant one). A question's outcome is a win for the model whose hits got more events;
a two-sided sign test over the decided questions (p < 0.05) says gain or loss. Repeated `--simulations`
times: how often interleaving finds the candidate better, worse, or neither, next to the truth verdict.

    python -m bench.interleaving_power /tmp/gc-zh-cited --calibration /tmp/gc-zh-cited.json \\
        --rounds 1,2,4,5 --queries 50,100,200 --events cited

With `--preference P` instead, it simulates the trial's own sequential test (stages/interleaving.py, as
the daemon runs it, looked at after every question) on questions the candidate wins with probability P:
how many won questions a trial needs before it decides.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stages import interleaving


def outcome(shown: Sequence[tuple[int, str]], relevant: dict[int, float], events: str) -> int:
    """+1 when the candidate's hits got more events than the base's, -1 when fewer, 0 on a tie
    (`click`: the first relevant hit only; `cited`: every relevant hit)."""
    used = [rank for rank, (hit, _team) in enumerate(shown) if relevant.get(hit, 0) > 0]
    if events == "click":
        used = used[:1]
    return interleaving.outcome([team for _hit, team in shown], used)


@dataclass
class Power:
    queries: int
    gain: float  # how often the sign test found the candidate better
    loss: float
    win_share: float  # the candidate's mean share of the decided questions
    decided: float  # the share of questions one model won (the rest: no event, or a tie)


def power(
    base: list[list[int]],
    candidate: list[list[int]],
    relevant: list[dict[int, float]],
    queries: int,
    simulations: int,
    events: str,
    seed: int,
) -> Power:
    from scipy.stats import binomtest

    rng = random.Random(seed)
    gains = losses = 0
    shares, decided_shares = [], []
    for _ in range(simulations):
        wins = defeats = 0
        for _ in range(queries):
            row = rng.randrange(len(base))
            result = outcome(
                interleaving.team_draft(base[row], candidate[row], 10, rng), relevant[row], events
            )
            wins += result > 0
            defeats += result < 0
        decided = wins + defeats
        decided_shares.append(decided / queries)
        if decided:
            shares.append(wins / decided)
            if binomtest(wins, decided, 0.5).pvalue < 0.05:
                gains += wins > defeats
                losses += wins < defeats
    return Power(
        queries,
        gains / simulations,
        losses / simulations,
        sum(shares) / max(len(shares), 1),
        sum(decided_shares) / simulations,
    )


def sequential_power(
    preference: float, sizes: list[int], simulations: int, alpha: float, min_decided: int, seed: int
) -> dict[int, tuple[float, float]]:
    """The trial's own test (stages.interleaving.judge_tally, looked at after every won question) on a
    stream of questions the candidate wins with probability `preference`: for each size, the share of
    simulated trials that had declared a gain, and a loss, by that many won questions."""
    from stages.interleaving import GAIN, LOSS, Tally, judge_tally

    rng = random.Random(seed)
    stops: list[tuple[int, str]] = []
    for _ in range(simulations):
        wins = losses = 0
        for decided in range(1, max(sizes) + 1):
            if rng.random() < preference:
                wins += 1
            else:
                losses += 1
            result = judge_tally(Tally(wins, losses), alpha, min_decided).result
            if result in (GAIN, LOSS):
                stops.append((decided, result))
                break
    return {
        size: (
            sum(1 for at, result in stops if at <= size and result == GAIN) / simulations,
            sum(1 for at, result in stops if at <= size and result == LOSS) / simulations,
        )
        for size in sizes
    }


def sequential_main(args) -> int:
    sizes = [int(n) for n in args.decided.split(",")]
    out = []
    for preference in (float(p) for p in args.preference.split(",")):
        found = sequential_power(preference, sizes, args.simulations, args.alpha, args.min_decided, args.seed)
        for size, (gain, loss) in found.items():
            print(
                f"preference {preference:.3f}, {size:>5} won questions: gain declared {gain:.0%}, loss {loss:.0%}"
            )
            out.append({"preference": preference, "decided": size, "gain": gain, "loss": loss})
    print(json.dumps({"alpha": args.alpha, "simulations": args.simulations, "rows": out}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, nargs="?", help="a bench.gate_calibration --work folder")
    parser.add_argument("--calibration", type=Path, help="that run's --out JSON")
    parser.add_argument(
        "--preference",
        help="instead of a calibration run: the candidate's share of won questions, e.g. 0.5,0.565 "
        "(the trial's sequential test on a stream of such questions)",
    )
    parser.add_argument("--decided", default="460,630,1000,1500", help="won questions (with --preference)")
    parser.add_argument("--alpha", type=float, default=0.05, help="promotion.trial_alpha (with --preference)")
    parser.add_argument("--min-decided", type=int, default=30, help="promotion.trial_min_decided")
    parser.add_argument("--rounds", default="1", help="round numbers, e.g. 1,2,4,5")
    parser.add_argument("--queries", default="50,100,200", help="questions asked per simulated trial")
    parser.add_argument("--events", choices=("cited", "click"), default="cited")
    parser.add_argument("--simulations", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--candidate-share",
        type=float,
        help="serve every candidate at this BM25 share (default: its round's)",
    )
    args = parser.parse_args()
    if args.preference:
        return sequential_main(args)
    if args.work is None or args.calibration is None:
        parser.error("give a calibration --work folder and --calibration, or --preference")
    if not (args.work / "config.toml").is_file():
        parser.error(f"{args.work} is not a bench.gate_calibration --work folder (no config.toml)")
    if not args.calibration.is_file():
        parser.error(f"--calibration {args.calibration}: no such file")

    from bench.gate_calibration import Truth, _share_name, compare
    from daemon.logs import configure_logging
    from daemon.settings import load_settings
    from daemon.step_params import torch_encode_params
    from stages.encoder import Encoder
    from stages.evaluate import evaluate_rankings

    configure_logging("warning", "console")
    report = json.loads(args.calibration.read_text())
    settings = load_settings(str(args.work / "config.toml"))
    truth = Truth(args.work / "truth", settings)
    relevant = truth.eval_set.relevant
    base_share = (
        None if report["base"]["bm25_share"] == "by language" else float(report["base"]["bm25_share"])
    )

    def lists(model: Path, share: float | None) -> list[list[int]]:
        encoder = Encoder(model, torch_encode_params(settings))
        try:
            return [ranked[:10] for ranked in truth.hybrid.rankings(encoder, None, [share])[share]]
        finally:
            encoder.release()

    base = lists(Path(report["base"]["model"]), base_share)
    base_scores = evaluate_rankings(base, relevant, "ndcg@10").primary_per_query
    rounds = {str(r["number"]): r for r in report["rounds"]}
    out = []
    for number in args.rounds.split(","):
        result = rounds[number]
        served = result["truth"]["served_share"]
        share = None if served == "by language" else float(served)
        if args.candidate_share is not None:
            share = args.candidate_share
        candidate = lists(Path(result["candidate"]), share)
        scores = evaluate_rankings(candidate, relevant, "ndcg@10").primary_per_query
        row = {
            "round": int(number),
            "share": _share_name(share),
            "truth": compare(scores, base_scores),
            "interleaving": [
                power(base, candidate, relevant, int(n), args.simulations, args.events, args.seed).__dict__
                for n in args.queries.split(",")
            ],
        }
        out.append(row)
        truth_row = row["truth"]
        print(
            f"round {number} (share {row['share']}): truth {truth_row['gain']:+.4f} "
            f"[{truth_row['ci95'][0]:+.4f}, {truth_row['ci95'][1]:+.4f}] {truth_row['verdict']}",
            flush=True,
        )
        for cell in row["interleaving"]:
            print(
                f"  {cell['queries']:>4} questions: gain found {cell['gain']:.0%}, loss found {cell['loss']:.0%}, "
                f"candidate's share of decided questions {cell['win_share']:.3f} "
                f"(decided {cell['decided']:.0%})",
                flush=True,
            )
    print(json.dumps({"events": args.events, "simulations": args.simulations, "rounds": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
