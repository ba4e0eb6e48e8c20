"""Quality per target: held-out perplexity (local configs) and answer accuracy per task.

Perplexity is the compression pipeline's own measure (`compress.quality.perplexity` on
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
from workbench.bench.tasks import Answer, Task, TaskResult, run_task
from workbench.compress.data import evaluation_texts
from workbench.compress.quality import perplexity

NO_PERPLEXITY = "n/a (endpoint: no log-probabilities over the chat API)"


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
        return {"target": self.target, "perplexity": self.perplexity, "error": self.error,
                "tasks": {name: result.to_dict() for name, result in self.tasks.items()}}


def failed_tasks(tasks: list[Task], error: str) -> dict[str, TaskResult]:
    """Each task's result when the target could not be reached: the error, in every cell."""
    return {t.name: TaskResult(t.name, unavailable=t.unavailable) if t.items is None
            else TaskResult(t.name, asked=1, failed=1, answers=[Answer("", "", error=error)]) for t in tasks}


def measure(target: Target, endpoint: Endpoint, session, tasks: list[Task], *, windows: int, limit: int | None,
            max_tokens: int = 16, reachable_error: str = "") -> Quality:
    """Quality of one opened target; `reachable_error` (from `probe`) skips the questions."""
    result = Quality(target.name)
    if session is not None and windows > 0:
        result.perplexity = perplexity(session.model, session.tokenizer, evaluation_texts(), max_windows=windows)
    if reachable_error:
        result.tasks = failed_tasks(tasks, reachable_error)
    else:
        result.tasks = {t.name: run_task(endpoint, t, limit=limit, max_tokens=max_tokens) for t in tasks}
    return result


def run_quality(targets: list[Target], tasks: list[Task], *, windows: int, limit: int | None, max_tokens: int = 16) -> list[Quality]:
    results = []
    for target in tqdm(targets, desc="quality"):
        try:
            with open_target(target) as (endpoint, session):
                _, error = probe(endpoint)
                results.append(measure(target, endpoint, session, tasks, windows=windows, limit=limit,
                                       max_tokens=max_tokens, reachable_error=error))
        except Exception as exc:  # a target that fails to load is one bad row, not a lost run
            print(f"quality: {target.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            results.append(Quality(target.name, tasks=failed_tasks(tasks, f"{type(exc).__name__}: {exc}"),
                                   error=f"{type(exc).__name__}: {exc}"))
    return results


def to_markdown(results: list[Quality], targets: list[Target], tasks: list[Task], meta: dict) -> str:
    local = {t.name: t.local for t in targets}
    lines = [
        f"Quality: perplexity on {meta['windows']} x 512 tokens of data/evaluation.txt (local configs); "
        f"answer accuracy over the OpenAI HTTP path, greedy, {meta['max_tokens']} max tokens"
        + (f", first {meta['limit']} questions per task" if meta.get("limit") else ""),
        "",
        "| target | perplexity | " + " | ".join(t.title for t in tasks) + " |",
        "|---|---|" + "---|" * len(tasks),
    ]
    for r in results:
        cells = [r.perplexity_cell(local[r.target])] + [r.tasks[t.name].cell() for t in tasks]
        lines.append(f"| {r.target} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: list[Quality], targets: list[Target], tasks: list[Task], meta: dict) -> None:
    import plotly.graph_objects as go

    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({"meta": meta, "results": [r.to_dict() for r in results]}, indent=2))
    (out / "quality.md").write_text(to_markdown(results, targets, tasks, meta))
    fig = go.Figure()
    for task in (t for t in tasks if t.items is not None):
        fig.add_bar(name=task.title, x=[r.target for r in results],
                    y=[(r.tasks[task.name].accuracy or 0) * 100 for r in results])
    fig.update_layout(title="Answer accuracy per target", yaxis_title="% correct", yaxis_range=[0, 100], barmode="group",
                      width=900, height=500)
    fig.write_html(out / "quality.html", include_plotlyjs="cdn")
