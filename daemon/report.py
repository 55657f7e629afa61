"""`embedtune report`: one self-contained HTML page (charts inlined as PNG) plus the chart as a file."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from daemon.settings import Settings
from state.counts import served_after
from state.db import connect
from state.layout import StateLayout
from state.pipeline_progress import report_data
from state.round_records import RoundState

SERIES = (("heldout", "ndcg@10"), ("heldout", "recall@10"), ("heldout+served", "ndcg@10"))


def _served_series(rounds):
    """Per finished round: the held-out scores of the model that served after its decision, as dense
    retrieval and (when the round judged it) as the index serves it, hybrid."""
    points = []
    for row in rounds:
        if row["state"] != RoundState.FINISHED or not row["current_metrics"]:
            continue
        metrics = served_after(row)
        points.append((row["id"], {(s, m): (metrics.get(s) or {}).get(m) for s, m in SERIES}))
    return points


def _chart(rounds, growth, funnel) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    series = _served_series(rounds)
    if series:
        ids = [p[0] for p in series]
        for key in SERIES:
            values = [p[1][key] for p in series]
            if any(v is not None for v in values):
                label = f"{key[1]} (served hybrid)" if key[0].endswith("+served") else key[1]
                axes[0].plot(
                    ids, [v if v is not None else float("nan") for v in values], marker="o", label=label
                )
        axes[0].legend()
        axes[0].set_xticks(ids)
    axes[0].set_title("model in service (held-out)")
    axes[0].set_xlabel("round")
    if growth:
        total, cumulative = 0, []
        for row in growth:
            total += row["n"]
            cumulative.append(total)
        axes[1].bar([row["day"] for row in growth], cumulative, color="#69c")
        axes[1].tick_params(axis="x", rotation=45)
    axes[1].set_title("documents ingested")
    labels = ["generated", "judged", "filtered", "kept"]
    axes[2].bar(labels, funnel, color=["#888", "#69c", "#39c", "#2a7"])
    axes[2].set_title("sample funnel")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def render_html(rounds, growth, funnel, chunks, png: bytes) -> str:
    rows = []
    for row in reversed(rounds):

        def metric(text, name="ndcg@10", evaluation="heldout"):
            value = (json.loads(text or "{}").get(evaluation) or {}).get(name)
            return f"{value:.4f}" if isinstance(value, int | float) else "-"

        merged = json.loads(row["merged_metrics"] or "{}")
        merged_text = ", ".join(
            f"{k}: {(v.get('heldout') or {}).get('ndcg@10', 0):.4f}" for k, v in merged.items()
        )
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(cell))}</td>"
                for cell in (
                    row["id"],
                    row["started"][:19],
                    row["state"],
                    row["decision"] or "-",
                    row["n_train"] or 0,
                    row["n_heldout"] or 0,
                    metric(row["current_metrics"]),
                    metric(row["candidate_metrics"]),
                    merged_text or "-",
                    metric(row["current_metrics"], evaluation="heldout+served"),
                    metric(row["candidate_metrics"], evaluation="heldout+served"),
                    (row["reason"] or row["error"] or "")[:200],
                )
            )
            + "</tr>"
        )
    image = base64.b64encode(png).decode()
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>embedtune report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left}}th{{background:#f3f3f3}}img{{max-width:100%;height:auto}}</style>
</head><body>
<h1>embedtune report</h1>
<p>{len(rounds)} round(s); {chunks} active chunks; samples generated {funnel[0]}, judged {funnel[1]},
filtered {funnel[2]}, kept {funnel[3]}.</p>
<img alt="model quality over rounds, corpus growth and sample funnel" src="data:image/png;base64,{image}">
<h2>Rounds</h2>
<table><tr><th>round</th><th>started</th><th>state</th><th>decision</th><th>train pairs</th><th>held-out queries</th>
<th>current nDCG@10</th><th>candidate nDCG@10</th><th>merged nDCG@10</th>
<th>current served (hybrid)</th><th>candidate served (hybrid)</th><th>reason</th></tr>
{"".join(rows)}
</table>
<h2>How to read this</h2>
<p>The left chart is the held-out score of the model that served after each finished round (a promotion
raises it; a rejected round keeps it). Each row compares, on the same held-out queries, the model in
service before the round, the fine-tuned candidate and its LM-Cocktail merges; the reason says which set
decided. The "served (hybrid)" columns score the same queries as the index serves them (BM25 fused with
each model's vectors): the gate refuses a model that makes them clearly worse. The funnel shows how many generated pairs survived the judge and the filter.</p>
</body></html>
"""


def write_report(settings: Settings, output: Path | None = None) -> int:
    layout = StateLayout(settings.paths.state_dir)
    if not layout.database.exists():
        print(f"embedtune: no database at {layout.database}")
        return 1
    output = output or layout.root / "report"
    output.mkdir(parents=True, exist_ok=True)
    conn = connect(layout.database, readonly=True)
    try:
        data = report_data(conn)
        rounds, growth, funnel, chunks = data.rounds, data.growth, data.funnel, data.active_chunks
    finally:
        conn.close()
    png = _chart(rounds, growth, funnel)
    (output / "report.png").write_bytes(png)
    (output / "index.html").write_text(render_html(rounds, growth, funnel, chunks, png), encoding="utf-8")
    print(f"report written to {output / 'index.html'} (chart: {output / 'report.png'})")
    return 0
