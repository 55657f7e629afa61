"""`embedtune eval --mode hybrid|dense|lexical|all`: an evaluation set's queries sent through the same
`search_many` that `embedtune search` uses, scored on what came back. So the number is what the team's
RAG clients get from the index, not a re-computation of it.

What was returned is traced back to the evaluation set's documents: for a BEIR folder by the file each
document was fed under (`<id>.md`, stages/evalsets.document_stem), for a pairs or RAG file by the text (a
served chunk matches a relevant passage when one contains the other, whitespace aside). Several chunks of
one document count once, at the best rank (documents are what BEIR judges); a chunk that maps to nothing
still takes its rank, as a miss.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from daemon.search import SearchAnswer, SearchError, search_many
from daemon.settings import Settings
from stages.evalsets import EvalSet, document_stem
from stages.evaluate import SEARCH_DEPTH, EvalResult, evaluate_rankings
from stages.fusion import MODES
from state.vector_store import Hit, IndexUnavailable

Mapper = Callable[[Hit, dict[int, float]], int | None]


def _flat(text: str) -> str:
    return " ".join(text.split())


def hit_mapper(eval_set: EvalSet) -> Mapper:
    """hit, the query's relevant documents -> the evaluation corpus index it stands for, or None."""
    if eval_set.corpus_ids:
        by_stem = {document_stem(doc_id): i for i, doc_id in enumerate(eval_set.corpus_ids)}
        return lambda hit, _relevant: by_stem.get(Path(hit.path).stem)
    by_text = {_flat(text): i for i, text in enumerate(eval_set.corpus_texts)}
    flat_corpus = [_flat(text) for text in eval_set.corpus_texts]

    def by_content(hit: Hit, relevant: dict[int, float]) -> int | None:
        text = _flat(hit.text)
        if text in by_text:
            return by_text[text]
        for index in relevant:
            passage = flat_corpus[index]
            if passage and (passage in text or text in passage):
                return index
        return None

    return by_content


def rankings(answers: list[SearchAnswer], eval_set: EvalSet) -> list[list[int]]:
    """Per query, the evaluation corpus indices in served order (unmatched chunks as distinct misses)."""
    mapper = hit_mapper(eval_set)
    out = []
    for answer, relevant in zip(answers, eval_set.relevant, strict=True):
        ranked: list[int] = []
        seen: set[int] = set()
        for hit in answer.hits:
            index = mapper(hit, relevant)
            if index is None:
                ranked.append(-1 - hit.chunk_id)  # a miss that still takes its rank
            elif index not in seen:
                seen.add(index)
                ranked.append(index)
        out.append(ranked)
    return out


def score_served(
    settings: Settings, eval_set: EvalSet, model: str, mode: str, metric: str
) -> tuple[EvalResult, list[SearchAnswer]]:
    answers = search_many(settings, eval_set.queries, model, SEARCH_DEPTH, mode)
    return evaluate_rankings(rankings(answers, eval_set), eval_set.relevant, metric), answers


def cmd_eval_served(
    settings: Settings, data: str, model: str, against: str, metric: str, mode: str, as_json: bool
) -> int:
    from daemon.eval_report import paired_gain, print_report
    from stages.evalsets import EvalFileError, load_eval_file

    modes = list(MODES) if mode == "all" else [mode]
    try:
        eval_set = load_eval_file(
            data, settings.promotion.user_eval_query_key, settings.promotion.user_eval_positive_key, "data"
        )
        if not eval_set.queries:
            raise SearchError(f"{data} holds no queries with a relevant passage")
        results: dict[str, EvalResult] = {}
        notes: set[str] = set()
        labels: dict[str, str] = {}
        for each in modes:
            result, answers = score_served(settings, eval_set, model, each, metric)
            label = f"{answers[0].model} {each}"
            results[label], labels[each] = result, label
            notes.update(a.note for a in answers if a.note)
            failed = [a for a in answers if a.error]
            if failed:
                notes.add(f"{len(failed)} queries could not be searched (scored 0): e.g. {failed[0].error}")
        baseline = None
        if against != "none":
            base_result, base_answers = score_served(settings, eval_set, against, "dense", metric)
            baseline = f"{base_answers[0].model} dense"
            results.setdefault(baseline, base_result)
    except (SearchError, IndexUnavailable, EvalFileError, ValueError, OSError) as exc:
        print(f"embedtune: {exc}", file=sys.stderr)
        return 2
    samples, seed = settings.promotion.bootstrap_samples, settings.training.seed
    gains = (
        []
        if baseline is None
        else [
            paired_gain(results, label, baseline, samples, seed)
            for label in labels.values()
            if label != baseline
        ]
    )
    report = {
        "data": str(data),
        "queries": len(eval_set.queries),
        "metric": metric,
        "served": True,
        "results": {label: result.to_json() for label, result in results.items()},
        "gains": gains,
        "notes": sorted(notes),
    }
    if as_json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    header = f"{data}: {report['queries']} queries, scored on what `embedtune search` returns"
    print_report(header, report["notes"], results, metric, gains)
    return 0
