"""Evaluation sets: the user's own file (classic anchor/positive lines or the RAG dataset JSON), BEIR
folders, and sets built from the corpus. All become queries + corpus + graded relevance."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stages.embed_cache import text_key
from state.round_records import CorpusChunk


@dataclass
class EvalSet:
    name: str
    queries: list[str]
    corpus_texts: list[str]
    relevant: list[dict[int, float]]
    corpus_keys: list[str] = field(default_factory=list)
    corpus_ids: list[str] = field(default_factory=list)  # a BEIR corpus' document ids, when it has them
    # Per query (or empty): corpus index -> the text that stands for that chunk when this query is scored,
    # the chunk with the query taken out (a query copied from the corpus must not be a verbatim lookup).
    stand_ins: list[dict[int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.corpus_keys:
            self.corpus_keys = [text_key(t) for t in self.corpus_texts]

    def __len__(self) -> int:
        return len(self.queries)


class EvalFileError(Exception):
    """An evaluation file that cannot be read; the message says what is wrong."""


def load_pairs_jsonl(
    path: Path,
    query_key: str = "anchor",
    positive_key: str = "positive",
    name: str = "user",
    extra_corpus: list[str] | None = None,
) -> EvalSet:
    queries: list[str] = []
    positives: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                query, positive = str(row[query_key]), row[positive_key]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise EvalFileError(
                    f"{path}:{number}: expected JSON with {query_key!r} and {positive_key!r}"
                ) from exc
            if isinstance(positive, list):
                positive = positive[0] if positive else ""
            queries.append(query)
            positives.append(str(positive))
    corpus = list(dict.fromkeys(positives + (extra_corpus or [])))
    index = {text: i for i, text in enumerate(corpus)}
    return EvalSet(name, queries, corpus, [{index[p]: 1.0} for p in positives])


def load_rag_json(path: Path, name: str = "user") -> EvalSet:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    try:
        queries, corpus, relevant = data["queries"], data["corpus"], data["relevant_docs"]
    except (KeyError, TypeError) as exc:
        raise EvalFileError(f"{path}: expected keys queries, corpus, relevant_docs") from exc
    corpus_ids = list(corpus)
    position = {doc_id: i for i, doc_id in enumerate(corpus_ids)}
    query_ids = [qid for qid in queries if relevant.get(qid)]
    return EvalSet(
        name,
        [queries[qid] for qid in query_ids],
        [corpus[d] for d in corpus_ids],
        [{position[d]: 1.0 for d in relevant[qid] if d in position} for qid in query_ids],
    )


def load_beir(folder: Path, split: str = "test", name: str = "beir") -> EvalSet:
    corpus_ids, corpus_texts = [], []
    with open(folder / "corpus.jsonl", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            corpus_ids.append(str(row["_id"]))
            title = (row.get("title") or "").strip()
            corpus_texts.append(f"{title}\n{row['text']}".strip() if title else row["text"])
    position = {doc_id: i for i, doc_id in enumerate(corpus_ids)}
    query_text = {}
    with open(folder / "queries.jsonl", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            query_text[str(row["_id"])] = row["text"]
    qrels: dict[str, dict[int, float]] = {}
    for query_id, corpus_id, score in _read_qrels(folder / "qrels" / f"{split}.tsv"):
        if score > 0 and corpus_id in position:
            qrels.setdefault(query_id, {})[position[corpus_id]] = score
    query_ids = [qid for qid in qrels if qid in query_text]
    return EvalSet(
        name,
        [query_text[q] for q in query_ids],
        corpus_texts,
        [qrels[q] for q in query_ids],
        corpus_ids=corpus_ids,
    )


def document_stem(corpus_id: str) -> str:
    """The file name (without suffix) a BEIR document is fed to the inbox under, so that what the index
    serves for it can be traced back to its id (`embedtune eval --mode`; bench/quality.py writes them)."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(corpus_id))[:80]


def _read_qrels(path: Path):
    """(query-id, corpus-id, score) rows of a BEIR qrels file, with or without its header line."""
    with open(path, encoding="utf-8") as handle:
        for index, row in enumerate(csv.reader(handle, delimiter="\t")):
            if len(row) < 3:
                continue
            try:
                score = float(row[-1])
            except ValueError:
                if index == 0:
                    continue  # the "query-id corpus-id score" header
                raise
            yield row[0], row[1], score


def load_eval_file(
    path: str | Path,
    query_key: str = "anchor",
    positive_key: str = "positive",
    name: str = "user",
    extra_corpus: list[str] | None = None,
) -> EvalSet:
    """Dispatch on what the path holds: a BEIR folder, a RAG dataset JSON, or anchor/positive lines."""
    path = Path(path).expanduser()
    if path.is_dir():
        return load_beir(path, name=name)
    if not path.exists():
        raise EvalFileError(f"evaluation file {path} does not exist")
    head = path.read_text(encoding="utf-8")[:4096].lstrip()
    if head.startswith("{") and '"relevant_docs"' in path.read_text(encoding="utf-8"):
        return load_rag_json(path, name=name)
    return load_pairs_jsonl(path, query_key, positive_key, name=name, extra_corpus=extra_corpus)


def without_copied_query(
    query: str, own: int, texts: Sequence[str], same_document: Sequence[int]
) -> tuple[dict[int, float], dict[int, str]]:
    """Relevance and stand-ins of a held-out query. A query copied word for word from its chunk (an
    inverse-cloze sentence, a span) would find that chunk by string match, and with chunk overlap a
    neighbour holding the same words would count as a miss. So every chunk of the document that holds
    the query is relevant, each scored with the query taken out; any other query: its own chunk."""
    needle = " ".join(query.split())
    if not needle or needle not in " ".join(texts[own].split()):
        return {own: 1.0}, {}
    stand_ins = {}
    for position in same_document:
        flat = " ".join(texts[position].split())
        if needle in flat:
            stand_ins[position] = " ".join(flat.replace(needle, " ", 1).split())
    return {position: 1.0 for position in stand_ins}, stand_ins


def structure_set(corpus: list[CorpusChunk], name: str = "structure") -> EvalSet:
    """Document-structure queries: headings of held-out documents as queries for the text under them.
    Written by people, never trained on: the gate's human signal when the user gives no file."""
    groups: dict[tuple[int, str], list[int]] = {}
    for index, chunk in enumerate(corpus):
        if chunk.split == "heldout" and chunk.heading:
            groups.setdefault((chunk.document_id, chunk.heading), []).append(index)
    queries, relevant = [], []
    for (_doc, heading), members in sorted(groups.items()):
        query = heading.split(" > ")[-1].strip()
        if len(query) >= 3:
            queries.append(query)
            relevant.append({m: 1.0 for m in members})
    texts = [chunk.text for chunk in corpus]
    return EvalSet(name, queries, texts, relevant, [text_key(t) for t in texts])
