"""`python -m workbench.harness [lm-eval's arguments]`: lm-eval's command line with the `workbench`
model and the shipped tasks registered, e.g.

    python -m workbench.harness --model workbench --model_args config=configs/int8.yaml \\
        --tasks workbench_mmlu_subset,workbench_ppl_prose

Everything else is lm-eval's own (`--limit`, `--output_path`, `--apply_chat_template`, other
models and tasks); `python -m workbench.harness ls tasks` lists the shipped tasks with lm-eval's.
"""

from __future__ import annotations

import sys

from workbench.harness import TASKS_DIR


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and not any(a in ("-h", "--help") for a in args) and "--include_path" not in args:
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["python -m workbench.harness", *args]

    from lm_eval.__main__ import cli_evaluate

    import workbench.harness.lm  # noqa: F401  (registers --model workbench)

    cli_evaluate()


if __name__ == "__main__":
    main()
