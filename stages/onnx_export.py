"""ONNX exports of a model version for CPU encoding, made once per version and checked against torch.

Why: on a CPU host encoding is most of embedtune's time (index fills, mining, the filter, evaluation).
ONNX Runtime with BERT's fused kernels (attention, skip-layer-norm, bias-GELU) and, where it keeps
quality, int8 weights encodes faster than PyTorch fp32. `optimum` would do the export, but its ONNX
half (optimum-onnx) pins transformers < 4.58 and this project runs transformers 5; the export here is
torch's own exporter plus ONNX Runtime's BERT optimizer and dynamic quantizer, the same three steps.

An export lives in `<exports_root>/<key of the model folder>/`: `model.onnx` (fp32, optimised),
`model-int8.onnx` (dynamic int8 weights, per channel) and `export.json`, the record of what was made and
how each variant compared with torch on the corpus (`stages/backend_check.py`). The folder is built
beside its final name and renamed, like a promotion, so a reader sees a whole export or none.
A refused export (the graph cannot be exported, or it does not encode like torch) leaves a record
saying why, so the daemon does not retry it and `status` can tell the user; a changed model folder (other
weights) gets a new export. A passing fault (out of memory, a full disk, the process killed) is no
verdict on the model: it raises `ExportInterrupted`, and the job records when it tries again
(`mark_interrupted`). The record also keeps each file's size and a digest of its ends, so a damaged
file is seen by a stat and two short reads (`status` must not load the graph) and torch encodes instead.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from state.folders import install_folder, staging_path

RECORD = "export.json"
FORMAT = 1
FP32, INT8 = "fp32", "int8"
VARIANT_FILES = {FP32: "model.onnx", INT8: "model-int8.onnx"}
# Architectures ONNX Runtime's BERT optimizer fuses (attention, layer norm, GELU); others keep the plain graph.
BERT_LIKE = {"bert", "roberta", "xlm-roberta", "distilbert", "camembert"}


@dataclass
class VariantCheck:
    """How one exported variant compared with torch on the same texts."""

    passed: bool
    min_cosine: float
    cosine_p1: float = 0.0  # the 1st percentile of the texts' cosines to torch
    mean_cosine: float = 0.0
    ndcg_torch: float | None = None
    ndcg: float | None = None
    queries: int = 0
    passages: int = 0
    reason: str = ""


@dataclass
class ExportRecord:
    source: str  # stages.models.model_key of the folder the export was made from
    model: str = ""  # that folder: an export whose folder is gone is swept away
    variants: dict[str, VariantCheck] = field(default_factory=dict)
    failed: str = ""  # why no export could be made (nothing to use; torch encodes)
    seconds: float = 0.0
    format: int = FORMAT
    files: dict[str, str] = field(default_factory=dict)  # variant -> file_mark() of its file
    # A try that met a passing fault (no export, no verdict): why, how many tries so far, and when the
    # next one is due (seconds since the epoch). Such a record holds no variants.
    interrupted: str = ""
    tries: int = 0
    retry_after: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ExportRecord:
        """Raises ValueError / TypeError for a record that is not one (callers treat it as missing)."""
        data = json.loads(text)
        data["variants"] = {
            name: VariantCheck(**check) for name, check in (data.get("variants") or {}).items()
        }
        data.setdefault("format", 0)  # a record without a format is from before formats: not this one
        return cls(**data)


def export_dir(root: Path, model_path: Path | str) -> Path:
    """Where the export of a model folder lives: one folder per resolved model path."""
    digest = hashlib.sha1(str(Path(model_path).resolve()).encode()).hexdigest()[:16]
    return Path(root) / digest


def read_record(root: Path, model_path: Path | str) -> ExportRecord | None:
    """The export record of this model folder, or None when there is none for its current weights."""
    from stages.models import model_key

    file = export_dir(root, model_path) / RECORD
    if not file.exists():
        return None
    try:
        record = ExportRecord.from_json(file.read_text())
    except (ValueError, TypeError):
        return None
    if record.format != FORMAT or record.source != model_key(model_path):
        return None  # made from other weights, or by another format: a new export is due
    return record


def remove_export(root: Path, model_path: Path | str) -> bool:
    """Drop a model folder's export (its version was removed)."""
    folder = export_dir(root, model_path)
    if not folder.exists():
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


NO_EXPORT = "no ONNX export yet (it is made in the background)"
NOT_LOADABLE = "ONNX export could not be loaded"
INTERRUPTED = "ONNX export interrupted"


class ExportInterrupted(Exception):
    """A passing fault stopped the export (out of memory, a full disk): no verdict on the model, try later."""


# errno values that say "the machine, now", not "this model": memory, space, quota, descriptors, I/O
TRANSIENT_ERRNOS = frozenset(
    {errno.ENOMEM, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EAGAIN, errno.EMFILE, errno.ENFILE}
    | {errno.EIO, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT}
)
# The same faults as native libraries word them (torch's allocator and ONNX Runtime raise RuntimeError)
TRANSIENT_WORDS = re.compile(
    r"out of memory|can(no|')t allocate memory|bad.alloc|bad allocation|no space left|disk quota",
    re.IGNORECASE,
)


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a passing fault of the machine rather than a refusal of
    the model: an export that ran out of memory or disk must be tried again, not recorded as failed."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError):
            return True
        if isinstance(current, OSError) and current.errno in TRANSIENT_ERRNOS:
            return True
        if TRANSIENT_WORDS.search(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False


def file_mark(file: Path) -> str:
    """Size and a digest of the first and last MiB: a truncated, emptied or overwritten export shows
    without reading (or loading) a graph of hundreds of MB."""
    size = file.stat().st_size
    digest = hashlib.sha1(str(size).encode())
    with open(file, "rb") as handle:
        digest.update(handle.read(1 << 20))
        if size > 1 << 20:
            handle.seek(max(1 << 20, size - (1 << 20)))
            digest.update(handle.read())
    return f"{size}:{digest.hexdigest()[:16]}"


def damaged(root: Path, model_path: Path | str, record: ExportRecord, variant: str) -> str:
    """Why the installed file of `variant` is not the one the check passed ("" when it is)."""
    file = export_dir(root, model_path) / VARIANT_FILES[variant]
    try:
        mark = file_mark(file)
    except OSError as exc:
        return f"{file.name}: {exc.strerror or exc}"
    expected = record.files.get(variant)
    if not expected or mark == expected:  # records made before marks were kept: the encoder's load decides
        return ""
    size, exported = mark.split(":")[0], expected.split(":")[0]
    if size != exported:
        return f"{file.name} is damaged ({size} bytes, {exported} were exported and checked)"
    return f"{file.name} is damaged (its contents changed since it was exported and checked)"


def mark_interrupted(
    root: Path, model_path: Path | str, reason: str, tries: int, retry_after: float
) -> ExportRecord:
    """Install a record of an interrupted try (no export): `status` says why and when the next try is;
    the daemon re-asks once `retry_after` has passed. Also written as a try starts, so a try whose
    process is killed (out of memory) leaves this record behind."""
    from stages.models import model_key

    record = ExportRecord(
        model_key(model_path),
        str(Path(model_path).resolve()),
        interrupted=reason[:500],
        tries=tries,
        retry_after=round(retry_after, 1),
    )
    final = export_dir(root, model_path)
    staging = staging_path(final)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / RECORD).write_text(record.to_json())
    install_folder(staging, final)
    return record


def interrupted_note(record: ExportRecord) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.retry_after))
    return f"{INTERRUPTED}: {record.interrupted}; tried again after {when} (try {record.tries + 1})"


GPU_DEVICES = Path("/dev")  # where the GPU's device files are (/dev/nvidia0, ROCm's /dev/kfd)
TORCH_VERSION: Path | None = None  # torch's version.py; None: found without importing torch


def guess_device(preference: str) -> str:
    """`stages.models.pick_device`'s answer without importing torch (for `status`): "auto" is "cuda"
    when torch was built for CUDA (or ROCm) and a GPU of that kind is visible to this process."""
    if preference != "auto":
        return preference
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return "cpu"
    cuda, hip = _torch_gpu_builds()
    if cuda and any(GPU_DEVICES.glob("nvidia[0-9]*")):
        return "cuda"
    if hip and (GPU_DEVICES / "kfd").exists():
        return "cuda"  # ROCm builds answer torch.cuda too
    return "cpu"


def _torch_gpu_builds() -> tuple[bool, bool]:
    """(built for CUDA, built for ROCm), read from torch/version.py without importing torch."""
    from importlib.util import find_spec

    file = TORCH_VERSION
    if file is None:
        try:
            spec = find_spec("torch")
        except (ImportError, ValueError):
            return False, False
        if spec is None or not spec.origin:
            return False, False
        file = Path(spec.origin).parent / "version.py"
    try:
        text = file.read_text()
    except OSError:
        return False, False

    def built(name: str) -> bool:
        match = re.search(rf"^{name}\b[^=\n]*=\s*(.+)$", text, re.MULTILINE)
        return match is not None and match.group(1).strip() not in ("None", "''", '""')

    return built("cuda"), built("hip")


def runtime_choice(
    root: Path | None, model_path: Path | str, backend: str, quantize: str, device: str
) -> tuple[str | None, str]:
    """The ONNX variant to encode `model_path` with (None: torch) and why: the one decision the encoder
    acts on and `status` reports. `device` is what torch would run on (an encoder passes pick_device's
    answer; `status`, which must not import torch, passes guess_device's). A chosen variant whose file
    is not the one that was checked (truncated, overwritten) is not used: torch encodes, and says so."""
    if backend == "torch" or root is None:
        return None, "model.backend = torch"
    if device.startswith(("cuda", "mps")):
        return None, f"device {device}: ONNX Runtime is used on the CPU only; torch runs the GPU"
    record = read_record(root, model_path)
    variant, reason = choose_variant(record, quantize, insist=backend == "onnx")
    if variant is not None and record is not None:
        problem = damaged(root, model_path, record, variant)
        if problem:
            return None, f"{NOT_LOADABLE}: {problem}"
    return variant, reason


def choose_variant(
    record: ExportRecord | None, quantize: str, insist: bool = False
) -> tuple[str | None, str]:
    """(variant to encode with or None for torch, why). `quantize`: auto (int8 when its check passed,
    else fp32), none (fp32 only), int8 (int8 only). `insist` (model.backend = "onnx"): when no variant
    passed its check, the user's choice stands: fp32 (or int8 when that is all that was asked for) is
    used anyway and the reason says what the check found."""
    if record is None:
        return None, NO_EXPORT
    if record.interrupted:
        return None, interrupted_note(record)
    if record.failed:
        return None, f"ONNX export failed: {record.failed}"
    wanted = {"auto": [INT8, FP32], "none": [FP32], "int8": [INT8]}[quantize]
    reasons = []
    for name in wanted:
        check = record.variants.get(name)
        if check is None:
            reasons.append(f"{name} not exported")
        elif check.passed:
            return (
                name,
                f"onnx {name} (checked against torch: mean cosine {check.mean_cosine:.4f}, {_ndcg_note(check)})",
            )
        else:
            reasons.append(f"{name} {check.reason}")
    if insist:
        for name in sorted(wanted, key=lambda variant: variant != FP32):  # fp32 is the nearer to torch
            if name in record.variants:
                return (
                    name,
                    f"onnx {name} (model.backend = onnx, although it does not match torch: {'; '.join(reasons)})",
                )
    return None, "ONNX export does not match torch: " + "; ".join(reasons)


def _ndcg_note(check: VariantCheck) -> str:
    if check.ndcg is None or check.ndcg_torch is None:
        return "no held-out queries yet"
    return f"held-out nDCG@10 {check.ndcg:.4f} vs {check.ndcg_torch:.4f} on {check.queries} queries"


def export_model(
    model_path: Path,
    root: Path,
    check: Callable[[Path, dict[str, Path]], dict[str, VariantCheck]],
    *,
    quantize: bool = True,
) -> ExportRecord:
    """Export, optimise and quantise the model in `model_path`, run `check(model_path, {variant: file})`
    on the result, and install the folder with its record. Exceptions become a failed record (a
    refusal: this model cannot be exported, or not like this), except passing faults of the machine
    (`is_transient`), which raise `ExportInterrupted` and leave the installed folder as it was."""
    from stages.models import model_key

    started = time.monotonic()
    final = export_dir(root, model_path)
    staging = staging_path(final)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    record = ExportRecord(model_key(model_path), str(Path(model_path).resolve()))
    try:
        files = _export_variants(Path(model_path), staging, quantize)
        record.variants = check(Path(model_path), files)
        record.files = {name: file_mark(file) for name, file in files.items()}
    except Exception as exc:  # a model the exporter cannot trace must not stop the daemon: torch encodes
        _interrupt_if_transient(exc, staging)
        for file in staging.glob("*.onnx*"):
            file.unlink()
        record.variants, record.files = {}, {}
        record.failed = f"{type(exc).__name__}: {exc}"[:500]
    record.seconds = round(time.monotonic() - started, 1)
    try:
        (staging / RECORD).write_text(record.to_json())
        install_folder(staging, final)
    except Exception as exc:  # a full disk while installing: no verdict was lost, try again later
        _interrupt_if_transient(exc, staging)
        raise
    return record


def _interrupt_if_transient(exc: Exception, staging: Path) -> None:
    """Raise ExportInterrupted (after removing the half-built folder) when `exc` is a passing fault."""
    if is_transient(exc):
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportInterrupted(f"{type(exc).__name__}: {exc}"[:500]) from exc


def _export_variants(model_path: Path, folder: Path, quantize: bool) -> dict[str, Path]:
    fp32 = folder / VARIANT_FILES[FP32]
    raw = folder / "raw.onnx"
    model_type, heads, hidden = export_fp32(model_path, raw)
    if model_type in BERT_LIKE:
        from onnxruntime.transformers.optimizer import optimize_model

        optimize_model(str(raw), model_type="bert", num_heads=heads, hidden_size=hidden).save_model_to_file(
            str(fp32)
        )
        raw.unlink()
    else:
        os.rename(raw, fp32)
    files = {FP32: fp32}
    if quantize:
        files[INT8] = quantize_int8(fp32, folder / VARIANT_FILES[INT8])
    return files


def export_fp32(model_path: Path, out: Path) -> tuple[str, int, int]:
    """Trace the whole sentence-transformers pipeline (transformer, pooling, dense, normalize) into one
    graph whose output is the sentence embedding; returns (model type, heads, hidden size)."""
    import torch

    from stages.models import load_embedder

    model = load_embedder(model_path, "cpu")
    model.eval()
    transformer = model[0].auto_model
    # Eager attention: its pattern is the one ONNX Runtime's optimizer fuses into one Attention kernel.
    if hasattr(transformer, "set_attn_implementation"):
        transformer.set_attn_implementation("eager")
    features = model.tokenize(["an example sentence to trace", "a second one"])
    names = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in features]

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            return self.model(dict(zip(names, tensors, strict=True)))["sentence_embedding"]

    dynamic = {name: {0: "batch", 1: "tokens"} for name in names}
    with torch.inference_mode():
        torch.onnx.export(
            SentenceEmbedding(),
            tuple(features[name] for name in names),
            str(out),
            input_names=names,
            output_names=["sentence_embedding"],
            dynamic_axes={**dynamic, "sentence_embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    config = transformer.config
    return str(config.model_type), int(config.num_attention_heads), int(config.hidden_size)


def quantize_int8(source: Path, out: Path) -> Path:
    """Dynamic int8 weights of the dense layers (MatMul), one scale per output channel; the fused
    attention (its query/key/value projections included) stays fp32. Measured (docs/benchmarks.md,
    "Encoding backends"): quantising attention too, in the fused kernel (per tensor) or as plain MatMuls
    of an unfused graph (per channel), was 1.2-1.3x faster still, but moved all-MiniLM-L6-v2 below the
    check on nfcorpus (min cosine 0.981 / p1 0.989) and cost multilingual-e5-small 0.012 nDCG@10 on
    zh-medqa's 500 real queries [-0.021, -0.004] although its cosines (p1 0.995) and 64 held-out queries
    passed the check; the dense layers alone stay within 0.005 of torch on both sets."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source),
        str(out),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
        # the fused BERT kernels are in Microsoft's domain, which shape inference cannot type
        extra_options={"DefaultTensorType": TensorProto.FLOAT},
    )
    return out
