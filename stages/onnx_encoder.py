"""Encoding with an ONNX export (stages/onnx_export.py) in ONNX Runtime, behind the interface the
`Encoder` uses from a SentenceTransformer (`encode`, `get_sentence_embedding_dimension`).

Tokenization reads the model folder's tokenizer.json with `tokenizers` (truncated at the model's
max_seq_length, padded to the longest text of a batch), which is what sentence-transformers does through
transformers; the export's check against torch (stages/backend_check.py) would catch any difference.
Texts are encoded longest first (in tokens), so a batch pads little. The `Encoder` tokenizes once: it
cuts its token-budget batches from `encodings` and hands them back to `embed_encodings`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PAD_FALLBACKS = ("[PAD]", "<pad>")


class OnnxEmbedder:
    def __init__(self, onnx_file: Path, model_path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        from stages.models import load_tokenizer, max_seq_length

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one per physical core
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        self.inputs = [node.name for node in self.session.get_inputs()]
        self.dimension = int(self.session.get_outputs()[0].shape[-1])
        self.max_seq_length = max_seq_length(model_path)
        self.model_path = Path(model_path)
        self._tokenizer = load_tokenizer(model_path)
        self._tokenizer.enable_truncation(self.max_seq_length)
        self._tokenizer.no_padding()  # batches are padded here, to their own longest text
        self.pad_id = self._tokenizer.token_to_id(_pad_token(model_path, self._tokenizer))
        self.file = Path(onnx_file)

    @functools.cached_property
    def _counter(self):
        """The tokenizer untruncated and unpadded, loaded when first needed (only `search` counts)."""
        from stages.models import load_tokenizer

        return load_tokenizer(self.model_path)

    def token_count(self, text: str) -> int:
        """Tokens of `text` with the model's special tokens, before truncation (search warns past the window)."""
        return len(self._counter.encode(text).ids)

    def get_sentence_embedding_dimension(self) -> int:
        return self.dimension

    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 64,
        normalize_embeddings: bool = True,
        convert_to_numpy: bool = True,
        **_: object,
    ) -> np.ndarray:
        encodings = self.encodings(texts)
        out = np.zeros((len(encodings), self.dimension), dtype=np.float32)
        order = np.argsort([-len(e.ids) for e in encodings], kind="stable")
        for start in range(0, len(encodings), batch_size):
            chosen = order[start : start + batch_size]
            out[chosen] = self.embed_encodings([encodings[i] for i in chosen], normalize=False)
        if normalize_embeddings:
            _normalize(out)
        return out

    def encodings(self, texts: Sequence[str]) -> list:
        """Each text's `tokenizers.Encoding`, truncated to the model's window and not padded."""
        return self._tokenizer.encode_batch(list(texts))

    def embed_encodings(self, encodings: Sequence, normalize: bool = True) -> np.ndarray:
        """Vectors of one batch of `encodings`, padded to the batch's longest."""
        width = max((len(e.ids) for e in encodings), default=0)
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            size = len(encoding.ids)
            ids[row, :size] = encoding.ids
            mask[row, :size] = encoding.attention_mask
            types[row, :size] = encoding.type_ids
        columns = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        vectors = self.session.run(None, {name: columns[name] for name in self.inputs})[0]
        vectors = np.asarray(vectors, dtype=np.float32)
        return _normalize(vectors) if normalize else vectors


def _normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors /= np.maximum(norms, 1e-12)
    return vectors


def _pad_token(model_path: Path, tokenizer) -> str:
    config = Path(model_path) / "tokenizer_config.json"
    if config.exists():
        value = json.loads(config.read_text()).get("pad_token")
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and tokenizer.token_to_id(value) is not None:
            return value
    for token in PAD_FALLBACKS:
        if tokenizer.token_to_id(token) is not None:
            return token
    raise ValueError(f"{model_path}: no padding token in the tokenizer")
