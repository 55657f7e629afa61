"""`embedtune eval`: any model the registry knows, scored on any evaluation set, with the gate's evaluator
and its paired-bootstrap interval. The answer to "is the model in service really better than the base on
*my* queries?" without writing a script."""

from __future__ import annotations

import sys

from daemon.serving import ModelChoiceError, resolve_model_choice
from daemon.settings import Settings


def cmd_eval(settings: Settings, data: str, model: str, against: str, metric: str, as_json: bool) -> int:
    import json

    from daemon.eval_report import paired_gain, print_report
    from daemon.step_params import encode_params
    from stages.encoder import Encoder
    from stages.evalsets import EvalFileError, load_eval_file
    from stages.evaluate import RetrievalEvaluator

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
        report["gain"] = paired_gain(
            results,
            chosen.label,
            baseline.label,
            settings.promotion.bootstrap_samples,
            settings.training.seed,
        )
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    header = f"{data}: {report['queries']} queries, {report['passages']} passages"
    notes = [report["note"]] if "note" in report else []
    print_report(header, notes, results, metric, [report["gain"]] if baseline else [])
    return 0
