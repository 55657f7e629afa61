"""The one way embedtune encodes text with an embedding model.

Queries get the query instruction (BGE convention: the configured one, else the query prompt the model
folder declares), passages the model's passage prompt when it declares one (E5), every vector is
normalised (inner product = cosine, as faiss and the gate expect), and passage vectors of a model go
through its embedding cache when one is given, so chunks already encoded by that model are not encoded
again. The round, the filter, exports and the benchmarks all use this class.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.embed_cache import EmbeddingCache, text_key
from stages.models import model_key

# On a CPU a batch is cut at about this many tokens (texts x the longest one's tokens): measured on 2 cores,
# 8 passages of ~250 tokens encode ~1.3x faster per passage than 64, in torch and ONNX Runtime alike
# (activations that stay in cache; docs/benchmarks.md, "Encoding backends"); short queries still go 64 at once.
CPU_BATCH_TOKENS = 2048


@dataclass(frozen=True)
class EncodeParams:
    device: str = "auto"
    query_instruction: str = ""
    batch_size: int = 64
    batch_tokens: int = 0  # a batch's padded tokens at most; 0: CPU_BATCH_TOKENS on a CPU, none on a GPU
    precision: str = "auto"  # torch weights: "auto" (fp16 on a GPU, fp32 on a CPU), "fp32", "fp16", "bf16"
    # model.backend / model.quantize; ONNX needs the folder exports are made in (stages/onnx_export.py)
    backend: str = "torch"
    quantize: str = "auto"
    exports_root: Path | None = None


class Encoder:
    """Loads a model once; `queries` and `passages` return normalised float32 matrices.

    >>> encoder = Encoder(Path("models/current"), EncodeParams(device="cpu"))
    >>> encoder.queries(["how do rivers form?"]).shape  # doctest: +SKIP
    (1, 384)
    """

    # With a progress callback, texts are encoded in slices of this many and the callback hears of each.
    PROGRESS_SLICE = 512

    def __init__(
        self,
        path: Path,
        params: EncodeParams,
        cache_root: Path | None = None,
        model=None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        from stages.models import model_prompts

        self.path = Path(path)
        self.params = params
        query_prompt, self.passage_prompt = model_prompts(self.path)
        self.query_prefix = params.query_instruction or query_prompt
        # which runtime encodes and why: "torch", or "onnx int8" / "onnx fp32" when a checked export exists
        self.runtime, self.runtime_reason = (
            "torch",
            "given model" if model is not None else "model.backend = torch",
        )
        if model is None:
            model = self._onnx_model()
        self.model = model if model is not None else self._torch_model()
        # vectors of another runtime are near, not equal: each runtime has its own cache entries
        key = model_key(self.path) if self.runtime == "torch" else f"{model_key(self.path)}:{self.runtime}"
        self.cache = EmbeddingCache(cache_root, key) if cache_root is not None else None
        # progress(0, n) when a call over n texts begins, then progress(k, n) per slice of k texts encoded
        self.progress = progress

    def _torch_model(self):
        """The sentence-transformers model, in half precision where `precision` says so (then the runtime
        is "torch fp16" / "torch bf16": its vectors are near fp32's, not equal, and are cached apart)."""
        from stages.models import load_embedder

        model = load_embedder(self.path, self.params.device)
        precision = encode_precision(self.params.precision, str(model.device))
        if precision != "fp32":
            import torch

            model.to({"fp16": torch.float16, "bf16": torch.bfloat16}[precision])
            self.runtime = f"torch {precision}"
        return model

    def _onnx_model(self):
        """The checked ONNX export of this folder when the settings ask for one, else None (torch)."""
        from stages.models import pick_device
        from stages.onnx_export import VARIANT_FILES, export_dir, runtime_choice

        params = self.params
        variant, self.runtime_reason = runtime_choice(
            params.exports_root, self.path, params.backend, params.quantize, pick_device(params.device)
        )
        if variant is None:
            return None
        from stages.onnx_encoder import OnnxEmbedder

        try:
            model = OnnxEmbedder(
                export_dir(params.exports_root, self.path) / VARIANT_FILES[variant], self.path
            )
        except Exception as exc:  # a damaged export file: torch still encodes, and the reason is kept
            self.runtime_reason = f"ONNX export could not be loaded: {type(exc).__name__}: {exc}"
            return None
        self.runtime = f"onnx {variant}"
        return model

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            dim = self.model.get_sentence_embedding_dimension() or 0
            return np.zeros((0, dim), dtype=np.float32)
        if self.progress is None:
            return self._encode_slice(texts)
        self.progress(0, len(texts))  # a call begins: the total grows by its size
        parts = []
        for start in range(0, len(texts), self.PROGRESS_SLICE):
            part = texts[start : start + self.PROGRESS_SLICE]
            parts.append(self._encode_slice(part))
            self.progress(len(part), len(texts))
        return np.concatenate(parts)

    def _encode_slice(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        budget = self._batch_tokens()
        if budget and hasattr(self.model, "embed_encodings"):
            return self._encode_tokenized(texts, budget)
        lengths = self._token_lengths(texts) if budget else None
        if lengths is None:  # one call: the model sorts by length and cuts batches of batch_size itself
            return self._run(texts, self.params.batch_size)
        out: np.ndarray | None = None
        for batch in token_budget_batches(lengths, budget, self.params.batch_size):
            vectors = self._run([texts[i] for i in batch], len(batch))
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            out[batch] = vectors
        return out

    def _encode_tokenized(self, texts: list[str], budget: int) -> np.ndarray:
        """The ONNX path: tokenize once, cut batches from those tokens, and embed the same encodings."""
        encodings = self.model.encodings(texts)
        out = np.empty((len(texts), self.model.get_sentence_embedding_dimension()), dtype=np.float32)
        lengths = [len(encoding.ids) for encoding in encodings]
        for batch in token_budget_batches(lengths, budget, self.params.batch_size):
            out[batch] = self.model.embed_encodings([encodings[i] for i in batch])
        return out

    def _run(self, texts: list[str], batch_size: int) -> np.ndarray:
        return self.model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True
        ).astype(np.float32, copy=False)

    def _batch_tokens(self) -> int:
        if self.params.batch_tokens:
            return self.params.batch_tokens
        device = str(getattr(self.model, "device", "cpu"))  # an ONNX model runs on the CPU
        return CPU_BATCH_TOKENS if device.startswith("cpu") else 0

    def _token_lengths(self, texts: list[str]) -> list[int] | None:
        """Each text's tokens as the model will see them (truncated), or None without a tokenizer file."""
        tokenizer = self._length_tokenizer
        if tokenizer is None:
            return None
        return [len(encoding.ids) for encoding in tokenizer.encode_batch(texts)]

    @functools.cached_property
    def _length_tokenizer(self):
        from stages.models import load_tokenizer, max_seq_length

        try:
            tokenizer = load_tokenizer(self.path)
        except Exception:  # a model given without a readable folder: batches as the model cuts them
            return None
        tokenizer.enable_truncation(max_seq_length(self.path))
        tokenizer.no_padding()
        return tokenizer

    def queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode([self.query_prefix + text for text in texts])

    def passages(self, texts: Sequence[str], keys: Sequence[str] | None = None) -> np.ndarray:
        """Passage vectors; cached by text hash when the encoder has a cache (`save_cache` writes it)."""
        if self.cache is None:
            return self._encode_passages(texts)
        keys = list(keys) if keys is not None else [text_key(text) for text in texts]
        return self.cache.get_many(keys, list(texts), self._encode_passages)

    def _encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        if not self.passage_prompt:
            return self._encode(texts)
        return self._encode([self.passage_prompt + text for text in texts])

    def save_cache(self) -> None:
        """Write new cached vectors to disk (atomic); a no-op without a cache or without new vectors."""
        if self.cache is not None:
            self.cache.save()

    def release(self) -> None:
        """Drop the model (the round evaluates several in turn; only one needs to be in memory)."""
        self.model = None


def encode_precision(wanted: str, device: str) -> str:
    """What "auto" means where the model runs: fp16 on a GPU (tensor cores; BERT encoders keep their
    ranking in it), fp32 on a CPU (half precision there is emulated and slower)."""
    if wanted != "auto":
        return wanted
    return "fp16" if device.startswith("cuda") else "fp32"


def token_budget_batches(lengths: Sequence[int], budget: int, max_batch: int) -> list[list[int]]:
    """Indexes of texts in batches, longest first, each padded to its first (longest) text and holding at
    most `budget` tokens that way (at least one text) and `max_batch` texts: long passages go a few at a
    time, short queries many, and texts of one length share a batch (little padding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    start = 0
    while start < len(order):
        longest = max(1, lengths[order[start]])
        size = max(1, min(max_batch, budget // longest))
        batches.append(order[start : start + size])
        start += size
    return batches
