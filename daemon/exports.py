"""`embedtune export`: the kept pairs (with hard negatives) and the held-out set, for other tools."""

from __future__ import annotations

import json
from pathlib import Path

from daemon.logs import get_logger
from daemon.settings import Settings
from state.db import Database
from state.layout import StateLayout

log = get_logger("embedtune.export")


def _kept_train(conn) -> list:
    return conn.execute(
        "SELECT s.id, s.query, COALESCE(s.passage, c.text) AS passage, s.chunk_id FROM samples s "
        "JOIN chunks c ON c.id=s.chunk_id WHERE s.kept=1 AND s.split='train' ORDER BY s.id"
    ).fetchall()


def mined_examples(settings: Settings, layout: StateLayout, conn) -> list[dict]:
    """Kept training pairs with negatives mined now by the model in service (as a round would)."""
    from daemon.round_child import Encoder
    from daemon.service import model_in_service
    from stages.embed_cache import text_key
    from stages.negatives import build_index, mine_hard_negatives

    rows = _kept_train(conn)
    corpus = conn.execute("SELECT id, text, sha256 FROM chunks WHERE active=1 ORDER BY id").fetchall()
    if not rows:
        return []
    encoder = Encoder(model_in_service(layout, settings), settings, layout.cache)
    texts = [c["text"] for c in corpus]
    position = {c["id"]: i for i, c in enumerate(corpus)}
    corpus_vectors = encoder.passages([text_key(t) for t in texts], texts)
    query_vectors = encoder.queries([r["query"] for r in rows])
    positive_vectors = encoder.model.encode([r["passage"] for r in rows], normalize_embeddings=True,
                                            convert_to_numpy=True)
    mined = mine_hard_negatives(query_vectors, [{position.get(r["chunk_id"], -1)} for r in rows],
                                positive_vectors, build_index(corpus_vectors),
                                max(1, settings.training.hard_negatives), tuple(settings.training.negative_range),
                                settings.training.negative_margin, settings.training.seed)
    examples = []
    for row, found in zip(rows, mined, strict=True):
        examples.append({"query": row["query"], "pos": row["passage"],
                         "neg": [texts[i] for i in found.negatives], "pos_score": found.positive_score,
                         "neg_scores": found.negative_scores})
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
        rows = conn.execute(
            "SELECT s.id, s.query, s.chunk_id FROM samples s JOIN chunks c ON c.id=s.chunk_id "
            "WHERE s.kept=1 AND s.split='heldout' AND c.active=1 ORDER BY s.id").fetchall()
        corpus = {str(c["id"]): c["text"] for c in conn.execute("SELECT id, text FROM chunks WHERE active=1")}
        data = {"queries": {f"q{r['id']}": r["query"] for r in rows}, "corpus": corpus,
                "relevant_docs": {f"q{r['id']}": [str(r["chunk_id"])] for r in rows}}
        output.write_text(json.dumps(data, ensure_ascii=False, indent=1))
        count = len(rows)
    else:
        examples = mined_examples(settings, layout, conn)
        with open(output, "w", encoding="utf-8") as handle:
            for example in examples:
                if fmt == "flagembedding":
                    line = {"query": example["query"], "pos": [example["pos"]], "neg": example["neg"],
                            "pos_scores": [example["pos_score"]], "neg_scores": example["neg_scores"],
                            "prompt": settings.model.query_instruction}
                else:
                    line = {"anchor": example["query"], "positive": example["pos"]}
                    if example["neg"]:
                        line["negative"] = example["neg"][0]
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        count = len(examples)
    print(f"wrote {count} {fmt} record(s) to {output}")
    return 0
