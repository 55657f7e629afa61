"""Chunk embeddings cached per (model key, chunk hash), so the model in service is not re-encoded for
every filter pass or round. One folder per model key holding one file, `cache.npz` (keys and vectors
together), replaced atomically: a reader never pairs the keys of one save with the vectors of another,
which two files replaced one after the other allowed while several processes saved. A save merges
what other processes saved meanwhile (under a file lock), so no process drops another's work."""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

CACHE_FILE = "cache.npz"


def cache_folder(root: Path, model_key: str) -> Path:
    """The folder a model's cache lives in under `root`."""
    return Path(root) / "embeddings" / hashlib.sha256(model_key.encode()).hexdigest()[:16]


class EmbeddingCache:
    def __init__(self, root: Path | None, model_key: str) -> None:
        self.model_key = model_key
        self.folder = None
        if root is not None:
            self.folder = cache_folder(root, model_key)
        self._vectors: dict[str, np.ndarray] = {}
        self._dirty = False
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        if self.folder is not None:
            self._vectors = self._read()

    def _read(self) -> dict[str, np.ndarray]:
        assert self.folder is not None
        try:
            with np.load(self.folder / CACHE_FILE) as data:
                keys, matrix = data["keys"], data["vectors"]
                if len(keys) == len(matrix):
                    return dict(zip((str(k) for k in keys), matrix, strict=True))
                return {}
        except FileNotFoundError:
            return self._read_legacy()
        except (OSError, ValueError, KeyError):
            return {}  # a damaged cache is rebuilt, never trusted

    def _read_legacy(self) -> dict[str, np.ndarray]:
        """The two-file form of earlier versions, when its halves agree in length (kept so an upgrade
        does not re-encode every chunk; the next save replaces it)."""
        assert self.folder is not None
        try:
            keys = (self.folder / "keys.txt").read_text().split()
            matrix = np.load(self.folder / "vectors.npy")
        except (OSError, ValueError):
            return {}
        return dict(zip(keys, matrix, strict=True)) if len(keys) == len(matrix) else {}

    def count_missing(self, keys: Sequence[str]) -> int:
        """How many of `keys` have no vector here (nothing is encoded)."""
        with self._lock:
            return sum(1 for key in keys if key not in self._vectors)

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
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "cache.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            on_disk = self._read()
            with self._lock:
                for key, vector in on_disk.items():
                    self._vectors.setdefault(key, vector)
                keys = list(self._vectors)
                matrix = np.stack([self._vectors[k] for k in keys]) if keys else np.zeros((0, 0), np.float32)
                self._dirty = False
            partial = self.folder / f"cache.{os.getpid()}.partial.npz"
            np.savez(partial, keys=np.asarray(keys, dtype=str), vectors=matrix)
            os.replace(partial, self.folder / CACHE_FILE)
            for legacy in ("keys.txt", "vectors.npy"):
                (self.folder / legacy).unlink(missing_ok=True)


def text_key(text: str) -> str:
    """Cache key of a passage: the hash of exactly the text that is encoded."""
    return hashlib.sha256(text.encode()).hexdigest()
