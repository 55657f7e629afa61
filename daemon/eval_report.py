"""What both forms of `embedtune eval` report: the gate's evaluator on a model (daemon/evaluation.py) and
what `search` serves (daemon/served_eval.py). One gain rule and one printed layout, so the two answers to
"is it better on my queries?" read alike and cannot drift apart."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stages.evaluate import EvalResult

# Shown beside the primary metric: the top of the list (what a RAG client reads) and its reach.
SHOWN_METRICS = ("recall@10", "mrr@10", "recall@100")


def paired_gain(
    results: Mapping[str, EvalResult], row: str, over: str, samples: int, seed: int
) -> dict[str, object]:
    """`row`'s primary-metric gain over `over`, with the paired-bootstrap 95% interval the gate uses."""
    from stages.gate import paired_bootstrap

    low, high = paired_bootstrap(
        results[row].primary_per_query, results[over].primary_per_query, samples, seed
    )
    return {
        "row": row,
        "over": over,
        "value": round(results[row].primary - results[over].primary, 5),
        "ci95": [round(low, 5), round(high, 5)],
    }


def verdict(ci95: Sequence[float]) -> str:
    """Where the interval lies: what a reader may conclude from it."""
    if ci95[0] > 0:
        return "above zero"
    return "below zero" if ci95[1] < 0 else "includes zero"


def print_report(
    header: str,
    notes: Iterable[str],
    results: Mapping[str, EvalResult],
    metric: str,
    gains: Iterable[Mapping],
) -> None:
    """The human form: a header line, notes, one line of metrics per row, one line per gain."""
    print(header)
    for note in notes:
        print(f"  note: {note}")
    width = max((len(label) for label in results), default=0)
    names = [metric, *(name for name in SHOWN_METRICS if name != metric)]  # the compared one first
    for label, result in results.items():
        shown = ", ".join(f"{name} {result.metrics[name]:.4f}" for name in names if name in result.metrics)
        print(f"  {label:<{width}}  {shown}")
    for g in gains:
        low, high = g["ci95"]
        print(
            f"  {g['row']}: {metric} gain over {g['over']} {g['value']:+.4f}, "
            f"95% CI [{low:+.4f}, {high:+.4f}] ({verdict(g['ci95'])})"
        )
