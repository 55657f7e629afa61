"""Model registry: versions are immutable folders; `models/current` is a symlink swapped atomically.

Protocol (README, "Where the model in service lives"): copy into `versions/<id>.tmp`, fsync, rename to
`versions/<id>`; then every change of what serves (promotion, rollback) commits the database first, in one
transaction with whatever must go with it (a round's decision and its used pairs), and only then points a
fresh symlink at the model and `os.replace`s it over `current`. The database is the truth and the link
follows it: a crash between the two leaves the change recorded and the link one step behind, and
`reconcile()` at start-up moves the link to what the database says. (Swapping the link first could not be
undone safely: reconcile cannot tell a promotion that ran ahead from a rollback that did not finish.)

`models/current` always names the model in service: a promoted version (relative link, so the state
folder can move) or, before any promotion and after a rollback to it, the base model's folder (absolute
link, refreshed at every start so a changed `model.base` is followed). This module decides which
version serves (`current_model_row`, `ModelRegistry.current`); daemon/serving.py resolves everything
else about what is served from that answer and the settings, and every other module asks there.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from state.db import transaction, utcnow
from state.folders import fsync_dir, install_folder
from state.layout import StateLayout


class ServingChanged(Exception):
    """The model in service is not the one the caller judged against (a rollback or another promotion
    happened meanwhile); nothing was changed."""


class RegistryError(Exception):
    """A registry operation cannot be done (e.g. nothing to roll back to)."""


@dataclass(frozen=True)
class ModelRecord:
    id: int
    path: Path
    parent_id: int | None
    round_id: int | None
    metrics: dict[str, Any]
    promoted_at: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ModelRecord:
        return cls(
            id=row["id"],
            path=Path(row["path"]),
            parent_id=row["parent_id"],
            round_id=row["round_id"],
            metrics=json.loads(row["metrics"] or "{}"),
            promoted_at=row["promoted_at"],
        )


@dataclass(frozen=True)
class ServingModel:
    """The model in service: a promoted version, or the base model (`model_id` None)."""

    model_id: int | None
    path: Path

    @property
    def version(self) -> str:
        return f"v{self.model_id}" if self.model_id is not None else "base"


def current_model_row(conn: sqlite3.Connection) -> sqlite3.Row | None:
    """The `models` row of the promoted version in service (None: the base model serves)."""
    return conn.execute(
        "SELECT * FROM models WHERE promoted_at IS NOT NULL AND retired_at IS NULL "
        "ORDER BY promoted_at DESC, id DESC LIMIT 1"
    ).fetchone()


class ModelRegistry:
    def __init__(self, conn: sqlite3.Connection, layout: StateLayout) -> None:
        self.conn = conn
        self.layout = layout

    # --- writing versions -------------------------------------------------------------------------
    def register(
        self,
        source: Path,
        *,
        round_id: int | None = None,
        parent_id: int | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> ModelRecord:
        """Copy a finished model folder into `versions/<id>` (never modified afterwards)."""
        if not (source / "modules.json").exists() and not (source / "config.json").exists():
            raise RegistryError(f"{source} is not a model folder (no modules.json or config.json)")
        self.layout.versions.mkdir(parents=True, exist_ok=True)
        with transaction(self.conn):
            model_id = self.conn.execute(
                "INSERT INTO models (path, parent_id, round_id, created, metrics) VALUES (?, ?, ?, ?, ?) "
                "RETURNING id",
                ("", parent_id, round_id, utcnow(), json.dumps(metrics or {})),
            ).fetchone()[0]
            final = self.layout.versions / str(model_id)
            self.conn.execute("UPDATE models SET path=? WHERE id=?", (str(final), model_id))
        staging = final.with_name(f"{model_id}.tmp")
        try:
            if staging.exists():
                shutil.rmtree(staging)
            shutil.copytree(source, staging, symlinks=False)
            install_folder(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            with transaction(self.conn):
                self.conn.execute("DELETE FROM models WHERE id=?", (model_id,))
            raise
        return self.get(model_id)

    def discard(self, model_id: int) -> None:
        """Remove a version that never served (a round whose promotion was refused): its row, then its
        folder. A version that served once stays, for rollback and audit."""
        record = self.get(model_id)
        if record.promoted_at is not None:
            raise RegistryError(f"model {model_id} has served; versions that served are kept")
        with transaction(self.conn):
            self.conn.execute("DELETE FROM models WHERE id=? AND promoted_at IS NULL", (model_id,))
        shutil.rmtree(record.path, ignore_errors=True)

    def get(self, model_id: int) -> ModelRecord:
        row = self.conn.execute("SELECT * FROM models WHERE id=?", (model_id,)).fetchone()
        if row is None:
            raise RegistryError(f"no model with id {model_id}")
        return ModelRecord.from_row(row)

    def current(self) -> ModelRecord | None:
        """The model in service according to the database (None: the base model serves)."""
        row = current_model_row(self.conn)
        return ModelRecord.from_row(row) if row else None

    def never_served(self) -> list[int]:
        """Versions registered and never promoted (a trial's candidate, or what a kill left behind)."""
        return [row[0] for row in self.conn.execute("SELECT id FROM models WHERE promoted_at IS NULL")]

    def history(self) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM promotions ORDER BY id").fetchall()

    # --- serving ----------------------------------------------------------------------------------
    def promote(
        self,
        model_id: int,
        note: str = "",
        *,
        replacing: int | None | str = "any",
        with_serving: Callable[[], None] | None = None,
    ) -> ModelRecord:
        """Serve `model_id`. With `replacing` (a model id, or None for the base model), only if that is
        still the model in service: a round judged against one model must not undo a rollback that ran
        while it trained. `with_serving` writes, on this connection, what must commit with the serving
        row (a round's decision and its used pairs): a kill cannot leave one without the other. The check,
        the commit and the link swap hold the serving lock that rollback holds too."""
        record = self.get(model_id)
        if not record.path.is_dir():
            raise RegistryError(f"model {model_id} folder {record.path} is missing")
        with self._serving_lock():
            with transaction(self.conn):
                if replacing != "any":
                    self._check_serving(replacing)
                self._write_serving(model_id, "promote", note)
                if with_serving is not None:
                    with_serving()
            self._swap_symlink(record.path)
        return self.get(model_id)

    def _check_serving(self, replacing: int | None) -> None:
        """Raise ServingChanged unless `replacing` (None: the base model) is the model in service."""
        serving = self.current()
        serving_id = serving.id if serving else None
        if serving_id != replacing:
            judged = f"v{replacing}" if replacing is not None else "the base model"
            now = f"v{serving_id}" if serving_id is not None else "the base model"
            raise ServingChanged(f"judged against {judged}, but {now} serves now")

    @contextmanager
    def _serving_lock(self) -> Iterator[None]:
        """One process at a time changes what serves (a round's promotion, `embedtune rollback`)."""
        self.layout.models.mkdir(parents=True, exist_ok=True)
        with open(self.layout.models / "serving.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def serving_stack(self) -> list[int | None]:
        """Which model served, as a stack rebuilt from the append-only history: a promotion pushes, a
        rollback pops, a reconcile replaces the top. None stands for the base model."""
        stack: list[int | None] = []
        for row in self.history():
            if row["action"] == "promote":
                stack.append(row["model_id"])
            elif row["action"] == "rollback":
                if stack:
                    stack.pop()
            elif row["action"] == "reconcile":
                if stack:
                    stack[-1] = row["model_id"]
                else:
                    stack.append(row["model_id"])
        return stack

    def rollback(self, base_path: Path | None = None) -> ModelRecord | None:
        """Serve the model that served before the current one (or the base model when there was none;
        `models/current` then names `base_path`, or is removed when the base cannot be resolved)."""
        with self._serving_lock():
            return self._rollback(base_path)

    def _rollback(self, base_path: Path | None) -> ModelRecord | None:
        current = self.current()
        if current is None:
            raise RegistryError("no promoted model in service; nothing to roll back")
        stack = self.serving_stack()
        previous = stack[-2] if len(stack) >= 2 else None
        if previous is not None and not self.get(previous).path.is_dir():
            previous = None
        now = utcnow()
        note = f"back to model {previous}" if previous is not None else "back to the base model"
        with transaction(self.conn):  # the database first: the link follows it (module docstring)
            self.conn.execute("UPDATE models SET retired_at=? WHERE id=?", (now, current.id))
            if previous is not None:
                self.conn.execute(
                    "UPDATE models SET promoted_at=?, retired_at=NULL WHERE id=?", (now, previous)
                )
            self.conn.execute(
                "INSERT INTO promotions (model_id, action, at, note) VALUES (?, 'rollback', ?, ?)",
                (current.id, now, note),
            )
        if previous is None:
            self._point_at_base(base_path)
            return None
        record = self.get(previous)
        self._swap_symlink(record.path)
        return record

    def reconcile(self, base_path: Path | None = None) -> str:
        """Start-up check: remove half-copied versions and make the symlink agree with the database (a
        change of what serves commits there first); with nothing promoted, point `models/current` at
        `base_path`."""
        notes = []
        if self.layout.versions.is_dir():
            for entry in self.layout.versions.iterdir():
                if entry.name.endswith(".tmp"):
                    shutil.rmtree(entry, ignore_errors=True)
                    notes.append(f"removed staging folder {entry.name}")
        for row in self.conn.execute("SELECT id, path, promoted_at FROM models").fetchall():
            if not Path(row["path"]).is_dir() and row["promoted_at"] is None:
                with transaction(self.conn):
                    self.conn.execute("DELETE FROM models WHERE id=?", (row["id"],))
                notes.append(f"dropped unfinished model row {row['id']}")
        notes.extend(self._link_follows_database(base_path))
        return "; ".join(notes) or "consistent"

    def _link_follows_database(self, base_path: Path | None) -> list[str]:
        """Point `models/current` at the model the database says serves; what was done, in words."""
        link_target = self._symlink_model_id()
        current = self.current()
        if current is not None and not current.path.is_dir():
            with transaction(self.conn):
                self.conn.execute("UPDATE models SET retired_at=? WHERE id=?", (utcnow(), current.id))
            self._point_at_base(base_path)
            return [f"model {current.id} folder missing; serving the base model"]
        if current is not None:
            if link_target == current.id:
                return []
            # A change of what serves committed but was stopped before its link swap.
            self._swap_symlink(current.path)
            return [f"symlink restored to model {current.id}"]
        if link_target is not None:  # the base serves: a rollback to it stopped before moving the link
            self._point_at_base(base_path)
            return [f"model {link_target} no longer serves: models/current moved off it"]
        if base_path is not None and self._point_at_base(base_path):
            if self.layout.current.is_symlink():
                return [f"models/current names the base model {base_path}"]
            return [f"base model {base_path} not found: models/current removed"]
        return []

    # --- helpers ----------------------------------------------------------------------------------
    def _write_serving(self, model_id: int, action: str, note: str) -> None:
        """The serving row and its history line; the caller holds the transaction."""
        now = utcnow()
        self.conn.execute(
            "UPDATE models SET retired_at=? WHERE promoted_at IS NOT NULL AND retired_at IS NULL AND id != ?",
            (now, model_id),
        )
        self.conn.execute("UPDATE models SET promoted_at=?, retired_at=NULL WHERE id=?", (now, model_id))
        self.conn.execute(
            "INSERT INTO promotions (model_id, action, at, note) VALUES (?, ?, ?, ?)",
            (model_id, action, now, note),
        )

    def _swap_symlink(self, target: Path, *, absolute: bool = False) -> None:
        link = self.layout.current
        link.parent.mkdir(parents=True, exist_ok=True)
        staging = link.with_name(f"current.{os.getpid()}.tmp")
        if staging.is_symlink() or staging.exists():
            staging.unlink()
        os.symlink(str(Path(target).resolve()) if absolute else os.path.relpath(target, link.parent), staging)
        os.replace(staging, link)
        fsync_dir(link.parent)

    def _point_at_base(self, base_path: Path | None) -> bool:
        """`models/current` names the base model (removed when there is no base folder to name). True
        when the link changed."""
        link = self.layout.current
        if base_path is None or not Path(base_path).is_dir():
            if link.is_symlink():
                self._unlink_current()
                return True
            return False
        wanted = str(Path(base_path).resolve())
        if link.is_symlink() and os.readlink(link) == wanted:
            return False
        self._swap_symlink(Path(base_path), absolute=True)
        return True

    def _unlink_current(self) -> None:
        link = self.layout.current
        if link.is_symlink():
            link.unlink()
            fsync_dir(link.parent)

    def _symlink_model_id(self) -> int | None:
        link = self.layout.current
        if not link.is_symlink():
            return None
        target = (link.parent / os.readlink(link)).resolve()
        if not target.is_dir() or target.parent != self.layout.versions.resolve():
            return None  # the base model's folder, or nothing
        try:
            model_id = int(target.name)
        except ValueError:
            return None
        exists = self.conn.execute("SELECT 1 FROM models WHERE id=?", (model_id,)).fetchone()
        return model_id if exists else None
