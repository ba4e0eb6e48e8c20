"""`python -m workbench.export SOURCE --to gguf|hf --out PATH [--type f16|q8_0|q4_0] [--pad]
[--overwrite] [--check]`: write a config's (compressed) model, a saved model folder or any
model source as a GGUF file for llama.cpp or a stock transformers checkpoint.

A bad request (unknown format or type, PATH already there, a quantized config asked for a
transformers checkpoint, a model that does not exist) is refused with exit code 2 before
the model is loaded, and nothing is written.

--check reads the export back and judges it: KL(model || export) per token and top-1
agreement on held-out text, within the tolerance of the export's type (docs/export.md). It
prints "check passed: ..." or "check FAILED: ..." and exits 1 when the check fails (the
export is written all the same). A greedy reply of llama.cpp that differs from the model's
is reported, not judged: a near-tie between the top two tokens flips greedy decoding."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from workbench.config import ConfigError
from workbench.export import FORMATS, GGUF_TYPES, ExportError, check_request, export, quantized_schemes
from workbench.models import ModelSourceError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workbench.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "source",
        help="a config (configs/pruned-25.yaml), a saved model folder, or a source string (embedded:NAME, tiny:ARCH, a hub id)",
    )
    parser.add_argument(
        "--to",
        required=True,
        choices=FORMATS,
        help="gguf: one file for llama.cpp; hf: a stock transformers checkpoint folder",
    )
    parser.add_argument("--out", required=True, type=Path, help="the .gguf file or the checkpoint folder to write")
    parser.add_argument("--type", choices=GGUF_TYPES, default=None, help="GGUF encoding (default f16)")
    parser.add_argument(
        "--pad",
        action="store_true",
        help="zero-pad pruned heads back to one head count per layer (exact outputs) where the format needs it",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--check",
        action="store_true",
        help="read the export back (transformers; llama.cpp when installed) and judge it: KL divergence and "
        "top-1 agreement with the model on held-out text within the type's tolerance; exit 1 when it fails",
    )
    args = parser.parse_args(argv)

    import workbench
    from workbench.session import _config_for, preflight

    try:
        config = _config_for(args.source, {"device": "cpu"})
        check_request(
            args.to, args.type, args.out, overwrite=args.overwrite, schemes=quantized_schemes(config.compression)
        )
        preflight(config)
        session = workbench.load(config)
        result = export(
            session, args.out, to=args.to, type=args.type, pad=args.pad, overwrite=args.overwrite, check=args.check
        )
    except (ExportError, ConfigError, ModelSourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    export_line, _, verdict_line = result.summary().partition("\n")
    print(export_line)
    for line in result.checks:
        print(f"  check: {line}")
    if verdict_line:
        print(verdict_line)
    return 1 if result.passed is False else 0


if __name__ == "__main__":
    sys.exit(main())
