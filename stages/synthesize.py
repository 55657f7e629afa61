"""LLM synthesis for one chunk: questions, user-style rewrites, and a judge score per pair.

Returns plain candidate pairs; the caller stores them. Questions that fail the basic checks (wrong
language, longer than the passage, empty, duplicate) come back with a reason instead of vanishing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stages.llm import InvalidReply, JsonRequest, LlmClient
from stages.prompts import messages, numbered, schema
from stages.text import detect_language


@dataclass
class Candidate:
    query: str
    kind: str  # question | rewrite | pseudo | structure
    parent: str | None = None  # the question a rewrite rewrites
    passage: str | None = None  # a positive other than the chunk text (inverse cloze); None = chunk
    judge_score: float | None = None
    reason: str | None = None  # set when the candidate is refused before filtering


@dataclass(frozen=True)
class ReplyBudget:
    """`max_tokens` for each request, sized to what its prompt asks for.

    Why: a request with no cap let a small model ramble for 3,576 tokens and hold a one-slot server for
    98 s. A question is one short sentence; a judge score is a number; JSON punctuation and a code fence
    are the overhead. A reply cut at the cap whose JSON is broken counts as malformed and is re-asked."""

    question_tokens: int = 64
    rewrite_tokens: int = 48
    score_tokens: int = 8
    overhead_tokens: int = 64

    def questions(self, count: int) -> int:
        return self.overhead_tokens + count * self.question_tokens

    def rewrites(self, questions: int, per_question: int) -> int:
        # each item repeats its question, then lists the rewrites
        return self.overhead_tokens + questions * (self.question_tokens + per_question * self.rewrite_tokens)

    def judge(self, count: int) -> int:
        return self.overhead_tokens + count * self.score_tokens


def _string_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, dict) or not isinstance(value.get(key), list):
        raise ValueError(f'expected {{"{key}": [...]}}')
    items = [str(item).strip() for item in value[key] if isinstance(item, str | int | float)]
    items = [item for item in items if item]
    if not items:
        raise ValueError(f"empty {key} list")
    return items


def check_query(query: str, passage: str, language: str) -> str | None:
    """Why a generated query is unusable, or None."""
    if len(query) < 3:
        return "query too short"
    if language == "zh" and detect_language(query) != "zh":
        return "query not in the passage's language (zh)"
    if language == "en" and detect_language(query) == "zh":
        return "query not in the passage's language (en)"
    if len(query) >= len(passage):
        return "query longer than the passage"
    return None


def synthesize_chunk(
    client: LlmClient,
    passage: str,
    language: str,
    questions_per_chunk: int,
    rewrites_per_question: int,
    budget: ReplyBudget | None = None,
) -> list[Candidate]:
    budget = budget or ReplyBudget()
    questions = client.ask_json(
        messages("questions", language, n=questions_per_chunk, passage=passage),
        lambda value: _string_list(value, "questions"),
        JsonRequest(
            "questions", schema("questions", questions_per_chunk), budget.questions(questions_per_chunk)
        ),
    )[: questions_per_chunk * 2]
    candidates: list[Candidate] = []
    seen: set[str] = set()
    for question in questions:
        if question in seen:
            continue
        seen.add(question)
        candidates.append(Candidate(question, "question", reason=check_query(question, passage, language)))
    good_questions = [c.query for c in candidates if c.reason is None]
    if rewrites_per_question and good_questions:

        def parse_rewrites(value: Any) -> list[tuple[str, list[str]]]:
            if not isinstance(value, dict) or not isinstance(value.get("items"), list):
                raise ValueError('expected {"items": [...]}')
            out = []
            for index, item in enumerate(value["items"]):
                if not isinstance(item, dict):
                    raise ValueError("items must be objects")
                parent = str(
                    item.get("question") or (good_questions[index] if index < len(good_questions) else "")
                )
                rewrites = [str(r).strip() for r in item.get("rewrites", []) if str(r).strip()]
                out.append((parent, rewrites[:rewrites_per_question]))
            if not any(rewrites for _p, rewrites in out):
                raise ValueError("no rewrites in the reply")
            return out

        for parent, rewrites in client.ask_json(
            messages("rewrites", language, n=rewrites_per_question, questions=numbered(good_questions)),
            parse_rewrites,
            JsonRequest(
                "rewrites",
                schema("rewrites", len(good_questions)),
                budget.rewrites(len(good_questions), rewrites_per_question),
            ),
        ):
            for rewrite in rewrites:
                if rewrite in seen:
                    continue
                seen.add(rewrite)
                candidates.append(
                    Candidate(
                        rewrite, "rewrite", parent=parent, reason=check_query(rewrite, passage, language)
                    )
                )
    to_judge = [c for c in candidates if c.reason is None]
    if to_judge:
        _judge(client, passage, language, to_judge, budget)
    return candidates


def _judge(
    client: LlmClient, passage: str, language: str, to_judge: list[Candidate], budget: ReplyBudget
) -> None:
    """Score every candidate in one request; when a (small) model keeps returning the wrong number of
    scores, score them one at a time, and mark a candidate whose single judgement still fails instead of
    failing the whole chunk (measured: a 0.5B model miscounts a 7-item list, rarely a 1-item one)."""

    def ask(batch: list[Candidate]) -> list[float]:
        def parse_scores(value: Any) -> list[float]:
            if not isinstance(value, dict) or not isinstance(value.get("scores"), list):
                raise ValueError('expected {"scores": [...]}')
            scores = [float(score) for score in value["scores"]]
            if len(scores) != len(batch):
                raise ValueError(f"expected {len(batch)} scores, got {len(scores)}")
            return [min(1.0, max(0.0, score)) for score in scores]

        return client.ask_json(
            messages(
                "judge", language, n=len(batch), passage=passage, questions=numbered([c.query for c in batch])
            ),
            parse_scores,
            JsonRequest("judge", schema("judge", len(batch)), budget.judge(len(batch))),
        )

    try:
        groups = [(to_judge, ask(to_judge))]
    except InvalidReply:
        if len(to_judge) == 1:
            raise
        groups = []
        for candidate in to_judge:
            try:
                groups.append(([candidate], ask([candidate])))
            except InvalidReply as exc:
                candidate.reason = f"judge reply malformed: {exc}"[:300]
    for batch, scores in groups:
        for candidate, score in zip(batch, scores, strict=True):
            candidate.judge_score = score
