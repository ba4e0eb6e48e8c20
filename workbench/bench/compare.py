"""The comparison table: one column per target (workbench config or foreign endpoint),
one row per measure: time to first token, aggregate tokens/s, context length, perplexity,
accuracy per task, price and what the run's questions cost.

Every number comes through the same OpenAI HTTP path (local configs are served in-process
by this workbench's server), latency from `bench.serve`, accuracy from `bench.tasks`,
perplexity from `bench.quality`. A target that cannot be reached or loaded fills its column
with the error instead of stopping the others. Nothing is estimated: a value the run could
not measure and the user did not give reads "unknown" or "n/a" with the reason.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from workbench.bench import serve as serve_bench
from workbench.bench.quality import Quality, failed_tasks, local_columns, measure
from workbench.bench.targets import Target, open_target, probe
from workbench.bench.tasks import Task


@dataclass
class Column:
    target: Target
    quality: Quality
    serve: list[dict]
    context_length: int | None = None
    context_source: str = ""
    error: str = ""
    load_avg: tuple[float, float | None] | None = None
    """This machine's 1-minute load average before and after timing: on a shared machine,
    the first thing to look at when two columns' latencies differ."""

    @property
    def task_tokens(self) -> tuple[int, int]:
        results = self.quality.tasks.values()
        return sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)

    @property
    def task_cost_usd(self) -> float | None:
        """What the task questions cost at the user's prices; None when no price was given."""
        if self.target.price_in is None and self.target.price_out is None:
            return None
        tokens_in, tokens_out = self.task_tokens
        return (tokens_in * (self.target.price_in or 0) + tokens_out * (self.target.price_out or 0)) / 1000

    def to_dict(self) -> dict:
        t = self.target
        return {
            "name": t.name,
            "config": t.config,
            "base_url": t.base_url,
            "model": t.model,
            "error": self.error,
            "context_length": self.context_length,
            "context_source": self.context_source,
            "serve": self.serve,
            "load_avg_1min_before_after": self.load_avg,
            "price_in_per_1k": t.price_in,
            "price_out_per_1k": t.price_out,
            "task_tokens": dict(zip(("prompt", "completion"), self.task_tokens)),
            "task_cost_usd": self.task_cost_usd,
            "quality": self.quality.to_dict(),
        }


def _load_avg() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _warm_up(endpoint) -> None:
    """One short request before timing, so a freshly loaded model's first-call costs (lazy
    initialisation, allocator growth) are not charged to whichever target happens to go first."""
    body = {"model": endpoint.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(endpoint.base_url + "/chat/completions", json=body, headers=endpoint.headers(), timeout=600)


def measure_column(
    target: Target,
    tasks: list[Task],
    *,
    levels,
    requests: int,
    tokens: int,
    windows: int,
    limit: int | None,
    max_tokens: int,
    harness: tuple[str, ...] = (),
    harness_limit: int | None = None,
) -> Column:
    try:
        with open_target(target) as (endpoint, session):
            reported, error = probe(endpoint)
            column = Column(target, Quality(target.name), [], error=error)
            if target.context or reported:
                column.context_length = target.context or reported
                column.context_source = "given" if target.context else "reported by /v1/models"
            if not error:
                _warm_up(endpoint)
                before = _load_avg()
                column.serve = serve_bench.run_serve(
                    endpoint.base_url,
                    endpoint.model,
                    api_key=endpoint.api_key,
                    levels=levels,
                    requests_per_client=requests,
                    tokens=tokens,
                )[0]
                column.load_avg = (before, _load_avg()) if before is not None else None
            column.quality = measure(
                target,
                endpoint,
                session,
                tasks,
                windows=windows,
                limit=limit,
                max_tokens=max_tokens,
                reachable_error=error,
                harness=harness,
                harness_limit=harness_limit,
            )
            return column
    except Exception as exc:  # noqa: BLE001 - a target that fails to load or answer is one bad column, not a lost run
        error = f"{type(exc).__name__}: {exc}"
        print(f"compare: {target.name}: {error}", file=sys.stderr)
        return Column(target, Quality(target.name, tasks=failed_tasks(tasks, error), error=error), [], error=error)


def run_compare(
    targets: list[Target],
    tasks: list[Task],
    *,
    levels=(1, 4),
    requests: int = 2,
    tokens: int = 32,
    windows: int = 4,
    limit: int | None = None,
    max_tokens: int = 16,
    harness: tuple[str, ...] = (),
    harness_limit: int | None = None,
) -> list[Column]:
    return [
        measure_column(
            t,
            tasks,
            levels=levels,
            requests=requests,
            tokens=tokens,
            windows=windows,
            limit=limit,
            max_tokens=max_tokens,
            harness=harness,
            harness_limit=harness_limit,
        )
        for t in tqdm(targets, desc="compare")
    ]


def machine() -> str:
    """Where the local columns ran, for the table's caption."""
    import platform

    import torch

    where = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    )
    return f"local targets on {where}, torch {torch.__version__}"


# --- the table --------------------------------------------------------------------------


def _what(target: Target) -> str:
    if target.config is not None and target.config.endswith(".gguf"):
        return f"llama.cpp (llama-cpp-python server) `{target.config}`"
    return f"workbench `{target.config}`" if target.local else f"`{target.model}` at {target.base_url}"


def _latency_cells(column: Column, level: int) -> tuple[str, str]:
    if column.error:
        return "error", "error"
    row = next(r for r in column.serve if r["concurrency"] == level)
    if row["failed"] == row["requests"]:
        return "error (all requests failed)", "error"
    note = f" ({row['failed']} of {row['requests']} failed)" if row["failed"] else ""
    return f"{row['ttft_ms_p50']:.0f} / {row['ttft_ms_p95']:.0f}{note}", f"{row['aggregate_tok_s']:.1f}{note}"


def _context_cell(column: Column) -> str:
    if column.context_length is None:
        return "unknown (not reported; give context=N)" if not column.target.local else "unknown"
    return f"{column.context_length:,} ({column.context_source})"


def _price_cell(target: Target) -> str:
    if target.price_in is None and target.price_out is None:
        return "0 (local, hardware and power not priced)" if target.local else "unknown (no price given)"
    return f"{target.price_in or 0:g} / {target.price_out or 0:g}"


def _cost_cell(column: Column) -> str:
    tokens_in, tokens_out = column.task_tokens
    answered = sum(r.asked - r.failed for r in column.quality.tasks.values())
    cost = column.task_cost_usd
    if column.error or not answered:
        return "n/a (no question answered)"
    if cost is None:
        return "0 (local)" if column.target.local else "unknown (no price given)"
    if not tokens_in + tokens_out:
        return "unknown (the endpoint reported no token usage)"
    return f"{cost:.4g} ({tokens_in:,} in + {tokens_out:,} out tokens)"


def table(columns: list[Column], tasks: list[Task], meta: dict) -> list[tuple[str, list[str]]]:
    """(row label, one cell per column): the Markdown table, as data."""
    rows = [
        ("what", [_what(c.target) for c in columns]),
        ("status", ["ok" if not c.error else f"error: {c.error}" for c in columns]),
    ]
    for level in meta["levels"]:
        cells = [_latency_cells(c, level) for c in columns]
        clients = f"{level} client{'s' if level > 1 else ''}"
        rows.append((f"time to first token p50 / p95, ms ({clients})", [ttft for ttft, _ in cells]))
        rows.append((f"aggregate tokens/s ({clients})", [tok_s for _, tok_s in cells]))
    rows.append(
        (
            "load average on this machine while timing (1 min, before / after)",
            [f"{c.load_avg[0]:.1f} / {c.load_avg[1]:.1f}" if c.load_avg else "n/a" for c in columns],
        )
    )
    rows.append(("context length, tokens", [_context_cell(c) for c in columns]))
    for label, cell in local_columns(list(meta.get("harness") or []), meta):
        if label.startswith(("perplexity", "KL", "top-1")):
            label += f" ({meta['windows']} x 512 tokens)"
        rows.append((label, [cell(c.quality, c.target.local) for c in columns]))
    for task in tasks:
        rows.append((f"accuracy: {task.title}", [c.quality.tasks[task.name].cell() for c in columns]))
    rows.append(("price per 1K tokens in / out, USD", [_price_cell(c.target) for c in columns]))
    rows.append(("cost of this run's task questions, USD", [_cost_cell(c) for c in columns]))
    return rows


def to_markdown(columns: list[Column], tasks: list[Task], meta: dict) -> str:
    lines = [
        f"Compare: streaming latency with {meta['tokens']} max tokens, {meta['requests']} requests per client; "
        f"questions greedy with {meta['max_tokens']} max tokens"
        + (f", first {meta['limit']} per task" if meta.get("limit") else "")
        + f"; {meta['machine']}",
        "",
        "| | " + " | ".join(c.target.name for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for label, cells in table(columns, tasks, meta):
        lines.append(f"| {label} | " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def figure(columns: list[Column], tasks: list[Task], meta: dict):
    from plotly.subplots import make_subplots

    names = [c.target.name for c in columns]
    fig = make_subplots(
        rows=1, cols=3, subplot_titles=("time to first token p50, ms", "aggregate tokens/s", "answer accuracy, %")
    )
    for level in meta["levels"]:
        clients = f"{level} client{'s' if level > 1 else ''}"
        rows = [next((r for r in c.serve if r["concurrency"] == level), None) for c in columns]
        fig.add_bar(
            x=names,
            y=[r["ttft_ms_p50"] if r and not math.isnan(r["ttft_ms_p50"]) else None for r in rows],
            name=f"TTFT, {clients}",
            row=1,
            col=1,
        )
        fig.add_bar(
            x=names, y=[r["aggregate_tok_s"] if r else None for r in rows], name=f"tok/s, {clients}", row=1, col=2
        )
    for task in (t for t in tasks if t.items is not None):
        accuracy = [c.quality.tasks[task.name].accuracy for c in columns]
        fig.add_bar(x=names, y=[a * 100 if a is not None else None for a in accuracy], name=task.title, row=1, col=3)
    fig.update_yaxes(range=[0, 100], row=1, col=3)
    fig.update_layout(title="Compare: " + ", ".join(names), barmode="group", width=1300, height=500)
    return fig


def write_results(out: Path, columns: list[Column], tasks: list[Task], meta: dict, *, png: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table_rows = [
        {"row": label, "cells": dict(zip((c.target.name for c in columns), cells))}
        for label, cells in table(columns, tasks, meta)
    ]
    (out / "compare.json").write_text(
        json.dumps({"meta": meta, "columns": [c.to_dict() for c in columns], "table": table_rows}, indent=2)
    )
    (out / "compare.md").write_text(to_markdown(columns, tasks, meta))
    fig = figure(columns, tasks, meta)
    fig.write_html(out / "compare.html", include_plotlyjs="cdn")
    if png:
        try:  # kaleido drives a Chromium; without one the HTML is still there
            fig.write_image(out / "compare.png")
        except Exception as exc:  # noqa: BLE001 - kaleido fails in many ways; each means no PNG
            print(f"compare: no PNG ({type(exc).__name__}: {exc}); compare.html has the figure", file=sys.stderr)
