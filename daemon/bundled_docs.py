"""`embedtune samples --into DIR`: sample documents for a first run, without a download.

Two short guides (English and Chinese) ship with embedtune; the bulk comes from the Python language
reference that every CPython installation carries (`pydoc_data.topics`), written out as Markdown with its
section titles as headings. Enough text for the default settings to reach a training round.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent / "bundled_docs"
_UNDERLINE = re.compile(r"^([*=\-~^\"]{3,})\s*$")


def reference_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return {}
    return dict(topics)


def topic_markdown(name: str, text: str) -> str:
    """Underlined titles (reStructuredText style) become Markdown headings."""
    lines = text.splitlines()
    out: list[str] = [f"# Python reference: {name}", ""]
    index = 0
    while index < len(lines):
        line = lines[index]
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if line.strip() and _UNDERLINE.match(following) and len(following.strip()) >= len(line.strip()) - 2:
            out += ["", f"## {line.strip()}", ""]
            index += 2
            continue
        out.append(line)
        index += 1
    return "\n".join(out).strip() + "\n"


def write_samples(folder: Path, topics_limit: int | None = None) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for path in sorted(HERE.glob("*.md")):
        shutil.copy2(path, folder / path.name)
        count += 1
    reference = folder / "python-reference"
    reference.mkdir(exist_ok=True)
    for index, (name, text) in enumerate(sorted(reference_topics().items())):
        if topics_limit is not None and index >= topics_limit:
            break
        safe = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or f"topic{index}"
        (reference / f"{safe}.md").write_text(topic_markdown(name, text), encoding="utf-8")
        count += 1
    return count
