"""int4 on the embedded model, lm_head included, rounded by each method, against float32.

For each variant the embedded model is loaded afresh and quantized by the `quantize` step
with the options below; then, on both held-out texts (workbench.data.HELD_OUT), its perplexity
against float32's on the same windows, KL(float32 || int4) and top-1 agreement
(workbench.metrics.log_prob_divergence, with float32's log-probs computed once). Prints a
Markdown table and writes JSON:

    PYTHONPATH=. nice -n 10 python scripts/measure_int4.py [--windows 8] [--calibration mix] \\
        [--variants rtn,hqq,gptq,...] [--out docs/int4_calibrated.json]

Decode speed is the bench's job (`python -m workbench.bench decode`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import workbench
from workbench.compress.quantization import quantize
from workbench.data import HELD_OUT, held_out_texts
from workbench.metrics import _log_probs, log_prob_divergence, token_windows

EVERY = [{"pattern": "lm_head", "scheme": "int4_weight_only"}]
VARIANTS = {  # every linear layer in int4 (lm_head too, unless the name says otherwise); rtn-lm_head-int8 is configs/int4.yaml
    "rtn-lm_head-int8": {
        "scheme": "int4_weight_only",
        "rules": [{"pattern": "lm_head", "scheme": "int8_weight_only"}],
    },
    "rtn": {"scheme": "int4_weight_only", "rules": EVERY},
    "hqq": {"scheme": "int4_weight_only", "method": "hqq", "rules": EVERY},
    "gptq": {"scheme": "int4_weight_only", "method": "gptq", "rules": EVERY},
    "gptq-lm_head-int8": {
        "scheme": "int4_weight_only",
        "method": "gptq",
        "rules": [{"pattern": "lm_head", "scheme": "int8_weight_only"}],
    },
    "gptq-64-windows": {
        "scheme": "int4_weight_only",
        "method": "gptq",
        "calibration_windows": 64,
        "rules": EVERY,
    },
    "gptq-no-act_order": {"scheme": "int4_weight_only", "method": "gptq", "act_order": False, "rules": EVERY},
}
CALIBRATED = ("gptq",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=8, help="512-token windows of each held-out text")
    parser.add_argument("--calibration", default=None, help="calibration data of gptq (default: the step's, mix)")
    parser.add_argument("--variants", default="all", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--out", default=None, help="write the figures here as JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")

    session = workbench.load("configs/default.yaml", device="cpu", quiet=True)
    windows = {
        text: token_windows(session.tokenizer, held_out_texts(text), window=512, max_windows=args.windows)
        for text in HELD_OUT
    }
    with torch.inference_mode():
        reference = {text: [_log_probs(session.model, w) for w in ws] for text, ws in windows.items()}
    del session
    rows = {}
    for name in names:
        options = dict(VARIANTS[name])
        if any(m in options.get("method", "rtn") for m in CALIBRATED) and args.calibration:
            options["calibration"] = args.calibration
        session = workbench.load("configs/default.yaml", device="cpu", quiet=True)
        start = time.perf_counter()
        report = quantize(session, **options)
        seconds = time.perf_counter() - start
        row: dict = {"options": options, "quantize_s": round(seconds, 1), "calibration": report.calibration}
        with torch.inference_mode():
            for text, ws in windows.items():
                d = log_prob_divergence((p, _log_probs(session.model, w), w[1:]) for p, w in zip(reference[text], ws))
                row[text] = {
                    "perplexity": d.compressed_perplexity,
                    "float32": d.original_perplexity,
                    "ratio": d.compressed_perplexity / d.original_perplexity,
                    "kl_mean": d.kl_mean,
                    "kl_p99": d.kl_p99,
                    "top1": d.top1_agreement,
                    "windows": d.windows,
                }
        rows[name] = row
        print(f"{name}: " + json.dumps({t: row[t] for t in HELD_OUT} | {"quantize_s": row["quantize_s"]}), flush=True)
        del session

    print(f"\n| int4 variant | {' | '.join(f'{t}: ppl (x fp32), KL, top-1' for t in HELD_OUT)} | quantize s |")
    print("|---|" + "---|" * len(HELD_OUT) + "---|")
    for name, row in rows.items():
        cells = [
            f"{row[t]['perplexity']:.3f} ({row[t]['ratio']:.4f}x), {row[t]['kl_mean']:.4f}, {row[t]['top1']:.1%}"
            for t in HELD_OUT
        ]
        print(f"| {name} | {' | '.join(cells)} | {row['quantize_s']} |")
    first = next(iter(rows.values()))
    print("float32: " + ", ".join(f"{t} {first[t]['float32']:.3f}" for t in HELD_OUT))
    if args.out:
        Path(args.out).write_text(json.dumps({"windows": args.windows, "variants": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
