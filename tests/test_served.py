"""Issue 35: one resolution of what is served (daemon/serving.py), read by `status`, `search` and the index
job alike; and the serving defects found around it. Real SQLite, Milvus Lite, tiny real models."""

from __future__ import annotations

import ast
import fcntl
import json
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.test_index import _add_document, _ingested

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [
    "rivers carve valleys through soft rock over many years",
    "glaciers grind mountains into fine powder and gravel",
    "volcanoes build islands from layers of cooled lava",
    "deserts form where mountains block the rain clouds",
]


def _state(settings):
    """A state folder with one document's chunks (no daemon: nothing retires them)."""
    from state.db import Database
    from state.layout import StateLayout

    layout = StateLayout(settings.paths.state_dir).ensure()
    db = Database(layout.database)
    _add_document(db.conn, "/inbox/earth.md", TEXTS)
    return layout, db


def _cli(capsys, settings, tmp_path, *argv) -> tuple[int, str, str]:
    """`embedtune --config FILE ...` in this process: exit code, stdout, stderr."""
    from daemon.cli import main

    config = tmp_path / "embedtune.toml"
    config.write_text(_toml(settings.model_dump(mode="json", exclude_none=True)))
    code = main(["--config", str(config), *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _toml(data: dict) -> str:
    """The settings' sections as TOML (scalars and lists of scalars: what the test settings hold)."""
    lines = []
    for section, values in data.items():
        if not isinstance(values, dict):
            continue
        lines.append(f"[{section}]")
        for key, value in values.items():
            if (
                value is None
                or isinstance(value, dict)
                or (isinstance(value, list) and any(isinstance(item, dict) for item in value))
            ):
                continue
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def test_a_fresh_install_answers_search_compare_and_eval_in_one_sentence(make_settings, tmp_path, capsys):
    """Before any document, with the default model.base = "auto": a sentence and a non-zero exit, never a
    traceback (ModelNotFound escaped before)."""
    settings = make_settings(model={"base": "auto"})
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"anchor": "what carves valleys", "positive": TEXTS[0]}) + "\n")
    commands = [
        ["search", "what carves valleys"],
        ["compare", "what carves valleys"],
        ["eval", "--data", str(data), "--mode", "hybrid"],
        ["eval", "--data", str(data)],
    ]
    for state in ("no state folder", "a database, no document"):
        if state != "no state folder":
            from state.db import Database

            settings.paths.state_dir.mkdir(parents=True, exist_ok=True)
            Database(settings.paths.state_dir / "embedtune.db").close()
        for argv in commands:
            code, _out, err = _cli(capsys, settings, tmp_path, *argv)
            lines = [line for line in err.splitlines() if line.strip()]
            assert code != 0, (state, argv)
            assert len(lines) == 1 and lines[0].startswith("embedtune: "), (state, argv, err)
            assert "Traceback" not in err and ("documents" in err or "document" in err), (state, argv, err)


def test_a_promoted_version_serves_search_while_the_base_folder_is_gone(
    make_settings, tiny_embedder, tmp_path
):
    from daemon.search import search
    from state.registry import ModelRegistry

    settings = make_settings(index={"enabled": False})
    layout, db = _state(settings)
    registry = ModelRegistry(db.conn, layout)
    registry.promote(registry.register(tiny_embedder).id)
    settings.model.base = str(tmp_path / "deleted-base")  # the base folder is gone
    answer = search(settings, "what carves valleys", k=3)
    assert answer.model == "v1" and answer.hits
    from daemon.search import SearchError

    with pytest.raises(SearchError, match="deleted-base"):  # the base itself: one sentence
        search(settings, "what carves valleys", model="base")


def _synced(make_settings):
    from daemon.indexing import IndexService

    settings = make_settings(index={"enabled": True, "lock_timeout_s": 2.0})
    layout, db = _state(settings)
    service = IndexService(settings, layout)
    report = service.sync(db.conn)
    assert report.swapped
    return settings, layout, db, service


def test_status_and_search_agree_while_the_index_lags(make_settings, tmp_path, capsys):
    """A chunk the live collection has not applied yet: search still answers from the live collection and
    says how far behind it is; status names the same collection and the same lag (before, search fell back
    to exact search while status said the collection served)."""
    from daemon.search import search

    settings, _layout, db, _service = _synced(make_settings)
    live = db.conn.execute("SELECT name FROM index_collections WHERE state = 'live'").fetchone()[0]
    _add_document(db.conn, "/inbox/late.md", ["tides rise twice a day along the coast"])
    answer = search(settings, "what carves valleys", k=3)
    assert answer.source == f"collection {live}" and "1 chunk change(s) behind" in answer.note
    code, out, _err = _cli(capsys, settings, tmp_path, "status", "--json")
    status = json.loads(out[out.index('{\n  "daemon"') :])  # after any log line of this process
    assert code == 0 and status["served"]["collection"] == live and status["index"]["behind"] == 1
    assert status["index"]["serving"] == "hybrid"
    code, out, _err = _cli(capsys, settings, tmp_path, "status")
    assert "1 chunk change(s) not yet in the live collection" in out


def test_a_chunk_landing_during_a_sync_leaves_no_stale_signature(make_settings, monkeypatch):
    """The signature, the count and the change-log position a sync records come from one snapshot: a chunk
    that lands while the sync reads is applied by the next sync, and the collection is never marked in line
    with a signature it does not hold."""
    from daemon import indexing, serving
    from daemon.search import search
    from state.index_records import chunk_signature

    settings, layout, db, service = _synced(make_settings)
    real = indexing.changes_since
    landed = []

    def racing(conn, seq):
        if not landed:  # another connection's ingest commits just as the sync starts reading
            from state.db import connect

            other = connect(layout.database)
            landed.extend(_add_document(other, "/inbox/race.md", ["sand dunes wander with the wind"]))
            other.close()
        return real(conn, seq)

    _add_document(db.conn, "/inbox/late.md", ["tides rise twice a day along the coast"])
    monkeypatch.setattr(indexing, "changes_since", racing)
    service.sync(db.conn)
    monkeypatch.setattr(indexing, "changes_since", real)
    live = serving.resolve_served(db.conn, settings, layout).live
    assert live.signature == chunk_signature(db.conn)  # what it holds, not what it read before
    service.sync(db.conn)
    served = serving.resolve_served(db.conn, settings, layout)
    assert served.behind == 0 and served.live.signature == chunk_signature(db.conn)
    assert search(settings, "sand dunes wander", k=3).source == f"collection {served.live.name}"


def test_search_answers_when_the_index_cannot_be_read(make_settings):
    """Milvus Lite's lock held by another process longer than index.lock_timeout_s: exact search answers,
    with a note (it raised before)."""
    from daemon.search import search

    settings, _layout, _db, _service = _synced(make_settings)
    lite = settings.index.lite_path(settings.paths.state_dir)
    with open(lite.with_name(lite.name + ".lock"), "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        answer = search(settings, "what carves valleys", k=3)
    assert answer.source.startswith("exact search") and "the index could not be read" in answer.note
    assert answer.hits


def test_the_query_length_note_counts_the_query_prompt(make_settings):
    from daemon.search import search

    settings = make_settings(index={"enabled": False})
    _state(settings)
    short = search(settings, "rivers", k=1)
    assert "query cut" not in short.note
    settings.model.query_instruction = "represent this question for searching relevant passages: " * 40
    assert "query cut" in search(settings, "rivers", k=1).note


def test_a_refused_index_is_retried_after_a_restart(make_settings, start_daemon):
    """The refused sync's job is dead under the key the next sync would get; a restart clears the refusal
    and must run a sync now (before, the key's dead job blocked it until a chunk changed)."""
    from daemon.indexing import JOB_KIND, IndexService
    from state.db import Database
    from state.index_records import IndexRecords

    settings, layout = _ingested(make_settings, start_daemon)
    db = Database(layout.database)
    IndexService(settings, layout).enqueue(db.conn, "changed")
    db.conn.execute(
        "UPDATE jobs SET state = 'dead', last_error = 'Milvus refused' WHERE kind = ?", (JOB_KIND,)
    )
    IndexRecords(db.conn).set_error("auth check failure (refused)", refused=True)
    running = start_daemon(settings)
    wait_for(
        lambda: running.scalar("SELECT COUNT(*) FROM index_collections WHERE state = 'live'"), timeout=120
    )
    assert not IndexRecords(running.conn).refused()


def test_status_resolves_without_converting_or_loading_a_model(make_settings, tmp_path, capsys):
    """`status` reads the same resolution as search, and before the packaged base is converted it says so
    instead of converting it (a 465 MB write from a status call before)."""
    settings = make_settings(model={"base": "packaged:multilingual-e5-small"})
    _state(settings)
    code, out, _err = _cli(capsys, settings, tmp_path, "status", "--json")
    status = json.loads(out[out.index('{\n  "daemon"') :])  # after any log line of this process
    assert (
        code == 0 and status["served"]["path"] is None and "not converted yet" in status["served"]["problem"]
    )
    assert not (settings.paths.state_dir / "models" / "packaged" / "multilingual-e5-small").exists()


def _imports(path: Path) -> set[str]:
    """Every daemon module a module imports, at the top or inside a function (not for type checking)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("daemon."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("daemon."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_the_served_resolution_imports_no_module_that_imports_it_back():
    """No import circle among the modules a search walks (indexing <-> step_params was one)."""
    graph = {f"daemon.{p.stem}": _imports(p) for p in (ROOT / "daemon").glob("*.py")}
    for module in ("daemon.serving", "daemon.step_params", "daemon.indexing", "daemon.search"):
        seen, todo = set(), list(graph[module])
        while todo:
            name = todo.pop()
            if name in seen or name not in graph:
                continue
            seen.add(name)
            todo += graph[name]
        assert module not in seen, f"{module} imports itself back through {sorted(seen)}"


def test_a_chunk_set_that_returns_to_an_earlier_state_still_gets_a_sync(make_settings):
    """A file reverted (or put back) makes the active chunks' signature one a done sync already had: the
    sync's key must still be new (before, the done job's key matched and no sync ran until another change,
    while search served the stale live collection)."""
    from daemon.indexing import JOB_KIND, IndexService

    settings = make_settings(index={"enabled": True})
    layout, db = _state(settings)
    service = IndexService(settings, layout)
    conn = db.conn
    chunk = conn.execute("SELECT MAX(id) FROM chunks").fetchone()[0]
    for active in (0, 1):  # retire a chunk, then bring it back: the signature returns to the first one
        assert service.enqueue(conn, "changed")
        conn.execute("UPDATE jobs SET state = 'done' WHERE kind = ?", (JOB_KIND,))
        conn.execute("UPDATE chunks SET active = ? WHERE id = ?", (active, chunk))
    assert service.enqueue(conn, "changed"), "the reverted chunk set got no sync"


def test_lookups_refuse_a_database_an_older_embedtune_wrote(make_settings):
    """search opens the state read-only and never migrates: an older schema gets one sentence, not a
    traceback from a missing column."""
    from daemon.search import SearchError, search

    settings = make_settings(index={"enabled": False})
    _layout, db = _state(settings)
    db.conn.execute("PRAGMA user_version = 3")
    with pytest.raises(SearchError, match="older embedtune"):
        search(settings, "rivers")
