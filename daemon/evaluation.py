"""`embedtune eval`: any model the registry knows, scored on any evaluation set, with the gate's evaluator
and its paired-bootstrap interval. The answer to "is the model in service really better than the base on
*my* queries?" without writing a script."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from daemon.settings import Settings


class ModelChoiceError(Exception):
    """A --model / --against value that names no model this install has."""


@dataclass(frozen=True)
class ModelChoice:
    label: str  # base | vN
    path: Path
    note: str = ""


def resolve_model_choice(settings: Settings, choice: str) -> ModelChoice:
    """'base', 'current' (the model in service; the base model before any promotion) or 'vN'."""
    from daemon.serving import base_model_path
    from state.db import Database
    from state.layout import StateLayout
    from state.registry import ModelRegistry, RegistryError

    choice = choice.strip().lower()
    if choice == "base":
        return ModelChoice("base", base_model_path(settings))
    if choice != "current" and not (choice.startswith("v") and choice[1:].isdigit()):
        raise ModelChoiceError(f"--model {choice!r}: use base, current or a version such as v3")
    layout = StateLayout(settings.paths.state_dir)
    if not layout.database.exists():
        if choice == "current":
            return ModelChoice("base", base_model_path(settings), "nothing promoted yet")
        raise ModelChoiceError(f"unknown model version {choice}: no state in {settings.paths.state_dir}")
    db = Database(layout.database)
    try:
        registry = ModelRegistry(db.conn, layout)
        if choice == "current":
            if registry.current() is None:
                return ModelChoice("base", base_model_path(settings), "nothing promoted yet")
            serving = registry.serving(base_model_path(settings))
            return ModelChoice(serving.version, serving.path)
        try:
            record = registry.get(int(choice[1:]))
        except RegistryError:
            raise ModelChoiceError(f"unknown model version {choice}") from None
        if not Path(record.path).exists():
            raise ModelChoiceError(f"model {choice} is recorded but its folder {record.path} is gone")
        return ModelChoice(choice, record.path)
    finally:
        db.close()


def cmd_eval(settings: Settings, data: str, model: str, against: str, metric: str, as_json: bool) -> int:
    import json

    from daemon.step_params import encode_params
    from stages.encoder import Encoder
    from stages.evalsets import EvalFileError, load_eval_file
    from stages.evaluate import RetrievalEvaluator
    from stages.gate import paired_bootstrap

    try:
        chosen = resolve_model_choice(settings, model)
        baseline = None if against == "none" else resolve_model_choice(settings, against)
        eval_set = load_eval_file(
            data, settings.promotion.user_eval_query_key, settings.promotion.user_eval_positive_key, "data"
        )
        evaluator = RetrievalEvaluator(eval_set, metric)
    except (ModelChoiceError, EvalFileError, ValueError, OSError) as exc:
        print(f"embedtune: {exc}", file=sys.stderr)
        return 2
    if not eval_set.queries:
        print(f"embedtune: {data} holds no queries with a relevant passage", file=sys.stderr)
        return 2
    if baseline and baseline.path == chosen.path:
        baseline = None
    results = {}
    from daemon.progress import Progress

    for choice in [chosen, baseline] if baseline else [chosen]:
        with Progress(f"eval {choice.label}", None, "texts") as progress:
            encoder = Encoder(choice.path, encode_params(settings), progress=progress.advance)
            try:
                results[choice.label] = evaluator(encoder)
            finally:
                encoder.release()
    report = {
        "data": str(data),
        "queries": len(eval_set.queries),
        "passages": len(eval_set.corpus_texts),
        "metric": metric,
        "models": {label: result.to_json() for label, result in results.items()},
    }
    if chosen.note:
        report["note"] = f"{model}: {chosen.note}; the base model answers"
    if baseline:
        low, high = paired_bootstrap(
            results[chosen.label].primary_per_query,
            results[baseline.label].primary_per_query,
            settings.promotion.bootstrap_samples,
            settings.training.seed,
        )
        gain = results[chosen.label].primary - results[baseline.label].primary
        report["gain"] = {
            "over": baseline.label,
            "value": round(gain, 5),
            "ci95": [round(low, 5), round(high, 5)],
        }
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{data}: {report['queries']} queries, {report['passages']} passages")
    if "note" in report:
        print(report["note"])
    for label, result in results.items():
        shown = ", ".join(
            f"{k} {v:.4f}" for k, v in result.metrics.items() if k in (metric, "recall@10", "mrr@10")
        )
        print(f"  {label:<6} {shown}")
    if baseline:
        g = report["gain"]
        verdict = "above zero" if g["ci95"][0] > 0 else "below zero" if g["ci95"][1] < 0 else "includes zero"
        print(
            f"  {metric} gain over {g['over']}: {g['value']:+.4f}, 95% CI [{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}] ({verdict})"
        )
    return 0
