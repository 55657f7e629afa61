"""`model.base = "auto"`: which packaged base model suits a corpus, decided from its text.

all-MiniLM-L6-v2 is English-only (nDCG@10 0.024 on the Chinese zh-medqa: near random) and about twice as
cheap as multilingual-e5-small, which reads Chinese, English and 100 other languages. English text gets
the cheaper model; Chinese or mixed text (a twentieth of the visible characters CJK, so a Chinese
document with English terms, or an English one quoting Chinese, counts as mixed) gets the multilingual one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from stages.text import cjk_ratio

AUTO = "auto"
ENGLISH_BASE = "packaged:all-MiniLM-L6-v2"
MULTILINGUAL_BASE = "packaged:multilingual-e5-small"
MIXED_CJK_SHARE = 0.05
# An English base serving a corpus whose chunks are this share Chinese is worth a word in `status`.
DRIFT_SHARE = 0.2
SAMPLE_CHARS = 20_000


@dataclass(frozen=True)
class BaseChoice:
    reference: str
    reason: str


def choose_base(text: str) -> BaseChoice:
    """The base for a corpus whose first document reads `text`."""
    share = cjk_ratio(text[:SAMPLE_CHARS])
    if share >= MIXED_CJK_SHARE:
        kind = "Chinese" if share >= 0.5 else "mixed Chinese/English"
        return BaseChoice(MULTILINGUAL_BASE, f"auto: {kind} text ({share:.0%} CJK) in the first document")
    return BaseChoice(ENGLISH_BASE, f"auto: English text ({share:.0%} CJK) in the first document")


def language_drift(reference: str, languages: Mapping[str, int]) -> str | None:
    """What `status` says when the corpus no longer fits the base `auto` chose: the choice stays (a new
    base means a new index and training from scratch), so the user is told how to switch."""
    total = sum(languages.values())
    if reference != ENGLISH_BASE or not total:
        return None
    share = languages.get("zh", 0) / total
    if share < DRIFT_SHARE:
        return None
    return (
        f"the corpus is now {share:.0%} Chinese but auto chose the English {ENGLISH_BASE} at the start; "
        f'set model.base = "{MULTILINGUAL_BASE}" and restart to switch (the index is rebuilt with it)'
    )


def describe_base(status: dict, configured: str) -> None:
    """Complete `status["model"]["base"]` with what the settings say: an explicit base as configured,
    "auto" before its choice, and the drift warning after it."""
    model = status["model"]
    base = model.get("base") or {}
    if configured != AUTO:
        base = {"reference": configured, "reason": "model.base"}
    elif not base.get("reference"):
        base = {"reference": "(not chosen yet)", "reason": "auto: the first document's language decides"}
    else:
        base["drift"] = language_drift(base["reference"], base.get("languages") or {})
    model["base"] = base
