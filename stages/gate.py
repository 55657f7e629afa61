"""The promotion gate: which variant (if any) may replace the model in service, and why.

Rule (docs/promotion.md):
1. A variant is eligible only if, on the synthetic held-out set, metric(variant) - metric(current)
   >= min_gain.
2. Human-signal sets (the user's evaluation file, document-structure queries) veto: a variant that
   loses more than `human_tolerance` on any of them is not eligible, whatever the synthetic gain.
3. The guard set vetoes a variant that drops more than `max_guard_drop` on it (forgetting).
3a. What users are served vetoes: a variant whose served hybrid ranking (BM25 fused with its vectors, the
    `<set>+served` sets) is worse than the model in service's with the whole paired 95% interval below
    zero is not eligible, whatever its dense gain (docs/promotion.md).
3b. With no human-signal set at all, the synthetic gain alone must be convincing: the lower end of its
    paired-bootstrap 95% interval must reach `synthetic_only_min_gain`.
0. With the questions users asked (the judge part of the query log, `asked` sets), they decide
   eligibility instead of rules 1 and 3b: the 95% interval of the variant's gain on them (as served) must
   lie above zero, by prediction-powered inference when enough questions carry the application's events,
   and reach `assessor_only_min_gain` when only an assessor judged them (`AskedEvidence`).
4. Among eligible variants, the one with the best score on the strongest set wins: the user's file if
   present, else the asked questions, else the synthetic held-out set. No eligible variant: the round is
   rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

SYNTHETIC = "heldout"
HUMAN_SETS = ("user", "structure")
GUARD = "guard"
SERVED_SUFFIX = "+served"  # a set scored through the served hybrid ranking (stages/hybrid_eval.py)
ASKED = "asked"  # the judge part of the query log (stages/real_queries.py)
EVENT_METHODS = ("ppi++", "classical")  # intervals the application's events made (stages/ppi.py)


class RejectionCause(StrEnum):
    """Why a round was rejected, for scripts and the report (the reason text is for people)."""

    NOT_ENOUGH_SAMPLES = "not_enough_samples"
    NO_HELDOUT = "no_heldout"
    NO_TRAINING_STEP = "no_training_step"
    NO_BASELINE = "no_baseline_evaluation"
    BELOW_MIN_GAIN = "below_min_gain"
    NOT_CONVINCING = "synthetic_gain_not_convincing"
    HUMAN_VETO = "human_signal_veto"
    GUARD_VETO = "guard_veto"
    SERVED_VETO = "served_hybrid_veto"
    SERVING_CHANGED = "serving_changed"
    ASKED_NOT_CONVINCING = "asked_gain_not_convincing"


@dataclass(frozen=True)
class AskedEvidence:
    """A variant's gain on the questions users asked, with its 95% interval and how it was made:
    `ppi++` (event labels correct an LLM assessor's bias, stages/ppi.py), `classical` (the event labels
    alone, beside the weak assessor) or `assessor` (a paired bootstrap on the assessor's grades alone;
    `weak` when that assessor was the teacher)."""

    set_name: str
    estimate: float
    low: float
    high: float
    method: str
    weak: bool
    questions: int
    gold: int
    required: float  # what the interval's low end must reach

    @property
    def passes(self) -> bool:
        return self.low > 0 and self.low >= self.required

    @property
    def decisive(self) -> bool:
        """Whether it may decide (rule 0). The teacher's grades alone cannot: the teacher mixes the base
        model with BM25 and grades by rank, so it rates the model in service near its ceiling (0.95
        nDCG@10 on the tiny model's own hybrid) and any model that moved away from it as a loss; its
        gains are shown, not acted on. With the application's events the round's evidence may decide:
        the events alone beside the teacher, PPI++ over an LLM's grades (stages/ppi.event_gain_interval)."""
        return self.method in EVENT_METHODS or not self.weak

    def describe(self) -> str:
        if self.method in EVENT_METHODS:
            judge = "events alone, no assessor's grades" if self.weak else "events + assessor"
        else:
            judge = "weak assessor (teacher)" if self.weak else "assessor"
        return (
            f"{self.set_name} {self.estimate:+.4f}, 95% CI [{self.low:+.4f}, {self.high:+.4f}] "
            f"({self.method}, {judge}; {self.questions} questions, {self.gold} with events)"
        )


@dataclass
class Decision:
    promote: bool
    variant: str | None
    reason: str
    gains: dict[str, dict[str, float]] = field(default_factory=dict)
    interval: tuple[float, float] | None = None
    cause: RejectionCause | None = None  # set when promote is False


def paired_bootstrap(
    new: Sequence[float], old: Sequence[float], samples: int = 1000, seed: int = 0
) -> tuple[float, float] | None:
    """95% interval of mean(new - old) by resampling queries with replacement."""
    if samples <= 0 or len(new) == 0 or len(new) != len(old):
        return None
    diff = np.asarray(new, dtype=np.float64) - np.asarray(old, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def decide(
    scores: dict[str, dict[str, float]],
    metric: str,
    min_gain: float,
    human_tolerance: float = 0.0,
    max_guard_drop: float = 0.01,
    current: str = "current",
    intervals: dict[str, tuple[float, float] | None] | None = None,
    synthetic_only_min_gain: float = 0.0,
    served_intervals: dict[str, dict[str, tuple[float, float] | None]] | None = None,
    asked: dict[str, AskedEvidence] | None = None,
) -> Decision:
    """`scores[variant][set]` is the metric value; `current` names the model in service.

    `intervals[variant]` is the bootstrap interval of the variant's held-out gain (used by rule 3b);
    `served_intervals[variant][set]` those of its gains on the `+served` sets (rule 3a); `asked[variant]`
    its gain on the questions users asked (rule 0), when the round has them.
    """
    if current not in scores or SYNTHETIC not in scores[current]:
        return Decision(
            False, None, "no held-out evaluation of the model in service", cause=RejectionCause.NO_BASELINE
        )
    baseline = scores[current]
    gains = {
        variant: {name: values[name] - baseline[name] for name in values if name in baseline}
        for variant, values in scores.items()
        if variant != current
    }
    human_signal = any(name in baseline for name in HUMAN_SETS)
    eligible: list[str] = []
    refusals: list[str] = []
    causes: dict[str, RejectionCause] = {}
    shown_only = {v: e for v, e in (asked or {}).items() if not e.decisive}
    asked = {v: e for v, e in (asked or {}).items() if e.decisive}
    for variant, gain in gains.items():
        synthetic = gain.get(SYNTHETIC, float("-inf"))
        evidence = asked.get(variant)
        if evidence is not None:
            if not evidence.passes:
                refusals.append(
                    f"{variant}: gain on asked questions not convincing ({evidence.describe()}; its low end "
                    f"must be above 0 and reach {evidence.required})"
                )
                causes[variant] = RejectionCause.ASKED_NOT_CONVINCING
                continue
        elif synthetic < min_gain:
            refusals.append(f"{variant}: held-out {metric} {synthetic:+.4f} < min_gain {min_gain}")
            causes[variant] = RejectionCause.BELOW_MIN_GAIN
            continue
        if evidence is None and not human_signal and synthetic_only_min_gain > 0:
            interval = (intervals or {}).get(variant)
            low = interval[0] if interval else synthetic
            if low < synthetic_only_min_gain:
                refusals.append(
                    f"{variant}: synthetic-only gain not convincing (95% CI low {low:+.4f} "
                    f"< synthetic_only_min_gain {synthetic_only_min_gain})"
                )
                causes[variant] = RejectionCause.NOT_CONVINCING
                continue
        for name in HUMAN_SETS:
            if name in gain and gain[name] < -human_tolerance:
                refusals.append(f"{variant}: vetoed by {name} set ({metric} {gain[name]:+.4f})")
                causes.setdefault(variant, RejectionCause.HUMAN_VETO)
        for name, interval in ((served_intervals or {}).get(variant) or {}).items():
            if interval is not None and interval[1] < 0:
                refusals.append(
                    f"{variant}: the served hybrid gets worse on {name.removesuffix(SERVED_SUFFIX)} "
                    f"({metric} {gain.get(name, 0.0):+.4f}, 95% CI [{interval[0]:+.4f}, {interval[1]:+.4f}])"
                )
                causes.setdefault(variant, RejectionCause.SERVED_VETO)
        if GUARD in gain and gain[GUARD] < -max_guard_drop:
            refusals.append(
                f"{variant}: vetoed by guard set ({metric} {gain[GUARD]:+.4f} < -{max_guard_drop})"
            )
            causes.setdefault(variant, RejectionCause.GUARD_VETO)
        if variant not in causes:
            eligible.append(variant)

    def strength(variant: str) -> tuple[float, float]:
        """What ranks variants: the user's file, else the asked questions, else the held-out set."""
        held = gains[variant].get(SYNTHETIC, float("-inf"))
        if "user" in gains[variant] and all("user" in gains[v] for v in eligible or gains):
            return gains[variant]["user"], held
        if variant in asked:
            return asked[variant].estimate, held
        return held, held

    if not eligible:
        # the cause of the variant that came closest: on the asked questions, else on the held-out set
        closest = max(
            gains, key=lambda v: asked[v].estimate if v in asked else gains[v].get(SYNTHETIC, float("-inf"))
        )
        shown = [
            f"asked questions (shown, not acted on): {e.describe()}" for e in list(shown_only.values())[:1]
        ]
        return Decision(False, None, "rejected: " + "; ".join(refusals + shown), gains, cause=causes[closest])
    best = max(eligible, key=strength)
    parts = [f"{name} {gains[best][name]:+.4f}" for name in gains[best]]
    reason = f"promoted {best}: {metric} gain " + ", ".join(parts)
    if best in asked:
        reason += f"; asked questions: {asked[best].describe()}"
    elif best in shown_only:
        reason += f"; asked questions (shown, not acted on): {shown_only[best].describe()}"
    return Decision(True, best, reason, gains)
