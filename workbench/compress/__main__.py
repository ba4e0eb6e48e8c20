"""`python -m workbench.compress CONFIG --out DIR`: apply a config's compression steps to its
model and measure before and after in one run; writes report.json, report.md, report.html
and the compressed model as it is held: pruned shapes, merged adapters and quantized layers
(int8/int4 tensors and their scales, compress/checkpoint.py), so `workbench.load(DIR/model)`
reads it without quantizing again; the KV-cache policy is recorded in its workbench.yaml and
re-applied. Only a scheme whose layers are torchao tensor subclasses (int8_dynamic, int4 off
the CPU) is still recorded as a step and re-applied at load.

The divergence from the original needs the model as loaded once the compressed one is
measured: it is loaded again then (from the cache), not kept through the run, so that neither
measurement's memory figure carries a second model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from workbench.compress.checkpoint import storable_schemes
from workbench.compress.pipeline import apply, split_steps
from workbench.compress.report import (
    divergence_from_original,
    layer_map_from_original,
    measure,
    to_markdown,
    write_report,
)
from workbench.config import ConfigError, WorkbenchConfig, load_config, parse_config
from workbench.data import CALIBRATION_BUILTINS, check_calibration
from workbench.harness import parse_tasks
from workbench.models import load_model
from workbench.session import Session, preflight
from workbench.step_options import STEP_OPTIONS


def with_calibration(config: WorkbenchConfig, spec: str, origin: str) -> WorkbenchConfig:
    """The config with `calibration: spec` on every step that takes one, except a recover step
    that loads a trained adapter (it reads no text). A prune replayed from that adapter's record
    then no longer matches it, so the importance is measured on `spec`."""
    data = config.to_data()
    for step in data["compression"]:
        if "calibration" in STEP_OPTIONS[step["step"]].model_fields and not step.get("adapter"):
            step["calibration"] = spec
    return parse_config(data, f"{origin} with --calibration {spec}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workbench.compress", description=__doc__)
    parser.add_argument("config", help="a config with a `compression:` list, e.g. configs/pruned-25.yaml")
    parser.add_argument("--out", type=Path, required=True, help="folder for the report and the compressed model")
    parser.add_argument(
        "--windows", type=int, default=8, help="512-token windows of held-out text for perplexity and divergence"
    )
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens generated for the decode-speed figure")
    parser.add_argument(
        "--calibration",
        help="calibration data of every step that reads it, overriding the config: "
        + ", ".join(CALIBRATION_BUILTINS)
        + ", or a .txt / .jsonl file or a folder of them (docs/compression.md)",
    )
    parser.add_argument(
        "--harness",
        default="workbench_mmlu_subset",
        help="comma-separated lm-eval tasks scored before and after (python -m workbench.harness ls tasks), or none",
    )
    args = parser.parse_args(argv)
    try:
        harness = parse_tasks(args.harness)
    except ValueError as exc:
        raise SystemExit(f"error: --harness: {exc}") from None

    config = load_config(args.config)  # a bad config fails here, before any model is loaded
    if args.calibration is not None:
        try:
            check_calibration(args.calibration)
            config = with_calibration(config, args.calibration, args.config)
        except (ConfigError, ValueError) as exc:
            raise SystemExit(f"error: --calibration: {exc}") from None
    if not config.compression:
        raise SystemExit(f"{args.config} lists no compression steps; nothing to compress")
    preflight(config)
    session = Session(load_model(config.model), config)
    print("Measuring the original model ...", file=sys.stderr, flush=True)
    before = measure(session, windows=args.windows, decode_tokens=args.decode_tokens, harness=harness)
    in_weights, reapplied = split_steps(config.compression)
    quantize_steps = [s for s in reapplied if s.step == "quantize"]
    if quantize_steps and storable_schemes(quantize_steps, session.loaded.device):
        # saved as quantized: only the KV-cache policy is left to re-apply at load
        in_weights = [step for step in config.compression if step.step != "kv_cache"]
        reapplied = [step for step in reapplied if step.step == "kv_cache"]
    session.reports = apply(session, in_weights)
    model_dir = args.out / "model"
    session.save(model_dir, reapply=reapplied)
    session.reports += apply(session, reapplied)
    print("Measuring the compressed model ...", file=sys.stderr, flush=True)
    after = measure(session, windows=args.windows, decode_tokens=args.decode_tokens, harness=harness)
    print("Comparing it with the original ...", file=sys.stderr, flush=True)
    original = load_model(config.model, quiet=True).model
    drift = divergence_from_original(original, session, windows=args.windows)
    layer_map = layer_map_from_original(original, session)
    del original
    write_report(args.out, args.config, before, after, session.reports, drift, layer_map)
    print(
        f"Compressed model saved to {model_dir}: workbench.load('{model_dir}')"
        + (f" re-applies {', '.join(s.step for s in reapplied)}" if reapplied else "")
    )
    print(to_markdown(args.config, before, after, session.reports, drift, layer_map))
    print(f"Report in {args.out}/report.md, report.json, report.html, divergence.html")


if __name__ == "__main__":
    main()
