"""Hybrid ranking: one query's dense and lexical (BM25) result lists fused into one.

The teacher (stages/teacher.py) mixes scores of every corpus passage, each side scaled by its spread over
the whole corpus for the query. A search engine returns each side's top-N list only; measured over Milvus
top-100 lists on nfcorpus and zh-medqa (docs/benchmarks.md, "Hybrid retrieval"), three choices matter:
- a candidate found by BM25 only gets its exact dense score (the caller passes the cosines, from the
  stored vectors); the dense list's lowest score instead lost 0.015 nDCG@10 on nfcorpus;
- a candidate found by the dense side only gets BM25 0 (below the N-th score, and usually 0);
- each side is scaled by its spread over the corpus, as the teacher's is: for the dense side exactly,
  sqrt(q' C q) with C the covariance of the chunk vectors (a 2,000-vector sample estimates it to 1e-3);
  for BM25 from the top-N list with zeros for every other chunk. Scaling by the top-N lists' own spread
  instead needed a BM25 share of 0.5 in English and 0.95 in Chinese and lost up to 0.15 between them.
The mix is `w * bm25 / spread_bm25 + (1 - w) * cosine / spread_dense` (a per-query shift changes no
order), `w` being the BM25 share. Reciprocal rank fusion is kept as the alternative measured beside it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODES = ("hybrid", "dense", "lexical")
RRF_K = 60
STATS_SAMPLE = 2000


@dataclass(frozen=True)
class Scored:
    """A candidate from one side: its id and that side's raw score (higher is better)."""

    chunk_id: int
    score: float


def lexical_only(dense: Sequence[Scored], lexical: Sequence[Scored]) -> list[int]:
    """Candidates BM25 found that the dense list lacks: the ones whose cosine `zmix` needs."""
    seen = {hit.chunk_id for hit in dense}
    return [hit.chunk_id for hit in lexical if hit.chunk_id not in seen]


def lexical_spread(lexical: Sequence[Scored], corpus_size: int) -> float:
    """BM25's standard deviation over the corpus for this query, the chunks outside the list at 0."""
    n = max(corpus_size, len(lexical), 1)
    total = sum(hit.score for hit in lexical)
    squares = sum(hit.score * hit.score for hit in lexical)
    variance = squares / n - (total / n) ** 2
    return math.sqrt(variance) if variance > 0 else 1.0


def dense_spread(query_vector: np.ndarray, covariance: np.ndarray | None, dense: Sequence[Scored]) -> float:
    """The cosine's standard deviation over the corpus: exact from the vectors' covariance; without it,
    the top-N list's own spread (the weaker estimate measured above)."""
    if covariance is not None:
        q = np.asarray(query_vector, dtype=np.float64)
        variance = float(q @ covariance @ q)
        return math.sqrt(variance) if variance > 0 else 1.0
    scores = np.asarray([hit.score for hit in dense], dtype=np.float64)
    std = float(scores.std()) if scores.size else 0.0
    return std if std > 0 else 1.0


def vector_covariance(vectors: np.ndarray) -> np.ndarray:
    """Covariance of chunk vectors (rows), what `dense_spread` needs; float64 for a stable quadratic form."""
    data = np.asarray(vectors, dtype=np.float64)
    if len(data) < 2:
        return np.zeros((data.shape[1], data.shape[1]))
    return np.cov(data.T, bias=True)


def stats_sample(count: int, seed: int = 0) -> np.ndarray:
    """Positions (of `count` rows) the covariance is estimated from: every row up to `STATS_SAMPLE`, else a
    draw fixed by `seed`, so the index job, exact search and the gate estimate the spread alike."""
    return np.random.default_rng(seed).choice(count, size=min(STATS_SAMPLE, count), replace=False)


def sample_covariance(matrix: np.ndarray, seed: int = 0) -> np.ndarray:
    """`vector_covariance` of the `stats_sample` rows of an in-memory matrix of chunk vectors."""
    return vector_covariance(matrix[stats_sample(len(matrix), seed)])


def candidate_depth(k: int, candidates: int) -> int:
    """How many hits each half returns before fusing into a top k: `index.candidates`, never fewer than
    k. `search` and the gate's served evaluator (stages/hybrid_eval.py) both go through here."""
    return max(k, candidates)


def zmix(
    dense: Sequence[Scored],
    lexical: Sequence[Scored],
    bm25_weight: float,
    k: int,
    dense_of: Mapping[int, float] | None = None,
    spreads: tuple[float, float] = (1.0, 1.0),
) -> list[Scored]:
    """The top k of the weighted mix of two top-N lists (see the module docstring). `dense_of` holds the
    exact dense scores of `lexical_only` candidates (one missing there gets the dense list's lowest);
    `spreads` are (dense, lexical) from `dense_spread` and `lexical_spread`."""
    if not 0.0 <= bm25_weight <= 1.0:
        raise ValueError("bm25_weight must be in [0, 1]")
    dense_std, lexical_std = spreads
    dense_scores = {hit.chunk_id: hit.score for hit in dense}
    lexical_scores = {hit.chunk_id: hit.score for hit in lexical}
    floor = min(dense_scores.values()) if dense_scores else 0.0
    extra = dense_of or {}
    fused = []
    for chunk_id in dict.fromkeys([*dense_scores, *lexical_scores]):
        cosine = dense_scores.get(chunk_id, extra.get(chunk_id, floor))
        bm25 = lexical_scores.get(chunk_id, 0.0)
        score = bm25_weight * bm25 / lexical_std + (1.0 - bm25_weight) * cosine / dense_std
        fused.append(Scored(chunk_id, score))
    fused.sort(key=lambda hit: (-hit.score, hit.chunk_id))
    return fused[:k]


def fusion_spreads(
    query_vector: np.ndarray,
    covariance: np.ndarray | None,
    dense: Sequence[Scored],
    lexical: Sequence[Scored],
    corpus_size: int,
) -> tuple[float, float]:
    """(dense, lexical) spreads of one query's lists: what `fuse_hybrid` scales each half by."""
    return dense_spread(query_vector, covariance, dense), lexical_spread(lexical, corpus_size)


def fuse_hybrid(
    query: str,
    dense: Sequence[Scored],
    lexical: Sequence[Scored],
    bm25_weight: float | None,
    k: int,
    dense_of: Mapping[int, float] | None,
    spreads: tuple[float, float],
) -> list[Scored]:
    """The served hybrid ranking of one query: `search` and the gate's evaluator both call this, so what
    the gate scores is what search serves. A share of None: the query's language decides."""
    share = bm25_weight if bm25_weight is not None else query_bm25_weight(query)
    return zmix(dense, lexical, share, k, dense_of, spreads)


def rrf(dense: Sequence[Scored], lexical: Sequence[Scored], k: int, constant: int = RRF_K) -> list[Scored]:
    """Reciprocal rank fusion (Cormack et al., 2009): sum of 1 / (constant + rank) over both lists."""
    totals: dict[int, float] = {}
    for hits in (dense, lexical):
        for rank, hit in enumerate(hits, 1):
            totals[hit.chunk_id] = totals.get(hit.chunk_id, 0.0) + 1.0 / (constant + rank)
    fused = [Scored(chunk_id, score) for chunk_id, score in totals.items()]
    fused.sort(key=lambda hit: (-hit.score, hit.chunk_id))
    return fused[:k]


# `index.analyzer = "auto"`: jieba as soon as the corpus holds Chinese (this many Chinese chunks: one
# stray quotation is not Chinese content). jieba splits English words too, so a mixed corpus loses
# nothing; a purely English one keeps the faster standard analyzer.
JIEBA_MIN_CHINESE_CHUNKS = 3


def choose_analyzer(configured: str, languages: Mapping[str, int]) -> str:
    """The BM25 analyzer: the configured one, or by the corpus' languages (chunks per language)."""
    if configured != "auto":
        return configured
    return "jieba" if languages.get("zh", 0) >= JIEBA_MIN_CHINESE_CHUNKS else "standard"


def choose_bm25_weight(
    configured: float | str, model_path: Path | None = None, fallback: float | None = None
) -> float | None:
    """The configured share; "auto": the one chosen for the model on the user's queries when a round
    chose one, else `fallback` (a base that reads every language: `READS_ALL_LANGUAGES_SHARE`), else
    None: each query gets its language's measured share (`query_bm25_weight`)."""
    if configured != "auto":
        return float(configured)
    chosen = model_bm25_weight(model_path) if model_path is not None else None
    return chosen if chosen is not None else fallback


def query_bm25_weight(query: str) -> float:
    """The measured share for the query's language: how much the dense half can be trusted depends on
    the model knowing the query's language, and a team's corpus may hold both."""
    from stages.text import detect_language

    return served_default_share("jieba" if detect_language(query) == "zh" else "standard")


# BM25's share of the *served* hybrid score (`zmix` over the two top-N lists) by analyzer, so by language,
# measured on the dev sets over Milvus top-N lists (docs/benchmarks.md, "How to fuse": `corpus-spread`
# peaks at 0.1-0.2 in English). Not the hybrid teacher's share (stages/teacher.py::TEACHER_BM25_SHARE):
# that one mixes whole-corpus z-scores to label training pairs and is part of the teacher's id.
SERVED_BM25_SHARE = {"standard": 0.2, "jieba": 0.7}
# The Chinese share (0.7) was measured with the English base, whose Chinese vectors are near random; a
# base that reads Chinese as well as English (the packaged multilingual-e5-small) gets the share measured
# where the dense half knows the language, for every query (docs/benchmarks.md, "The packaged
# multilingual base": on the Chinese subset 0.7 served below dense, 0.2 above it).
READS_ALL_LANGUAGES_SHARE = SERVED_BM25_SHARE["standard"]


def served_default_share(analyzer: str) -> float:
    """The served BM25 share for an analyzer's language when nothing chose one (`index.bm25_weight`)."""
    return SERVED_BM25_SHARE.get(analyzer, SERVED_BM25_SHARE["standard"])


# BM25 shares a round tries on the user's judged queries; the best is served with the model it promotes.
# Finer below 0.2: a tuned model wants less BM25 than its base (zh-medqa, docs/benchmarks.md "Second
# pass": the base's best share 0.3, a tuned candidate's 0.05, where its served gain was +0.04 and at 0.2
# noise).
WEIGHT_GRID = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9)
# Beside the model's files in its version folder, so it is promoted and rolled back with the model.
RETRIEVAL_FILE = "embedtune_retrieval.json"


def pick_weight(sweep: Mapping[str, float], default: float) -> float:
    """The best share of a sweep (ties: the one nearest the language default)."""
    best = max(sweep.values())
    tied = [float(w) for w, value in sweep.items() if value >= best - 1e-9]
    return min(tied, key=lambda w: abs(w - default))


def read_model_choice(model_path: Path) -> dict:
    """The model version's retrieval file (its BM25 share and how it was chosen); {} when it has none
    or it cannot be read."""
    try:
        choice = json.loads((Path(model_path) / RETRIEVAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return choice if isinstance(choice, dict) else {}


def _is_share(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def model_trial_shares(model_path: Path) -> list[float]:
    """The BM25 shares its round asked an interleaved trial to try this model at (stages/round_steps.py
    `events_trial_shares`); [] when it named none (the trial tries its `bm25_weight`)."""
    shares = read_model_choice(model_path).get("trial_shares")
    if not isinstance(shares, list) or not all(_is_share(w) for w in shares):
        return []
    return list(dict.fromkeys(float(w) for w in shares))


def write_model_bm25_weight(model_path: Path, weight: float, chosen_on: str) -> None:
    """Set the share this model version is served with (a trial's winning arm), keeping the rest of
    its retrieval file; written whole to a temporary file and renamed, so no reader sees half of it."""
    choice = {**read_model_choice(model_path), "bm25_weight": weight, "chosen_on": chosen_on}
    path = Path(model_path) / RETRIEVAL_FILE
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(choice, indent=2), encoding="utf-8")
    partial.replace(path)


def model_bm25_weight(model_path: Path) -> float | None:
    """The BM25 share chosen for this model version on the user's queries, if one was."""
    value = read_model_choice(model_path).get("bm25_weight")
    return float(value) if _is_share(value) else None
