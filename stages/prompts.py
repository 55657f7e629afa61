"""Every prompt in one place, in English and Chinese, chosen by the chunk's language. All ask for JSON."""

from __future__ import annotations

PROMPTS: dict[str, dict[str, dict[str, str]]] = {
    "questions": {
        "en": {
            "system": "You write search queries for training a retrieval model. Reply with JSON only.",
            "user": (
                "TASK:questions\nWrite {n} different questions that the passage below answers. Each must be "
                "answerable from the passage alone, in English, shorter than the passage, and must not copy "
                'long phrases from it.\nReply as {{"questions": ["...", ...]}}\n\nPASSAGE:\n{passage}'
            ),
        },
        "zh": {
            "system": "你为检索模型的训练编写搜索问题。只用 JSON 回答。",
            "user": (
                "TASK:questions\n请针对下面的段落写出 {n} 个不同的中文问题，每个问题都能仅凭该段落回答，"
                '比段落短，且不要照抄段落中的长句。\n回答格式：{{"questions": ["...", ...]}}\n\n段落：\n{passage}'
            ),
        },
    },
    "rewrites": {
        "en": {
            "system": "You rewrite questions the way real users type them into a search box. Reply with JSON only.",
            "user": (
                "TASK:rewrites\nFor each question below, write {n} rewrite(s) with other wording, as a user "
                "would type it (shorter, keywords, informal), keeping the meaning and the language.\n"
                'Reply as {{"items": [{{"question": "...", "rewrites": ["..."]}}, ...]}}\n\n'
                "QUESTIONS:\n{questions}"
            ),
        },
        "zh": {
            "system": "你把问题改写成真实用户在搜索框里输入的样子。只用 JSON 回答。",
            "user": (
                "TASK:rewrites\n请把下面每个问题改写 {n} 次，换一种说法，像用户在搜索框里输入的那样"
                "（更短、关键词、口语化），意思不变，仍用中文。\n"
                '回答格式：{{"items": [{{"question": "...", "rewrites": ["..."]}}, ...]}}\n\n问题：\n{questions}'
            ),
        },
    },
    "judge": {
        "en": {
            "system": "You judge whether a passage answers a question. Reply with JSON only.",
            "user": (
                "TASK:judge\nFor each numbered question, score from 0 to 1 how well the passage answers it "
                '(1 = fully and directly, 0 = not at all).\nReply as {{"scores": [0.0, ...]}} with exactly '
                "{n} numbers in order.\n\nPASSAGE:\n{passage}\n\nQUESTIONS:\n{questions}"
            ),
        },
        "zh": {
            "system": "你判断一个段落是否回答了问题。只用 JSON 回答。",
            "user": (
                "TASK:judge\n请为每个编号的问题打分（0 到 1），表示该段落回答它的程度"
                '（1 = 完整直接地回答，0 = 完全没有回答）。\n回答格式：{{"scores": [0.0, ...]}}，'
                "按顺序恰好 {n} 个数。\n\n段落：\n{passage}\n\n问题：\n{questions}"
            ),
        },
    },
}


# The JSON shape of each task's reply, sent as `response_format` where the server supports it. Strict
# schemas (OpenAI's rule: every property required, no others) so that one schema fits every server.
SCHEMAS: dict[str, dict] = {
    "questions": {
        "type": "object",
        "properties": {"questions": {"type": "array", "items": {"type": "string"}}},
        "required": ["questions"],
        "additionalProperties": False,
    },
    "rewrites": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "question": {"type": "string"},
                        "rewrites": {"type": "array", "items": {"type": "string"}},
                    },
                    "required": ["question", "rewrites"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["items"],
        "additionalProperties": False,
    },
    "judge": {
        "type": "object",
        "properties": {"scores": {"type": "array", "items": {"type": "number"}}},
        "required": ["scores"],
        "additionalProperties": False,
    },
}


def schema(task: str, count: int) -> dict:
    """The task's schema with its list held to the `count` items the prompt asks for: servers that
    decode under a grammar (llama.cpp, vLLM) then cannot miscount, which small models otherwise do."""
    import copy

    result = copy.deepcopy(SCHEMAS[task])
    key = {"questions": "questions", "rewrites": "items", "judge": "scores"}[task]
    items = result["properties"][key]
    items["minItems"] = count
    items["maxItems"] = count if task != "questions" else count * 2
    return result


def messages(task: str, language: str, **fields: object) -> list[dict[str, str]]:
    variant = PROMPTS[task]["zh" if language == "zh" else "en"]
    return [
        {"role": "system", "content": variant["system"]},
        {"role": "user", "content": variant["user"].format(**fields)},
    ]


def numbered(items: list[str]) -> str:
    return "\n".join(f"{index + 1}. {item}" for index, item in enumerate(items))
