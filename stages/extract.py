"""Turn a file into text sections (heading, body). Every refusal is an ExtractionError with a reason a
person can act on; nothing here touches the database."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import unicodedata
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".docx", ".doc", ".pdf", ".html", ".htm"}
ZIP_RATIO_LIMIT = 100  # uncompressed/compressed; real docx files stay far below
ZIP_SIZE_LIMIT = 512 * 1024 * 1024


class ExtractionError(Exception):
    """The file cannot be used; str(error) is the one-line reason shown in `status`."""


@dataclass(frozen=True)
class Section:
    heading: str
    text: str


@dataclass
class ExtractedDocument:
    sections: list[Section] = field(default_factory=list)
    title: str = ""
    encoding: str = ""

    @property
    def text(self) -> str:
        return "\n\n".join(section.text for section in self.sections)


def read_checked(path: Path, max_bytes: int) -> bytes:
    """Read a regular file whole, refusing what is not one or is too large."""
    try:
        info = path.stat()
    except FileNotFoundError as exc:
        raise ExtractionError("file disappeared before it could be read") from exc
    except PermissionError as exc:
        raise ExtractionError("permission denied") from exc
    if stat.S_ISDIR(info.st_mode):
        raise ExtractionError("is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise ExtractionError("not a regular file (fifo, socket or device)")
    if info.st_size > max_bytes:
        raise ExtractionError(
            f"file is {info.st_size / 1e6:.1f} MB, over ingest.max_file_mb ({max_bytes / 1e6:.1f} MB)"
        )
    if info.st_size == 0:
        raise ExtractionError("empty file")
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise ExtractionError("file disappeared before it could be read") from exc
    except PermissionError as exc:
        raise ExtractionError("permission denied") from exc
    except OSError as exc:
        raise ExtractionError(f"read error: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise ExtractionError("file grew over ingest.max_file_mb while being read")
    return data


# --- text decoding ---------------------------------------------------------------------------------
_BOMS = [
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
]


def _control_ratio(text: str) -> float:
    if not text:
        return 1.0
    # Classify each distinct character once (Counter counts in C): a document repeats a small alphabet.
    bad = sum(
        count
        for ch, count in Counter(text).items()
        if (unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn") and ch not in "\n\r\t\f") or ch == "\ufffd"
    )
    return bad / len(text)


def decode_text(data: bytes) -> tuple[str, str]:
    """Decode text bytes: BOMs, UTF-8, then charset-normalizer (GB2312/GBK/GB18030, Big5, UTF-16...)."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                text = data.decode(encoding, errors="strict")
            except UnicodeDecodeError as exc:
                raise ExtractionError(
                    f"undecodable text: invalid {encoding} after its byte-order mark"
                ) from exc
            return _checked_text(text), encoding
    try:
        return _checked_text(data.decode("utf-8")), "utf-8"
    except UnicodeDecodeError:
        pass
    if b"\x00" in data[:4096] and not _looks_utf16(data):
        raise ExtractionError("binary content in a text file (NUL bytes)")
    from charset_normalizer import from_bytes

    best = from_bytes(data, cp_isolation=None).best()
    if best is None:
        raise ExtractionError("undecodable text: no text encoding fits (not UTF-8, UTF-16, GBK or Big5)")
    text = str(best)
    encoding = best.encoding
    # charset-normalizer can prefer a narrower Chinese code page; GB18030 is a superset of GB2312/GBK.
    if encoding in ("gb2312", "gbk"):
        try:
            text, encoding = data.decode("gb18030"), "gb18030"
        except UnicodeDecodeError:
            pass
    return _checked_text(text), encoding


def _looks_utf16(data: bytes) -> bool:
    sample = data[:4096]
    even_zeros = sample[0::2].count(0)
    odd_zeros = sample[1::2].count(0)
    half = max(1, len(sample) // 2)
    return (odd_zeros / half > 0.3) != (even_zeros / half > 0.3)


def _checked_text(text: str) -> str:
    if "\x00" in text:
        raise ExtractionError("binary content in a text file (NUL bytes)")
    if _control_ratio(text[:20000]) > 0.05:
        raise ExtractionError("undecodable text: mostly control or invalid characters (binary junk?)")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise ExtractionError("no text: the file holds only whitespace")
    return text


# --- formats ---------------------------------------------------------------------------------------
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_MD_FENCE = re.compile(r"^(```|~~~)")


def sections_from_markdown(text: str) -> list[Section]:
    """Split on ATX headings; each section carries the heading path (H1 > H2 > ...) as context."""
    sections: list[Section] = []
    path: list[tuple[int, str]] = []
    body: list[str] = []
    in_fence = False

    def flush() -> None:
        content = "\n".join(body).strip()
        if content:
            sections.append(Section(" > ".join(title for _level, title in path), content))
        body.clear()

    for line in text.split("\n"):
        if _MD_FENCE.match(line.strip()):
            in_fence = not in_fence
        match = None if in_fence else _MD_HEADING.match(line)
        if match:
            flush()
            level = len(match.group(1))
            path[:] = [(lvl, title) for lvl, title in path if lvl < level]
            path.append((level, match.group(2).strip()))
        else:
            body.append(line)
    flush()
    if not sections and path:
        sections.append(Section(" > ".join(t for _l, t in path[:-1]), path[-1][1]))
    return sections


def sections_from_plain(text: str) -> list[Section]:
    return [Section("", text.strip())]


def _check_zip(data: bytes, label: str) -> zipfile.ZipFile:
    import io

    if data[:8] == b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1":
        raise ExtractionError(f"password-protected or encrypted {label} (an OLE container, not a zip)")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise ExtractionError(f"corrupt {label}: not a valid zip container") from exc
    total = sum(item.file_size for item in archive.infolist())
    if total > ZIP_SIZE_LIMIT or total > ZIP_RATIO_LIMIT * max(1, len(data)):
        raise ExtractionError(
            f"{label} would decompress to {total / 1e6:.0f} MB from {len(data) / 1e6:.1f} MB (zip bomb?)"
        )
    return archive


def extract_docx(data: bytes) -> ExtractedDocument:
    import io

    import docx

    archive = _check_zip(data, "docx")
    if "word/document.xml" not in archive.namelist():
        raise ExtractionError("corrupt docx: word/document.xml is missing")
    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as exc:  # python-docx raises many types for broken packages
        raise ExtractionError(f"corrupt docx: {type(exc).__name__}") from exc
    sections: list[Section] = []
    path: list[tuple[int, str]] = []
    body: list[str] = []
    title = document.core_properties.title or ""
    style_name = _docx_style_names(document)

    def flush() -> None:
        content = "\n".join(body).strip()
        if content:
            sections.append(Section(" > ".join(t for _l, t in path), content))
        body.clear()

    for paragraph in document.paragraphs:
        text = paragraph.text.strip()
        if not text:
            continue
        level = _docx_heading_level(style_name(paragraph))
        if level:
            flush()
            path[:] = [(lvl, t) for lvl, t in path if lvl < level]
            path.append((level, text))
        else:
            body.append(text)
    for table in document.tables:
        for row in table.rows:
            cells = [cell.text.strip() for cell in row.cells if cell.text.strip()]
            if cells:
                body.append(" | ".join(cells))
    flush()
    if not sections:
        raise ExtractionError("no text in docx")
    return ExtractedDocument(sections, title=title)


def _docx_style_names(document) -> Callable[[object], str]:
    """Paragraph -> style name, looked up once per style id. `paragraph.style` searches the styles part
    on every call (~1 ms per paragraph, most of a docx's extraction time); this makes the same lookup
    (`part.get_style` with the paragraph's pStyle id, the default style for none or an unknown id) once
    per distinct id in the document."""
    from docx.enum.style import WD_STYLE_TYPE

    names: dict[str | None, str] = {}

    def name(paragraph) -> str:
        style_id = paragraph._p.style  # the w:pStyle value, None when the paragraph names none
        if style_id not in names:
            style = document.part.get_style(style_id, WD_STYLE_TYPE.PARAGRAPH)
            names[style_id] = (style.name or "") if style is not None else ""
        return names[style_id]

    return name


def _docx_heading_level(style: str) -> int:
    if style == "Title":
        return 1
    match = re.match(r"Heading (\d)", style)
    return int(match.group(1)) if match else 0


def extract_pdf(data: bytes) -> ExtractedDocument:
    import io
    import logging

    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    logging.getLogger("pypdf").setLevel(logging.ERROR)
    if not data.lstrip()[:5].startswith(b"%PDF"):
        raise ExtractionError("corrupt pdf: no %PDF header")
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            try:
                if not reader.decrypt(""):
                    raise ExtractionError("password-protected pdf")
            except ExtractionError:
                raise
            except Exception as exc:
                raise ExtractionError("password-protected pdf") from exc
        pages = [page.extract_text() or "" for page in reader.pages]
    except ExtractionError:
        raise
    except (PdfReadError, Exception) as exc:
        raise ExtractionError(f"corrupt pdf: {type(exc).__name__}") from exc
    text = "\n\n".join(page.strip() for page in pages if page.strip())
    if not text.strip():
        raise ExtractionError(
            f"scanned pdf: {len(pages)} page(s) with no text layer (run OCR, e.g. ocrmypdf, first)"
        )
    title = ""
    try:
        title = str((reader.metadata or {}).get("/Title") or "")
    except Exception:
        title = ""
    return ExtractedDocument([Section(title, _checked_text(text))], title=title)


def extract_html(data: bytes) -> ExtractedDocument:
    from bs4 import BeautifulSoup

    text, encoding = decode_text(data)
    soup = BeautifulSoup(text, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "head"]):
        if tag.name == "head":
            continue
        tag.decompose()
    title = soup.title.get_text(strip=True) if soup.title else ""
    sections: list[Section] = []
    path: list[tuple[int, str]] = []
    body: list[str] = []

    def flush() -> None:
        content = "\n".join(body).strip()
        if content:
            sections.append(Section(" > ".join(t for _l, t in path) or title, content))
        body.clear()

    root = soup.body or soup
    for element in root.find_all(
        ["h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "pre", "td", "blockquote", "dd", "dt", "figcaption"]
    ):
        content = element.get_text(" ", strip=True)
        if not content:
            continue
        if element.name.startswith("h") and len(element.name) == 2:
            flush()
            level = int(element.name[1])
            path[:] = [(lvl, t) for lvl, t in path if lvl < level]
            path.append((level, content))
        elif not element.find_parent(["p", "li", "td", "blockquote", "dd"]):
            body.append(content)
    flush()
    if not sections:
        plain = root.get_text("\n", strip=True)
        if not plain.strip():
            raise ExtractionError("no text in html")
        sections = [Section(title, plain)]
    return ExtractedDocument(sections, title=title, encoding=encoding)


def doc_converter() -> list[str] | None:
    """The command that turns legacy .doc into text on this machine, if any is installed."""
    if shutil.which("antiword"):
        return ["antiword", "-w", "0"]
    if shutil.which("catdoc"):
        return ["catdoc", "-w"]
    for office in ("soffice", "libreoffice"):
        if shutil.which(office):
            return [office]
    return None


def extract_doc(path: Path, data: bytes, timeout: float = 120.0) -> ExtractedDocument:
    if not data.startswith(b"\xd0\xcf\x11\xe0"):
        raise ExtractionError("corrupt doc: not an OLE2 Word file")
    command = doc_converter()
    if command is None:
        raise ExtractionError(
            "legacy .doc needs a converter: install antiword (apt-get install antiword) or LibreOffice"
        )
    import tempfile

    try:
        if command[0] in ("soffice", "libreoffice"):
            with tempfile.TemporaryDirectory() as out:
                subprocess.run(
                    [*command, "--headless", "--convert-to", "txt:Text", "--outdir", out, str(path)],
                    check=True,
                    capture_output=True,
                    timeout=timeout,
                )
                produced = list(Path(out).glob("*.txt"))
                if not produced:
                    raise ExtractionError("LibreOffice could not convert this .doc")
                text, _enc = decode_text(produced[0].read_bytes())
        else:
            result = subprocess.run([*command, str(path)], check=True, capture_output=True, timeout=timeout)
            text, _enc = decode_text(result.stdout)
    except subprocess.CalledProcessError as exc:
        message = (exc.stderr or b"").decode("utf-8", "replace").strip().splitlines()
        reason = message[-1] if message else f"exit {exc.returncode}"
        if "password" in reason.lower() or "encrypt" in reason.lower():
            raise ExtractionError("password-protected doc") from exc
        raise ExtractionError(f"corrupt doc: {command[0]} failed ({reason[:120]})") from exc
    except subprocess.TimeoutExpired as exc:
        raise ExtractionError(f"{command[0]} timed out converting this .doc") from exc
    return ExtractedDocument(sections_from_plain(text))


def extract(path: Path, data: bytes) -> ExtractedDocument:
    """Dispatch on the suffix; `data` is the file's bytes as hashed (so what is hashed is what is read)."""
    suffix = path.suffix.lower()
    if suffix in (".md", ".markdown"):
        text, encoding = decode_text(data)
        sections = sections_from_markdown(text)
        if not sections:
            raise ExtractionError("no text in markdown")
        return ExtractedDocument(sections, encoding=encoding)
    if suffix in (".txt", ".text"):
        text, encoding = decode_text(data)
        return ExtractedDocument(sections_from_plain(text), encoding=encoding)
    if suffix in (".html", ".htm"):
        return extract_html(data)
    if suffix == ".docx":
        return extract_docx(data)
    if suffix == ".pdf":
        return extract_pdf(data)
    if suffix == ".doc":
        return extract_doc(path, data)
    raise ExtractionError(f"unsupported file type {suffix or '(none)'}")
