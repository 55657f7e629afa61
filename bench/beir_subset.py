"""A smaller BEIR set for benchmarks that run the whole daemon on 2 cores: the first `--queries` queries
(file order, not chosen by score), every document relevant to them, and other documents drawn at random
(seeded) up to `--documents`. Scores on a subset are comparable between models, not to the full set's.

    python -m bench.beir_subset ../shared/data/zh-medqa /tmp/zh-medqa-2k --queries 300 --documents 2000
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--split", default="test")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with open(args.dataset / "qrels" / f"{args.split}.tsv", encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle, delimiter="\t") if len(row) >= 3]
    header, rows = (rows[0], rows[1:]) if not rows[0][-1].strip().lstrip("-").isdigit() else (None, rows)
    chosen: list[str] = []
    for query_id, _doc, score in rows:
        if float(score) > 0 and query_id not in chosen and len(chosen) < args.queries:
            chosen.append(query_id)
    kept_rows = [row for row in rows if row[0] in chosen]
    relevant = {row[1] for row in kept_rows}
    with open(args.dataset / "corpus.jsonl", encoding="utf-8") as handle:
        corpus = [json.loads(line) for line in handle]
    others = [row["_id"] for row in corpus if str(row["_id"]) not in relevant]
    random.Random(args.seed).shuffle(others)
    keep = relevant | set(others[: max(0, args.documents - len(relevant))])
    (args.output / "qrels").mkdir(parents=True, exist_ok=True)
    with open(args.output / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for row in corpus:
            if str(row["_id"]) in keep:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(args.dataset / "queries.jsonl", encoding="utf-8") as source:
        with open(args.output / "queries.jsonl", "w", encoding="utf-8") as handle:
            for line in source:
                if str(json.loads(line)["_id"]) in chosen:
                    handle.write(line)
    with open(args.output / "qrels" / f"{args.split}.tsv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(header or ["query-id", "corpus-id", "score"])
        writer.writerows(kept_rows)
    print(f"{len(chosen)} queries, {len(keep)} documents -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
