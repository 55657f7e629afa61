"""Encoding with an ONNX export (stages/onnx_export.py) in ONNX Runtime, behind the interface the
`Encoder` uses from a SentenceTransformer (`encode`, `get_sentence_embedding_dimension`).

Tokenization reads the model folder's tokenizer.json with `tokenizers` (truncated at the model's
max_seq_length, padded to the longest text of a batch), which is what sentence-transformers does through
transformers; the export's check against torch (stages/backend_check.py) would catch any difference.
Texts are encoded longest first, as sentence-transformers does, so a batch pads little.
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
        pad_token = _pad_token(model_path, self._tokenizer)
        self._tokenizer.enable_padding(pad_id=self._tokenizer.token_to_id(pad_token), pad_token=pad_token)
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
        texts = list(texts)
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        order = np.argsort([-len(text) for text in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            chosen = order[start : start + batch_size]
            out[chosen] = self._run([texts[i] for i in chosen])
        if normalize_embeddings:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out /= np.maximum(norms, 1e-12)
        return out

    def _run(self, texts: list[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(texts)
        columns = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        feeds = {name: np.asarray(columns[name], dtype=np.int64) for name in self.inputs}
        return self.session.run(None, feeds)[0]


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
