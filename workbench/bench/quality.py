"""Quality per target: what a researcher compares, and the workbench's own answer tasks.

For a local config, on the loaded weights:
- perplexity on both held-out texts (`workbench.data.HELD_OUT`: the CPython reference text, from
  the calibration text's source, and out-of-domain prose), the compression pipeline's measure;
- for a compressed or adapted config, the divergence from its original (the same source with no
  compression and no adapter): mean and p99 KL per token and top-1 agreement on those texts, as
  llama.cpp's `perplexity --kl-divergence` reports them;
- lm-eval tasks through the `workbench` backend (`workbench.harness`; MMLU's stratified subset
  by default), with lm-eval's standard errors;
- the footprint: weight bytes as held, KV-cache bytes per token, this process's resident memory.
These need the model in this process: an endpoint gets "n/a" with the reason. Answer accuracy
goes through the OpenAI HTTP path (`bench.tasks`), the same for a local config and a cloud model.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from tqdm.auto import tqdm

import workbench
from workbench.bench.cpu import describe
from workbench.bench.targets import Endpoint, Target, open_target, probe
from workbench.bench.tasks import Answer, Task, TaskResult, mode_name, run_task
from workbench.config import ModelConfig, WorkbenchConfig
from workbench.data import HELD_OUT, held_out_texts
from workbench.harness import TASKS, Score, evaluate
from workbench.metrics import Divergence, divergence, perplexity
from workbench.models.anatomy import kv_bytes_per_token, weight_bytes

NO_PERPLEXITY = "n/a (endpoint: no log-probabilities over the chat API)"
NOT_LOCAL = "n/a (endpoint: needs the weights in this process)"


def columns(tasks: list[Task], thinking: list[bool] | None) -> list[tuple[str, str, Task, bool | None]]:
    """(result key, column title, task, thinking mode): one per task (mode None: the target's
    default), or one per task and thinking mode."""
    if not thinking:
        return [(t.name, t.title, t, None) for t in tasks]
    return [
        (f"{t.name}@thinking-{mode_name(m)}", f"{t.title}, thinking {mode_name(m)}", t, m)
        for t in tasks
        for m in thinking
    ]


@dataclass
class Quality:
    target: str
    perplexity: dict[str, float] = field(default_factory=dict)
    """held-out text name (workbench.data.HELD_OUT) -> perplexity over the run's windows"""
    divergence: dict[str, Divergence] = field(default_factory=dict)
    """held-out text name -> divergence from the original; empty for an original"""
    original: bool = False
    """the target is its own original (no compression, no adapter): its divergence is zero"""
    harness: dict[str, Score] = field(default_factory=dict)
    """lm-eval task -> its headline score"""
    footprint: dict[str, int] = field(default_factory=dict)
    """weight_bytes, kv_bytes_per_token, rss_bytes (after loading, before any original loads)"""
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    error: str = ""

    def _missing(self, local: bool, why_local: str, why_endpoint: str = NOT_LOCAL) -> str:
        return f"error: {self.error}" if self.error else (why_local if local else why_endpoint)

    def perplexity_cell(self, local: bool, text: str = "reference") -> str:
        if text in self.perplexity:
            return f"{self.perplexity[text]:.3f}"
        return self._missing(local, "not measured (--windows 0)", NO_PERPLEXITY)

    def kl_cell(self, local: bool, text: str) -> str:
        """mean / p99 KL(original || this), nats per token."""
        if text in self.divergence:
            d = self.divergence[text]
            return f"{d.kl_mean:.2g} / {d.kl_p99:.2g}"
        if self.original and text in self.perplexity:
            return "0 (the original)"
        return self._missing(local, "not measured (--windows 0)")

    def top1_cell(self, local: bool, text: str) -> str:
        if text in self.divergence:
            return f"{100 * self.divergence[text].top1_agreement:.1f}%"
        if self.original and text in self.perplexity:
            return "100% (the original)"
        return self._missing(local, "not measured (--windows 0)")

    def harness_cell(self, local: bool, task: str) -> str:
        if task in self.harness:
            return self.harness[task].cell()
        return self._missing(local, "not measured")

    def footprint_cell(self, local: bool, key: str) -> str:
        if key in self.footprint:
            value = self.footprint[key]
            return f"{value / 1024:.1f} KB" if key == "kv_bytes_per_token" else f"{value / 1e6:,.0f} MB"
        return self._missing(local, "not measured")

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "perplexity": self.perplexity,
            "divergence": {name: vars(d) for name, d in self.divergence.items()},
            "original": self.original,
            "harness": {name: score.to_dict() for name, score in self.harness.items()},
            "footprint": self.footprint,
            "error": self.error,
            "tasks": {name: result.to_dict() for name, result in self.tasks.items()},
        }


def original_config(config: WorkbenchConfig) -> WorkbenchConfig | None:
    """What a config compresses or adapts: its model source as it loads by default (dtype auto,
    no compression, no adapter), on the same device; None when the config is that already."""
    if not config.compression and config.model.adapter is None and config.model.dtype == "auto":
        return None
    m = config.model
    return WorkbenchConfig(model=ModelConfig(source=m.source, device=m.device, context_limit=m.context_limit))


def held_out(quality: Quality, session, *, windows: int) -> None:
    """Perplexity on every held-out text and, for a compressed or adapted session, the
    divergence from its original, which is loaded for this and let go after."""
    base = original_config(session.config)
    quality.original = base is None
    original = workbench.load(base, quiet=True) if base is not None else None
    try:
        for name in tqdm(HELD_OUT, desc=f"{quality.target}: held-out texts", leave=False):
            texts = held_out_texts(name)
            if original is None:
                quality.perplexity[name] = perplexity(session.model, session.tokenizer, texts, max_windows=windows)
            else:
                d = divergence(original.model, session.model, session.tokenizer, texts, max_windows=windows)
                quality.divergence[name] = d
                quality.perplexity[name] = d.compressed_perplexity
    finally:
        del original


def footprint(session) -> dict[str, int]:
    return {
        "weight_bytes": weight_bytes(session.model),
        "kv_bytes_per_token": kv_bytes_per_token(session.model),
        "rss_bytes": psutil.Process().memory_info().rss,
    }


def failed_tasks(tasks: list[Task], error: str, thinking: list[bool] | None = None) -> dict[str, TaskResult]:
    """Each column's result when the target could not be reached: the error, in every cell."""
    return {
        key: TaskResult(t.name, unavailable=t.unavailable, thinking=mode)
        if t.items is None
        else TaskResult(t.name, asked=1, failed=1, thinking=mode, answers=[Answer("", "", error=error)])
        for key, _, t, mode in columns(tasks, thinking)
    }


def measure(
    target: Target,
    endpoint: Endpoint,
    session,
    tasks: list[Task],
    *,
    windows: int,
    limit: int | None,
    max_tokens: int = 16,
    reachable_error: str = "",
    thinking: list[bool] | None = None,
    thinking_tokens: int = 256,
    harness: tuple[str, ...] = (),
    harness_limit: int | None = None,
) -> Quality:
    """Quality of one opened target; `reachable_error` (from `probe`) skips the questions.
    With `thinking` modes, every task is asked once per mode, one question at a time (so the
    time to the first answer token is the request's own), `thinking_tokens` the budget with
    thinking on. `harness` names lm-eval tasks scored on a local target's weights
    (`harness_limit`: only their first questions)."""
    result = Quality(target.name)
    if session is not None:
        result.footprint = footprint(session)
        if windows > 0:
            held_out(result, session, windows=windows)
        if harness:
            scores = evaluate(session, list(harness), limit=harness_limit)
            result.harness = {score.task: score for score in scores}
    if reachable_error:
        result.tasks = failed_tasks(tasks, reachable_error, thinking)
        return result
    for key, _, task, mode in columns(tasks, thinking):
        if mode is None:
            result.tasks[key] = run_task(endpoint, task, limit=limit, max_tokens=max_tokens)
        else:
            result.tasks[key] = run_task(
                endpoint,
                task,
                limit=limit,
                max_tokens=thinking_tokens if mode else max_tokens,
                concurrency=1,
                thinking=mode,
            )
    return result


def run_quality(
    targets: list[Target],
    tasks: list[Task],
    *,
    windows: int,
    limit: int | None,
    max_tokens: int = 16,
    thinking: list[bool] | None = None,
    thinking_tokens: int = 256,
    harness: tuple[str, ...] = (),
    harness_limit: int | None = None,
) -> list[Quality]:
    results = []
    for target in tqdm(targets, desc="quality"):
        try:
            with open_target(target) as (endpoint, session):
                _, error = probe(endpoint)
                results.append(
                    measure(
                        target,
                        endpoint,
                        session,
                        tasks,
                        windows=windows,
                        limit=limit,
                        max_tokens=max_tokens,
                        reachable_error=error,
                        thinking=thinking,
                        thinking_tokens=thinking_tokens,
                        harness=harness,
                        harness_limit=harness_limit,
                    )
                )
        except Exception as exc:  # noqa: BLE001 - a target that fails to load is one bad row, not a lost run
            print(f"quality: {target.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            results.append(
                Quality(
                    target.name,
                    tasks=failed_tasks(tasks, f"{type(exc).__name__}: {exc}", thinking),
                    error=f"{type(exc).__name__}: {exc}",
                )
            )
    return results


Cell = Callable[[Quality, bool], str]
"""A table cell of a result, given whether its target is local."""


def _cell(method: Callable[[Quality, bool, str], str], key: str) -> Cell:
    return lambda r, local: method(r, local, key)


def local_columns(harness: list[str], meta: dict) -> list[tuple[str, Cell]]:
    """(title, cell of a result) for every measure taken on a local target's weights."""
    cols = [
        (f"{task} ({TASKS[task][0] if task in TASKS else 'lm-eval'})", _cell(Quality.harness_cell, task))
        for task in harness
    ]
    for text in HELD_OUT:
        cols += [
            (f"perplexity, {text}", _cell(Quality.perplexity_cell, text)),
            (f"KL mean / p99, {text}", _cell(Quality.kl_cell, text)),
            (f"top-1 agreement, {text}", _cell(Quality.top1_cell, text)),
        ]
    cols += [
        ("weights", _cell(Quality.footprint_cell, "weight_bytes")),
        ("KV cache per token", _cell(Quality.footprint_cell, "kv_bytes_per_token")),
        ("process RSS after load", _cell(Quality.footprint_cell, "rss_bytes")),
    ]
    return cols


def _thinking(meta: dict) -> list[bool] | None:
    return [m == "on" for m in meta["thinking"]] if meta.get("thinking") else None


def to_markdown(results: list[Quality], targets: list[Target], tasks: list[Task], meta: dict) -> str:
    local = {t.name: t.local for t in targets}
    cols = columns(tasks, _thinking(meta))
    budget = f"{meta['max_tokens']} max tokens" + (
        f" ({meta['thinking_tokens']} with thinking on)" if meta.get("thinking") else ""
    )
    harness = list(meta.get("harness") or [])
    local_rows = [(label, cell) for label, cell in local_columns(harness, meta)]
    lines = [
        f"Quality: perplexity, KL(original || target) mean / p99 (nats per token) and top-1 agreement on "
        f"{meta['windows']} x 512 tokens of each held-out text, lm-eval tasks on the weights "
        f"(accuracy % ± standard error)"
        + (f", first {meta['harness_limit']} questions" if meta.get("harness_limit") else "")
        + f" (local configs); answer accuracy over the OpenAI HTTP path, greedy, {budget}"
        + (f", first {meta['limit']} questions per task" if meta.get("limit") else "")
        + (f"; CPU {describe(meta['cpu'])}" if meta.get("cpu") else ""),
        "",
        "| target | "
        + " | ".join(label for label, _ in local_rows)
        + (" | " if cols else "")
        + " | ".join(title for _, title, _, _ in cols)
        + " |",
        "|---|" + "---|" * (len(local_rows) + len(cols)),
    ]
    for r in results:
        cells = [cell(r, local[r.target]) for _, cell in local_rows] + [r.tasks[key].cell() for key, _, _, _ in cols]
        lines.append(f"| {r.target} | " + " | ".join(cells) + " |")
    if meta.get("thinking"):
        lines += [
            "",
            "Thinking on and off, per task (streamed, one question at a time): reasoning tokens per "
            "answered question, and the median seconds from the request to the first answer token.",
            "",
            "| target | task | thinking | accuracy | reasoning tokens / question | first answer token (s, median) |",
            "|---|---|---|---|---|---|",
        ]
        for r in results:
            for key, _, task, mode in cols:
                result = r.tasks[key]
                answered = result.asked - result.failed
                tokens = f"{result.reasoning_tokens / answered:.1f}" if answered else "-"
                first = f"{result.first_answer_s:.2f}" if result.first_answer_s is not None else "-"
                lines.append(f"| {r.target} | {task.name} | {mode_name(mode)} | {result.cell()} | {tokens} | {first} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: list[Quality], targets: list[Target], tasks: list[Task], meta: dict) -> None:
    import plotly.graph_objects as go

    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({"meta": meta, "results": [r.to_dict() for r in results]}, indent=2))
    (out / "quality.md").write_text(to_markdown(results, targets, tasks, meta))
    fig = go.Figure()
    for key, title, task, _ in columns(tasks, _thinking(meta)):
        if task.items is not None:
            fig.add_bar(
                name=title, x=[r.target for r in results], y=[(r.tasks[key].accuracy or 0) * 100 for r in results]
            )
    fig.update_layout(
        title="Answer accuracy per target",
        yaxis_title="% correct",
        yaxis_range=[0, 100],
        barmode="group",
        width=900,
        height=500,
    )
    fig.write_html(out / "quality.html", include_plotlyjs="cdn")
