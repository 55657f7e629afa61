"""Language detection and word tokenization shared by chunking, synthesis and BM25."""

from __future__ import annotations

import re
from functools import lru_cache

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"\w+", re.UNICODE)
_SPACE = re.compile(r"\s")


def cjk_ratio(text: str) -> float:
    letters = len(text) - len(_SPACE.findall(text))  # regex scans in C; a Python loop per character was
    return len(_CJK.findall(text)) / letters if letters else 0.0  # a sixth of ingest time


def detect_language(text: str) -> str:
    """'zh' when CJK characters make up a fifth of the visible text, else 'en' (Latin scripts)."""
    return "zh" if cjk_ratio(text[:5000]) >= 0.2 else "en"


@lru_cache(maxsize=1)
def _jieba():
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


def tokenize_for_bm25(text: str) -> list[str]:
    """jieba words for Chinese runs, lower-cased word tokens otherwise (mixed text gets both)."""
    if _CJK.search(text):
        tokens = []
        for token in _jieba().lcut_for_search(text.lower()):
            token = token.strip()
            if token and _WORD.fullmatch(token):
                tokens.append(token)
        return tokens
    return [token.lower() for token in _WORD.findall(text)]
