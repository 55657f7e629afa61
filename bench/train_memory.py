"""Where the round's peak memory goes: the training step's resident memory under each setting that
changes what the backward pass keeps (batch, mined negatives, cached MNRL's mini-batches, gradient
checkpointing), with its throughput, each in a fresh process so that peaks do not mix.

Passages are real abstracts (a BEIR set's corpus), queries their titles, negatives other abstracts, so
sequence lengths are what a round sees (the model truncates at its max_seq_length).

    python -m bench.train_memory ../shared/data/nfcorpus [--pairs 96] [--model REF] [--only-default]

A set without titles (zh-medqa) pairs its real queries with their relevant documents instead.
`--freeze-word-embeddings both` runs each setting twice, the word-embedding table trained and frozen
(training.freeze_word_embeddings), and prints the frozen run's speed and peak as ratios of the trained one:

    python -m bench.train_memory ../shared/data/zh-medqa --model packaged:multilingual-e5-small \
        --only-default --pairs 64 --freeze-word-embeddings both
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CPU_DEFAULT = "cached MNRL, mini-batch 8 (the CPU default, cached_batch = auto)"
# name -> (batch, negatives, cached_batch, gradient_checkpointing)
SETTINGS = {
    "plain MNRL (batch 32, 3 negatives; the default before stop 20)": (32, 3, 0, False),
    "1 negative": (32, 1, 0, False),
    "no mined negatives": (32, 0, 0, False),
    "batch 16": (16, 3, 0, False),
    CPU_DEFAULT: (32, 3, 8, False),
    "gradient checkpointing": (32, 3, 0, True),
}


def _pairs(dataset: Path, pairs: int, negatives: int) -> list[dict]:
    from stages.evalsets import load_beir

    data = load_beir(dataset)
    corpus = data.corpus_texts
    rows = []
    for i in range(pairs):
        if "\n" in corpus[i]:  # title -> abstract
            title, _, body = corpus[i].partition("\n")
            query, positive = title, body
        else:  # a real query -> its relevant document
            query = data.queries[i % len(data.queries)]
            positive = corpus[next(iter(data.relevant[i % len(data.queries)]))]
        others = [corpus[(i + 7 * (k + 1)) % len(corpus)] for k in range(negatives)]
        rows.append({"query": query, "pos": positive, "neg": others})
    return rows


FREEZE_CHOICES = {"auto": ["auto"], "true": [True], "false": [False], "both": [False, True]}


def child(
    dataset: Path,
    pairs: int,
    batch: int,
    negatives: int,
    cached: int,
    checkpointing: bool,
    model_ref: str,
    freeze: bool | str = "auto",
) -> dict:
    """Runs in its own process: load the model, train, report the step's peak RSS and pairs/s."""
    from daemon.round_process import peak_rss_mb, reset_peak_rss
    from stages.models import resolve_model_path
    from stages.train import TrainParams, train_model

    rows = _pairs(dataset, pairs, negatives)
    model_path = resolve_model_path(model_ref)
    params = TrainParams(
        batch_size=batch,
        cached_batch=cached,
        gradient_checkpointing=checkpointing,
        freeze_word_embeddings=freeze,
        warmup_ratio=0.0,
        max_minutes=30,
        device="cpu",
    )
    from stages.models import load_embedder

    model = load_embedder(model_path, "cpu")
    loaded = peak_rss_mb()
    reset_peak_rss()
    with tempfile.TemporaryDirectory() as tmp:
        outcome = train_model(model_path, Path(tmp) / "out", rows, params, model=model)
    return {
        "model_loaded_mb": loaded,
        "train_peak_mb": peak_rss_mb(),
        "pairs_per_s": round(outcome.pairs_per_second, 4),
        "steps": outcome.steps,
        "word_embeddings_frozen": outcome.word_embeddings_frozen,
        "optimized_parameters": outcome.optimized_parameters,
    }


def _run_child(args: argparse.Namespace, setting: list) -> dict:
    """One setting in a fresh process, so that its peak RSS is its own."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.train_memory", str(args.dataset), "--pairs", str(args.pairs)]
        + ["--model", args.model, "--child", json.dumps(setting)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset", type=Path, nargs="?")
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--model", default="packaged:all-MiniLM-L6-v2")
    parser.add_argument("--only-default", action="store_true", help="only the CPU default setting")
    parser.add_argument("--batch", type=int, help="batch size for every setting (default: the setting's)")
    parser.add_argument(
        "--freeze-word-embeddings",
        choices=sorted(FREEZE_CHOICES),
        default="auto",
        help="training.freeze_word_embeddings for every run; 'both': trained, then frozen",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.child:
        batch, negatives, cached, checkpointing, freeze = json.loads(args.child)
        print(
            json.dumps(
                child(args.dataset, args.pairs, batch, negatives, cached, checkpointing, args.model, freeze)
            )
        )
        return 0
    from daemon.logs import configure_logging

    configure_logging("error", "console")
    print(f"{args.pairs} pairs of real texts ({args.dataset.name}), {args.model}, CPU fp32")
    print(
        "| setting | word embeddings | model loaded MB | training peak MB | pairs/s | optimised parameters |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    results = {}
    chosen = {CPU_DEFAULT: SETTINGS[CPU_DEFAULT]} if args.only_default else SETTINGS
    for name, setting in chosen.items():
        batch, *rest = setting
        runs = {}
        for freeze in FREEZE_CHOICES[args.freeze_word_embeddings]:
            result = _run_child(args, [args.batch or batch, *rest, freeze])
            table = "frozen" if result["word_embeddings_frozen"] else "trained"
            runs[table] = result
            results[f"{name} ({table})" if args.freeze_word_embeddings == "both" else name] = result
            print(
                f"| {name} | {table} | {result['model_loaded_mb']} | {result['train_peak_mb']} | "
                f"{result['pairs_per_s']:.3f} | {result['optimized_parameters'] / 1e6:.1f}M |",
                flush=True,
            )
        if {"frozen", "trained"} <= runs.keys():
            frozen, trained = runs["frozen"], runs["trained"]
            print(
                f"frozen/trained: pairs/s {frozen['pairs_per_s'] / trained['pairs_per_s']:.2f}x, "
                f"training peak {frozen['train_peak_mb'] / trained['train_peak_mb']:.2f}x "
                f"({trained['train_peak_mb'] - frozen['train_peak_mb']} MB less)",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
