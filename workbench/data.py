"""The text the workbench ships for calibration and held-out evaluation (see data/README.md),
and the short-answer system prompt its answer checks ask under.

Calibration text (`calibration_texts`) is what compression is fitted on. The held-out texts
(`HELD_OUT`, `held_out_texts`) are never used for calibration or training: "reference" is
technical prose from the same source as the calibration text (`evaluation_texts`), "prose" is
narrative prose of another kind altogether (`prose_texts`), so a compressed model can be judged
on text unlike what it was fitted on. Every file holds documents separated by a line holding
only a form feed."""

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


HELD_OUT = {"reference": "evaluation.txt", "prose": "prose.txt"}
"""Each held-out text by name -> its file under data/:
- reference: data/evaluation.txt, 39 Python Language Reference topics, the calibration text's source;
- prose: data/prose.txt, 40 chapter openings of public-domain fiction (Austen, Melville, Natsume
  in translation), made by scripts/make_prose_data.py."""


def held_out_texts(name: str) -> list[str]:
    """The documents of one held-out text (a key of HELD_OUT)."""
    if name not in HELD_OUT:
        raise ValueError(f"unknown held-out text {name!r}: known are {', '.join(sorted(HELD_OUT))}")
    return list(_documents(HELD_OUT[name]))


def prose_texts() -> list[str]:
    return held_out_texts("prose")
