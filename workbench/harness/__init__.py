"""lm-evaluation-harness as the workbench's evaluator: the field's tasks and the workbench's own,
scored on a session's weights, in the numbers and standard errors papers and model cards quote.

- `WorkbenchLM` (workbench/harness/lm.py) is lm-eval's `workbench` model: any config, compressed,
  pruned or adapter-merged, as lm-eval's `hf` backend scores a transformers model.
- `workbench/harness/tasks/` holds task YAMLs that need no hub: MMLU's test set and a stratified
  subset of it, the bench's facts and arithmetic, rolling perplexity on both held-out texts.
  lm-eval's own CLI reads them with `--include_path workbench/harness/tasks`, against any model,
  the workbench's server included (`--model local-completions`).
- `python -m workbench.harness` is lm-eval's CLI with both registered (lm-eval 0.4.13 discovers
  no model plugins, so `lm_eval --model workbench` itself cannot find the backend).
- `evaluate(session, tasks)` is the same from Python: the bench and the compress report call it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workbench.session import Session

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

TASKS = {
    "workbench_mmlu_subset": ("acc", "MMLU, 500 questions stratified by subject, lm-eval's lettered formulation"),
    "workbench_mmlu": ("acc", "MMLU, all 14,042 test questions, zero-shot, lm-eval's lettered formulation"),
    "workbench_mmlu_cloze_subset": ("acc_norm", "MMLU cloze (the model card's formulation), the 500-question subset"),
    "workbench_mmlu_cloze": ("acc_norm", "MMLU cloze (the model card's formulation), all 14,042 questions"),
    "workbench_facts": ("acc", "32 short-answer facts (data/facts.jsonl)"),
    "workbench_arithmetic": ("acc", "20 two-digit arithmetic questions"),
    "workbench_ppl_reference": ("word_perplexity", "rolling perplexity of data/evaluation.txt (CPython reference)"),
    "workbench_ppl_prose": ("word_perplexity", "rolling perplexity of data/prose.txt (out-of-domain prose)"),
}
"""The shipped tasks: name -> (the headline metric, what the task measures)."""


@dataclass(frozen=True)
class Score:
    """One task's headline number, as lm-eval reports it."""

    task: str
    metric: str
    value: float
    stderr: float | None
    """lm-eval's standard error of the mean (None where it has none: perplexities)"""
    samples: int

    def cell(self) -> str:
        if self.metric.startswith("acc"):
            spread = f" ± {100 * self.stderr:.1f}" if self.stderr is not None else ""
            return f"{100 * self.value:.1f}{spread}"
        return f"{self.value:.3f}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.metric,
            "value": self.value,
            "stderr": self.stderr,
            "samples": self.samples,
        }


def parse_tasks(names: str) -> tuple[str, ...]:
    """A `--harness` option: comma-separated task names, or `none`. The shipped names are
    checked here, before any model loads (ValueError naming the unknown ones); lm-eval's own
    are checked by lm-eval."""
    tasks = tuple(t.strip() for t in names.split(",") if t.strip() and t.strip() != "none")
    unknown = [t for t in tasks if t.startswith("workbench_") and t not in TASKS]
    if unknown:
        raise ValueError(f"no shipped task {', '.join(unknown)}; the shipped ones: {', '.join(TASKS)}")
    return tasks


def task_manager(tasks: list[str]) -> Any:
    """lm-eval's task index with the shipped tasks; lm-eval's own thousands only when asked for."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=not all(t in TASKS for t in tasks))


def evaluate(
    session: Session,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> list[Score]:
    """Each task's headline score (accuracy with its standard error, or word perplexity) on the
    session's weights; `limit` scores the first questions of each task only."""
    from lm_eval import simple_evaluate

    from workbench.harness.lm import WorkbenchLM

    if not tasks or not all(tasks):
        raise ValueError(f"name at least one task: {', '.join(TASKS)} or any of lm-eval's")
    model = WorkbenchLM(session=session, batch_size=batch_size)
    if not progress:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    out = simple_evaluate(
        model=model, tasks=tasks, limit=limit, task_manager=task_manager(tasks), log_samples=False, bootstrap_iters=1000
    )
    assert out is not None
    scores = []
    for task in tasks:
        result = out["results"][task]
        metric = TASKS[task][0] if task in TASKS else next(k.split(",")[0] for k in result if k.endswith(",none"))
        stderr = result.get(f"{metric}_stderr,none")
        scores.append(
            Score(
                task=task,
                metric=metric,
                value=float(result[f"{metric},none"]),
                stderr=float(stderr) if isinstance(stderr, int | float) else None,
                samples=int(out["n-samples"][task]["effective"]),
            )
        )
    return scores
