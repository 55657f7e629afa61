"""Bad-input campaign: hostile files dropped at once beside good ones. Each bad file gets a reason in
`status`, memory stays bounded, the daemon stays up, and the good files are ingested."""

from __future__ import annotations

import json
import os

import pytest

from daemon.settings import load_settings
from tests.docs_factory import CHINESE, ENGLISH, generate_corpus, make_pdf, make_scanned_pdf, make_zip_bomb
from tests.reliability.harness import (
    DaemonProcess,
    campaign_scale,
    query,
    scalar,
    settled,
    wait,
    write_config,
)

SCALES = {"reduced": {"empty": 1000, "depth": 40}, "full": {"empty": 10_000, "depth": 200}}


def hostile_files(inbox, empty_count: int, depth: int) -> dict[str, str]:
    """Returns {relative path: expected fragment of the reason}."""
    expected: dict[str, str] = {}
    bad = inbox / "bad"
    bad.mkdir()

    def put(name: str, data: bytes, reason: str) -> None:
        (bad / name).write_bytes(data)
        expected[f"bad/{name}"] = reason

    put("empty.txt", b"", "empty")
    put("spaces.md", b"   \n\n  ", "whitespace")
    put("nul.txt", b"abc\x00def" * 200, "binary")
    put("random.txt", os.urandom(4096), "")
    put("png.md", b"\x89PNG\r\n\x1a\n" + os.urandom(2048), "")
    put("elf.html", b"\x7fELF\x02\x01\x01" + b"\x00" * 4000, "binary")
    put("broken.docx", b"PK\x03\x04garbage", "corrupt docx")
    put("ole.docx", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 2048, "password-protected")
    put("nozip.docx", b"this is not a zip", "corrupt docx")
    put("broken.pdf", b"%PDF-1.7\n1 0 obj garbage", "corrupt pdf")
    put("fake.pdf", b"plain text pretending", "corrupt pdf")
    put("old.doc", b"not an OLE file at all", "corrupt doc")
    put("noext", b"hello", "unsupported")
    put("image.png", b"\x89PNG", "unsupported")
    put("archive.zip", b"PK\x05\x06" + b"\x00" * 18, "unsupported")
    put("utf16-junk.txt", b"\xff\xfe" + os.urandom(1000), "")
    make_zip_bomb(bad / "bomb1.docx", megabytes=300)
    expected["bad/bomb1.docx"] = "zip bomb"
    make_zip_bomb(bad / "bomb2.docx", megabytes=600)
    expected["bad/bomb2.docx"] = "zip bomb"
    make_scanned_pdf(bad / "scan.pdf")
    expected["bad/scan.pdf"] = "scanned pdf"
    make_pdf(bad / "locked.pdf", ["secret"], encrypt_with="pw")
    expected["bad/locked.pdf"] = "password-protected pdf"
    with open(bad / "sparse.txt", "wb") as handle:  # 1 GB, no blocks on disk
        handle.truncate(1024**3)
    expected["bad/sparse.txt"] = "max_file_mb"
    os.mkfifo(bad / "x.txt")
    expected["bad/x.txt"] = "not a regular file"
    os.mkfifo(bad / "y.md")
    expected["bad/y.md"] = "not a regular file"
    (bad / "folder.txt").mkdir()
    expected["bad/folder.txt"] = "directory"
    (bad / "folder.pdf").mkdir()
    expected["bad/folder.pdf"] = "directory"
    with open(os.fsencode(str(bad)) + b"/latin1-\xe9t\xe9.txt", "wb") as handle:
        handle.write(ENGLISH.encode())
    expected["bad/latin1-\\xe9t\\xe9.txt"] = "UTF-8"
    os.symlink("/etc/passwd", bad / "outside.txt")  # ignored: points outside the inbox
    put("gbk-as-big5.txt", "機器學習是人工智慧的一個分支。".encode("big5"), "")  # decodable: not hostile
    expected.pop("bad/gbk-as-big5.txt")
    put("control.txt", bytes(range(1, 32)) * 200, "undecodable")
    put("huge-line.txt", b"x" * (2 * 1024 * 1024), "max_file_mb")
    deep = inbox / "deep"
    path = deep
    for level in range(depth):
        path = path / f"d{level}"
    path.mkdir(parents=True)
    (path / "bottom.txt").write_text("Deep file. " + ENGLISH)
    empties = inbox / "empties"
    empties.mkdir()
    for i in range(empty_count):
        (empties / f"e{i}.txt").touch()
    return expected


@pytest.mark.parametrize("scale", [pytest.param("reduced"), pytest.param("full", marks=pytest.mark.slow)])
def test_bad_input_campaign(tmp_path, tiny_embedder, scale):
    if scale == "full" and campaign_scale() != "full":
        pytest.skip("full campaign: EMBEDTUNE_CAMPAIGN=full")
    sizes = SCALES[scale]
    config = write_config(
        tmp_path / "c.toml",
        tmp_path,
        tiny_embedder,
        extra={"ingest": {"max_file_mb": 1.0, "workers": 2}, "training": {"min_new_samples": 10**6}},
    )
    settings = load_settings(config, env=False)
    inbox, state = settings.paths.inbox, settings.paths.state_dir
    staging = tmp_path / "drop"
    staging.mkdir()
    expected = hostile_files(staging, sizes["empty"], sizes["depth"])
    good = generate_corpus(staging / "good", 20, sentences=(4, 12))
    (staging / "good" / "zh.txt").write_text(CHINESE)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    wait(
        lambda: scalar(state, "SELECT activity FROM daemon") not in (None, "starting", "stopped"),
        timeout=60,
        message="daemon up",
    )
    for entry in staging.iterdir():  # dropped at once
        os.rename(entry, inbox / entry.name)
    total_expected = len(expected) + sizes["empty"] + len(good) + 2
    wait(
        lambda: (
            (scalar(state, "SELECT COUNT(*) FROM documents WHERE status IN ('ingested','rejected')") or 0)
            >= total_expected - 1
            and settled(state)
        ),
        timeout=900,
        message="every file decided",
    )
    assert daemon.alive()
    peak = daemon.peak_rss_mb()
    reasons = {
        row["path"][len(str(inbox)) + 1 :]: row["error"]
        for row in query(state, "SELECT path, error FROM documents WHERE status='rejected'")
    }
    for name, fragment in expected.items():
        assert name in reasons, f"{name} has no rejection"
        assert fragment in reasons[name], (name, reasons[name])
    assert sum(1 for name in reasons if name.startswith("empties/")) == sizes["empty"]
    ingested = {
        row[0][len(str(inbox)) + 1 :]
        for row in query(state, "SELECT path FROM documents WHERE status='ingested'")
    }
    assert {f"good/{p.name}" for p in good} <= ingested and "good/zh.txt" in ingested
    assert any(name.endswith("bottom.txt") for name in ingested)
    assert "bad/outside.txt" not in reasons and "bad/outside.txt" not in ingested
    assert peak < 2500, f"peak RSS {peak:.0f} MB"
    assert daemon.terminate() == 0
    hostile = len(expected) + sizes["empty"] + 2  # + the ignored symlink and deep nesting
    print(
        "BAD INPUT CAMPAIGN",
        json.dumps(
            {
                "scale": scale,
                "hostile_inputs": hostile,
                "named_cases": len(expected),
                "empty_files": sizes["empty"],
                "depth": sizes["depth"],
                "good_ingested": len(good) + 2,
                "peak_rss_mb": round(peak),
            }
        ),
    )
