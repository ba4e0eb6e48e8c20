"""Apply a config's compression steps to a loaded session, in order, with a progress bar."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, is_dataclass

from tqdm.auto import tqdm

from workbench.compress import STEPS
from workbench.compress.recovery import teacher_copy
from workbench.data import calibration_texts
from workbench.paths import ADAPTER_RECORD, resolve_path
from workbench.step_options import PruneOptions

IN_WEIGHTS = {"prune_heads", "recover"}
"""Steps whose result lives in the weights and shapes a checkpoint stores. The others
(quantize, kv_cache) are recorded in the saved folder's workbench.yaml and re-applied on
load: deterministic, so the reloaded model gives the same outputs."""


def split_steps(steps) -> tuple[list, list]:
    """(steps saved in the weights, steps re-applied at load); config order kept within each.
    Pruning and recovery always precede quantization (the config enforces it), so running
    every weight step first changes nothing."""
    return [s for s in steps if s.step in IN_WEIGHTS], [s for s in steps if s.step not in IN_WEIGHTS]


def calibration_digest() -> str:
    return hashlib.sha256("\f".join(calibration_texts()).encode()).hexdigest()[:16]


def prune_record(source: str, options: dict, report: dict) -> dict:
    """What a saved recovery adapter remembers of the prune it was trained after."""
    return {
        "source": source,
        "options": PruneOptions.model_validate(options).model_dump(mode="json"),
        "calibration": calibration_digest(),
        "removed": {str(k): v for k, v in report["removed"].items()},
    }


def recorded_removal(source: str, options: dict, later_steps) -> dict | None:
    """The KV groups a later `recover` step's adapter was trained on, when it recorded a prune
    with exactly these options of the same model on the same calibration text: the prune is
    deterministic, so replaying the recorded groups gives the same model without measuring
    importance again (the taylor pass takes minutes on a small CPU). Otherwise None."""
    adapter = next((s.model_extra.get("adapter") for s in later_steps if s.step == "recover"), None)
    if not adapter or options.get("remove") is not None:
        return None
    record = json.loads((resolve_path(adapter) / ADAPTER_RECORD).read_text()).get("prune") or {}
    wanted = PruneOptions.model_validate(options).model_dump(mode="json")
    if (
        record.get("source") == source
        and record.get("options") == wanted
        and record.get("calibration") == calibration_digest()
        and record.get("removed")
    ):
        return {int(k): v for k, v in record["removed"].items()}
    return None


def apply(session, steps) -> list[dict]:
    """Run each step on `session` in place; return their reports as plain dicts.

    A `recover` step that trains gets the model as loaded (copied before the first step) as its
    teacher, and the prune it follows, to record beside a saved adapter."""
    steps = list(steps)
    teacher = None
    if any(s.step == "recover" and not (s.model_extra or {}).get("adapter") for s in steps):
        teacher = teacher_copy(session.model)
    reports, prune = [], None
    for i, step in enumerate(tqdm(steps, desc="compressing", disable=not steps)):
        options = dict(step.model_extra or {})
        _, run = STEPS[step.step]
        if step.step == "prune_heads":
            removal = recorded_removal(session.loaded.source, options, steps[i + 1 :])
            report = (
                run(session, **{**options, "ratio": None, "per_layer": None, "remove": removal})
                if removal
                else run(session, **options)
            )
            report = asdict(report)
            if removal:
                report["removed_from"] = "recover adapter record"
            prune = prune_record(session.loaded.source, options, report)
        elif step.step == "recover":
            report = run(session, teacher=teacher, prune=prune, **options)
        else:
            report = run(session, **options)
        # a step's report is a dataclass instance (is_dataclass also admits a dataclass type)
        reports.append(asdict(report) if is_dataclass(report) else dict(report))  # type: ignore[arg-type]
    return reports
