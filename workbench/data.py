"""The text the workbench ships for calibration and held-out evaluation (see data/README.md),
and the short-answer system prompt its answer checks ask under."""

from __future__ import annotations

from functools import cache

from workbench.paths import DATA_DIR

SHORT_ANSWER_PROMPT = "Answer with only the answer: a word, a name or a number. No explanation."
"""The system prompt of the bench's answer tasks (workbench.bench.tasks), so that its checker
can read a reply; the recover step's `[short]` prompts and the thinking examples ask under it too."""


@cache
def _documents(name: str) -> tuple[str, ...]:
    path = DATA_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run from a checkout of the workbench repository")
    return tuple(doc.strip() for doc in path.read_text(encoding="utf-8").split("\n\f\n") if doc.strip())


def calibration_texts() -> list[str]:
    return list(_documents("calibration.txt"))


def evaluation_texts() -> list[str]:
    return list(_documents("evaluation.txt"))
