"""Apply a config's compression steps to a loaded session, in order, with a progress bar."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass

from tqdm.auto import tqdm

from workbench.compress import STEPS

IN_WEIGHTS = {"prune_heads"}
"""Steps whose result lives in the weights and shapes a checkpoint stores. The others
(quantize, kv_cache) are recorded in the saved folder's workbench.yaml and re-applied on
load: deterministic, so the reloaded model gives the same outputs."""


def split_steps(steps) -> tuple[list, list]:
    """(steps saved in the weights, steps re-applied at load); config order kept within each.
    Pruning always precedes quantization (the config enforces it), so running every weight
    step first changes nothing."""
    return [s for s in steps if s.step in IN_WEIGHTS], [s for s in steps if s.step not in IN_WEIGHTS]


def apply(session, steps) -> list[dict]:
    """Run each step on `session` in place; return their reports as plain dicts."""
    reports = []
    for step in tqdm(steps, desc="compressing", disable=not steps):
        options = dict(step.model_extra or {})
        _, run = STEPS[step.step]
        report = run(session, **options)
        reports.append(asdict(report) if is_dataclass(report) else dict(report))
    return reports
