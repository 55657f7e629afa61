"""Prediction-powered inference (PPI++) for the gate's mean paired gain.

The gate compares a variant with the model in service on logged questions: per question the paired
difference d = metric(variant) - metric(current). Gold labels (the application's click/cited events) give
d for a few questions only (n); an assessor (LLM or teacher) gives it for all of them: for the n gold ones
and for N more. The assessor's mean alone is biased by its errors; the gold mean alone is unbiased but
wide. PPI++ (Angelopoulos, Duchi, Zrnic 2023, "PPI++: Efficient Prediction-Powered Inference",
arXiv:2311.01453) takes the assessor's mean and removes its bias measured on the gold questions:

    theta(lam) = lam * mean(assessor, unlabelled) + mean(gold - lam * assessor, on the gold questions)

It is unbiased for every fixed lam; lam = 0 is the gold mean alone, lam = 1 is plain PPI. Its variance is
lam^2 Var(assessor)/N + Var(gold - lam * assessor)/n, and the lam that minimises it is estimated from the
data ("power tuning"), so a useless assessor costs (asymptotically) nothing and a good one narrows the
interval. The interval is the normal (CLT) one. Conventions follow the authors' package ppi-python
(`ppi_mean_ci`, `ppi_mean_pointestimate` with the tuned lambda), which tests/test_ppi.py checks against:
standard deviations with divisor n (ddof 0), the tuned lambda clipped to [0, 1].

The interval is asymptotic: with few gold values it is too narrow. Measured on simulated discrete gains
(assessor right on 85% of questions, N = 1000, 4,000 runs), a nominal 95% interval covered the true mean
90.2% of the time with n = 30 gold values, 93.3% with 60 and 94.4% with 120 (the gold-only interval:
93.9%, 94.2%, 94.4%).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import structlog
from scipy.stats import norm

log = structlog.get_logger("embedtune.gate")

PPI = "ppi++"
CLASSICAL = "classical"


@dataclass(frozen=True)
class PpiEstimate:
    """A mean with its (1 - alpha) interval; `method` says whether the assessor was used ("ppi++") or the
    estimate fell back to the gold values alone ("classical"), `lam` the assessor's weight (0 then)."""

    estimate: float
    low: float
    high: float
    lam: float
    n_gold: int
    n_unlabelled: int
    method: str


def _as_values(values: Sequence[float], name: str) -> np.ndarray:
    """A 1-D float array, refused when anything in it is not finite: one NaN would silently make the
    whole interval NaN, and the gate would read that as neither a gain nor a loss."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds a value that is not a finite number (NaN or infinity).")
    return array


def _z(alpha: float) -> float:
    """The two-sided normal quantile for level alpha."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}.")
    return float(norm.ppf(1.0 - alpha / 2.0))


def classical_mean_interval(values: Sequence[float], alpha: float = 0.05) -> tuple[float, float, float]:
    """(estimate, low, high): the mean of `values` with its normal-approximation interval.

    The standard error uses the divisor n, as ppi-python's classical interval does, so that PPI++ with
    lam = 0 gives exactly this interval. At least 2 values are needed: one value has no spread to measure.
    """
    array = _as_values(values, "values")
    if array.size < 2:
        raise ValueError(f"a mean interval needs at least 2 values, got {array.size}.")
    z = _z(alpha)
    mean = float(array.mean())
    half = z * float(array.std()) / math.sqrt(array.size)
    return mean, mean - half, mean + half


def tuned_lambda(gold: np.ndarray, predicted_gold: np.ndarray, predicted_unlabelled: np.ndarray) -> float:
    """The variance-minimising weight of the assessor, clipped to [0, 1].

    d Var(theta)/d lam = 0 gives lam = Cov(gold, assessor) / ((1 + n/N) Var(assessor)); the covariance is
    taken on the gold questions (divisor n), the assessor's variance on all n + N questions (divisor
    n + N - 1), as in ppi-python. A negative covariance (an assessor that disagrees with gold) gives 0.
    Callers make sure N > 0 and the assessor's values are not all equal.
    """
    n, big_n = gold.size, predicted_unlabelled.size
    covariance = float(np.mean((gold - gold.mean()) * (predicted_gold - predicted_gold.mean())))
    variance = float(np.var(np.concatenate([predicted_gold, predicted_unlabelled]), ddof=1))
    lam = covariance / ((1.0 + n / big_n) * variance)
    return float(np.clip(lam, 0.0, 1.0))


def _classical_estimate(gold: np.ndarray, alpha: float, n_unlabelled: int, why: str) -> PpiEstimate:
    estimate, low, high = classical_mean_interval(gold, alpha)
    log.debug("ppi_fallback", reason=why, n_gold=gold.size, n_unlabelled=n_unlabelled)
    return PpiEstimate(estimate, low, high, 0.0, gold.size, n_unlabelled, CLASSICAL)


def ppi_mean_interval(
    gold: Sequence[float],
    predicted_gold: Sequence[float],
    predicted_unlabelled: Sequence[float],
    alpha: float = 0.05,
    lam: float | None = None,
) -> PpiEstimate:
    """The PPI++ estimate of the mean of the gold values, with its (1 - alpha) normal interval.

    `gold[i]` and `predicted_gold[i]` are the gold and the assessor's value for the same question;
    `predicted_unlabelled` the assessor's values for the questions without gold. `lam=None` tunes the
    assessor's weight from the data (clipped to [0, 1]); a number uses it as given (0 = gold alone,
    1 = plain PPI).

    Degenerate inputs, handled explicitly rather than left to divide by zero:
    - fewer than 2 gold values, or gold and predicted_gold of different lengths: ValueError, as is any
      value that is not finite or an alpha outside (0, 1);
    - no unlabelled values (N == 0): the assessor has nothing to add; the classical interval on gold,
      method "classical", lam 0;
    - the assessor's values all equal (zero variance) with lam=None: it carries no information, lam 0,
      which is exactly the classical interval on gold, reported as method "classical".
    Gold values that are all equal give a zero-width interval, as the normal approximation does.
    """
    y = _as_values(gold, "gold")
    yhat = _as_values(predicted_gold, "predicted_gold")
    yhat_unlabelled = _as_values(predicted_unlabelled, "predicted_unlabelled")
    if y.size != yhat.size:
        raise ValueError(
            f"gold and predicted_gold must pair up question by question: {y.size} gold values, "
            f"{yhat.size} predictions."
        )
    if y.size < 2:
        raise ValueError(f"PPI++ needs at least 2 gold values to measure the assessor's bias, got {y.size}.")
    z = _z(alpha)
    if lam is not None and not math.isfinite(lam):
        raise ValueError(f"lam must be a finite number, got {lam}.")
    n, big_n = y.size, yhat_unlabelled.size
    if big_n == 0:
        return _classical_estimate(y, alpha, big_n, "no unlabelled values")
    if lam is None:
        if np.ptp(np.concatenate([yhat, yhat_unlabelled])) == 0.0:
            return _classical_estimate(y, alpha, big_n, "assessor values all equal")
        lam = tuned_lambda(y, yhat, yhat_unlabelled)
    lam = float(lam)
    rectifier = y - lam * yhat
    estimate = lam * float(yhat_unlabelled.mean()) + float(rectifier.mean())
    variance = (lam**2) * float(yhat_unlabelled.var()) / big_n + float(rectifier.var()) / n
    half = z * math.sqrt(variance)
    return PpiEstimate(estimate, estimate - half, estimate + half, lam, n, big_n, PPI)


def event_gain_interval(
    gold: Sequence[float],
    predicted_gold: Sequence[float],
    predicted_unlabelled: Sequence[float],
    *,
    weak: bool,
    alpha: float = 0.05,
) -> PpiEstimate:
    """The gate's interval for the mean paired gain on logged questions: PPI++ over a real assessor's
    gains, the events' classical interval alone with a weak one.

    PPI carries the assessor's bias measured on the questions with events over to the rest. Logged
    questions with events are not a random draw: an application posts a click or citation only where the
    model in service showed something usable, so they are that model's successes and the rest hold its
    failures. The teacher (a weak assessor) is that model's own hybrid, so it errs most exactly there:
    measured on nfcorpus (bench/gate_calibration.py), its mean gain for a candidate was -0.065 on the
    questions with events and -0.220 on the rest, and PPI++ said -0.052 [-0.092, -0.011] where the
    truth was +0.006 [-0.011, +0.023]. An LLM grades each passage on its own, with no tie to the model
    in service, so its bias has no such reason to differ between the two groups and PPI keeps it."""
    if weak:
        y = _as_values(gold, "gold")
        if y.size < 2:
            raise ValueError(f"a mean interval needs at least 2 gold values, got {y.size}.")
        return _classical_estimate(y, alpha, len(predicted_unlabelled), "weak assessor")
    return ppi_mean_interval(gold, predicted_gold, predicted_unlabelled, alpha)
