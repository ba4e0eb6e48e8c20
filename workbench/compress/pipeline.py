"""Apply a config's compression steps to a loaded session, in order, with a progress bar."""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass

from tqdm.auto import tqdm

from workbench.compress import STEPS
from workbench.compress.calibration import Calibration, resolve
from workbench.compress.recovery import teacher_copy
from workbench.data import DEFAULT_CALIBRATION
from workbench.models.memory import release
from workbench.paths import ADAPTER_RECORD, resolve_path
from workbench.step_options import STEP_OPTIONS, PruneOptions

IN_WEIGHTS = {"prune_heads", "recover"}
"""Steps whose result lives in the weights and shapes a checkpoint stores. The others
(quantize, kv_cache) are recorded in the saved folder's workbench.yaml and re-applied on
load: deterministic, so the reloaded model gives the same outputs."""


def split_steps(steps) -> tuple[list, list]:
    """(steps saved in the weights, steps re-applied at load); config order kept within each.
    Pruning and recovery always precede quantization (the config enforces it), so running
    every weight step first changes nothing."""
    return [s for s in steps if s.step in IN_WEIGHTS], [s for s in steps if s.step not in IN_WEIGHTS]


def _prune_options(options: dict) -> dict:
    """A prune's options as recorded: validated and with the calibration named. Records written
    before calibration was a choice have no `calibration` and a numeric ridge: they were all fitted
    on the reference text."""
    dumped = PruneOptions.model_validate(options).model_dump(mode="json")
    dumped["calibration"] = dumped.get("calibration") or DEFAULT_CALIBRATION
    if dumped.get("remove") is not None:  # listed groups: no criterion chose them, no ratio counted them
        for chooser in ("criterion", "ratio", "per_layer"):
            dumped.pop(chooser, None)
    return dumped


def prune_record(source: str, options: dict, report: dict, calibration: Calibration | None) -> dict:
    """What a saved recovery adapter remembers of the prune it was trained after: enough to
    replay it (the groups) and to say what it measured (the importance)."""
    return {
        "source": source,
        "options": _prune_options(options),
        "calibration": calibration.digest if calibration is not None else None,
        "calibration_data": calibration.record() if calibration is not None else None,
        "removed": {str(k): v for k, v in report["removed"].items()},
        "importance": report.get("importance") or [],
    }


def _recover_adapter(later_steps) -> str | None:
    return next((s.model_extra.get("adapter") for s in later_steps if s.step == "recover"), None)


def recorded_removal(session, options: dict, later_steps) -> dict | None:
    """The prune a later `recover` step's adapter was trained after, when it recorded a prune
    with exactly these options of the same model on the same calibration text: the prune is
    deterministic, so replaying the recorded groups gives the same model without measuring
    importance again (the taylor pass takes minutes on a small CPU). Otherwise None.
    Returns {"removed", "importance", "adapter"}, as prune_heads' `replay` takes it."""
    adapter = _recover_adapter(later_steps)
    if not adapter or options.get("remove") is not None:
        return None
    record = json.loads((resolve_path(adapter) / ADAPTER_RECORD).read_text()).get("prune") or {}
    if not record.get("removed") or record.get("source") != session.loaded.source:
        return None
    recorded = {"calibration": "reference", **record.get("options", {})}
    wanted = _prune_options(options)
    if recorded != wanted:
        return None
    if record.get("calibration") != resolve(session, wanted["calibration"]).digest:
        return None
    return {
        "removed": {int(k): v for k, v in record["removed"].items()},
        "importance": record.get("importance") or [],
        "adapter": adapter,
    }


def resolve_calibrations(session, steps) -> dict[int, Calibration]:
    """Each step's calibration data, by step index, built before the first step changes the
    model: a mix's self-generated text must come from the model as loaded, not a pruned one."""
    resolved = {}
    for i, step in enumerate(steps):
        opts = STEP_OPTIONS[step.step].model_validate(step.model_extra or {})
        if getattr(opts, "reads_calibration", False):
            resolved[i] = resolve(session, getattr(opts, "calibration", None))
    return resolved


def apply(session, steps) -> list[dict]:
    """Run each step on `session` in place; return their reports as plain dicts. Then what the
    steps replaced is freed and handed back to the OS (memory.release): the weights that stay are
    copied out of the mapped checkpoint, so its pages go with the mapping.

    A `recover` step that trains gets the model as loaded (copied before the first step) as its
    teacher, and the prune it follows, to record beside a saved adapter."""
    steps = list(steps)
    teacher = None
    if any(s.step == "recover" and not (s.model_extra or {}).get("adapter") for s in steps):
        teacher = teacher_copy(session.model)
    reports, prune = [], None
    calibrations = resolve_calibrations(session, steps)
    for i, step in enumerate(tqdm(steps, desc="compressing", disable=not steps)):
        options = dict(step.model_extra or {})
        _, run = STEPS[step.step]
        if step.step == "prune_heads":
            replay = recorded_removal(session, options, steps[i + 1 :])
            report = run(session, replay=replay, **options)
            prune = prune_record(session.loaded.source, options, asdict(report), calibrations.get(i))
        elif step.step == "recover":
            report = run(session, teacher=teacher, prune=prune, **options)
        else:
            report = run(session, **options)
        # a step's report is a dataclass instance (is_dataclass also admits a dataclass type)
        reports.append(asdict(report) if is_dataclass(report) else dict(report))  # type: ignore[arg-type]
    del teacher
    if any(s.step != "kv_cache" for s in steps):  # a cache policy replaces no weight: nothing to free
        # The steps replaced layers whose originals still sit in the mapped checkpoint, paged in
        # (an int8 session kept ~500 MB of float32 file pages) and in the heap as freed temporaries.
        release([session.model, session.media.adapter])
    return reports
