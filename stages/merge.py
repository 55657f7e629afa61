"""LM-Cocktail merges of a fine-tuned model with its base, keeping the base's sentence-transformers shape.

LM_Cocktail's encoder export rewrites the folder as CLS pooling + Normalize whatever the base used; a
mean-pooling base (all-MiniLM) would silently change behaviour. After merging, the base's module files
(modules.json, pooling, normalize, sentence_bert_config, prompts) are copied back over the output.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

ST_CONFIG_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def restore_st_modules(base: Path, merged: Path) -> None:
    """Make `merged` use exactly the base's non-transformer modules."""
    if not (base / "modules.json").exists():
        return  # a plain HF base: LM_Cocktail's CLS + Normalize is the BGE convention, keep it
    for entry in (
        json.loads((merged / "modules.json").read_text()) if (merged / "modules.json").exists() else []
    ):
        folder = merged / entry.get("path", "")
        if entry.get("path") and folder.is_dir():
            shutil.rmtree(folder)
    for name in ST_CONFIG_FILES:
        if (base / name).exists():
            shutil.copy2(base / name, merged / name)
    for entry in json.loads((base / "modules.json").read_text()):
        sub = entry.get("path", "")
        if sub and (base / sub).is_dir():
            shutil.copytree(base / sub, merged / sub, dirs_exist_ok=True)


def merge_with_base(candidate: Path, base: Path, candidate_weight: float, output: Path) -> Path:
    from LM_Cocktail import mix_models

    with contextlib.redirect_stdout(io.StringIO()):
        mix_models(
            model_names_or_paths=[str(candidate), str(base)],
            model_type="encoder",
            weights=[candidate_weight, 1.0 - candidate_weight],
            output_path=str(output),
        )
    restore_st_modules(base, output)
    return output


def merge_with_data(
    candidate: Path, base: Path, examples: list[dict], output: Path, neg_number: int = 3
) -> tuple[Path, list[float]]:
    """LM-Cocktail's mix_models_with_data: weights chosen by loss on a few examples."""
    from LM_Cocktail import mix_models_with_data

    usable = [e for e in examples if len(e.get("neg", [])) >= neg_number][:16]
    if len(usable) < 2:
        raise ValueError("not enough examples with negatives for mix_models_with_data")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        mix_models_with_data(
            model_names_or_paths=[str(candidate), str(base)],
            model_type="encoder",
            example_ata=[{"query": e["query"], "pos": [e["pos"]], "neg": e["neg"]} for e in usable],
            temperature=5.0,
            batch_size=2,
            max_input_length=256,
            neg_number=neg_number,
            output_path=str(output),
        )
    restore_st_modules(base, output)
    weights = []
    for line in buffer.getvalue().splitlines():
        parts = line.rsplit(" ", 1)
        if len(parts) == 2:
            with contextlib.suppress(ValueError):
                weights.append(float(parts[1]))
    return output, weights[-2:]
