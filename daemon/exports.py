"""`embedtune export`: the kept pairs (with hard negatives) and the held-out set, for other tools."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from daemon.logs import get_logger
from daemon.settings import Settings
from state.db import Database
from state.layout import StateLayout
from state.round_records import RoundStore

log = get_logger("embedtune.export")


def mined_examples(settings: Settings, layout: StateLayout, conn) -> list[dict]:
    """Kept training pairs with negatives mined now by the model in service, by the round's own miner."""
    from daemon.round_process import encode_params, negative_params
    from daemon.service import model_in_service
    from stages.encoder import Encoder
    from stages.round_steps import Snapshot, mine_negatives

    inputs = RoundStore(conn).inputs(max_pairs=-1)
    if not inputs.train:
        return []
    snapshot = Snapshot(inputs.corpus, sorted(inputs.train, key=lambda s: s.id), inputs.heldout)
    params = negative_params(settings)
    params = replace(params, count=max(1, params.count))  # an export always carries negatives
    encoder = Encoder(model_in_service(conn, layout, settings), encode_params(settings), layout.cache)
    mined = mine_negatives(snapshot, encoder, params)
    examples = [
        {"query": e.query, "pos": e.pos, "neg": e.neg, "pos_score": e.pos_score, "neg_scores": e.neg_scores}
        for e in mined.examples
    ]
    if settings.model.reranker:
        from FlagEmbedding import FlagReranker

        from stages.models import resolve_model_path

        reranker = FlagReranker(str(resolve_model_path(settings.model.reranker)), use_fp16=False)
        for example in examples:
            pairs = [[example["query"], example["pos"]]] + [[example["query"], n] for n in example["neg"]]
            scores = reranker.compute_score(pairs)
            scores = scores if isinstance(scores, list) else [scores]
            example["pos_score"], example["neg_scores"] = float(scores[0]), [float(s) for s in scores[1:]]
    return examples


def export(settings: Settings, fmt: str, output: Path) -> int:
    layout = StateLayout(settings.paths.state_dir)
    if not layout.database.exists():
        print(f"embedtune: no database at {layout.database}")
        return 1
    conn = Database(layout.database).conn
    output.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    if fmt == "rag-eval":
        inputs = RoundStore(conn).inputs(max_pairs=0)
        data = {
            "queries": {f"q{h.id}": h.query for h in inputs.heldout},
            "corpus": {str(c.id): c.text for c in inputs.corpus},
            "relevant_docs": {f"q{h.id}": [str(h.chunk_id)] for h in inputs.heldout},
        }
        output.write_text(json.dumps(data, ensure_ascii=False, indent=1))
        count = len(inputs.heldout)
    else:
        examples = mined_examples(settings, layout, conn)
        with open(output, "w", encoding="utf-8") as handle:
            for example in examples:
                if fmt == "flagembedding":
                    line = {
                        "query": example["query"],
                        "pos": [example["pos"]],
                        "neg": example["neg"],
                        "pos_scores": [example["pos_score"]],
                        "neg_scores": example["neg_scores"],
                        "prompt": settings.model.query_instruction,
                    }
                else:
                    line = {"anchor": example["query"], "positive": example["pos"]}
                    if example["neg"]:
                        line["negative"] = example["neg"][0]
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        count = len(examples)
    print(f"wrote {count} {fmt} record(s) to {output}")
    return 0
