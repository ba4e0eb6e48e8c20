"""Quality per target: held-out perplexity (local configs) and answer accuracy per task.

Perplexity is the compression pipeline's own measure (`workbench.metrics.perplexity` on
`data/evaluation.txt`), computed on the loaded model, so it exists only for local targets:
a chat API returns no prompt log-probabilities to compute it from. Answer accuracy goes
through the OpenAI HTTP path (`bench.tasks`), the same for a local config and a cloud model.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from workbench.bench.targets import Endpoint, Target, open_target, probe
from workbench.bench.tasks import Answer, Task, TaskResult, mode_name, run_task
from workbench.data import evaluation_texts
from workbench.metrics import perplexity

NO_PERPLEXITY = "n/a (endpoint: no log-probabilities over the chat API)"


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
    perplexity: float | None = None
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    error: str = ""

    def perplexity_cell(self, local: bool) -> str:
        if self.perplexity is not None:
            return f"{self.perplexity:.3f}"
        return f"error: {self.error}" if self.error else ("not measured (--windows 0)" if local else NO_PERPLEXITY)

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "perplexity": self.perplexity,
            "error": self.error,
            "tasks": {name: result.to_dict() for name, result in self.tasks.items()},
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
) -> Quality:
    """Quality of one opened target; `reachable_error` (from `probe`) skips the questions.
    With `thinking` modes, every task is asked once per mode, one question at a time (so the
    time to the first answer token is the request's own), `thinking_tokens` the budget with
    thinking on."""
    result = Quality(target.name)
    if session is not None and windows > 0:
        result.perplexity = perplexity(session.model, session.tokenizer, evaluation_texts(), max_windows=windows)
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


def _thinking(meta: dict) -> list[bool] | None:
    return [m == "on" for m in meta["thinking"]] if meta.get("thinking") else None


def to_markdown(results: list[Quality], targets: list[Target], tasks: list[Task], meta: dict) -> str:
    local = {t.name: t.local for t in targets}
    cols = columns(tasks, _thinking(meta))
    budget = f"{meta['max_tokens']} max tokens" + (
        f" ({meta['thinking_tokens']} with thinking on)" if meta.get("thinking") else ""
    )
    lines = [
        f"Quality: perplexity on {meta['windows']} x 512 tokens of data/evaluation.txt (local configs); "
        f"answer accuracy over the OpenAI HTTP path, greedy, {budget}"
        + (f", first {meta['limit']} questions per task" if meta.get("limit") else ""),
        "",
        "| target | perplexity | " + " | ".join(title for _, title, _, _ in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for r in results:
        cells = [r.perplexity_cell(local[r.target])] + [r.tasks[key].cell() for key, _, _, _ in cols]
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
