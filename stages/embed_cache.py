"""Chunk embeddings cached per (model key, chunk hash), so the model in service is not re-encoded for
every filter pass or round. One folder per model key; written atomically (temp file + os.replace)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np


class EmbeddingCache:
    def __init__(self, root: Path | None, model_key: str) -> None:
        self.model_key = model_key
        self.folder = None
        if root is not None:
            digest = hashlib.sha256(model_key.encode()).hexdigest()[:16]
            self.folder = Path(root) / "embeddings" / digest
        self._vectors: dict[str, np.ndarray] = {}
        self._dirty = False
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        if self.folder is None:
            return
        keys_file, data_file = self.folder / "keys.txt", self.folder / "vectors.npy"
        if not (keys_file.exists() and data_file.exists()):
            return
        try:
            keys = keys_file.read_text().split()
            matrix = np.load(data_file)
        except (OSError, ValueError):
            return  # a damaged cache is rebuilt, never trusted
        if len(keys) == len(matrix):
            self._vectors = dict(zip(keys, matrix, strict=True))

    def get_many(
        self, keys: Sequence[str], texts: Sequence[str], encode: Callable[[list[str]], np.ndarray]
    ) -> np.ndarray:
        """Vectors for `keys` (chunk hashes), encoding only the missing texts."""
        with self._lock:
            missing = [i for i, key in enumerate(keys) if key not in self._vectors]
        if missing:
            unique: dict[str, str] = {}
            for i in missing:
                unique.setdefault(keys[i], texts[i])
            vectors = encode(list(unique.values()))
            with self._lock:
                for key, vector in zip(unique, vectors, strict=True):
                    self._vectors[key] = np.asarray(vector, dtype=np.float32)
                self._dirty = True
        with self._lock:
            return np.stack([self._vectors[key] for key in keys]) if keys else np.zeros((0, 0), np.float32)

    def save(self) -> None:
        if self.folder is None or not self._dirty:
            return
        with self._lock:
            keys = list(self._vectors)
            matrix = np.stack([self._vectors[k] for k in keys]) if keys else np.zeros((0, 0), np.float32)
            self._dirty = False
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp_keys = self.folder / f"keys.{os.getpid()}.tmp"
        tmp_data = self.folder / f"vectors.{os.getpid()}.tmp.npy"
        tmp_keys.write_text("\n".join(keys))
        np.save(tmp_data, matrix)
        os.replace(tmp_data, self.folder / "vectors.npy")
        os.replace(tmp_keys, self.folder / "keys.txt")


def text_key(text: str) -> str:
    """Cache key of a passage: the hash of exactly the text that is encoded."""
    return hashlib.sha256(text.encode()).hexdigest()


def model_key(path: Path | str) -> str:
    """Identity of a model's weights: its folder plus the weight file's size and mtime."""
    folder = Path(path).resolve()
    for name in ("model.safetensors", "pytorch_model.bin"):
        weights = folder / name
        if weights.exists():
            info = weights.stat()
            return f"{folder}:{info.st_size}:{int(info.st_mtime)}"
    return str(folder)
