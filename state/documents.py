"""Documents and chunks: what the watcher saw, what ingestion stored, what retired.

Each public function is one transaction, so a crash leaves a document either before or after a step.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from state.db import transaction, utcnow
from state.queue import Job, JobQueue


@dataclass(frozen=True)
class NewChunk:
    ordinal: int
    text: str
    heading: str
    sha256: str
    language: str


def ingest_job_key(doc_id: int, size: int, mtime: float) -> str:
    return f"ingest:{doc_id}:{size}:{int(mtime * 1e6)}"


def heldout_bucket(first_sha256: str) -> float:
    """A stable number in [0, 1) from the document's first content hash."""
    return int(hashlib.sha256(first_sha256.encode()).hexdigest()[:12], 16) / float(16**12)


class DocumentStore:
    def __init__(self, conn: sqlite3.Connection, queue: JobQueue | None = None) -> None:
        self.conn = conn
        self.queue = queue or JobQueue(conn)

    def get(self, doc_id: int) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM documents WHERE id=?", (doc_id,)).fetchone()

    def by_path(self, path: str) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM documents WHERE path=?", (path,)).fetchone()

    def live_paths(self) -> dict[str, sqlite3.Row]:
        rows = self.conn.execute("SELECT * FROM documents WHERE status != 'deleted'").fetchall()
        return {row["path"]: row for row in rows}

    # --- watcher side ---------------------------------------------------------------------------
    def file_seen(self, path: str, size: int, mtime: float) -> bool:
        """A settled file: record it and queue an ingest job unless this exact (size, mtime) was queued.
        Returns True when a job was queued."""
        now = utcnow()
        with transaction(self.conn):
            row = self.by_path(path)
            if row is None:
                doc_id = self.conn.execute(
                    "INSERT INTO documents (path, size, mtime, status, first_seen, updated) "
                    "VALUES (?, ?, ?, 'pending', ?, ?) RETURNING id",
                    (path, size, mtime, now, now),
                ).fetchone()[0]
            else:
                doc_id = row["id"]
                unchanged = row["size"] == size and row["mtime"] == mtime and row["status"] != "deleted"
                if unchanged:
                    return False
                self.conn.execute(
                    "UPDATE documents SET size=?, mtime=?, status=CASE WHEN status='deleted' THEN 'pending' "
                    "ELSE status END, updated=? WHERE id=?",
                    (size, mtime, now, doc_id),
                )
            return self.queue.enqueue(
                "ingest",
                ingest_job_key(doc_id, size, mtime),
                {"document_id": doc_id, "path": path},
                priority=10,
                in_transaction=True,
            )

    def reject_path(self, path: str, reason: str) -> None:
        """A file refused before any job (unsupported type, undecodable name, folder named like a file)."""
        now = utcnow()
        with transaction(self.conn):
            self.conn.execute(
                "INSERT INTO documents (path, status, error, first_seen, updated) VALUES (?, 'rejected', ?, ?, ?) "
                "ON CONFLICT(path) DO UPDATE SET status='rejected', error=excluded.error, updated=excluded.updated "
                "WHERE documents.error IS NOT excluded.error OR documents.status != 'rejected'",
                (path, reason, now, now),
            )

    def paths_under(self, folder: str) -> list[str]:
        prefix = folder.rstrip("/") + "/"
        rows = self.conn.execute(
            "SELECT path FROM documents WHERE status != 'deleted' AND substr(path, 1, ?) = ?",
            (len(prefix), prefix),
        ).fetchall()
        return [row[0] for row in rows]

    def file_deleted(self, path: str, retire_samples: str = "keep") -> bool:
        with transaction(self.conn):
            row = self.by_path(path)
            if row is None or row["status"] == "deleted":
                return False
            self.conn.execute(
                "UPDATE documents SET status='deleted', updated=? WHERE id=?", (utcnow(), row["id"])
            )
            self._retire_chunks(row["id"], retire_samples, "source file deleted")
            self._hand_over_duplicate(row)
        return True

    def file_moved(self, src: str, dest: str, retire_samples: str = "keep") -> bool:
        """A rename inside the inbox: same content, new path; nothing is re-ingested. A file the move
        overwrote is retired as a deletion would retire it (`ingest.retire_samples`)."""
        with transaction(self.conn):
            row = self.by_path(src)
            if row is None:
                return False
            existing = self.by_path(dest)
            if existing is not None:
                if existing["status"] != "deleted":
                    # Overwrote another file: that file's content is gone.
                    self._retire_chunks(existing["id"], retire_samples, "overwritten by a move")
                self.conn.execute(
                    "UPDATE documents SET path=?, status='deleted', updated=? WHERE id=?",
                    (f"{dest}\x00replaced:{existing['id']}", utcnow(), existing["id"]),
                )
            self.conn.execute(
                "UPDATE documents SET path=?, updated=? WHERE id=?", (dest, utcnow(), row["id"])
            )
        return True

    # --- ingest side ----------------------------------------------------------------------------
    def reject(self, job: Job, doc_id: int, reason: str, retire_samples: str = "keep") -> None:
        with transaction(self.conn):
            self.conn.execute(
                "UPDATE documents SET status='rejected', error=?, updated=? WHERE id=?",
                (reason, utcnow(), doc_id),
            )
            # The previous version (if any) is no longer what the file holds.
            self._retire_chunks(doc_id, retire_samples, "file replaced by unusable content")
            self.queue.complete(job, in_transaction=True)

    def store_version(
        self,
        job: Job,
        doc_id: int,
        sha256: str,
        size: int,
        mtime: float,
        language: str,
        chunks: Sequence[NewChunk],
        heldout_fraction: float,
        retire_samples: str = "keep",
    ) -> str:
        """Record one content version and its chunks, queue their synthesis and finish the job, all in
        one transaction. Returns what happened: unchanged | moved | duplicate | stored."""
        now = utcnow()
        with transaction(self.conn):
            doc = self.get(doc_id)
            if doc is None:
                self.queue.complete(job, in_transaction=True)
                return "gone"
            if doc["sha256"] == sha256 and doc["status"] == "ingested":
                self.conn.execute(
                    "UPDATE documents SET size=?, mtime=?, updated=? WHERE id=?", (size, mtime, now, doc_id)
                )
                self.queue.complete(job, in_transaction=True)
                return "unchanged"
            twin = self.conn.execute(
                "SELECT * FROM documents WHERE sha256=? AND id != ? AND status IN ('ingested','deleted') "
                "ORDER BY status='ingested', id LIMIT 1",
                (sha256, doc_id),
            ).fetchone()
            if twin is not None and doc["sha256"] is None:
                outcome = self._adopt_twin(doc, twin, size, mtime)
                self.queue.complete(job, in_transaction=True)
                return outcome
            first = doc["first_sha256"] or sha256
            split = doc["split"] or self._choose_split(first, heldout_fraction)
            self._retire_chunks(doc_id, retire_samples, "file changed")
            self.conn.execute(
                "UPDATE documents SET sha256=?, first_sha256=?, size=?, mtime=?, status='ingested', error=NULL, "
                "language=?, split=?, duplicate_of=NULL, updated=? WHERE id=?",
                (sha256, first, size, mtime, language, split, now, doc_id),
            )
            self.conn.executemany(
                "INSERT INTO chunks (document_id, version, ordinal, text, heading, sha256, language, split, "
                "active, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?) "
                "ON CONFLICT(document_id, version, ordinal) DO UPDATE SET active=1",
                [
                    (doc_id, sha256, c.ordinal, c.text, c.heading, c.sha256, c.language, split, now)
                    for c in chunks
                ],
            )
            ids = self.conn.execute(
                "SELECT id FROM chunks WHERE document_id=? AND version=? AND +active=1 ORDER BY ordinal",
                (doc_id, sha256),
            ).fetchall()
            self.queue.enqueue_many(
                "synthesize",
                [(f"synthesize:{row[0]}", {"chunk_id": row[0]}) for row in ids],
                priority=50,
                in_transaction=True,
            )
            self.queue.complete(job, in_transaction=True)
        return "stored"

    def _adopt_twin(self, doc: sqlite3.Row, twin: sqlite3.Row, size: int, mtime: float) -> str:
        """Same content seen before. A deleted/vanished twin means a move: the old identity (and its
        chunks and samples) takes the new path. A live twin means a copy: no second set of chunks."""
        import os

        now = utcnow()
        twin_alive = twin["status"] == "ingested" and os.path.lexists(twin["path"])
        if twin_alive:
            self.conn.execute(
                "UPDATE documents SET sha256=?, first_sha256=?, size=?, mtime=?, status='ingested', "
                "duplicate_of=?, split=?, error=?, updated=? WHERE id=?",
                (
                    twin["sha256"],
                    twin["first_sha256"],
                    size,
                    mtime,
                    twin["id"],
                    twin["split"],
                    f"same content as {twin['path']}",
                    now,
                    doc["id"],
                ),
            )
            return "duplicate"
        path = doc["path"]
        self.conn.execute("DELETE FROM documents WHERE id=?", (doc["id"],))
        self.conn.execute(
            "UPDATE documents SET path=?, size=?, mtime=?, status='ingested', error=NULL, updated=? WHERE id=?",
            (path, size, mtime, now, twin["id"]),
        )
        self.conn.execute(
            "UPDATE chunks SET active=1 WHERE document_id=? AND version=?", (twin["id"], twin["sha256"])
        )
        self.conn.execute(
            "UPDATE samples SET kept=NULL, reason=NULL WHERE reason='source retired' AND chunk_id IN "
            "(SELECT id FROM chunks WHERE document_id=? AND version=?)",
            (twin["id"], twin["sha256"]),
        )
        return "moved"

    def _choose_split(self, first_sha256: str, fraction: float) -> str:
        if heldout_bucket(first_sha256) < fraction:
            return "heldout"
        # Once there are two documents, at least one is held out; the newcomer (no samples yet) is it.
        # Two indexed EXISTS probes: counting every document here made each ingest O(documents).
        has_heldout, has_train = self.conn.execute(
            "SELECT EXISTS(SELECT 1 FROM documents WHERE split = 'heldout'), "
            "EXISTS(SELECT 1 FROM documents WHERE split = 'train')"
        ).fetchone()
        if not has_heldout and has_train:
            return "heldout"
        return "train"

    def _retire_chunks(self, doc_id: int, retire_samples: str, reason: str) -> None:
        # `+active`: without it SQLite picks the chunks_active index and walks every active chunk (each
        # ingest was O(chunks): 10k documents took 30x as long to store as 1k); the document's own
        # chunks come from the (document_id, version, ordinal) key instead.
        self.conn.execute("UPDATE chunks SET active=0 WHERE document_id=? AND +active=1", (doc_id,))
        if retire_samples == "drop":
            self.conn.execute(
                "UPDATE samples SET kept=0, reason='source retired' WHERE kept IS NOT 0 AND chunk_id IN "
                "(SELECT id FROM chunks WHERE document_id=? AND +active=0)",
                (doc_id,),
            )

    def _hand_over_duplicate(self, row: sqlite3.Row) -> None:
        """A deleted original whose copy is still in the inbox: the copy takes over its chunks."""
        copy = self.conn.execute(
            "SELECT * FROM documents WHERE duplicate_of=? AND status='ingested' ORDER BY id LIMIT 1",
            (row["id"],),
        ).fetchone()
        if copy is None:
            return
        self.conn.execute(
            "UPDATE documents SET duplicate_of=? WHERE duplicate_of=? AND id != ?",
            (copy["id"], row["id"], copy["id"]),
        )
        self.conn.execute(
            "UPDATE chunks SET document_id=?, active=1 WHERE document_id=? AND version=?",
            (copy["id"], row["id"], row["sha256"]),
        )
        self.conn.execute("UPDATE documents SET duplicate_of=NULL, error=NULL WHERE id=?", (copy["id"],))
        self.conn.execute(
            "UPDATE samples SET kept=NULL, reason=NULL WHERE reason='source retired' AND chunk_id IN "
            "(SELECT id FROM chunks WHERE document_id=?)",
            (copy["id"],),
        )
