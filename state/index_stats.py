"""Per-collection vector statistics (the chunk vectors' covariance), in one .npz file per collection under
<state_dir>/index/stats: hybrid queries scale the dense side by its spread over the corpus with it
(stages/fusion.py). A file, not a table: it is a 384x384 (up to 1024x1024) float matrix read whole."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class VectorStats:
    covariance: np.ndarray
    chunks: int  # how many active chunks the collection held when the sample was drawn


def stats_file(folder: Path, collection: str) -> Path:
    return folder / f"{collection}.npz"


def save_stats(folder: Path, collection: str, stats: VectorStats) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    folder.mkdir(parents=True, exist_ok=True)
    final = stats_file(folder, collection)
    partial = final.with_name(final.stem + ".partial.npz")
    np.savez(partial, covariance=stats.covariance, chunks=np.array(stats.chunks))
    os.replace(partial, final)


def load_stats(folder: Path, collection: str) -> VectorStats | None:
    try:
        with np.load(stats_file(folder, collection)) as data:
            return VectorStats(data["covariance"], int(data["chunks"]))
    except (OSError, KeyError, ValueError):
        return None


def drop_stats(folder: Path, collection: str) -> None:
    stats_file(folder, collection).unlink(missing_ok=True)
