"""`embedtune export`: the kept pairs (with hard negatives), the held-out set, the chunk embeddings of
the model in service, and the query log, for other tools."""

from __future__ import annotations

import json
import sys
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
    from daemon.serving import converted_models_root, model_in_service
    from daemon.step_params import encode_params, negative_params
    from stages.encoder import Encoder
    from stages.round_steps import Snapshot, mine_negatives

    inputs = RoundStore(conn).inputs(max_pairs=-1)
    if not inputs.train:
        return []
    snapshot = Snapshot(inputs.corpus, sorted(inputs.train, key=lambda s: s.id), inputs.heldout)
    params = negative_params(settings)
    params = replace(params, count=max(1, params.count))  # an export always carries negatives
    from daemon.progress import Progress

    with Progress("mine negatives", None, "texts") as progress:
        encoder = Encoder(
            model_in_service(conn, layout, settings).path,
            encode_params(settings),
            layout.cache,
            progress=progress.advance,
        )
        mined = mine_negatives(snapshot, encoder, params)
    examples = [
        {"query": e.query, "pos": e.pos, "neg": e.neg, "pos_score": e.pos_score, "neg_scores": e.neg_scores}
        for e in mined.examples
    ]
    if settings.model.reranker:
        from FlagEmbedding import FlagReranker

        from stages.models import resolve_model_path

        reranker_path = resolve_model_path(settings.model.reranker, converted_models_root(settings))
        reranker = FlagReranker(str(reranker_path), use_fp16=False)
        for example in examples:
            pairs = [[example["query"], example["pos"]]] + [[example["query"], n] for n in example["neg"]]
            scores = reranker.compute_score(pairs)
            scores = scores if isinstance(scores, list) else [scores]
            example["pos_score"], example["neg_scores"] = float(scores[0]), [float(s) for s in scores[1:]]
    return examples


def export_embeddings(settings: Settings, layout: StateLayout, conn, output: Path) -> int:
    """Every active chunk with its vector from the model in service, as Parquet. The vectors are the live
    collection's (the sync brings it in line first, encoding only what is missing), so the file and the
    index agree; without an index, they are encoded here through the embedding cache."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from daemon.indexing import IndexService
    from daemon.serving import model_in_service
    from state.index_records import active_chunks, max_chunk_id

    serving = model_in_service(conn, layout, settings)
    chunks = active_chunks(conn)
    if settings.index.enabled:
        from daemon.indexing import index_target
        from state.vector_store import open_store

        report = IndexService(settings, layout, show_progress=None).sync(conn)
        vectors: dict[int, list[float]] = {}
        with open_store(index_target(settings)) as store:
            for page in store.vectors(report.collection, max_chunk_id(conn)):
                vectors.update((int(row["chunk_id"]), row["vector"]) for row in page)
        source = f"collection {report.collection}"
    else:
        from daemon.progress import Progress
        from daemon.step_params import encode_params
        from stages.encoder import Encoder

        encoder = Encoder(serving.path, encode_params(settings), layout.cache)
        vectors = {}
        with Progress("encode chunks", len(chunks), "chunks") as progress:
            for start in range(0, len(chunks), 256):
                batch = chunks[start : start + 256]
                for chunk, vector in zip(batch, encoder.passages([c.text for c in batch]), strict=True):
                    vectors[chunk.id] = vector.tolist()
                progress.update(len(batch))
        encoder.save_cache()
        source = "encoded now"
    rows = [chunk for chunk in chunks if chunk.id in vectors]
    dim = len(next(iter(vectors.values()))) if vectors else 0
    table = pa.table(
        {
            "chunk_id": pa.array([c.id for c in rows], pa.int64()),
            "document_path": pa.array([c.path for c in rows], pa.string()),
            "text": pa.array([c.text for c in rows], pa.string()),
            "vector": pa.array([vectors[c.id] for c in rows], pa.list_(pa.float32(), dim)),
            "model_version": pa.array([serving.version] * len(rows), pa.string()),
        }
    )
    tmp = output.with_name(output.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(output)
    log.info("embeddings_exported", rows=len(rows), model=serving.version, source=source, path=str(output))
    return len(rows)


def export_queries(conn, output: Path) -> int:
    """The query log (state/query_log.py) as JSON lines, one per query with its events and its question's
    `split` (train / judge / null), in the order they were logged; written beside the output and renamed,
    so a reader never sees half a file."""
    from state.query_log import QueryLog

    tmp = output.with_name(output.name + ".tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8") as handle:
        for entry in QueryLog(conn).export():
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(output)
    return count


def _query_prompt(settings: Settings, layout: StateLayout, conn) -> str:
    """The query prefix the model in service is used with: the configured instruction, else the model's
    own (E5's `query: `), so FlagEmbedding trains on the queries as embedtune encodes them."""
    from daemon.serving import model_in_service
    from stages.models import ModelNotFound, model_prompts

    if settings.model.query_instruction:
        return settings.model.query_instruction
    try:
        return model_prompts(model_in_service(conn, layout, settings).path)[0]
    except ModelNotFound:
        return ""


def export(settings: Settings, fmt: str, output: Path) -> int:
    layout = StateLayout(settings.paths.state_dir)
    if not layout.database.exists():
        print(f"embedtune: no database at {layout.database}")
        return 1
    conn = Database(layout.database).conn
    output.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    if fmt == "embeddings":
        from state.vector_store import IndexUnavailable

        try:
            count = export_embeddings(settings, layout, conn, output)
        except IndexUnavailable as exc:
            print(f"embedtune: {exc}", file=sys.stderr)
            return 2
    elif fmt == "queries":
        count = export_queries(conn, output)
    elif fmt == "rag-eval":
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
        query_prompt = _query_prompt(settings, layout, conn)
        with open(output, "w", encoding="utf-8") as handle:
            for example in examples:
                if fmt == "flagembedding":
                    line = {
                        "query": example["query"],
                        "pos": [example["pos"]],
                        "neg": example["neg"],
                        "pos_scores": [example["pos_score"]],
                        "neg_scores": example["neg_scores"],
                        "prompt": query_prompt,
                    }
                else:
                    line = {"anchor": example["query"], "positive": example["pos"]}
                    if example["neg"]:
                        line["negative"] = example["neg"][0]
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        count = len(examples)
    print(f"wrote {count} {fmt} record(s) to {output}")
    return 0
