from __future__ import annotations

from daemon.bundled_docs import topic_markdown, write_samples
from stages.extract import sections_from_markdown


def test_samples_are_written_with_headings(tmp_path):
    count = write_samples(tmp_path, topics_limit=5)
    assert count == 7
    assert (tmp_path / "embedtune-zh.md").read_text(encoding="utf-8").startswith("# embedtune")
    topics = sorted((tmp_path / "python-reference").glob("*.md"))
    assert len(topics) == 5
    sections = sections_from_markdown(topics[0].read_text())
    assert sections and all(s.heading.startswith("Python reference:") for s in sections)


def test_underlined_titles_become_headings():
    text = "Intro line.\n\nCustom access\n*************\n\nBody text here.\n"
    markdown = topic_markdown("t", text)
    assert "## Custom access" in markdown and "*****" not in markdown
