"""The text the workbench ships for calibration and held-out evaluation (see data/README.md)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[2] / "data"


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
