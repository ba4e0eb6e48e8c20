"""Plotly pictures of what `workbench.inspect` measures: the thin drawing layer the notebooks
call. Every function takes the library's plain data (frames, captures, timelines) and returns
a `plotly.graph_objects.Figure`; nothing here computes a number a test would check.

`python -m workbench.inspect.figures --out docs/figures` writes one PNG per notebook, computed
on the embedded model with the same library calls and sizes the notebooks use (static export
needs kaleido and a Chrome/Chromium on the machine).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

import workbench
from workbench.bench.pruning import PERPLEXITY_KEYS
from workbench.bench.tasks import arithmetic_items
from workbench.data import SHORT_ANSWER_PROMPT, held_out_texts
from workbench.inspect.attention import capture_attention, head_stats
from workbench.inspect.divergence import DivergenceMap, divergence_map
from workbench.inspect.kvcache import memory_curve
from workbench.inspect.thinking import thinking_timeline as run_timeline
from workbench.inspect.tradeoffs import pruning_tradeoffs, quantization_tradeoffs

PHASE_COLOURS = {"reasoning": "#8e6bbf", "answer": "#2a9d8f", "end": "#999999"}


def attention_heatmap(capture, layer: int, head: int) -> go.Figure:
    frame = capture.frame(layer, head)
    fig = go.Figure(
        go.Heatmap(
            z=frame.to_numpy(),
            x=list(frame.columns),
            y=list(frame.index),
            colorscale="Viridis",
            zmin=0,
            zmax=1,
            colorbar={"title": "p"},
        )
    )
    fig.update_layout(
        title=f"Attention of layer {layer}, head {head} (row: query token, column: key token)",
        yaxis_autorange="reversed",
        width=760,
        height=700,
        xaxis_tickangle=-60,
    )
    return fig


def head_map(stats: pd.DataFrame, column: str = "sink", title: str | None = None) -> go.Figure:
    """One statistic for every captured head: layers down, heads across."""
    grid = stats.pivot(index="layer", columns="head", values=column)
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=[f"h{h}" for h in grid.columns],
            y=list(grid.index),
            colorscale="Magma",
            colorbar={"title": column},
        )
    )
    fig.update_layout(
        title=title or f"{column} per head",
        xaxis_title="query head",
        yaxis_title="layer",
        yaxis_autorange="reversed",
        width=520,
        height=640,
    )
    return fig


def head_stats_overview(stats: pd.DataFrame, title: str = "Attention heads") -> go.Figure:
    """Sink attention, previous-token attention and entropy for every head, side by side."""
    columns = [
        ("sink", "attention to the first token"),
        ("previous_token", "attention to the previous token"),
        ("entropy", "entropy (nats)"),
    ]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[t for _, t in columns], horizontal_spacing=0.08)
    for i, (column, _) in enumerate(columns, start=1):
        grid = stats.pivot(index="layer", columns="head", values=column)
        fig.add_trace(
            go.Heatmap(
                z=grid.to_numpy(),
                x=[f"h{h}" for h in grid.columns],
                y=list(grid.index),
                colorscale="Magma",
                showscale=False,
            ),
            row=1,
            col=i,
        )
        fig.update_yaxes(autorange="reversed", title_text="layer" if i == 1 else None, row=1, col=i)
        fig.update_xaxes(title_text="query head", row=1, col=i)
    fig.update_layout(title=title, width=1100, height=560)
    return fig


def ablation_vs_importance(scan: pd.DataFrame, importance: pd.DataFrame) -> go.Figure:
    """Each KV group: its loss change when ablated against a pruning criterion's score."""
    merged = scan.merge(importance, on=["layer", "group"])
    fig = go.Figure(
        go.Scatter(
            x=merged["score"],
            y=merged["loss_delta"],
            mode="markers",
            text=[f"layer {layer}, group {g}" for layer, g in zip(merged.layer, merged.group)],
            marker={
                "color": merged["layer"],
                "colorscale": "Viridis",
                "showscale": True,
                "colorbar": {"title": "layer"},
            },
        )
    )
    criterion = importance["criterion"].iloc[0] if len(importance) else "criterion"
    fig.update_layout(
        title=f"Loss change when a KV group is ablated vs its {criterion} importance",
        xaxis_title=f"{criterion} importance",
        yaxis_title="loss change (nats)",
        width=760,
        height=480,
    )
    return fig


def kv_memory_curve(curve: pd.DataFrame, title: str = "KV cache against sequence length") -> go.Figure:
    """Cache bytes (exact) and process memory (allocator-level) per policy; skipped policies
    are named in the legend with their reason."""
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=(
            "KV-cache bytes (measured on the cache object)",
            "process memory (resident set, or CUDA allocated)",
        ),
    )
    measured = curve[curve.skipped.isna()]
    for i, (label, rows) in enumerate(measured.groupby("label", sort=False)):
        colour = f"hsl({(i * 83) % 360},60%,45%)"
        fig.add_scatter(
            x=rows.tokens,
            y=rows.cache_MiB,
            mode="lines+markers",
            name=label,
            legendgroup=label,
            line={"color": colour},
            row=1,
            col=1,
        )
        fig.add_scatter(
            x=rows.tokens,
            y=rows.process_MiB,
            mode="lines+markers",
            name=label,
            legendgroup=label,
            showlegend=False,
            line={"color": colour},
            row=1,
            col=2,
        )
    if len(measured):
        first = measured[measured.label == measured.label.iloc[0]]
        fig.add_scatter(
            x=first.tokens,
            y=first.dynamic_bytes_predicted / 2**20,
            mode="lines",
            name="predicted from config (dynamic)",
            line={"dash": "dot", "color": "black"},
            row=1,
            col=1,
        )
    for _, row in curve[curve.skipped.notna()].iterrows():
        fig.add_scatter(x=[None], y=[None], mode="markers", name=f"{row.label}: skipped ({row.skipped})", row=1, col=1)
    fig.update_xaxes(title_text="tokens in the cache")
    fig.update_yaxes(title_text="MiB")
    fig.update_layout(title=title, width=1150, height=480, legend={"orientation": "h", "y": -0.25})
    return fig


def thinking_timeline(timeline, title: str = "Thinking timeline") -> go.Figure:
    """One bar per generated token: its latency, coloured by phase, the token in the hover."""
    t = timeline.tokens
    fig = go.Figure()
    for phase, rows in t.groupby("phase", sort=False):
        fig.add_bar(
            x=rows.step,
            y=rows.latency_s * 1000,
            name=phase,
            marker_color=PHASE_COLOURS.get(phase),
            text=[repr(x) for x in rows.text],
            textposition="none",
            hovertemplate="step %{x}: %{text}<br>%{y:.1f} ms",
        )
    summary = timeline.summary()
    if summary.time_to_first_answer_token_s is not None:
        first = t[t.phase == "answer"].step.iloc[0]
        fig.add_vline(
            x=first - 0.5,
            line_dash="dot",
            annotation_text=f"first answer token at {summary.time_to_first_answer_token_s:.2f} s",
        )
    fig.update_layout(
        title=title, xaxis_title="generated token", yaxis_title="latency (ms)", width=1000, height=420, bargap=0.1
    )
    return fig


def compression_tradeoffs(
    pruning: pd.DataFrame, quantization: pd.DataFrame, title: str = "Compression trade-offs"
) -> go.Figure:
    """One row of panels per held-out text both frames measured (`perplexity`: the reference
    text, `perplexity_prose`: out-of-domain prose): the pruning curve per criterion on the left,
    each quantize configuration's weight bytes on the right. A criterion or configuration keeps
    its colour in every row, and its legend entry shows or hides it in all of them."""
    texts = [(name, key) for name, key in PERPLEXITY_KEYS.items() if key in pruning and key in quantization]
    fig = make_subplots(
        rows=len(texts),
        cols=2,
        subplot_titles=[
            panel
            for name, _ in texts
            for panel in (
                f"head pruning: {name}-text perplexity vs KV groups removed",
                f"quantization: {name}-text perplexity vs weight bytes",
            )
        ],
        vertical_spacing=0.14,
    )
    palette = plotly.colors.qualitative.Plotly
    criteria = [(str(criterion), rows) for criterion, rows in pruning.groupby("criterion")]
    for r, (name, key) in enumerate(texts, start=1):
        for i, (criterion, rows) in enumerate(criteria):
            fig.add_scatter(
                x=rows.ratio * 100,
                y=rows[key],
                mode="lines+markers",
                name=criterion,
                legendgroup=criterion,
                showlegend=r == 1,
                line={"color": palette[i % len(palette)]},
                row=r,
                col=1,
            )
        for j, (_, row) in enumerate(quantization.iterrows()):
            fig.add_scatter(
                x=[row.weight_MB],
                y=[row[key]],
                mode="markers",
                name=row.config,
                legendgroup=row.config,
                showlegend=r == 1,
                marker={"size": 11, "symbol": "diamond", "color": palette[(len(criteria) + j) % len(palette)]},
                row=r,
                col=2,
            )
        fig.update_xaxes(title_text="% of KV groups removed", row=r, col=1)
        fig.update_yaxes(title_text=f"perplexity, held-out {name} text", type="log", row=r, col=1)
        fig.update_xaxes(title_text="weight MB", row=r, col=2)
        fig.update_yaxes(title_text=f"perplexity, held-out {name} text", row=r, col=2)
    fig.update_layout(title=title, width=1150, height=80 + 420 * len(texts))
    return fig


def _maps(maps) -> dict[str, DivergenceMap]:
    return {maps.labels[1]: maps} if isinstance(maps, DivergenceMap) else dict(maps)


def divergence_layers(maps: DivergenceMap | dict[str, DivergenceMap], title: str | None = None) -> go.Figure:
    """Logit-lens KL per layer (log scale) and the relative hidden-state difference, one line
    per map: several maps of the same original (before and after recovery, say) overlay."""
    maps = _maps(maps)
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=(
            "logit-lens KL(original || compressed), nats/token",
            "hidden-state difference, relative to the original's norm",
        ),
    )
    palette = plotly.colors.qualitative.Plotly
    for i, (label, m) in enumerate(maps.items()):
        colour = palette[i % len(palette)]
        layers, kl = m.layers.layer.tolist(), m.layers.logit_lens_kl.clip(lower=1e-9).tolist()
        fig.add_scatter(
            x=layers,
            y=kl,
            mode="lines+markers",
            name=label,
            legendgroup=label,
            line={"color": colour},
            row=1,
            col=1,
        )
        fig.add_scatter(
            x=layers,
            y=m.layers.relative_difference.tolist(),
            mode="lines+markers",
            name=label,
            legendgroup=label,
            showlegend=False,
            line={"color": colour},
            row=1,
            col=2,
        )
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_xaxes(title_text="layer")
    fig.update_layout(title=title or "Where the models part, layer by layer", width=1100, height=420)
    return fig


def divergence_overview(m: DivergenceMap, title: str | None = None, top: int = 15) -> go.Figure:
    """The whole map on one page: layers, heads, the modules with the largest output error and
    the KL along the text."""
    fig = make_subplots(
        rows=2,
        cols=2,
        subplot_titles=(
            "logit-lens KL per layer (nats/token)",
            "head contribution error (grey: removed)",
            f"the {top} modules with the largest output error (relative MSE)",
            "output KL along the text (red: top-1 differs)",
        ),
        vertical_spacing=0.16,
        horizontal_spacing=0.22,
    )
    fig.add_bar(
        x=m.layers.layer,
        y=m.layers.logit_lens_kl.clip(lower=1e-9),
        name="logit-lens KL",
        showlegend=False,
        row=1,
        col=1,
    )
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_xaxes(title_text="layer", row=1, col=1)
    grid = m.heads.pivot(index="layer", columns="head", values="output_error")
    removed = m.heads.pivot(index="layer", columns="head", values="status") == "removed"
    fig.add_heatmap(
        z=grid.to_numpy(),
        x=list(grid.columns),
        y=list(grid.index),
        colorscale="Magma",
        zmin=0,
        colorbar={"title": "error", "x": 1.0, "y": 0.79, "len": 0.42},
        row=1,
        col=2,
    )
    fig.add_heatmap(
        z=removed.where(removed).astype(float).to_numpy(),
        x=list(grid.columns),
        y=list(grid.index),
        colorscale=[[0, "#bbbbbb"], [1, "#bbbbbb"]],
        showscale=False,
        hoverinfo="skip",
        row=1,
        col=2,
    )
    fig.update_yaxes(autorange="reversed", title_text="layer", row=1, col=2)
    fig.update_xaxes(title_text="query head", row=1, col=2)
    worst = m.modules[m.modules.relative_mse > 0].nlargest(top, "relative_mse").iloc[::-1]
    fig.add_bar(x=worst.relative_mse, y=worst.module, orientation="h", showlegend=False, row=2, col=1)
    fig.update_xaxes(type="log", title_text="relative MSE", row=2, col=1)
    p = m.positions
    fig.add_scatter(x=p.position, y=p.kl, mode="lines", showlegend=False, line={"color": "#444"}, row=2, col=2)
    miss = p[~p.top1_agree]
    fig.add_scatter(
        x=miss.position,
        y=miss.kl,
        mode="markers",
        showlegend=False,
        marker={"color": "crimson", "size": 5},
        text=miss.token,
        row=2,
        col=2,
    )
    fig.update_xaxes(title_text="token position", row=2, col=2)
    summary = (
        f"output KL {m.output['kl_mean']:.3g} nats/token (p99 {m.output['kl_p99']:.3g}), "
        f"top-1 agreement {m.output['top1_agreement']:.1%} over {m.output['tokens']} tokens"
    )
    fig.update_layout(title=f"{title or 'What compression broke'}<br><sup>{summary}</sup>", width=1200, height=900)
    return fig


# --- the README's PNGs -------------------------------------------------------------------------

ATTENTION_TEXT = (
    "The KV cache stores the keys and values of every token a model has read, so that each new token "
    "attends to them without computing them again. Its size grows with the context."
)


def export(out: Path, only: list[str] | None = None) -> list[Path]:
    """Compute each notebook's headline figure at full size, write it as PNG, and print the
    numbers behind it (what the README quotes). `only`: notebook numbers, e.g. ["02", "04"]."""
    out.mkdir(parents=True, exist_ok=True)
    session = workbench.load(quiet=True)
    name = "SmolLM2-135M-Instruct"
    written = []

    def wanted(number: str) -> bool:
        return not only or number in only

    def save(fig: go.Figure, filename: str, started: float, numbers: str) -> None:
        path = out / filename
        fig.write_image(path, scale=1)
        print(f"{path} ({time.perf_counter() - started:.0f} s)\n{numbers}\n", flush=True)
        written.append(path)

    if wanted("01"):
        started = time.perf_counter()
        stats = head_stats(capture_attention(session, ATTENTION_TEXT))
        save(
            head_stats_overview(stats, title=f"Attention heads of {name}, one paragraph"),
            "01_attention_heads.png",
            started,
            f"heads with > 50% on the first token: {int((stats.sink > 0.5).sum())} of {len(stats)}; "
            f"> 50% on the previous token: {int((stats.previous_token > 0.5).sum())}",
        )

    if wanted("02"):
        started = time.perf_counter()
        curve = memory_curve(session, [128, 256, 512, 1024, 2048])
        save(
            kv_memory_curve(curve, title=f"KV cache of {name} against sequence length"),
            "02_kv_cache_memory.png",
            started,
            curve[["label", "tokens", "cache_bytes", "process_MiB", "skipped"]].to_string(index=False),
        )

    if wanted("03"):
        started = time.perf_counter()
        item = arithmetic_items(1)[0]  # held out: the thinking adapter never saw it
        thinker = workbench.load("configs/thinking.yaml", quiet=True)
        asked = [{"role": "system", "content": SHORT_ANSWER_PROMPT}, {"role": "user", "content": item.question}]
        timeline = run_timeline(thinker, asked, max_tokens=160)
        summary = timeline.summary()
        save(
            thinking_timeline(
                timeline, title=f"{name} + thinking adapter: {item.question} (held out; per-token latency, CPU)"
            ),
            "03_thinking_traces.png",
            started,
            f"{summary}\nmedian latency per phase (ms): "
            f"{(timeline.tokens.groupby('phase').latency_s.median() * 1000).round(1).to_dict()}",
        )

    if wanted("04"):
        started = time.perf_counter()
        pruning = pruning_tradeoffs(ratios=(0.0, 0.1, 0.2, 0.3), windows=2)
        quantization = quantization_tradeoffs(windows=2)
        save(
            compression_tradeoffs(pruning, quantization, title=f"Compressing {name}"),
            "04_compression_tradeoffs.png",
            started,
            "\n".join(
                f"{key}:\n" + pruning.pivot(index="ratio", columns="criterion", values=key).round(2).to_string()
                for key in PERPLEXITY_KEYS.values()
            )
            + "\n"
            + quantization[["config", "weight_MB", "size_vs_float32", *PERPLEXITY_KEYS.values()]]
            .round(3)
            .to_string(index=False),
        )

    if wanted("05"):
        started = time.perf_counter()
        pruned = workbench.load("configs/pruned-25.yaml", quiet=True)
        layer_map = divergence_map(session, pruned, "\n\n".join(held_out_texts("prose")), max_tokens=256)
        save(
            divergence_overview(layer_map, title=f"What pruned-25 changed in {name}: 256 tokens of held-out prose"),
            "05_what_compression_broke.png",
            started,
            layer_map.to_markdown(),
        )
    return written


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m workbench.inspect.figures", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("docs/figures"), help="folder for the PNGs (default docs/figures)"
    )
    parser.add_argument(
        "--only", nargs="*", choices=["01", "02", "03", "04", "05"], help="just these notebooks' figures"
    )
    args = parser.parse_args()
    export(args.out, args.only)


if __name__ == "__main__":
    main()
