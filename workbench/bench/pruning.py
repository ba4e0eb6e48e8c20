"""Perplexity against the share of attention heads pruned, for each importance criterion.

Every point prunes a freshly loaded model, so points are independent; `random` runs once
per seed and is summarised by its median, the control the other criteria must beat.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tqdm.auto import tqdm

import workbench
from workbench.compress.data import evaluation_texts
from workbench.compress.pruning import prune_heads
from workbench.compress.quality import perplexity


def run_curve(source: str | None, ratios: list[float], criteria: list[str], seeds: list[int], windows: int,
              calibration_texts: int = 16) -> list[dict]:
    texts = evaluation_texts()
    plan = [(r, c, s) for r in ratios for c in criteria for s in (seeds if c == "random" else seeds[:1])]
    rows = []
    base = None
    for ratio, criterion, seed in tqdm(plan, desc="pruning curve"):
        session = workbench.load(source, quiet=True)
        heads = None
        if ratio > 0:
            report = prune_heads(session, criterion=criterion, ratio=ratio, seed=seed, calibration_texts=calibration_texts)
            heads = sum(report.heads_after)
        elif base is not None:
            rows.append({**base, "criterion": criterion, "seed": seed})
            continue
        row = {
            "ratio": ratio,
            "criterion": criterion,
            "seed": seed,
            "heads": heads if heads is not None else session.model.config.num_attention_heads * session.model.config.num_hidden_layers,
            "perplexity": perplexity(session.model, session.tokenizer, texts, max_windows=windows),
        }
        if ratio == 0:
            base = {k: v for k, v in row.items() if k not in ("criterion", "seed")}
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for ratio in sorted({r["ratio"] for r in rows}):
        for criterion in sorted({r["criterion"] for r in rows}):
            points = [r for r in rows if r["ratio"] == ratio and r["criterion"] == criterion]
            if points:
                out.append({"ratio": ratio, "criterion": criterion, "heads": points[0]["heads"],
                            "perplexity_median": statistics.median(p["perplexity"] for p in points),
                            "runs": len(points)})
    return out


def to_markdown(summary: list[dict], meta: dict) -> str:
    criteria = sorted({s["criterion"] for s in summary})
    lines = [
        f"Pruning curve: {meta['source']}, perplexity on {meta['windows']} x 512 tokens of held-out text "
        f"(random: median of seeds {meta['seeds']})",
        "",
        "| KV groups removed | heads left | " + " | ".join(criteria) + " |",
        "|---|---|" + "---|" * len(criteria),
    ]
    for ratio in sorted({s["ratio"] for s in summary}):
        cells = {s["criterion"]: s for s in summary if s["ratio"] == ratio}
        heads = next(iter(cells.values()))["heads"]
        lines.append(f"| {ratio:.0%} | {heads} | " + " | ".join(f"{cells[c]['perplexity_median']:.2f}" for c in criteria) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, rows: list[dict], summary: list[dict], meta: dict) -> None:
    import plotly.graph_objects as go

    out.mkdir(parents=True, exist_ok=True)
    (out / "pruning.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=2))
    (out / "pruning.md").write_text(to_markdown(summary, meta))
    fig = go.Figure()
    for criterion in sorted({s["criterion"] for s in summary}):
        points = [s for s in summary if s["criterion"] == criterion]
        fig.add_scatter(x=[p["ratio"] * 100 for p in points], y=[p["perplexity_median"] for p in points], mode="lines+markers", name=criterion)
    fig.update_layout(title=f"Perplexity vs KV groups pruned: {meta['source']}", xaxis_title="% of KV groups removed",
                      yaxis_title="held-out perplexity", yaxis_type="log", width=900, height=500)
    fig.write_html(out / "pruning.html", include_plotlyjs="cdn")
