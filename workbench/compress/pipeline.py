"""Apply a config's compression steps to a loaded session, in order, with a progress bar."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass

from tqdm.auto import tqdm

from workbench.compress import STEPS


def apply(session, steps) -> list[dict]:
    """Run each step on `session` in place; return their reports as plain dicts."""
    reports = []
    for step in tqdm(steps, desc="compressing", disable=not steps):
        options = dict(step.model_extra or {})
        _, run = STEPS[step.step]
        report = run(session, **options)
        reports.append(asdict(report) if is_dataclass(report) else dict(report))
    return reports
