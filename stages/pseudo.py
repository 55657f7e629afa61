"""The built-in synthesizer (no LLM): pseudo-queries made from the documents themselves.

Methods (chosen by `synthesis.pseudo_method`, compared in docs/benchmarks.md):
- heading: the chunk's heading path (a human-written title for the text under it) as the query; a
  chunk without one falls back to its lead sentence as query and the rest as positive.
- inverse_cloze: a sentence as the query, the chunk without that sentence as the positive.
- span: a short random span of the chunk as the query, the whole chunk as the positive.
- keyphrase: a few of the chunk's most distinctive words (tf x idf, idf from the corpus when known), in
  the order they appear: the short keyword form many real search queries take.
All are deterministic for a given chunk (seeded by its hash).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Mapping

from stages.chunk import split_sentences
from stages.synthesize import Candidate
from stages.text import tokenize_for_bm25

MIN_QUERY_CHARS = 8


def _rng(chunk_sha: str, seed: int) -> random.Random:
    return random.Random(int(hashlib.sha256(f"{seed}:{chunk_sha}".encode()).hexdigest()[:16], 16))


def _words(text: str, language: str) -> list[str]:
    return list(text) if language == "zh" else text.split()


def _join_words(words: list[str], language: str) -> str:
    return "".join(words) if language == "zh" else " ".join(words)


def inverse_cloze(text: str, rng: random.Random, count: int) -> list[Candidate]:
    sentences = split_sentences(text)
    if len(sentences) < 2:
        return []
    picks = rng.sample(range(len(sentences)), k=min(count, len(sentences)))
    out = []
    for index in picks:
        query = sentences[index]
        if len(query) < MIN_QUERY_CHARS:
            continue
        rest = " ".join(s for i, s in enumerate(sentences) if i != index)
        out.append(Candidate(query, "pseudo", passage=rest))
    return out


def span(text: str, language: str, rng: random.Random, count: int) -> list[Candidate]:
    words = _words(text, language)
    low, high = (8, 20) if language == "zh" else (4, 12)
    if len(words) < high * 2:
        return []
    out = []
    for _ in range(count):
        length = rng.randint(low, high)
        start = rng.randrange(0, len(words) - length)
        out.append(Candidate(_join_words(words[start : start + length], language), "pseudo"))
    return out


# Words that carry no topic (used only when no corpus idf is at hand).
_STOPWORDS = frozenset(
    "a an and are as at be been but by can could did do does for from had has have how however in into is it "
    "its may might more most no not of on or our such than that the their then there these they this those "
    "to was we were what when where which while who why will with would also between both each other only "
    "using used use study studies results after all any because before during over under very".split()
)
KEYPHRASE_POOL = 10


def keyphrase(
    text: str, rng: random.Random, count: int, idf: Mapping[str, float] | None = None
) -> list[Candidate]:
    tokens = [t for t in tokenize_for_bm25(text) if len(t) > 1 and not t.isdigit() and t not in _STOPWORDS]
    if len(set(tokens)) < 4:
        return []
    counts = Counter(tokens)
    rarest = max(idf.values()) if idf else 0.0

    def weight(token: str) -> float:
        if not idf:
            return counts[token] * min(len(token), 10) / 10
        rarity = idf.get(token, rarest)
        # A word found in no other document is more often a typo, a number or a name than the topic.
        return counts[token] * rarity * (0.5 if rarity >= rarest - 1e-9 else 1.0)

    pool = sorted(counts, key=lambda t: (-weight(t), t))[:KEYPHRASE_POOL]
    first = {token: text.lower().find(token) for token in pool}
    out, seen = [], set()
    for _ in range(count * 3):
        size = min(len(pool), rng.randint(2, 4))
        picked = sorted(rng.sample(pool, size), key=lambda t: first[t])
        query = _join_words(picked, "en") if not _is_cjk(picked) else "".join(picked)
        if query not in seen:
            seen.add(query)
            out.append(Candidate(query, "pseudo"))
        if len(out) == count:
            break
    return out


def _is_cjk(tokens: list[str]) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for token in tokens for ch in token)


def heading(text: str, heading_path: str, rng: random.Random, count: int) -> list[Candidate]:
    if heading_path:
        # The most specific heading, with its parent for context when the heading alone is short.
        parts = [part.strip() for part in heading_path.split(" > ") if part.strip()]
        query = parts[-1]
        if len(query) < MIN_QUERY_CHARS and len(parts) > 1:
            query = f"{parts[-2]} {parts[-1]}"
        if len(query) >= 3 and query not in text[: len(query) + 1]:
            return [Candidate(query, "pseudo")]
        if len(query) >= 3:
            return [Candidate(query, "pseudo")]
    sentences = split_sentences(text)
    if len(sentences) >= 2 and len(sentences[0]) >= MIN_QUERY_CHARS:
        return [Candidate(sentences[0], "pseudo", passage=" ".join(sentences[1:]))]
    return inverse_cloze(text, rng, count)


def pseudo_queries(
    text: str,
    heading_path: str,
    language: str,
    chunk_sha: str,
    method: str,
    count: int,
    seed: int = 0,
    idf: Mapping[str, float] | None = None,
) -> list[Candidate]:
    rng = _rng(chunk_sha, seed)
    if method == "keyphrase":
        return keyphrase(text, rng, count, idf)
    if method == "heading":
        return heading(text, heading_path, rng, count)
    if method == "inverse_cloze":
        return inverse_cloze(text, rng, count)
    if method == "span":
        return span(text, language, rng, count)
    raise ValueError(f"unknown pseudo method {method!r}")
