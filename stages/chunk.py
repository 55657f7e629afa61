"""Sentence-aware chunking measured in the embedding model's tokens, with overlap.

Deterministic: the same sections and tokenizer always give the same chunks.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from stages.extract import Section

# Sentence ends (only a match's end is used): Chinese full-width marks (and the ellipsis) end a sentence
# on their own; a Latin full stop needs whitespace after it. Closing quotes and brackets stay with their
# sentence. The marks are matched, not looked behind for: the same ends, at a third of the cost.
_SENTENCE_END = re.compile(
    r"[。！？；!?;…][”’」』）)\]\"']*"  # CJK / bang / semicolon, possibly followed by closers
    r"|\.[\"')\]]*(?=\s)"  # Latin full stop needs a following space
    r"|\n\s*\n"  # paragraph break
)


@dataclass(frozen=True)
class Chunk:
    ordinal: int
    text: str
    heading: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(f"{self.heading}\x00{self.text}".encode()).hexdigest()


# Text the word-count path counts exactly: printable ASCII and the whitespace BERT treats as a separator;
# with BERT's Chinese-character handling also CJK unified ideographs (each one a word of its own) and the
# common CJK punctuation marks (Unicode P*, unchanged by NFD, so each is cut off as a word). Control
# characters (which the normalizer deletes, joining words) and anything else take the exact path.
_ASCII_CHARS = r"\t\n\r\x20-\x7e"
_CJK_CHARS = r"\u4e00-\u9fff。，、；：？！“”‘’（）《》【】「」『』…—·"
_PLAIN_ASCII = re.compile(rf"[{_ASCII_CHARS}]*")
_PLAIN_ASCII_CJK = re.compile(rf"[{_ASCII_CHARS}{_CJK_CHARS}]*")


@dataclass(frozen=True)
class _WordRule:
    """How a BERT WordPiece tokenizer cuts plain text into words."""

    words: re.Pattern[str]  # one match per word of the pre-tokenizer
    plain: re.Pattern[str]  # text this rule counts exactly (fullmatch)
    lowercase: bool
    added: re.Pattern[str] | None  # added tokens, folded like the text; matched before splitting words


class TokenCounter:
    """Counts and hard-splits text in the model's tokens (special tokens excluded), with a
    `tokenizers.Tokenizer` (stages.models.load_tokenizer).

    For BERT WordPiece tokenizers (BERT, MiniLM, BGE) `count_many` counts plain sentences per word:
    BERT's pre-tokenizer cuts ASCII text at whitespace and at every punctuation mark (and, with its
    Chinese handling, around every CJK ideograph), and WordPiece splits each word on its own, so a
    sentence's count is the sum of its words' counts. Each distinct word goes through the real tokenizer
    once and is remembered; running text repeats its words, so this is 2-4x faster than encoding every
    sentence (the normalizer dominates encoding; docs/benchmarks.md "Ingestion") with the same numbers.
    Anything else (other tokenizers, other scripts, control characters, added tokens) is encoded whole."""

    def __init__(self, tokenizer, word_cache_size: int = 200_000) -> None:
        self.tokenizer = tokenizer
        self.word_cache_size = word_cache_size
        self._word_counts: dict[str, int] = {}
        self._rule = _bert_word_rule(tokenizer)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def count_many(self, texts: list[str]) -> list[int]:
        """Counts for a section's sentences, equal to `count` on each."""
        counts = [0] * len(texts)
        whole: list[int] = []
        by_words: dict[int, list[str]] = {}
        for i, text in enumerate(texts):
            words = self._split_words(text)
            if words is None:
                whole.append(i)
            else:
                by_words[i] = words
        if by_words:
            known = self._word_counts
            missing = {w for words in by_words.values() for w in words if w not in known}
            if len(known) + len(missing) > self.word_cache_size:
                known.clear()  # bounded memory: start over rather than track recency
                missing = {w for words in by_words.values() for w in words}
            if missing:
                ordered = list(missing)
                encoded = self.tokenizer.encode_batch(ordered, add_special_tokens=False)
                known.update(zip(ordered, (len(e.ids) for e in encoded), strict=True))
            lookup = known.__getitem__
            for i, words in by_words.items():
                counts[i] = sum(map(lookup, words))
        if whole:
            encoded = self.tokenizer.encode_batch([texts[i] for i in whole], add_special_tokens=False)
            for i, encoding in zip(whole, encoded, strict=True):
                counts[i] = len(encoding.ids)
        return counts

    def _split_words(self, text: str) -> list[str] | None:
        """BERT's words of `text`, or None where the word sum might differ from encoding it whole."""
        rule = self._rule
        if rule is None or not rule.plain.fullmatch(text):
            return None
        folded = text.lower() if rule.lowercase else text
        if rule.added is not None and rule.added.search(folded):
            return None
        return rule.words.findall(folded)

    def split(self, text: str, max_tokens: int) -> list[str]:
        offsets = self.tokenizer.encode(text, add_special_tokens=False).offsets
        pieces = []
        for start in range(0, len(offsets), max_tokens):
            window = offsets[start : start + max_tokens]
            begin = window[0][0]
            end = offsets[start + max_tokens][0] if start + max_tokens < len(offsets) else len(text)
            piece = text[begin:end].strip()
            if piece:
                pieces.append(piece)
        return pieces


def _bert_word_rule(tokenizer) -> _WordRule | None:
    """The word rule of a BERT WordPiece tokenizer; None for any other kind (counted whole)."""
    from tokenizers import models, normalizers, pre_tokenizers

    normalizer = tokenizer.normalizer
    if not (
        isinstance(normalizer, normalizers.BertNormalizer)
        and normalizer.clean_text
        and isinstance(tokenizer.pre_tokenizer, pre_tokenizers.BertPreTokenizer)
        and isinstance(tokenizer.model, models.WordPiece)
    ):
        return None
    lowercase = bool(normalizer.lowercase)
    alnum = "a-z0-9" if lowercase else "A-Za-z0-9"
    added = [
        t.content.lower() if lowercase else t.content for t in tokenizer.get_added_tokens_decoder().values()
    ]
    added = sorted({token for token in added if token}, key=len, reverse=True)
    return _WordRule(
        words=re.compile(rf"[{alnum}]+|[^\s{alnum}]"),
        plain=_PLAIN_ASCII_CJK if normalizer.handle_chinese_chars else _PLAIN_ASCII,
        lowercase=lowercase,
        added=re.compile("|".join(map(re.escape, added))) if added else None,
    )


def split_sentences(text: str) -> list[str]:
    parts: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
        piece = text[start:end].strip()
        if piece:
            parts.append(piece)
        start = end
    tail = text[start:].strip()
    if tail:
        parts.append(tail)
    return [" ".join(p.split()) if not _has_cjk(p) else re.sub(r"\s*\n\s*", "", p) for p in parts]


_CJK = re.compile(r"[\u4e00-\u9fff]")


def _has_cjk(text: str) -> bool:
    return _CJK.search(text) is not None


def _join(sentences: Sequence[str]) -> str:
    out = ""
    for sentence in sentences:
        if (
            out
            and not (_has_cjk(out[-1]) and _has_cjk(sentence[:1]))
            and not out.endswith(tuple("。！？；…”」"))
        ):
            out += " "
        elif out and not _has_cjk(sentence[:1]):
            out += " "
        out += sentence
    return out


def chunk_sections(
    sections: Sequence[Section],
    count_tokens: Callable[[str], int],
    split_tokens: Callable[[str, int], list[str]],
    max_tokens: int,
    overlap_tokens: int,
    min_chars: int = 1,
    count_many: Callable[[list[str]], list[int]] | None = None,
) -> list[Chunk]:
    """Pack whole sentences up to `max_tokens`; carry trailing sentences up to `overlap_tokens` into the
    next chunk. Sentences longer than a chunk are split hard on token boundaries, never dropped.
    `count_many`, when given, counts a section's sentences in one call (same counts as `count_tokens`)."""
    chunks: list[Chunk] = []
    for section in sections:
        units: list[tuple[str, int]] = []
        sentences = split_sentences(section.text)
        sizes = count_many(sentences) if count_many else [count_tokens(s) for s in sentences]
        for sentence, size in zip(sentences, sizes, strict=True):
            if size > max_tokens:
                for piece in split_tokens(sentence, max_tokens):
                    units.append((piece, count_tokens(piece)))
            else:
                units.append((sentence, size))
        current: list[tuple[str, int]] = []
        current_size = 0
        fresh = 0  # sentences in `current` that are not overlap from the previous chunk

        def emit(units_now: list[tuple[str, int]], heading: str) -> None:
            text = _join([u for u, _n in units_now]).strip()
            if text and not text.isspace():
                chunks.append(Chunk(len(chunks), text, heading))

        for unit, size in units:
            if current and current_size + size > max_tokens and fresh:
                emit(current, section.heading)
                carried: list[tuple[str, int]] = []
                carried_size = 0
                for prev, prev_size in reversed(current):
                    if (
                        carried_size + prev_size > overlap_tokens
                        or carried_size + prev_size + size > max_tokens
                    ):
                        break
                    carried.insert(0, (prev, prev_size))
                    carried_size += prev_size
                current, current_size, fresh = carried, carried_size, 0
            current.append((unit, size))
            current_size += size
            fresh += 1
        if current and fresh:
            emit(current, section.heading)
    # Fold fragments too small to be useful into their predecessor in the same section.
    merged: list[Chunk] = []
    for chunk in chunks:
        if (
            merged
            and len(chunk.text) < min_chars
            and merged[-1].heading == chunk.heading
            and count_tokens(merged[-1].text + " " + chunk.text) <= max_tokens
        ):
            previous = merged.pop()
            chunk = Chunk(previous.ordinal, _join([previous.text, chunk.text]), previous.heading)
        merged.append(chunk)
    return [Chunk(i, c.text, c.heading) for i, c in enumerate(merged) if c.text.strip()]
