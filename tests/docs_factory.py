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


ENGLISH = ("Solar power converts sunlight into electricity. Panels on the roof feed the city grid. "
           "Batteries store energy for the night. The river powers a water system too.")
CHINESE = ("机器学习是人工智能的一个分支。它使计算机能够从数据中学习！深度神经网络效果很好？"
           "北京和上海是中国的城市；河流的历史很长…音乐也是文化的一部分。")
