"""Training losses named by `training.loss`: one term or a weighted sum of terms, through the
sentence-transformers losses.

- mnrl: MultipleNegativesRankingLoss (in-batch plus mined negatives; needs no teacher);
- margin_mse: MarginMSELoss on the teacher's score margins (GPL's loss);
- kl: DistillKLDivLoss, the student's softmax over (positive, negatives) pulled to the teacher's.

A sum such as "mnrl+margin_mse" or "mnrl+0.5*kl" embeds each batch once and adds the terms'
`compute_loss_from_embeddings`, so a sum costs no more encoder passes than one term. Teacher scores
reach the terms that need them as the dataset's `label` column; mnrl ignores it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LOSS_NAMES = ("mnrl", "margin_mse", "kl")
TEACHER_LOSSES = frozenset({"margin_mse", "kl"})
_TERM = re.compile(r"^\s*(?:(\d+(?:\.\d*)?|\.\d+)\s*\*\s*)?([a-z_]+)\s*$")


class LossSpecError(ValueError):
    """A `training.loss` value that names no known loss or is malformed."""


@dataclass(frozen=True)
class LossTerm:
    name: str
    weight: float


def parse_loss(spec: str) -> tuple[LossTerm, ...]:
    """'mnrl+0.5*margin_mse' -> (mnrl x1, margin_mse x0.5); each name at most once."""
    terms: list[LossTerm] = []
    for part in spec.split("+"):
        match = _TERM.match(part)
        if not match or match.group(2) not in LOSS_NAMES:
            raise LossSpecError(
                f"{part.strip()!r} is not a loss: use {', '.join(LOSS_NAMES)} or a sum such as 'mnrl+margin_mse'"
            )
        weight = float(match.group(1)) if match.group(1) else 1.0
        if weight <= 0:
            raise LossSpecError(f"loss weight for {match.group(2)} must be > 0")
        terms.append(LossTerm(match.group(2), weight))
    names = [term.name for term in terms]
    if len(set(names)) != len(names):
        raise LossSpecError(f"{spec!r} names a loss twice")
    return tuple(terms)


def needs_teacher(spec: str) -> bool:
    return any(term.name in TEACHER_LOSSES for term in parse_loss(spec))


def build_loss(
    spec: str, model, temperature: float, cached_batch: int = 0, gather_across_devices: bool = False
):
    """The torch module the trainer calls. A lone mnrl may be the cached variant (large batches in small
    memory); a sum cannot, as cached MNRL embeds in its own mini-batches."""
    import torch
    from sentence_transformers.base.losses.merged_forward import embed_columns
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        DistillKLDivLoss,
        MarginMSELoss,
        MultipleNegativesRankingLoss,
    )

    terms = parse_loss(spec)
    scale = 1.0 / temperature
    if len(terms) == 1 and terms[0].name == "mnrl":
        if cached_batch:
            return CachedMultipleNegativesRankingLoss(
                model, scale=scale, mini_batch_size=cached_batch, gather_across_devices=gather_across_devices
            )
        return MultipleNegativesRankingLoss(model, scale=scale, gather_across_devices=gather_across_devices)

    def make(name: str):
        if name == "mnrl":
            return MultipleNegativesRankingLoss(
                model, scale=scale, gather_across_devices=gather_across_devices
            )
        if name == "margin_mse":
            return MarginMSELoss(model)
        # Labels are on the student's cosine scale (stages/labels.py calibrates them), so both sides are
        # sharpened by the same temperature as mnrl. DistillKLDivLoss multiplies by the temperature
        # squared; dividing it out below keeps this term's size comparable to the others.
        return DistillKLDivLoss(model, temperature=temperature)

    modules = [make(term.name) for term in terms]
    weights = [term.weight / (temperature**2 if term.name == "kl" else 1.0) for term in terms]

    class WeightedSum(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.terms = torch.nn.ModuleList(modules)

        def forward(self, sentence_features, labels):
            embeddings = embed_columns(self.model, sentence_features)
            return sum(
                weight * term.compute_loss_from_embeddings(embeddings, labels)
                for weight, term in zip(weights, self.terms, strict=True)
            )

    return WeightedSum()
