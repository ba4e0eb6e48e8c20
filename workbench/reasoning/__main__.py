"""`python -m workbench.reasoning --out data/thinking`: train the thinking adapter.

Loads the model (the embedded default unless --model), trains the LoRA on generated
arithmetic traces and the model's own replies (workbench/reasoning/train.py), writes the
adapter folder with its chat template, then scores the bench's 20 held-out arithmetic
questions with thinking on and off and prints the result.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from workbench.reasoning.train import ThinkingOptions

    parser = argparse.ArgumentParser(prog="python -m workbench.reasoning", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="adapter folder to write (e.g. data/thinking)")
    parser.add_argument(
        "--model", default="embedded:smollm2-135m-instruct", help="source to train on (default the embedded model)"
    )
    parser.add_argument("--options", default="{}", help='JSON of training options, e.g. \'{"steps": 200, "batch": 8}\'')
    args = parser.parse_args(argv)
    try:
        opts = ThinkingOptions.model_validate(json.loads(args.options))
    except (ValueError, json.JSONDecodeError) as exc:
        print(f"--options: {exc}", file=sys.stderr)
        return 2
    if args.out.is_file():
        print(f"--out {args.out} is a file; give a folder", file=sys.stderr)
        return 2
    import workbench
    from workbench.reasoning.train import train

    session = workbench.load(args.model)
    report = train(session, opts, args.out)
    for mode, result in report.held_out.items():
        print(
            f"held-out arithmetic, thinking {mode}: {result['correct']}/{result['asked']} "
            f"(closed think blocks: {result['closed_think_blocks']})"
        )
    print(
        f"held-out perplexity (4 x 512 tokens), reference text: {report.perplexity_before:.3f} stock -> "
        f"{report.perplexity_after:.3f}; prose: {report.perplexity_prose_before:.3f} -> {report.perplexity_prose_after:.3f}"
    )
    print(
        f"trained {report.steps} steps in {report.seconds:.0f} s (own replies {report.replies_seconds:.0f} s); adapter in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
