"""Does an ONNX export encode like torch? Checked on the model's own corpus before anything uses it.

Two tests, both on the same texts for torch and for each exported variant:
- the vectors' cosine to torch's: at least `MIN_COSINE` (0.99) for 99% of the texts and no text below
  `FLOOR_COSINE` (0.95). An export bug (another tokenization, pooling, truncation) shows as many low
  cosines or a few very low ones; int8 rounding spreads a few texts to 0.985-0.99 (all-MiniLM-L6-v2,
  mean 0.996), which a strict minimum would count as a bug;
- with held-out queries (the daemon's synthetic ones, whose answer chunk is known), nDCG@10 over the
  sampled passages is no more than `NDCG_TOLERANCE` below torch's. 0.005 is the tolerance the issue set
  for a quantised default; paired on the same queries and passages it only measures what the backend
  changes. With no held-out queries yet, the cosine test decides alone and the record says so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from stages.encoder import EncodeParams, Encoder
from stages.evaluate import query_metrics
from stages.onnx_export import VariantCheck

MIN_COSINE = 0.99
FLOOR_COSINE = 0.95
NDCG_TOLERANCE = 0.005


@dataclass(frozen=True)
class CheckSample:
    """Passages to encode and held-out queries whose answer is `passages[relevant[i]]`."""

    passages: list[str]
    queries: list[str]
    relevant: list[int]


def check_variants(
    model_path: Path, files: dict[str, Path], sample: CheckSample, params: EncodeParams
) -> dict[str, VariantCheck]:
    from stages.onnx_encoder import OnnxEmbedder

    if not sample.passages:
        raise ValueError("no passages to check the export on")
    torch_params = replace(params, backend="torch")
    reference = Encoder(model_path, torch_params)
    ref_passages, ref_queries = reference.passages(sample.passages), reference.queries(sample.queries)
    reference.release()
    ndcg_torch = _ndcg(ref_queries, ref_passages, sample.relevant)
    checks = {}
    for name, file in files.items():
        encoder = Encoder(model_path, torch_params, model=OnnxEmbedder(file, model_path))
        passages, queries = encoder.passages(sample.passages), encoder.queries(sample.queries)
        cosines = np.concatenate([(passages * ref_passages).sum(axis=1), (queries * ref_queries).sum(axis=1)])
        ndcg = _ndcg(queries, passages, sample.relevant)
        checks[name] = judge(cosines, ndcg_torch, ndcg, len(sample.queries), len(sample.passages))
    return checks


def judge(
    cosines: np.ndarray, ndcg_torch: float | None, ndcg: float | None, n_queries: int, n_passages: int
) -> VariantCheck:
    reasons = []
    low = float(np.percentile(cosines, 1))
    min_cosine = float(cosines.min())
    if low < MIN_COSINE:
        reasons.append(f"1% of texts have cosine to torch below {low:.4f} (< {MIN_COSINE})")
    if min_cosine < FLOOR_COSINE:
        reasons.append(f"min cosine {min_cosine:.4f} < {FLOOR_COSINE}")
    if ndcg_torch is not None and ndcg is not None and ndcg_torch - ndcg > NDCG_TOLERANCE:
        reasons.append(f"held-out nDCG@10 {ndcg:.4f} vs torch {ndcg_torch:.4f} (tolerance {NDCG_TOLERANCE})")
    if not reasons and ndcg_torch is None:
        reasons_note = "no held-out queries yet: cosine only"
    else:
        reasons_note = ""
    return VariantCheck(
        passed=not reasons,
        min_cosine=round(min_cosine, 6),
        cosine_p1=round(low, 6),
        mean_cosine=round(float(cosines.mean()), 6),
        ndcg_torch=None if ndcg_torch is None else round(ndcg_torch, 5),
        ndcg=None if ndcg is None else round(ndcg, 5),
        queries=n_queries,
        passages=n_passages,
        reason="; ".join(reasons) or reasons_note,
    )


def _ndcg(queries: np.ndarray, passages: np.ndarray, relevant: list[int]) -> float | None:
    if not len(relevant):
        return None
    ranked = np.argsort(-(queries @ passages.T), axis=1, kind="stable")[:, :10]
    values = [
        query_metrics(list(row), {rel: 1.0})["ndcg@10"] for row, rel in zip(ranked, relevant, strict=True)
    ]
    return float(np.mean(values))
