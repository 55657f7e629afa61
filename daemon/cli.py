"""The `embedtune` command. Imports stay lazy: `status` must answer fast and never import torch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from daemon.settings import ConfigError, Settings, load_settings

# What a user reads first (`embedtune --help`): what the product does for them, not how the module is built.
DESCRIPTION = (
    "embedtune keeps a retrieval embedding model tuned to your own documents: drop files into its\n"
    "inbox, and it indexes them, trains on them and serves the model that finds them best."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedtune", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="config file (default: $EMBEDTUNE_CONFIG, else embedded defaults)")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("run", help="run the daemon in the foreground (what the systemd unit starts)")

    status = sub.add_parser("status", help="what the daemon is doing")
    status.add_argument("--json", action="store_true", help="machine-readable output (stable shape)")

    sub.add_parser("rollback", help="serve the previous model again")
    trial = sub.add_parser("trial", help="the running interleaved trial (docs/promotion.md)")
    trial.add_argument("action", choices=("stop",), help="stop: end it now and discard its candidate")

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    config_sub.add_parser("check", help="validate the config file and print the effective settings")

    train = sub.add_parser("train", help="training rounds: without --now, say when the next one starts")
    train.add_argument("--now", action="store_true", help="start a round now, whatever the schedule")
    train.add_argument(
        "--foreground",
        action="store_true",
        help="with --now: run the round here even if the daemon is running",
    )

    jobs = sub.add_parser("requeue", help="give dead jobs a fresh set of attempts")
    jobs.add_argument("--kind", help="only jobs of this kind")

    samples = sub.add_parser("samples", help="write sample documents (e.g. into the inbox) for a first run")
    samples.add_argument("--into", default=None, help="folder (default: the configured inbox)")

    from daemon.once import add_once_arguments

    add_once_arguments(sub.add_parser("once", help="one-shot: ingest, synthesize and train, then exit"))

    export = sub.add_parser("export", help="write the training data for other tools")
    export.add_argument(
        "--format",
        required=True,
        choices=["flagembedding", "sentence-transformers", "rag-eval", "embeddings", "queries"],
        help="embeddings: Parquet of every active chunk with its vector from the model in service; "
        "queries: the query log, one JSON line per query with its events",
    )
    export.add_argument("--output", required=True, help="output file")

    evaluate = sub.add_parser("eval", help="score a model on an evaluation set, with a 95%% interval")
    evaluate.add_argument(
        "--data", required=True, help="a BEIR folder, a RAG eval JSON, or anchor/positive JSON lines"
    )
    evaluate.add_argument("--model", default="current", help="current (default), base or a version (v3)")
    evaluate.add_argument("--against", default="base", help="compare with: base (default), current, vN, none")
    evaluate.add_argument("--metric", default="ndcg@10", help="the metric the interval is for")
    evaluate.add_argument(
        "--mode",
        choices=("model", "hybrid", "dense", "lexical", "all"),
        default="model",
        help="model (default): the model alone on the set's own corpus; hybrid, dense, lexical or all: "
        "the set's queries through `search` on what the index serves (feed the set's corpus first)",
    )
    evaluate.add_argument("--json", action="store_true")

    modes = ("hybrid", "dense", "lexical")
    mode_help = "hybrid (BM25 + the model), dense (the model alone) or lexical (BM25); default index.mode"
    search = sub.add_parser("search", help="search the chunks as the index serves them")
    search.add_argument("query", nargs="?", help="the question (or --queries FILE)")
    search.add_argument(
        "--queries", default=None, help="a file of queries: one a line, or JSON lines with id and query"
    )
    search.add_argument("--model", default="current", help="current (default), base or a version (v3)")
    search.add_argument("--mode", choices=modes, default=None, help=mode_help)
    search.add_argument("-k", type=int, default=10, help="hits to show (default 10)")
    search.add_argument("--json", action="store_true", help="one JSON object per query")

    compare = sub.add_parser("compare", help="base and current model side by side for one query")
    compare.add_argument("query")
    compare.add_argument("--mode", choices=modes, default=None, help=mode_help)
    compare.add_argument("-k", type=int, default=10, help="hits to show (default 10)")
    compare.add_argument("--json", action="store_true")

    serve = sub.add_parser(
        "serve", help="serve the model in service over HTTP (OpenAI /v1/embeddings, /v1/search, /health)"
    )
    serve.add_argument("--host", default=None, help="address to listen on (default serve.host, loopback)")
    serve.add_argument("--port", type=int, default=None, help="port (default serve.port, 8765)")

    report = sub.add_parser("report", help="write an HTML report (and a PNG chart)")
    report.add_argument("--output", default=None, help="folder (default: <state_dir>/report)")
    return parser


def _load(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(args.config)
    except ConfigError as exc:
        print(f"embedtune: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def cmd_status(settings: Settings, as_json: bool) -> int:
    from stages.base_choice import describe_base
    from state.layout import StateLayout
    from state.status import format_status, read_status, set_served

    layout = StateLayout(settings.paths.state_dir)
    status = read_status(layout, settings.llm.url)
    describe_base(status, settings.model.base)
    served, encoder = served_for_status(settings, layout)
    set_served(status, served, settings.index.mode if settings.index.enabled else "")
    status["model"]["encoder"] = encoder
    status["query_log"]["enabled"] = settings.query_log.enabled
    if as_json:
        print(json.dumps(status, indent=2, ensure_ascii=False))
    else:
        print(format_status(status))
    return 0


def served_for_status(settings: Settings, layout) -> tuple[dict | None, str]:
    """What is served (the same resolution `search` and the index job read) and what encodes for it, on
    one read-only connection; no torch, no model loaded, nothing converted."""
    from daemon.onnx_jobs import describe_encoder
    from daemon.serving import resolve_served
    from state.db import connect

    conn = connect(layout.database, readonly=True) if layout.database.exists() else None
    try:
        served = resolve_served(conn, settings, layout)
        summary = {
            "version": served.version,
            "path": str(served.path) if served.path else None,
            "problem": served.problem or None,
            "collection": served.live.name if served.live_is_ours() else None,
            "behind": served.behind,
            "bm25_weight": served.bm25_weight,
            "analyzer": served.analyzer,
        }
        try:
            encoder = describe_encoder(conn, settings, layout, served=served)
        except Exception as exc:  # status answers even when this part cannot be worked out
            encoder = f"unknown ({type(exc).__name__}: {exc})"
        return summary, encoder
    except Exception as exc:
        return None, f"unknown ({type(exc).__name__}: {exc})"
    finally:
        if conn is not None:
            conn.close()


def cmd_config_check(settings: Settings, source: str | None) -> int:
    from daemon.settings import config_path, missing_files

    path = config_path(source)
    problems = missing_files(settings)
    if problems:
        print(f"embedtune: invalid configuration in {path or 'embedded defaults'}:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    print(f"configuration OK ({path or 'embedded defaults'})")
    print(json.dumps(settings.model_dump(mode="json"), indent=2, ensure_ascii=False))
    return 0


def cmd_rollback(settings: Settings) -> int:
    from daemon.serving import base_model_path_or_none
    from state.db import Database
    from state.layout import StateLayout
    from state.registry import ModelRegistry, RegistryError

    layout = StateLayout(settings.paths.state_dir).ensure()
    db = Database(layout.database)
    try:
        record = ModelRegistry(db.conn, layout).rollback(base_model_path_or_none(settings))
    except RegistryError as exc:
        print(f"embedtune: {exc}", file=sys.stderr)
        return 1
    print(f"now serving {'v' + str(record.id) if record else 'the base model'}")
    if settings.index.enabled:
        from daemon.indexing import IndexService
        from state.vector_store import IndexUnavailable

        index = IndexService(settings, layout)
        index.enqueue(db.conn, "rollback")  # adds chunks that arrived since, or fills a new collection
        try:
            swapped = index.follow_serving(db.conn)
        except IndexUnavailable as exc:
            print(f"embedtune: the index alias was not moved (a queued sync retries): {exc}", file=sys.stderr)
            return 1
        if swapped is not None:
            print(f"index alias {settings.index.alias} now points at {swapped.name}")
        else:
            print("the index is filled for this model in the background (embedtune status shows progress)")
    return 0


def cmd_trial_stop(settings: Settings) -> int:
    """End the running interleaved trial and discard its candidate; `serve` follows within a poll."""
    from daemon.trials import stop_trial
    from state.db import Database
    from state.layout import StateLayout

    layout = StateLayout(settings.paths.state_dir).ensure()
    stopped = stop_trial(Database(layout.database).conn, layout, "stopped with `embedtune trial stop`")
    if stopped is None:
        print("embedtune: no trial is running", file=sys.stderr)
        return 1
    print(f"trial {stopped.trial_id} stopped; its candidate is discarded")
    return 0


def cmd_requeue(settings: Settings, kind: str | None) -> int:
    from state.db import Database
    from state.layout import StateLayout
    from state.queue import JobQueue

    layout = StateLayout(settings.paths.state_dir).ensure()
    count = JobQueue(Database(layout.database).conn).requeue_dead(kind)
    print(f"requeued {count} dead job(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = _load(args)
    if args.command == "status":
        return cmd_status(settings, args.json)
    if args.command == "config":
        return cmd_config_check(settings, args.config)
    if args.command == "train" and not args.now:  # read-only, like status: no logging set-up, no torch
        if args.foreground:
            print("embedtune: --foreground runs a round now; add --now", file=sys.stderr)
            return 2
        from daemon.round_scheduler import round_outlook

        print(round_outlook(settings))
        return 0
    from daemon.logs import configure_logging

    configure_logging(settings.logging.level, settings.logging.format)
    if args.command == "run":
        from daemon.service import run_daemon

        return run_daemon(settings, config_file=args.config)
    if args.command == "rollback":
        return cmd_rollback(settings)
    if args.command == "requeue":
        return cmd_requeue(settings, args.kind)
    if args.command == "trial":
        return cmd_trial_stop(settings)
    if args.command == "train":
        from daemon.round_scheduler import train_now

        return train_now(settings, foreground=args.foreground, config_file=args.config)
    if args.command == "samples":
        from daemon.bundled_docs import write_samples

        target = Path(args.into) if args.into else settings.paths.inbox
        print(f"wrote {write_samples(target)} sample documents to {target}")
        return 0
    if args.command == "once":
        from daemon.once import run_once

        return run_once(settings, args)
    if args.command == "export":
        from daemon.exports import export

        return export(settings, args.format, Path(args.output))
    if args.command == "eval":
        if args.mode != "model":
            from daemon.served_eval import cmd_eval_served

            return cmd_eval_served(
                settings, args.data, args.model, args.against, args.metric, args.mode, args.json
            )
        from daemon.evaluation import cmd_eval

        return cmd_eval(settings, args.data, args.model, args.against, args.metric, args.json)
    if args.command == "search":
        from daemon.search import cmd_search

        return cmd_search(settings, args.query, args.model, args.k, args.json, args.mode, args.queries)
    if args.command == "compare":
        from daemon.search import cmd_compare

        return cmd_compare(settings, args.query, args.k, args.json, args.mode)
    if args.command == "serve":
        from daemon.serve import cmd_serve

        return cmd_serve(settings, args.host, args.port)
    if args.command == "report":
        from daemon.report import write_report

        return write_report(settings, Path(args.output) if args.output else None)
    raise SystemExit(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
