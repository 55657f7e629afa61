"""What the vector store holds, as rows: one per Milvus collection, with the model that filled it.

Milvus holds the vectors; SQLite holds which collection belongs to which model version, which one is live
(the alias points at it), how far a fill got, and the active-chunk signature at its last complete sync,
so the daemon can tell with one cheap query whether the index is behind the documents.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from state.db import transaction, utcnow

FILLING, READY, LIVE, DROPPED = "filling", "ready", "live", "dropped"


@dataclass(frozen=True)
class ActiveChunk:
    id: int
    sha256: str
    text: str
    path: str


@dataclass(frozen=True)
class CollectionRecord:
    name: str
    model_id: int | None
    model_path: str
    dim: int
    state: str
    chunks: int
    signature: str
    progress: str
    swapped: str | None
    analyzer: str | None = None  # None: dense only (made before hybrid search)
    bm25_weight: float | None = None
    synced_seq: int | None = None  # the last chunk_changes row applied; None: the next sync is a full pass

    @property
    def hybrid(self) -> bool:
        return self.analyzer is not None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> CollectionRecord:
        return cls(
            name=row["name"],
            model_id=row["model_id"],
            model_path=row["model_path"],
            dim=row["dim"],
            state=row["state"],
            chunks=row["chunks"],
            signature=row["signature"],
            progress=row["progress"],
            swapped=row["swapped"],
            analyzer=row["analyzer"],
            bm25_weight=row["bm25_weight"],
            synced_seq=row["synced_seq"],
        )


@dataclass(frozen=True)
class ChunkChanges:
    """What changed in the active set after a position of the change log (the last change per chunk)."""

    seq: int  # the last row read: the position a sync that applied these records
    added: list[ActiveChunk]
    removed: list[int]
    # the active chunks in the same snapshot: what a collection that applied these changes holds
    signature: str = ""
    count: int = 0


def active_chunks(conn: sqlite3.Connection) -> list[ActiveChunk]:
    """Every chunk the index must hold: the active chunks (the same corpus a round snapshots)."""
    rows = conn.execute(
        "SELECT c.id, c.sha256, c.text, d.path FROM chunks c JOIN documents d ON d.id = c.document_id "
        "WHERE c.active = 1 ORDER BY c.id"
    ).fetchall()
    return [ActiveChunk(row[0], row[1], row[2], row[3]) for row in rows]


def active_chunk_ids(conn: sqlite3.Connection) -> list[int]:
    return [row[0] for row in conn.execute("SELECT id FROM chunks WHERE active = 1 ORDER BY id")]


def change_seq(conn: sqlite3.Connection) -> int:
    """The change log's last position (0: nothing logged yet). AUTOINCREMENT keeps it in sqlite_sequence,
    so it survives the pruning of every row and is never handed out again."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'chunk_changes'").fetchone()
    return int(row[0]) if row else 0


def changes_since(conn: sqlite3.Connection, seq: int) -> ChunkChanges:
    """The chunks that became active or inactive after `seq`, read in one snapshot: O(changes), however
    large the corpus. A chunk added then retired since is only removed (deleting an absent id is a no-op)."""
    with transaction(conn, immediate=False):
        last, state = seq, {}
        for position, chunk_id, active in conn.execute(
            "SELECT seq, chunk_id, active FROM chunk_changes WHERE seq > ? ORDER BY seq", (seq,)
        ):
            last, state[chunk_id] = position, active
        wanted = [chunk_id for chunk_id, active in state.items() if active]
        added: list[ActiveChunk] = []
        for start in range(0, len(wanted), 500):
            part = wanted[start : start + 500]
            marks = ",".join("?" * len(part))
            added += [
                ActiveChunk(row[0], row[1], row[2], row[3])
                for row in conn.execute(
                    "SELECT c.id, c.sha256, c.text, d.path FROM chunks c JOIN documents d ON d.id = c.document_id "
                    f"WHERE c.active = 1 AND c.id IN ({marks})",
                    part,
                )
            ]
        # In the same read transaction as the log: a chunk landing meanwhile is in neither (the next sync
        # applies it), never in the signature without its change (a collection marked in line that is not).
        signature, count = chunk_signature(conn), active_count(conn)
    present = {chunk.id for chunk in added}
    removed = sorted(chunk_id for chunk_id in state if chunk_id not in present)
    return ChunkChanges(last, sorted(added, key=lambda chunk: chunk.id), removed, signature, count)


def changes_after(conn: sqlite3.Connection, seq: int) -> int:
    """How many change-log rows lie after `seq`: how far behind the chunks a collection at `seq` is."""
    return int(conn.execute("SELECT COUNT(*) FROM chunk_changes WHERE seq > ?", (seq,)).fetchone()[0])


def active_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM chunks WHERE active = 1").fetchone()[0])


def has_active_chunks(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM chunks WHERE active = 1 LIMIT 1").fetchone() is not None


def active_languages(conn: sqlite3.Connection) -> dict[str, int]:
    """Active chunks per detected language ('en', 'zh'): what `index.analyzer = "auto"` decides by."""
    rows = conn.execute("SELECT language, COUNT(*) FROM chunks WHERE active = 1 GROUP BY language")
    return {str(language): int(count) for language, count in rows}


def chunk_signature(conn: sqlite3.Connection) -> str:
    """Changes whenever the set of active chunks changes (count, largest id and id sum), in one query
    over the chunks_active index, so the main loop can poll it every few seconds at 100k chunks."""
    row = conn.execute(
        "SELECT COUNT(*), COALESCE(MAX(id), 0), COALESCE(SUM(id), 0) FROM chunks WHERE active = 1"
    ).fetchone()
    return f"{row[0]}:{row[1]}:{row[2]}"


def max_chunk_id(conn: sqlite3.Connection) -> int:
    """No chunk id in any collection exceeds this (ids come from the chunks table and are never reused)."""
    return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM chunks").fetchone()[0])


class IndexRecords:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def get(self, name: str) -> CollectionRecord | None:
        row = self.conn.execute("SELECT * FROM index_collections WHERE name = ?", (name,)).fetchone()
        return CollectionRecord.from_row(row) if row else None

    def live(self) -> CollectionRecord | None:
        row = self.conn.execute("SELECT * FROM index_collections WHERE state = 'live'").fetchone()
        return CollectionRecord.from_row(row) if row else None

    def for_model(
        self,
        model_id: int | None,
        model_path: str,
        analyzer: str | None = None,
        *,
        any_analyzer: bool = False,
    ) -> CollectionRecord | None:
        """The collection being filled or filled by this model with this analyzer (newest), if any;
        with any_analyzer, whatever its analyzer (a search can still use a dense-only collection)."""
        where = "" if any_analyzer else " AND analyzer IS ?"
        params = (model_id, model_path) if any_analyzer else (model_id, model_path, analyzer)
        row = self.conn.execute(
            "SELECT * FROM index_collections WHERE model_id IS ? AND model_path = ? AND state != 'dropped'"
            f"{where} ORDER BY created DESC, name DESC LIMIT 1",
            params,
        ).fetchone()
        return CollectionRecord.from_row(row) if row else None

    def collections_for_model(self, model_id: int | None, model_path: str) -> list[CollectionRecord]:
        """Every collection of this model not dropped, the live one first, then newest first."""
        rows = self.conn.execute(
            "SELECT * FROM index_collections WHERE model_id IS ? AND model_path = ? AND state != 'dropped' "
            "ORDER BY state = 'live' DESC, created DESC, name DESC",
            (model_id, model_path),
        ).fetchall()
        return [CollectionRecord.from_row(row) for row in rows]

    def create(
        self,
        name: str,
        model_id: int | None,
        model_path: str,
        dim: int,
        analyzer: str | None = None,
        bm25_weight: float | None = None,
    ) -> CollectionRecord:
        with transaction(self.conn):
            self.conn.execute(
                "INSERT INTO index_collections "
                "(name, model_id, model_path, dim, state, created, analyzer, bm25_weight) "
                "VALUES (?, ?, ?, ?, 'filling', ?, ?, ?)",
                (name, model_id, model_path, dim, utcnow(), analyzer, bm25_weight),
            )
        record = self.get(name)
        assert record is not None
        return record

    def next_serial(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM index_collections").fetchone()[0]) + 1

    def set_bm25_weight(self, name: str, weight: float) -> None:
        """The BM25 share hybrid queries on this collection use (a query-time setting: no refill)."""
        with transaction(self.conn):
            self.conn.execute("UPDATE index_collections SET bm25_weight = ? WHERE name = ?", (weight, name))

    def set_progress(self, name: str, text: str) -> None:
        with transaction(self.conn):
            self.conn.execute("UPDATE index_collections SET progress = ? WHERE name = ?", (text, name))

    def mark_synced(self, name: str, chunks: int, signature: str, seq: int | None = None) -> None:
        """A complete pass: the collection holds exactly the active chunks with this signature, and every
        change up to `seq`. Change-log rows every collection that follows the log has applied are pruned
        (a collection without a position does a full pass when it is next synced, and needs none)."""
        with transaction(self.conn):
            self.conn.execute(
                "UPDATE index_collections SET chunks = ?, signature = ?, progress = '', synced_seq = ?, "
                "filled = COALESCE(filled, ?), state = CASE state WHEN 'filling' THEN 'ready' ELSE state END "
                "WHERE name = ?",
                (chunks, signature, seq, utcnow(), name),
            )
            self._prune()

    def _prune(self) -> None:
        """Drop the change-log rows every collection that still follows the log has applied."""
        self.conn.execute(
            "DELETE FROM chunk_changes WHERE seq <= (SELECT MIN(synced_seq) "
            "FROM index_collections WHERE state != 'dropped')"
        )

    def forget_changes(self) -> int:
        """The index is off: nothing follows the change log, so its rows go, and every collection's
        position with them (if the index is turned on again, each collection's next sync is a full pass).
        Returns the rows dropped; a read when there are none."""
        if self.conn.execute("SELECT 1 FROM chunk_changes LIMIT 1").fetchone() is None:
            return 0
        with transaction(self.conn):
            self.conn.execute("UPDATE index_collections SET synced_seq = NULL WHERE synced_seq IS NOT NULL")
            return self.conn.execute("DELETE FROM chunk_changes").rowcount

    def make_live(self, name: str) -> None:
        """Record an alias swap: this collection is live, the one before it is kept as ready. A kept one
        stops following the change log (its position is forgotten, so the log can be pruned past it): if
        it serves again after a rollback, its first sync is a full pass."""
        now = utcnow()
        with transaction(self.conn):
            self.conn.execute(
                "UPDATE index_collections SET state = 'ready', synced_seq = NULL WHERE state = 'live' AND name != ?",
                (name,),
            )
            self.conn.execute(
                "UPDATE index_collections SET state = 'live', swapped = ? WHERE name = ?", (now, name)
            )

    def clear_live(self) -> None:
        """No collection is live (the alias was found missing): the last live one is kept as ready."""
        with transaction(self.conn):
            self.conn.execute(
                "UPDATE index_collections SET state = 'ready', synced_seq = NULL WHERE state = 'live'"
            )

    def surplus(self, keep: int, serving_name: str | None) -> list[CollectionRecord]:
        """Collections beyond the live one and the `keep` most recently live: dropped to bound disk use.
        A fill for a model no longer in service (abandoned by a rollback) counts as surplus too.

        Only the live collection and `serving_name` (the serving model's, filled and about to go live) go
        on following the change log: every other one forgets its position here, so a collection filled
        but never swapped live (the model changed during its fill) no longer stops the pruning for good.
        Kept for a rollback, it is brought up to date by a full pass if it serves again."""
        self._forget_positions(serving_name)
        kept: list[CollectionRecord] = []
        extra: list[CollectionRecord] = []
        rows = self.conn.execute(
            "SELECT * FROM index_collections WHERE state IN ('ready','filling') "
            "ORDER BY COALESCE(swapped, filled, created) DESC, name DESC"
        ).fetchall()
        for record in map(CollectionRecord.from_row, rows):
            if record.name == serving_name:
                continue
            if record.state == FILLING or len(kept) >= keep:
                extra.append(record)
            else:
                kept.append(record)
        return extra

    def _forget_positions(self, serving_name: str | None) -> None:
        """Collections neither live nor `serving_name` stop following the change log; the rows only they
        still needed go."""
        if (
            self.conn.execute(
                "SELECT 1 FROM index_collections WHERE state IN ('ready','filling') AND name IS NOT ? "
                "AND synced_seq IS NOT NULL LIMIT 1",
                (serving_name,),
            ).fetchone()
            is None
        ):
            return
        with transaction(self.conn):
            self.conn.execute(
                "UPDATE index_collections SET synced_seq = NULL "
                "WHERE state IN ('ready','filling') AND name IS NOT ? AND synced_seq IS NOT NULL",
                (serving_name,),
            )
            self._prune()

    def mark_dropped(self, name: str) -> None:
        with transaction(self.conn):
            self.conn.execute(
                "UPDATE index_collections SET state = 'dropped', dropped = ? WHERE name = ?", (utcnow(), name)
            )

    def set_error(self, text: str | None, *, refused: bool = False) -> int:
        """The index's last failure (None once it works again), shown by `status`; returns how many
        failures in a row there have been."""
        with transaction(self.conn):
            if text is None:
                self.conn.execute(
                    "UPDATE daemon SET index_error = NULL, index_failures = 0, index_refused = 0 WHERE id = 1"
                )
                return 0
            row = self.conn.execute(
                "UPDATE daemon SET index_error = ?, index_failures = index_failures + 1, index_refused = ? "
                "WHERE id = 1 RETURNING index_failures",
                (text, int(refused)),
            ).fetchone()
        return int(row[0]) if row else 1

    def refused(self) -> bool:
        """Milvus refused the last sync: the daemon does not ask again until it restarts."""
        row = self.conn.execute("SELECT index_refused FROM daemon WHERE id = 1").fetchone()
        return bool(row and row[0])

    def clear_refusal(self) -> None:
        """At start-up: the configuration may have changed, so a refused index is tried once more."""
        with transaction(self.conn):
            self.conn.execute("UPDATE daemon SET index_refused = 0 WHERE id = 1")
