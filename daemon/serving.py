"""The model in service, as the daemon's processes ask for it: the registry decides which version serves
(state/registry.py), the settings say where the base model lives. One function, so the index, the filter,
rounds, exports, `eval` and `search` can never disagree about it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from daemon.settings import Settings
from state.layout import StateLayout
from state.registry import ModelRegistry, ServingModel


def base_model_path(settings: Settings) -> Path:
    """The configured base model's folder (a packaged model resolves to its installed folder)."""
    from stages.models import resolve_model_path

    return resolve_model_path(settings.model.base)


def model_in_service(conn: sqlite3.Connection, layout: StateLayout, settings: Settings) -> ServingModel:
    current = ModelRegistry(conn, layout).current()
    if current is not None:
        return ServingModel(current.id, current.path)
    return ServingModel(None, base_model_path(settings))


def base_model_path_or_none(settings: Settings) -> Path | None:
    """The base folder, or None when it cannot be resolved (`config check` and the log say why)."""
    from stages.models import ModelNotFound

    try:
        return base_model_path(settings)
    except ModelNotFound:
        return None
