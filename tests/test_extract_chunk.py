from __future__ import annotations

from pathlib import Path

import pytest

from stages.chunk import TokenCounter, chunk_sections, split_sentences
from stages.extract import (
    ExtractionError,
    Section,
    decode_text,
    extract,
    read_checked,
    sections_from_markdown,
)
from stages.models import load_tokenizer
from tests.docs_factory import CHINESE, ENGLISH, make_docx, make_pdf, make_scanned_pdf, make_zip_bomb


def _extract(path: Path):
    return extract(path, read_checked(path, 50 * 1024 * 1024))


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "gbk", "gb18030", "big5"])
def test_text_encodings_are_detected(tmp_path, encoding):
    text = (
        CHINESE
        if encoding != "big5"
        else "機器學習是人工智慧的一個分支。它使電腦能夠從資料中學習！深度神經網路效果很好。"
    )
    path = tmp_path / f"{encoding}.txt"
    path.write_bytes(text.encode(encoding))
    assert _extract(path).text.strip() == text


def test_english_utf8(tmp_path):
    path = tmp_path / "en.txt"
    path.write_text(ENGLISH)
    assert _extract(path).text == ENGLISH


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("empty.txt", b"", "empty file"),
        ("blank.txt", b"   \n\t\n", "only whitespace"),
        ("junk.txt", bytes(range(256)) * 40, "binary"),
        ("junk.md", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 100, "binary"),
        ("broken.docx", b"PK\x03\x04 not really a zip", "corrupt docx"),
        ("locked.docx", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 600, "password-protected"),
        ("broken.pdf", b"%PDF-1.4\n garbage garbage", "corrupt pdf"),
        ("notpdf.pdf", b"hello world, not a pdf at all", "corrupt pdf"),
    ],
)
def test_bad_input_is_rejected_with_a_reason(tmp_path, name, data, reason):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ExtractionError, match=reason):
        _extract(path)


def test_docx_with_headings(tmp_path):
    path = make_docx(tmp_path / "a.docx", "Solar energy", ["Panels convert sunlight.", "Batteries store it."])
    document = _extract(path)
    assert document.sections[0].heading == "Solar energy"
    assert "Batteries store it." in document.text


def test_docx_zip_bomb_is_refused(tmp_path):
    path = make_zip_bomb(tmp_path / "bomb.docx", megabytes=600)
    assert path.stat().st_size < 5 * 1024 * 1024
    with pytest.raises(ExtractionError, match="zip bomb"):
        _extract(path)


def test_pdf_text_scanned_and_encrypted(tmp_path):
    text = _extract(
        make_pdf(tmp_path / "a.pdf", ["Solar power converts sunlight.", "Second line here."])
    ).text
    assert "Solar power converts sunlight." in text
    with pytest.raises(ExtractionError, match="scanned pdf"):
        _extract(make_scanned_pdf(tmp_path / "scan.pdf"))
    with pytest.raises(ExtractionError, match="password-protected pdf"):
        _extract(make_pdf(tmp_path / "locked.pdf", ["secret"], encrypt_with="pw"))


def test_html(tmp_path):
    path = tmp_path / "a.html"
    path.write_text(
        "<html><head><title>T</title><script>var x=1;</script></head><body><h1>Energy</h1>"
        "<p>Solar panels make power.</p><h2>Storage</h2><p>Batteries keep it.</p></body></html>"
    )
    document = _extract(path)
    assert [s.heading for s in document.sections] == ["Energy", "Energy > Storage"]
    assert "var x" not in document.text


def test_legacy_doc_without_converter_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda _name: None)
    path = tmp_path / "old.doc"
    path.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 600)
    with pytest.raises(ExtractionError, match="antiword"):
        _extract(path)


def test_read_checked_refuses_size_directories_and_fifos(tmp_path):
    import os

    big = tmp_path / "big.txt"
    big.write_bytes(b"a" * 2000)
    with pytest.raises(ExtractionError, match="max_file_mb"):
        read_checked(big, 1000)
    folder = tmp_path / "folder.txt"
    folder.mkdir()
    with pytest.raises(ExtractionError, match="directory"):
        read_checked(folder, 1000)
    fifo = tmp_path / "x.txt"
    os.mkfifo(fifo)
    with pytest.raises(ExtractionError, match="not a regular file"):
        read_checked(fifo, 1000)
    with pytest.raises(ExtractionError, match="disappeared"):
        read_checked(tmp_path / "gone.txt", 1000)


def test_markdown_headings_become_context():
    sections = sections_from_markdown(
        "# Guide\n\nIntro text.\n\n## Install\n\nRun make.\n\n```\n# not a heading\n```\n"
        "### Linux\n\nUse apt.\n"
    )
    assert [(s.heading, s.text.splitlines()[0]) for s in sections] == [
        ("Guide", "Intro text."),
        ("Guide > Install", "Run make."),
        ("Guide > Install > Linux", "Use apt."),
    ]
    assert "# not a heading" in sections[1].text


def test_undecodable_bytes():
    with pytest.raises(ExtractionError):
        decode_text(bytes([0x80, 0x81, 0xFE, 0xFF, 0x00, 0x01, 0x02]) * 50)


@pytest.fixture(scope="module")
def counter(tiny_embedder):
    return TokenCounter(load_tokenizer(tiny_embedder))


def test_chinese_sentences_end_on_boundaries(counter):
    text = CHINESE * 6
    chunks = chunk_sections([Section("", text)], counter.count, counter.split, 40, 8)
    assert len(chunks) > 2
    for chunk in chunks:
        assert chunk.text[-1] in "。！？；…", chunk.text
        assert counter.count(chunk.text) <= 40


def test_sentence_splitting_both_languages():
    assert split_sentences("First one. Second one! Third?") == ["First one.", "Second one!", "Third?"]
    assert split_sentences("你好。今天好吗？很好！") == ["你好。", "今天好吗？", "很好！"]
    assert split_sentences("Version 2.5 is out. Yes.") == ["Version 2.5 is out.", "Yes."]


def test_chunks_overlap_fit_and_are_deterministic(counter):
    # words of the tiny vocabulary: a sentence is ~8 tokens, so a 16-token overlap carries one forward
    text = " ".join(f"The river {i} is in the city." for i in range(40))
    first = chunk_sections([Section("H", text)], counter.count, counter.split, 48, 16)
    second = chunk_sections([Section("H", text)], counter.count, counter.split, 48, 16)
    assert first == second
    assert all(counter.count(c.text) <= 48 and c.text.strip() and c.heading == "H" for c in first)
    tail = first[0].text.split(". ")[-1]
    assert tail.rstrip(".") in first[1].text  # overlap carries the last sentence forward


def test_overlong_sentence_is_split_not_dropped(counter):
    sentence = "word " * 300
    chunks = chunk_sections([Section("", sentence)], counter.count, counter.split, 32, 4)
    assert len(chunks) >= 9
    assert sum(c.text.count("word") for c in chunks) == 300


def test_batched_token_counts_give_the_same_chunks(counter):
    sections = [Section("h", (CHINESE + " The river city has a long history. ") * 8), Section("", "Short.")]
    one_by_one = chunk_sections(sections, counter.count, counter.split, 40, 8)
    batched = chunk_sections(sections, counter.count, counter.split, 40, 8, count_many=counter.count_many)
    assert one_by_one == batched and len(batched) > 2
    texts = ["river", "城市的历史很长。", ""]
    assert counter.count_many(texts) == [counter.count(t) for t in texts]


WORD_COUNT_CASES = [
    "The river city has a long history.",
    "Version 2.5 (beta) costs $3,000 -- see https://example.org/a_b?c=d&e=f#g.",
    "UPPER lower MiXeD snake_case camelCase don't it's",
    "tabs\tand\nnewlines\r\nand  double  spaces",
    "x" * 150 + " too long for one WordPiece word",
    "unknownzzqqxx words hyphen-ated e.g. i.e. etc...",
    "a literal [MASK] and [cls] and [SEP] token",
    "control\x0cjoined\x07words and DEL\x7fhere",
    "naïve café résumé",
    "城市的历史很长。 mixed English",
    "他说：“你好！”（测试）《书》【注】「引」『号』、…—·",
    "mixed 中文 and English 123, 第3章",
    "ＡＢＣ fullwidth letters ０１２",
    "〇々 and 한국어 and Ελληνικά",
    "中文\x0c控制",
    "",
    "   ",
    "!!!???...,,,;;;:::",
]


@pytest.mark.parametrize("which", ["tiny", "packaged"])
def test_word_counts_equal_whole_sentence_counts(tiny_embedder, which):
    """The per-word path must give the tokenizer's own count for every sentence it accepts, and send every
    sentence it cannot count exactly to the tokenizer."""
    from stages.models import resolve_model_path

    path = tiny_embedder if which == "tiny" else resolve_model_path("packaged:all-MiniLM-L6-v2")
    counter = TokenCounter(load_tokenizer(path))
    assert counter._rule is not None  # both are BERT WordPiece tokenizers
    texts = WORD_COUNT_CASES + split_sentences(ENGLISH * 3) + split_sentences(CHINESE)
    expected = [counter.count(t) for t in texts]
    assert counter.count_many(texts) == expected
    assert counter.count_many(texts) == expected  # from the word cache
    small = TokenCounter(load_tokenizer(path), word_cache_size=5)
    assert small.count_many(texts) == expected
    small.count_many(["eight nine"])  # over the bound: the cache restarts with this batch's words
    assert set(small._word_counts) == {"eight", "nine"}
    assert counter._split_words("control\x0cjoined") is None and counter._split_words("naïve") is None
    assert counter._split_words("a literal [MASK] token") is None
    assert counter._split_words("ＡＢＣ") is None and counter._split_words("城市，历史。") == list(
        "城市，历史。"
    )


def test_other_tokenizers_are_counted_whole():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "river": 1, "city": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    counter = TokenCounter(tokenizer)
    assert counter._rule is None
    texts = ["river city", "the river, the city.", ""]
    assert counter.count_many(texts) == [counter.count(t) for t in texts] == [2, 6, 0]


def test_docx_style_table_names_paragraphs_as_python_docx_does(tmp_path):
    import io

    import docx

    from stages.extract import _docx_style_names, extract_docx

    document = docx.Document()
    document.add_heading("Manual", 0)
    document.add_heading("Install", 1)
    document.add_paragraph("Run the installer.", style="List Bullet")
    document.add_paragraph("Plain body text.")
    document.add_heading("Offline", 3)
    document.add_paragraph("Quoted.", style="Intense Quote")
    buffer = io.BytesIO()
    document.save(buffer)
    reopened = docx.Document(io.BytesIO(buffer.getvalue()))
    name = _docx_style_names(reopened)
    assert [name(p) for p in reopened.paragraphs] == [p.style.name for p in reopened.paragraphs]
    sections = extract_docx(buffer.getvalue()).sections
    assert [s.heading for s in sections] == [
        "Install",
        "Install > Offline",
    ]  # Title and Heading 1 share level 1
