"""SQLite connection handling and schema migrations keyed on PRAGMA user_version.

Connections run in autocommit mode; writers open explicit `BEGIN IMMEDIATE` transactions so that a
claim or a document's chunks are all-or-nothing. WAL lets the CLI read while the daemon writes.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

BUSY_TIMEOUT_MS = 30_000

MIGRATIONS: list[str] = [
    # 1: the core tables (documents, chunks, samples, jobs, rounds, models), plus the daemon heartbeat and the promotion history.
    """
    CREATE TABLE documents (
        id            INTEGER PRIMARY KEY,
        path          TEXT NOT NULL UNIQUE,
        sha256        TEXT,
        first_sha256  TEXT,
        size          INTEGER,
        mtime         REAL,
        status        TEXT NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending','ingested','rejected','deleted')),
        error         TEXT,
        language      TEXT,
        duplicate_of  INTEGER REFERENCES documents(id) ON DELETE SET NULL,
        split         TEXT CHECK (split IN ('train','heldout')),
        first_seen    TEXT NOT NULL,
        updated       TEXT NOT NULL
    );
    CREATE INDEX documents_sha ON documents(sha256);
    CREATE INDEX documents_status ON documents(status);

    CREATE TABLE chunks (
        id            INTEGER PRIMARY KEY,
        document_id   INTEGER NOT NULL REFERENCES documents(id),
        version       TEXT NOT NULL,
        ordinal       INTEGER NOT NULL,
        text          TEXT NOT NULL,
        heading       TEXT NOT NULL DEFAULT '',
        sha256        TEXT NOT NULL,
        language      TEXT NOT NULL DEFAULT 'en',
        split         TEXT NOT NULL DEFAULT 'train' CHECK (split IN ('train','heldout')),
        active        INTEGER NOT NULL DEFAULT 1,
        created       TEXT NOT NULL,
        UNIQUE (document_id, version, ordinal)
    );
    CREATE INDEX chunks_active ON chunks(active);
    CREATE INDEX chunks_sha ON chunks(sha256);

    CREATE TABLE samples (
        id            INTEGER PRIMARY KEY,
        chunk_id      INTEGER NOT NULL REFERENCES chunks(id),
        query         TEXT NOT NULL,
        kind          TEXT NOT NULL CHECK (kind IN ('question','rewrite','pseudo','structure')),
        parent_id     INTEGER REFERENCES samples(id),
        passage       TEXT,
        split         TEXT NOT NULL CHECK (split IN ('train','heldout')),
        judge_score   REAL,
        rerank_score  REAL,
        bm25_score    REAL,
        rank          INTEGER,
        kept          INTEGER,
        reason        TEXT,
        created       TEXT NOT NULL,
        round_id      INTEGER REFERENCES rounds(id),
        UNIQUE (chunk_id, kind, query)
    );
    CREATE INDEX samples_kept ON samples(kept, split);
    CREATE INDEX samples_round ON samples(round_id);

    CREATE TABLE jobs (
        id            INTEGER PRIMARY KEY,
        kind          TEXT NOT NULL,
        key           TEXT NOT NULL UNIQUE,
        payload       TEXT NOT NULL DEFAULT '{}',
        state         TEXT NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending','running','done','failed','dead')),
        priority      INTEGER NOT NULL DEFAULT 100,
        attempts      INTEGER NOT NULL DEFAULT 0,
        max_attempts  INTEGER NOT NULL DEFAULT 5,
        not_before    REAL NOT NULL DEFAULT 0,
        lease_owner   TEXT,
        lease_until   REAL,
        last_error    TEXT,
        raw_reply     TEXT,
        created       TEXT NOT NULL,
        updated       TEXT NOT NULL
    );
    CREATE INDEX jobs_claim ON jobs(state, kind, not_before, priority);

    CREATE TABLE rounds (
        id                INTEGER PRIMARY KEY,
        started           TEXT NOT NULL,
        finished          TEXT,
        state             TEXT NOT NULL CHECK (state IN ('running','finished','aborted')),
        stage             TEXT NOT NULL DEFAULT 'snapshot',
        progress          TEXT NOT NULL DEFAULT '{}',
        pid               INTEGER,
        trigger           TEXT NOT NULL DEFAULT 'schedule',
        n_train           INTEGER,
        n_heldout         INTEGER,
        base_model        TEXT,
        candidate_metrics TEXT,
        merged_metrics    TEXT,
        current_metrics   TEXT,
        eval_sets         TEXT,
        decision          TEXT CHECK (decision IN ('promoted','rejected') OR decision IS NULL),
        reason            TEXT,
        model_id          INTEGER REFERENCES models(id),
        error             TEXT
    );

    CREATE TABLE models (
        id            INTEGER PRIMARY KEY,
        path          TEXT NOT NULL,
        parent_id     INTEGER REFERENCES models(id),
        round_id      INTEGER,
        created       TEXT NOT NULL,
        metrics       TEXT NOT NULL DEFAULT '{}',
        promoted_at   TEXT,
        retired_at    TEXT
    );

    CREATE TABLE promotions (
        id            INTEGER PRIMARY KEY,
        model_id      INTEGER REFERENCES models(id),
        action        TEXT NOT NULL CHECK (action IN ('promote','rollback','reconcile')),
        at            TEXT NOT NULL,
        note          TEXT
    );

    CREATE TABLE daemon (
        id            INTEGER PRIMARY KEY CHECK (id = 1),
        pid           INTEGER,
        host          TEXT,
        started       TEXT,
        heartbeat     TEXT,
        heartbeat_ts  REAL,
        activity      TEXT NOT NULL DEFAULT 'stopped',
        breaker       TEXT NOT NULL DEFAULT 'closed'
    );
    INSERT INTO daemon (id) VALUES (1);
    """,
    # 2: the LLM client's state as the daemon last saw it (concurrency in use and why, structured mode),
    # and the config keys changed since start-up that only a restart applies.
    """
    ALTER TABLE daemon ADD COLUMN llm TEXT;
    ALTER TABLE daemon ADD COLUMN restart_keys TEXT;
    """,
    # 3: a rejected round's machine-readable cause, and what the on_promote hook did after a promotion.
    """
    ALTER TABLE rounds ADD COLUMN cause TEXT;
    ALTER TABLE rounds ADD COLUMN hook TEXT;
    """,
    # 4: teacher judgements of (query, chunk) pairs, keyed by what was judged, not by row ids: a later round
    # or a restarted one asks for the same texts and gets the stored score instead of re-running the teacher.
    """
    CREATE TABLE teacher_scores (
        teacher_id    TEXT NOT NULL,
        query_hash    TEXT NOT NULL,
        chunk_hash    TEXT NOT NULL,
        score         REAL NOT NULL,
        PRIMARY KEY (teacher_id, query_hash, chunk_hash)
    ) WITHOUT ROWID;
    """,
    # 5: the vector-store collections that follow the model in service (one per model version; the alias
    # clients query points at the live one), and the index's progress for `status`.
    """
    CREATE TABLE index_collections (
        name          TEXT PRIMARY KEY,
        model_id      INTEGER,
        model_path    TEXT NOT NULL,
        dim           INTEGER NOT NULL,
        state         TEXT NOT NULL CHECK (state IN ('filling','ready','live','dropped')),
        chunks        INTEGER NOT NULL DEFAULT 0,
        signature     TEXT NOT NULL DEFAULT '',
        progress      TEXT NOT NULL DEFAULT '',
        created       TEXT NOT NULL,
        filled        TEXT,
        swapped       TEXT,
        dropped       TEXT
    );
    ALTER TABLE daemon ADD COLUMN index_error TEXT;
    """,
    # 6: the held-out choice at ingest asks whether any document has a split; without an index that was a
    # scan of every document per ingest (quadratic over a growing folder).
    """
    CREATE INDEX documents_split ON documents(split);
    """,
    # 7: claiming the next job read every pending job of its kind and sorted them (jobs_claim cannot give
    # priority order across two states), so synthesizing 100k chunks was quadratic; this index holds only
    # claimable jobs, per kind, in claim order, and a claim reads its first ready row.
    """
    CREATE INDEX jobs_ready ON jobs(kind, priority, not_before, id) WHERE state IN ('pending','failed');
    """,
    # 8: what each round step cost (wall seconds and its own peak RSS), for `status` and capacity planning.
    """
    ALTER TABLE rounds ADD COLUMN steps TEXT;
    """,
    # 9: hybrid search. A collection's BM25 analyzer (NULL: made before hybrid search, dense only, so the
    # sync rebuilds it blue/green) and the BM25 share its hybrid queries use (the served configuration).
    """
    ALTER TABLE index_collections ADD COLUMN analyzer TEXT;
    ALTER TABLE index_collections ADD COLUMN bm25_weight REAL;
    """,
    # 10: held-out pairs are no longer ranked by the model in service (it is the model being judged, so
    # its filter kept only the queries it already answered): the ones it ranked are filtered again.
    """
    UPDATE samples SET kept = NULL, rank = NULL, bm25_score = NULL, rerank_score = NULL, reason = NULL
    WHERE split = 'heldout' AND rank IS NOT NULL;
    """,
    # 11: the index's failures: consecutive transient ones (the retry waits longer each time) and whether
    # Milvus refused outright (no retry until the daemon restarts with a changed configuration).
    """
    ALTER TABLE daemon ADD COLUMN index_failures INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE daemon ADD COLUMN index_refused INTEGER NOT NULL DEFAULT 0;
    """,
    # 12: the base model `model.base = "auto"` chose from the corpus language, once per state folder.
    """
    ALTER TABLE daemon ADD COLUMN base_model TEXT;
    ALTER TABLE daemon ADD COLUMN base_reason TEXT;
    """,
    # 13: the index follows changes, not the corpus. Every chunk that becomes active or stops being active
    # leaves a row here (triggers, so no writer can forget); a collection records the last row its sync
    # applied, and the next sync reads only the rows after it. Rows every collection has applied are pruned.
    # Existing collections have no position yet: their next sync is a full pass that records one. The
    # (active, language) index answers the analyzer's language count from the index alone.
    """
    CREATE TABLE chunk_changes (
        seq      INTEGER PRIMARY KEY AUTOINCREMENT,
        chunk_id INTEGER NOT NULL,
        active   INTEGER NOT NULL
    );
    CREATE TRIGGER chunk_changes_insert AFTER INSERT ON chunks WHEN NEW.active = 1
    BEGIN
        INSERT INTO chunk_changes (chunk_id, active) VALUES (NEW.id, 1);
    END;
    CREATE TRIGGER chunk_changes_update AFTER UPDATE OF active ON chunks WHEN NEW.active IS NOT OLD.active
    BEGIN
        INSERT INTO chunk_changes (chunk_id, active) VALUES (NEW.id, NEW.active);
    END;
    CREATE TRIGGER chunk_changes_delete AFTER DELETE ON chunks WHEN OLD.active = 1
    BEGIN
        INSERT INTO chunk_changes (chunk_id, active) VALUES (OLD.id, 0);
    END;
    ALTER TABLE index_collections ADD COLUMN synced_seq INTEGER;
    CREATE INDEX chunks_active_language ON chunks(active, language);
    """,
    # 14: the query log, shaped like User Behavior Insights (state/query_log.py): each answered search
    # with the hits it showed in rank order, and what the application did with them (click, cited, ...).
    # An event names a logged query; the gate on real questions reads both.
    """
    CREATE TABLE queries (
        query_id      TEXT PRIMARY KEY,
        user_query    TEXT NOT NULL,
        client_id     TEXT NOT NULL DEFAULT '',
        source        TEXT NOT NULL CHECK (source IN ('cli','http')),
        mode          TEXT NOT NULL,
        model_version TEXT NOT NULL,
        collection    TEXT NOT NULL,
        hit_ids       TEXT NOT NULL,
        at            TEXT NOT NULL
    );
    CREATE INDEX queries_at ON queries(at);

    CREATE TABLE query_events (
        id            INTEGER PRIMARY KEY,
        query_id      TEXT NOT NULL REFERENCES queries(query_id),
        action_name   TEXT NOT NULL,
        object_id     TEXT,
        position      INTEGER,
        client_id     TEXT NOT NULL DEFAULT '',
        attributes    TEXT NOT NULL DEFAULT '{}',
        at            TEXT NOT NULL
    );
    CREATE INDEX query_events_query ON query_events(query_id);
    """,
    # 15: the ONNX export job's kind is "onnx_export" (it was "export", a name `embedtune export`'s training
    # data exports had too); its keys carry the kind.
    """
    UPDATE jobs SET kind = 'onnx_export', key = 'onnx_export:' || substr(key, 8)
    WHERE kind = 'export' AND key LIKE 'export:%';
    """,
    # 16: learning from real questions (state/real_queries.py). Each logged question is put, once and for
    # good, in "train" or "judge"; the row outlives the query log's retention, so a question asked again
    # after its queries were pruned lands on the same side. Judgments grade (question, passage) pairs 0..3
    # per judge and are reused across rounds; both are keyed by text hashes, not row ids.
    """
    CREATE TABLE question_splits (
        question_key  TEXT PRIMARY KEY,
        split         TEXT NOT NULL CHECK (split IN ('train','judge')),
        at            TEXT NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE judgments (
        judge_id      TEXT NOT NULL,
        question_key  TEXT NOT NULL,
        passage_key   TEXT NOT NULL,
        grade         REAL NOT NULL,
        at            TEXT NOT NULL,
        PRIMARY KEY (judge_id, question_key, passage_key)
    ) WITHOUT ROWID;
    """,
    # 17: interleaved trials (state/trials.py). A round's candidate the gate could not tell from the model
    # in service is registered (never promoted) and `serve` mixes its hits into a share of the searches;
    # a logged query of a trial remembers which model showed each hit (`teams`, aligned with hit_ids).
    # At most one trial runs (the partial unique index); model_id is no foreign key: a lost trial's
    # version is discarded and the trial row stays as history.
    """
    CREATE TABLE trials (
        id            INTEGER PRIMARY KEY,
        round_id      INTEGER REFERENCES rounds(id),
        model_id      INTEGER NOT NULL,
        path          TEXT NOT NULL,
        replacing_id  INTEGER,
        variant       TEXT NOT NULL,
        share         REAL NOT NULL CHECK (share > 0 AND share <= 1),
        started       TEXT NOT NULL,
        ended         TEXT,
        result        TEXT,
        reason        TEXT NOT NULL DEFAULT ''
    );
    CREATE UNIQUE INDEX trials_one_running ON trials((ended IS NULL)) WHERE ended IS NULL;
    ALTER TABLE queries ADD COLUMN trial_id INTEGER;
    ALTER TABLE queries ADD COLUMN teams TEXT;
    CREATE INDEX queries_trial ON queries(trial_id) WHERE trial_id IS NOT NULL;
    """,
    # 18: a trial's arms. A candidate whose round chose its BM25 share on events alone is tried at more
    # than one share (`arms`, a JSON list; [] tries the share in its folder); each interleaved query
    # remembers its arm, and an arm the served model beat is taken out (`arms_out`, JSON list of indexes).
    """
    ALTER TABLE trials ADD COLUMN arms TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE trials ADD COLUMN arms_out TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE queries ADD COLUMN trial_arm INTEGER;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def connect(path: Path | str, *, readonly: bool = False) -> sqlite3.Connection:
    """Open a connection with the pragmas every connection needs (FKs and busy timeout are per connection)."""
    if readonly:
        uri = f"file:{Path(path).as_posix()}?mode=ro"
        conn = sqlite3.connect(
            uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False
        )
    else:
        conn = sqlite3.connect(
            str(path), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False
        )
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    if not readonly:
        conn.execute("PRAGMA synchronous = NORMAL")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection, *, immediate: bool = True) -> Iterator[sqlite3.Connection]:
    """One explicit transaction; rolled back on any exception. IMMEDIATE takes the write lock up front
    so two writers never deadlock upgrading a read lock."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    else:
        conn.execute("COMMIT")


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Bring the schema up to `target` (normally SCHEMA_VERSION), one migration per transaction. Returns
    the new version. A lower target builds an older schema, for upgrade tests."""
    conn.execute("PRAGMA journal_mode = WAL")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"database schema {version} is newer than this embedtune ({SCHEMA_VERSION}); upgrade embedtune"
        )
    while version < target:
        script = MIGRATIONS[version]
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _split_sql(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        version += 1
    return version


def _split_sql(script: str) -> list[str]:
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements


class Database:
    """Owner of the database file: migrates once, then hands out one connection per thread."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with connect(self.path) as conn:
            migrate(conn)
        conn.close()

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path)
            self._local.conn = conn
        return conn

    def transaction(self) -> contextmanager:
        return transaction(self.conn)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
