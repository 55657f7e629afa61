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
A failed export leaves a record saying why, so the daemon does not retry it on every tick and `status`
can tell the user; a changed model folder (other weights) gets a new export.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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


def runtime_choice(
    root: Path | None, model_path: Path | str, backend: str, quantize: str, device: str
) -> tuple[str | None, str]:
    """The ONNX variant to encode `model_path` with (None: torch) and why: the one decision the encoder
    acts on and `status` reports. `device` is what torch would run on (an encoder passes pick_device's
    answer; `status`, which must not import torch, passes the setting: on a GPU host with "auto" the
    export job makes no export, and `status` reads that from the job)."""
    if backend == "torch" or root is None:
        return None, "model.backend = torch"
    if device.startswith(("cuda", "mps")):
        return None, f"device {device}: ONNX Runtime is used on the CPU only; torch runs the GPU"
    return choose_variant(read_record(root, model_path), quantize, insist=backend == "onnx")


def choose_variant(
    record: ExportRecord | None, quantize: str, insist: bool = False
) -> tuple[str | None, str]:
    """(variant to encode with or None for torch, why). `quantize`: auto (int8 when its check passed,
    else fp32), none (fp32 only), int8 (int8 only). `insist` (model.backend = "onnx"): when no variant
    passed its check, the user's choice stands: fp32 (or int8 when that is all that was asked for) is
    used anyway and the reason says what the check found."""
    if record is None:
        return None, NO_EXPORT
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
    on the result, and install the folder with its record. Exceptions become a failed record."""
    import time

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
    except Exception as exc:  # a model the exporter cannot trace must not stop the daemon: torch encodes
        for file in staging.glob("*.onnx*"):
            file.unlink()
        record.variants = {}
        record.failed = f"{type(exc).__name__}: {exc}"[:500]
    record.seconds = round(time.monotonic() - started, 1)
    (staging / RECORD).write_text(record.to_json())
    install_folder(staging, final)
    return record


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
