"""Real documents of every supported kind, built at test time."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path


def make_docx(path: Path, title: str, paragraphs: list[str]) -> Path:
    import docx

    document = docx.Document()
    document.add_heading(title, level=1)
    for paragraph in paragraphs:
        document.add_paragraph(paragraph)
    document.save(str(path))
    return path


def make_pdf(path: Path, lines: list[str], encrypt_with: str | None = None) -> Path:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=A4)
    y = 800
    for line in lines:
        pdf.drawString(50, y, line)
        y -= 20
    pdf.save()
    data = buffer.getvalue()
    if encrypt_with:
        from pypdf import PdfReader, PdfWriter

        writer = PdfWriter()
        for page in PdfReader(io.BytesIO(data)).pages:
            writer.add_page(page)
        writer.encrypt(encrypt_with)
        out = io.BytesIO()
        writer.write(out)
        data = out.getvalue()
    path.write_bytes(data)
    return path


def make_scanned_pdf(path: Path) -> Path:
    """A page with only drawings: what a scan without OCR looks like to a text extractor."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    pdf = canvas.Canvas(str(path), pagesize=A4)
    pdf.rect(50, 50, 400, 600, fill=1)
    pdf.save()
    return path


def make_zip_bomb(path: Path, megabytes: int = 700) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        chunk = b"\0" * (1024 * 1024)
        with archive.open("word/document.xml", "w", force_zip64=True) as handle:
            for _ in range(megabytes):
                handle.write(chunk)
    return path


ENGLISH = (
    "Solar power converts sunlight into electricity. Panels on the roof feed the city grid. "
    "Batteries store energy for the night. The river powers a water system too."
)
CHINESE = (
    "机器学习是人工智能的一个分支。它使计算机能够从数据中学习！深度神经网络效果很好？"
    "北京和上海是中国的城市；河流的历史很长…音乐也是文化的一部分。"
)


EN_WORDS = (
    "river city music history solar energy water system database server network model search "
    "document training data learning language engine storage battery panel grid"
).split()
ZH_SENTENCES = [
    "机器学习是人工智能的一个分支。",
    "它使计算机能够从数据中学习！",
    "深度神经网络效果很好。",
    "北京和上海是中国的大城市。",
    "河流的历史很长。",
    "太阳能可以转化为电能；",
    "数据库服务器存储文件。",
]


def english_text(rng, sentences: int) -> str:
    return " ".join(
        " ".join(rng.choice(EN_WORDS) for _ in range(rng.randint(6, 16))).capitalize() + "."
        for _ in range(sentences)
    )


def chinese_text(rng, sentences: int) -> str:
    return "".join(rng.choice(ZH_SENTENCES) for _ in range(sentences))


def generate_corpus(
    folder: Path,
    count: int,
    seed: int = 0,
    kinds: tuple[str, ...] = ("txt", "md", "docx", "html"),
    sentences: tuple[int, int] = (10, 60),
) -> list[Path]:
    """A mixed Chinese/English corpus; every third file is Chinese (some in GB18030)."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        zh = i % 3 == 0
        body = (
            chinese_text(rng, rng.randint(*sentences)) if zh else english_text(rng, rng.randint(*sentences))
        )
        if kind == "txt":
            path = folder / f"doc{i}.txt"
            path.write_bytes(body.encode("gb18030" if zh and i % 2 else "utf-8"))
        elif kind == "md":
            path = folder / f"doc{i}.md"
            path.write_text(f"# Title {i}\n\n{body}\n\n## Part two\n\n{body[: len(body) // 2]}\n")
        elif kind == "docx":
            path = make_docx(
                folder / f"doc{i}.docx", f"Report {i}", [body[: len(body) // 2], body[len(body) // 2 :]]
            )
        elif kind == "pdf":
            words = body.split() if not zh else [body]
            lines = (
                [" ".join(words[j : j + 12]) for j in range(0, min(len(words), 240), 12)]
                if not zh
                else [english_text(rng, 1) for _ in range(8)]
            )
            path = make_pdf(folder / f"doc{i}.pdf", lines)
        else:
            path = folder / f"doc{i}.html"
            path.write_text(f"<html><body><h1>Page {i}</h1><p>{body}</p></body></html>")
        paths.append(path)
    return paths
