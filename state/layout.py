"""The folder layout under `paths.state_dir`, in one place: every module asks here for its paths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StateLayout:
    root: Path

    @property
    def database(self) -> Path:
        return self.root / "embedtune.db"

    @property
    def lock_file(self) -> Path:
        return self.root / "embedtune.lock"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def versions(self) -> Path:
        return self.models / "versions"

    @property
    def exports(self) -> Path:
        """ONNX exports of model versions (stages/onnx_export.py), one folder per model folder."""
        return self.models / "exports"

    @property
    def current(self) -> Path:
        return self.models / "current"

    @property
    def rounds(self) -> Path:
        return self.root / "rounds"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def index_stats(self) -> Path:
        """Per-collection vector statistics hybrid queries normalise with (stages/fusion.py)."""
        return self.root / "index" / "stats"

    def round_dir(self, round_id: int) -> Path:
        return self.rounds / str(round_id)

    def ensure(self) -> StateLayout:
        for folder in (self.root, self.versions, self.rounds, self.cache):
            folder.mkdir(parents=True, exist_ok=True)
        return self
