"""Does the gate's held-out set tell the truth? The same models judged on the held-out set as it was built
before issue 25 and as it is built now, beside the dataset's real queries.

Before: held-out pairs went through the filter like training pairs, ranked by the model in service (the
model the set judges), and a query copied from its chunk had that whole chunk, sentence included, as its
only relevant passage. Now: without a reranker held-out pairs are not ranked by the model in service, and a
copied query is judged on every chunk of its document that holds it, with the query taken out. The two
changes are also shown one at a time.

Run it on a state folder that `bench.quality --keep` left (the round's candidate and the merges it made):

    python -m bench.quality ../shared/data/nfcorpus --keep /tmp/q
    python -m bench.heldout_bias /tmp/q ../shared/data/nfcorpus
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def former_filter(settings, inputs, base_path: Path, cache: Path | None = None) -> set[int]:
    """The held-out sample ids the former filter kept: ranked by the base model (the model in service
    before any promotion) among BM25 candidates, exactly as training pairs are."""
    from daemon.step_params import encode_params
    from stages.encoder import Encoder
    from stages.filter import Bm25Index, FilterInput, embedding_pair_scorer, filter_pairs

    texts = [chunk.text for chunk in inputs.corpus]
    position = {chunk.id: index for index, chunk in enumerate(inputs.corpus)}
    encoder = Encoder(base_path, encode_params(settings), cache)  # the daemon's filter cached the corpus
    items = [
        FilterInput(h.id, h.query, position[h.chunk_id], h.passage or texts[position[h.chunk_id]])
        for h in inputs.heldout
    ]
    results = filter_pairs(
        items,
        texts,
        Bm25Index(texts),
        embedding_pair_scorer(encoder.queries, encoder.passages),
        settings.synthesis.featured_percentage,
        settings.synthesis.filter_candidates,
    )
    return {r.sample_id for r in results if r.kept}


def held_out_designs(inputs, kept_by_former_filter: set[int]) -> dict:
    """The four held-out sets: {former, current} filter x {whole chunk, query taken out}."""
    from stages.evalsets import EvalSet
    from stages.round_steps import Snapshot, heldout_set

    designs = {}
    for filtered in (True, False):
        heldout = [h for h in inputs.heldout if h.id in kept_by_former_filter or not filtered]
        snapshot = Snapshot(inputs.corpus, [], heldout)
        fair = heldout_set(snapshot)
        lookup = EvalSet(
            "heldout",
            fair.queries,
            fair.corpus_texts,
            [{snapshot.position[h.chunk_id]: 1.0} for h in heldout],
            fair.corpus_keys,
        )
        prefix = "filtered by the base" if filtered else "not filtered"
        designs[f"{prefix}, whole chunk"] = lookup
        designs[f"{prefix}, query taken out"] = fair
    return designs


def verdict(low: float, gain: float, min_gain: float, synthetic_only_min_gain: float) -> str:
    """What the gate's held-out rules say: rule 1 (eligible: gain >= min_gain) and rule 3b (with no human
    signal, the interval's lower end >= synthetic_only_min_gain)."""
    eligible = "eligible" if gain >= min_gain else "not eligible"
    convincing = "3b pass" if low >= synthetic_only_min_gain else "3b fail"
    return f"{eligible}, {convincing}"


def latest_candidate(layout) -> Path:
    """The newest round folder holding a trained candidate (the round need not have finished: the
    candidate is written before evaluation starts)."""
    rounds = sorted(
        (folder for folder in layout.rounds.iterdir() if (folder / "candidate" / "modules.json").exists()),
        key=lambda folder: int(folder.name),
    )
    if not rounds:
        raise SystemExit(f"no round with a trained candidate under {layout.rounds}")
    return rounds[-1]


def real_row_from_quality(quality: dict, variant: str, queries: int) -> dict:
    """The real-query row as bench.quality measured it in the same run (same models, same evaluator)."""
    base, mine = quality["real"]["base"]["ndcg@10"], quality["real"][variant]["ndcg@10"]
    low, high = quality["real_ci_vs_base"][variant]
    return {
        "variant": variant,
        "set": "real queries",
        "n": queries,
        "base": round(base, 4),
        "variant_ndcg": round(mine, 4),
        "gain": round(mine - base, 4),
        "ci": [round(low, 4), round(high, 4)],
        "verdict": "",
    }


def main() -> int:
    from daemon.logs import configure_logging
    from daemon.serving import base_model_path
    from daemon.settings import load_settings
    from daemon.step_params import encode_params
    from stages.encoder import Encoder
    from stages.evalsets import load_beir
    from stages.evaluate import RetrievalEvaluator
    from stages.gate import paired_bootstrap
    from state.db import Database
    from state.layout import StateLayout
    from state.round_records import RoundStore

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kept", type=Path, help="the folder `bench.quality --keep` wrote")
    parser.add_argument("dataset", type=Path, help="the BEIR folder (its real queries)")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--quality-json",
        type=Path,
        help="bench.quality's --json of the same run: its real-query scores are reused",
    )
    args = parser.parse_args()
    configure_logging("warning", "console")
    settings = load_settings(None)
    settings.paths.state_dir = args.kept / "state"
    layout = StateLayout(settings.paths.state_dir)
    conn = Database(layout.database).conn
    inputs = RoundStore(conn).inputs(0, settings.promotion.heldout_queries)
    round_dir = latest_candidate(layout)
    base_path = base_model_path(settings)
    variants = {"base": base_path, "candidate": round_dir / "candidate"}
    variants.update(
        {path.name.removeprefix("bench-"): path for path in sorted(round_dir.glob("bench-merged-*"))}
    )
    kept = former_filter(settings, inputs, base_path, layout.cache)
    designs = held_out_designs(inputs, kept)
    real = load_beir(args.dataset, name="real")
    quality = json.loads(args.quality_json.read_text()) if args.quality_json else None
    print(
        f"{len(inputs.heldout)} held-out queries, {len(kept)} kept by the former filter; corpus "
        f"{len(inputs.corpus)} chunks; {len(real)} real queries"
    )
    scores: dict[str, dict] = {}
    for name, path in variants.items():
        encoder = Encoder(path, encode_params(settings), layout.cache)  # the round's vectors, when cached
        vectors = encoder.passages([chunk.text for chunk in inputs.corpus])
        scores[name] = {design: RetrievalEvaluator(s)(encoder, vectors) for design, s in designs.items()}
        if quality is None:
            scores[name]["real queries"] = RetrievalEvaluator(real)(encoder)
    rows = []
    min_gain = settings.promotion.min_gain
    convincing = settings.promotion.synthetic_only_min_gain
    for name in variants:
        if name == "base":
            continue
        for design in [*designs, "real queries"]:
            if design == "real queries" and quality is not None:
                rows.append(real_row_from_quality(quality, name, len(real)))
                continue
            mine, base = scores[name][design], scores["base"][design]
            gain = mine.primary - base.primary
            low, high = paired_bootstrap(mine.primary_per_query, base.primary_per_query)
            rows.append(
                {
                    "variant": name,
                    "set": design,
                    "n": mine.n_queries,
                    "base": round(base.primary, 4),
                    "variant_ndcg": round(mine.primary, 4),
                    "gain": round(gain, 4),
                    "ci": [round(low, 4), round(high, 4)],
                    "verdict": verdict(low, gain, min_gain, convincing) if design != "real queries" else "",
                }
            )
    print(
        f"{'variant':<12} {'set':<36} {'n':>5} {'base':>7} {'variant':>8} {'gain':>8} {'95% CI':>18}  verdict"
    )
    for r in rows:
        ci = f"[{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]"
        print(
            f"{r['variant']:<12} {r['set']:<36} {r['n']:>5} {r['base']:>7.4f} {r['variant_ndcg']:>8.4f} "
            f"{r['gain']:>+8.4f} {ci:>18}  {r['verdict']}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "heldout": len(inputs.heldout), "kept": len(kept)}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
