"""The `status` report: one read-only pass over the database, no model, no torch.

The JSON shape is a stable interface for scripts and monitoring; add keys, never rename them.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from state.counts import chunks_by_activity, documents_by_status, jobs_by_kind_and_state, samples_by_outcome
from state.db import connect
from state.index_records import active_languages
from state.layout import StateLayout
from state.query_log import QueryLog
from state.real_queries import JudgmentStore, RealQueryStore
from state.registry import current_model_row
from state.samples import count_unused_train
from state.trials import TrialStore

HEARTBEAT_STALE_S = 60.0
MAX_REJECTIONS = 50
MAX_ERRORS = 20
MAX_ROUNDS = 10


def empty_status(llm_url: str = "") -> dict[str, Any]:
    return {
        "daemon": {
            "alive": False,
            "pid": None,
            "heartbeat": None,
            "activity": "never started",
            "restart_needed": [],
        },
        "documents": {"pending": 0, "ingested": 0, "rejected": 0, "deleted": 0, "rejections": []},
        "chunks": {"active": 0, "retired": 0},
        "samples": {
            "total": 0,
            "question": 0,
            "rewrite": 0,
            "pseudo": 0,
            "structure": 0,
            "train": 0,
            "heldout": 0,
            "kept": 0,
            "dropped": 0,
            "unfiltered": 0,
            "unused_train": 0,
        },
        "jobs": {"pending": 0, "running": 0, "done": 0, "failed": 0, "dead": 0, "recent_errors": []},
        "llm": {
            "url": llm_url,
            "breaker": "closed",
            "concurrency": None,
            "max_concurrency": None,
            "concurrency_reason": None,
            "structured": None,
        },
        "rounds": [],
        "model": {"current": None, "path": None, "metrics": {}, "base": None},
        "index": {"live": None, "collections": [], "error": None},
        "query_log": {"queries": 0, "events": 0, "queries_with_events": 0},
        "trial": None,
    }


def read_status(layout: StateLayout, llm_url: str = "", now: float | None = None) -> dict[str, Any]:
    status = empty_status(llm_url)
    if not layout.database.exists():
        return status
    conn = connect(layout.database, readonly=True)
    try:
        _fill(conn, status, layout, now if now is not None else time.time())
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
    finally:
        conn.close()
    return status


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else None


def _fill(conn: sqlite3.Connection, status: dict[str, Any], layout: StateLayout, now: float) -> None:
    row = conn.execute("SELECT * FROM daemon WHERE id=1").fetchone()
    if row is not None:
        _fill_daemon(status, row, now)
    _fill_documents(conn, status)
    status["chunks"].update(chunks_by_activity(conn))
    _fill_samples(conn, status)
    _fill_jobs(conn, status)
    status["rounds"] = [
        _round_entry(r) for r in conn.execute("SELECT * FROM rounds ORDER BY id DESC LIMIT ?", (MAX_ROUNDS,))
    ]
    _fill_index(conn, status, row)
    if row is not None and "base_model" in row.keys() and row["base_model"]:
        status["model"]["base"] = {
            "reference": row["base_model"],
            "reason": row["base_reason"],
            "languages": active_languages(conn),  # whether the corpus still fits the base auto chose
        }
    model = current_model_row(conn)
    if model is not None:
        status["model"] = {
            "current": f"v{model['id']}",
            "path": str(Path(layout.current)),
            "version_path": model["path"],
            "metrics": _loads(model["metrics"]) or {},
            "promoted_at": model["promoted_at"],
            "base": status["model"]["base"],
        }
    _fill_query_log(conn, status)
    _fill_trial(conn, status)


def _fill_trial(conn: sqlite3.Connection, status: dict[str, Any]) -> None:
    """The latest interleaved trial (state/trials.py), running or ended, with its questions so far."""
    try:
        recent = TrialStore(conn).recent(1)
        if recent:
            trial = recent[0]
            status["trial"] = {
                "id": trial.id,
                "round": trial.round_id,
                "candidate": trial.version,
                "against": f"v{trial.replacing_id}" if trial.replacing_id is not None else "base",
                "share": trial.share,
                "arms": list(trial.arms),
                "arms_out": list(trial.arms_out),
                "started": trial.started,
                "ended": trial.ended,
                "result": trial.result,
                "reason": trial.reason,
                "questions": TrialStore(conn).question_count(trial.id),
            }
    except sqlite3.OperationalError as exc:  # a database from before trials
        if "no such" not in str(exc):
            raise


def _fill_query_log(conn: sqlite3.Connection, status: dict[str, Any]) -> None:
    """What the query log holds (a database from before the log reads as empty)."""
    try:
        status["query_log"].update(QueryLog(conn).counts())
        status["query_log"]["questions"] = RealQueryStore(conn).split_counts()
        status["query_log"]["judgments"] = JudgmentStore(conn).count()
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise


def _fill_daemon(status: dict[str, Any], row: sqlite3.Row, now: float) -> None:
    """Alive means a fresh heartbeat from a process that did not say it stopped."""
    alive = (
        bool(row["pid"])
        and row["heartbeat_ts"] is not None
        and (now - row["heartbeat_ts"] < HEARTBEAT_STALE_S)
        and row["activity"] != "stopped"
    )
    status["daemon"] = {
        "alive": alive,
        "pid": row["pid"] if alive else None,
        "heartbeat": row["heartbeat"],
        "activity": row["activity"] if alive else f"not running (last: {row['activity']})",
        "started": row["started"],
        "restart_needed": (_loads(row["restart_keys"]) or [])
        if alive and "restart_keys" in row.keys()
        else [],
    }
    status["llm"]["breaker"] = row["breaker"]
    llm_state = _loads(row["llm"]) if "llm" in row.keys() else None
    if alive and isinstance(llm_state, dict):
        for key in ("concurrency", "max_concurrency", "concurrency_reason", "structured"):
            status["llm"][key] = llm_state.get(key)


def _fill_documents(conn: sqlite3.Connection, status: dict[str, Any]) -> None:
    docs = status["documents"]
    docs.update(documents_by_status(conn))
    docs["rejections"] = [
        {"path": r["path"], "reason": r["error"], "updated": r["updated"]}
        for r in conn.execute(
            "SELECT path, error, updated FROM documents WHERE status='rejected' ORDER BY updated DESC LIMIT ?",
            (MAX_REJECTIONS,),
        )
    ]


def _fill_samples(conn: sqlite3.Connection, status: dict[str, Any]) -> None:
    samples = status["samples"]
    for kind, count in conn.execute("SELECT kind, COUNT(*) FROM samples GROUP BY kind"):
        samples[kind] = count
        samples["total"] += count
    for split, count in conn.execute("SELECT split, COUNT(*) FROM samples GROUP BY split"):
        samples[split] = count
    samples.update(samples_by_outcome(conn))
    samples["unused_train"] = count_unused_train(conn)


def _fill_jobs(conn: sqlite3.Connection, status: dict[str, Any]) -> None:
    jobs = status["jobs"]
    by_kind = jobs_by_kind_and_state(conn)
    for (_kind, state), count in by_kind.items():
        jobs[state] = jobs.get(state, 0) + count
    jobs["by_kind"] = {f"{kind}:{state}": n for (kind, state), n in by_kind.items()}
    jobs["recent_errors"] = [
        {
            "id": r["id"],
            "kind": r["kind"],
            "state": r["state"],
            "attempts": r["attempts"],
            "error": r["last_error"],
            "updated": r["updated"],
        }
        for r in conn.execute(
            "SELECT id, kind, state, attempts, last_error, updated FROM jobs "
            "WHERE state IN ('failed','dead') AND last_error IS NOT NULL ORDER BY updated DESC LIMIT ?",
            (MAX_ERRORS,),
        )
    ]


def _round_entry(r: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": r["id"],
        "state": r["state"],
        "stage": r["stage"],
        "decision": r["decision"],
        "reason": r["reason"] or r["error"] or "",
        "started": r["started"],
        "finished": r["finished"],
        "trigger": r["trigger"],
        "progress": _loads(r["progress"]) or {},
        "n_train": r["n_train"],
        "n_heldout": r["n_heldout"],
        "metrics": {
            "candidate": _loads(r["candidate_metrics"]),
            "merged": _loads(r["merged_metrics"]),
            "current": _loads(r["current_metrics"]),
            "eval_sets": _loads(r["eval_sets"]),
        },
        "model_id": r["model_id"],
        "cause": r["cause"] if "cause" in r.keys() else None,
        "hook": (_loads(r["hook"]) if "hook" in r.keys() else None),
        "steps": (_loads(r["steps"]) if "steps" in r.keys() else None) or [],
    }


def _fill_index(conn: sqlite3.Connection, status: dict[str, Any], daemon_row: sqlite3.Row | None) -> None:
    """The vector store as the index job last recorded it (the CLI never opens Milvus to answer)."""
    index = status["index"]
    if daemon_row is not None and "index_error" in daemon_row.keys():
        index["error"] = daemon_row["index_error"]
    try:
        rows = conn.execute(
            "SELECT * FROM index_collections WHERE state != 'dropped' ORDER BY created DESC"
        ).fetchall()
    except sqlite3.OperationalError:
        return  # a database from before the index existed
    for row in rows:
        analyzer = row["analyzer"] if "analyzer" in row.keys() else None
        weight = row["bm25_weight"] if "bm25_weight" in row.keys() else None
        entry = {
            "name": row["name"],
            "model": f"v{row['model_id']}" if row["model_id"] is not None else "base",
            "state": row["state"],
            "chunks": row["chunks"],
            "progress": row["progress"],
            "swapped": row["swapped"],
            # what this collection can serve: "hybrid" (BM25 + dense) or "dense" (built before hybrid)
            "retrieval": "hybrid" if analyzer else "dense",
            "analyzer": analyzer,
            "bm25_weight": weight,
        }
        index["collections"].append(entry)
        if row["state"] == "live":
            index["live"] = entry


def set_served_mode(status: dict[str, Any], wanted: str) -> None:
    """`index.mode` (what search and eval serve by default) and what the live collection can serve of
    it now: a collection built before hybrid search serves dense until its rebuild goes live."""
    index = status["index"]
    live = index.get("live")
    index["mode"] = wanted
    if not wanted or live is None:
        index["serving"] = None
    elif wanted != "dense" and live.get("retrieval") != "hybrid":
        index["serving"] = "dense"
    else:
        index["serving"] = wanted


def set_served(status: dict[str, Any], served: dict[str, Any] | None, wanted: str) -> None:
    """What the one resolution of "what is served" (daemon/serving.py, the same `search` reads) says:
    the version and folder, why nothing serves yet, and how far the live collection lags the chunks."""
    set_served_mode(status, wanted)
    status["served"] = served
    if served is None:
        return
    index = status["index"]
    index["behind"] = served["behind"] if index.get("live") else None
    if index.get("live") and not served.get("collection") and wanted:
        index["serving"] = None  # the live collection is another model's: search answers by exact search


def _retrieval(entry: dict[str, Any]) -> str:
    if entry.get("retrieval") != "hybrid":
        return "dense only: built before hybrid search, rebuilt in the background"
    weight = entry.get("bm25_weight")
    share = f", BM25 share {weight:.2f}" if weight is not None else ", BM25 share by query language"
    return f"hybrid: BM25 ({entry.get('analyzer')}) + dense{share}"


def _steps_line(steps: list[dict[str, Any]]) -> str:
    """'snapshot 0.1s, negatives 46s, train 11s ... peak 1.2 GB (train)': where a round's time and memory went."""
    seconds: dict[str, float] = {}
    for step in steps:
        seconds[step["step"]] = seconds.get(step["step"], 0.0) + float(step.get("seconds", 0))
    peak = max(steps, key=lambda step: step.get("peak_rss_mb", 0))
    times = ", ".join(
        f"{name} {value:.0f}s" if value >= 1 else f"{name} {value:.1f}s" for name, value in seconds.items()
    )
    return f"{times}; peak {peak.get('peak_rss_mb', 0) / 1024:.1f} GB ({peak['step']})"


def format_status(status: dict[str, Any]) -> str:
    """A compact human table."""
    d = status["daemon"]
    docs = status["documents"]
    s = status["samples"]
    j = status["jobs"]
    lines = [
        f"daemon    {'alive' if d['alive'] else 'down'}  pid={d['pid'] or '-'}  heartbeat={d['heartbeat'] or '-'}",
        f"          {d['activity']}",
        *(
            [f"          restart needed to apply: {', '.join(d['restart_needed'])}"]
            if d.get("restart_needed")
            else []
        ),
        f"documents pending={docs['pending']} ingested={docs['ingested']} rejected={docs['rejected']} "
        f"deleted={docs['deleted']}",
        f"chunks    active={status['chunks']['active']} retired={status['chunks']['retired']}",
        f"samples   total={s['total']} question={s['question']} rewrite={s['rewrite']} pseudo={s['pseudo']} "
        f"kept={s['kept']} dropped={s.get('dropped', 0)} unfiltered={s.get('unfiltered', 0)} "
        f"train={s['train']} heldout={s['heldout']} new-for-training={s.get('unused_train', 0)}",
        f"jobs      pending={j['pending']} running={j['running']} done={j['done']} failed={j['failed']} "
        f"dead={j['dead']}",
        f"llm       {status['llm']['url'] or '(none: built-in synthesizer)'}  breaker={status['llm']['breaker']}",
    ]
    llm = status["llm"]
    if llm.get("concurrency") is not None:
        lines.append(
            f"          concurrency {llm['concurrency']}/{llm['max_concurrency']} "
            f"({llm['concurrency_reason']})  structured={llm['structured']}"
        )
    model = status["model"]
    lines.append(
        f"model     {model['current'] or 'base model (nothing promoted yet)'}"
        + (f"  {model['path']}" if model["path"] else "")
    )
    base = model.get("base") or {}
    if base.get("reference"):
        lines.append(f"base      {base['reference']}  ({base.get('reason') or 'configured'})")
    if base.get("drift"):
        lines.append(f"          warning: {base['drift']}")
    served = status.get("served") or {}
    if served.get("problem"):
        lines.append(f"serving   nothing yet: {served['problem']}")
    if model.get("encoder"):
        lines.append(f"encoder   {model['encoder']}")
    lines += _index_lines(status.get("index") or {})
    lines += _query_log_lines(status.get("query_log") or {})
    lines += _trial_lines(status.get("trial"))
    lines += _round_lines(status["rounds"])
    if docs["rejections"]:
        lines.append("rejected files")
        for item in docs["rejections"][:20]:
            lines.append(f"  {item['path']}: {item['reason']}")
    if j["recent_errors"]:
        lines.append("job errors")
        for item in j["recent_errors"][:10]:
            lines.append(
                f"  #{item['id']} {item['kind']} {item['state']} x{item['attempts']}: "
                f"{(item['error'] or '')[:120]}"
            )
    return "\n".join(lines)


def _index_lines(index: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if index.get("collections") or index.get("error"):
        live = index.get("live")
        parts = [
            f"live {live['name']} ({live['model']}, {live['chunks']} chunks, {_retrieval(live)})"
            if live
            else "no live collection"
        ]
        for entry in index["collections"]:
            if entry["state"] == "filling" or (entry["progress"] and entry is not live):
                parts.append(f"filling {entry['name']} ({entry['model']}) {entry['progress'] or ''}".rstrip())
            elif entry["progress"]:
                parts.append(f"adding {entry['progress']}")
        if index.get("serving"):
            parts.insert(0, f"serves {index['serving']}")
        if index.get("behind"):
            parts.append(
                f"{index['behind']} chunk change(s) not yet in the live collection (a sync adds them)"
            )
        lines.append("index     " + "; ".join(parts))
        if index.get("error"):
            lines.append(f"          error: {index['error'][:160]}")
    return lines


def _query_log_lines(query_log: dict[str, Any]) -> list[str]:
    """'queries   logged=120 events=31 (on 25 queries)', and whether logging is off."""
    if not query_log:
        return []
    line = (
        f"queries   logged={query_log.get('queries', 0)} events={query_log.get('events', 0)} "
        f"(on {query_log.get('queries_with_events', 0)} queries)"
    )
    if query_log.get("enabled") is False:
        line += "  logging off (query_log.enabled = false)"
    lines = [line]
    questions = query_log.get("questions") or {}
    if any(questions.values()):
        lines.append(
            f"          questions: {questions.get('train', 0)} to train on, {questions.get('judge', 0)} kept "
            f"for the gate; {query_log.get('judgments', 0)} stored judgments"
        )
    return lines


def _trial_lines(trial: dict[str, Any] | None) -> list[str]:
    """'trial     #2 v7 against v5 on 20% of searches: 140 questions; 40 won, ...' (or how it ended)."""
    if not trial:
        return []
    origin = f" (round {trial['round']})" if trial["round"] is not None else ""
    head = (
        f"trial     #{trial['id']}{origin} {trial['candidate']} against {trial['against']} "
        f"on {trial['share']:.0%} of searches, {trial['questions']} interleaved questions"
    )
    if trial.get("arms"):
        arms = ", ".join(
            f"{share:g}" + (" (out)" if arm in trial.get("arms_out", []) else "")
            for arm, share in enumerate(trial["arms"])
        )
        head += f", the candidate at BM25 shares {arms}"
    if trial["ended"]:
        return [f"{head}; ended {trial['ended']}: {trial['result']}", f"          {trial['reason']}"]
    return [f"{head}; running", f"          {trial['reason'] or 'no events tallied yet'}"]


def _round_lines(rounds: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    if rounds:
        lines.append("rounds")
        for r in rounds:
            progress = r.get("progress") or {}
            step = ""
            if progress.get("total") and "scored" in progress:
                step = f" teacher {progress['scored']}/{progress['total']} pairs"
            elif progress.get("total"):
                step = f" step {progress.get('step', 0)}/{progress['total']}"
                if progress.get("loss") is not None:
                    step += f" loss {progress['loss']:.4f}"
            lines.append(
                f"  #{r['id']:<4} {r['state']:<9} {r['stage']:<10}{step} "
                f"{r['decision'] or '':<9} {r['reason'][:90]}"
            )
            if r.get("steps") and r["state"] != "running":
                lines.append("        " + _steps_line(r["steps"]))
            hook = r.get("hook")
            if hook and not hook.get("ok"):
                lines.append(
                    f"        on_promote hook failed (exit {hook.get('returncode')}): "
                    f"{(hook.get('stderr') or '').strip()[-120:]}"
                )
    return lines
