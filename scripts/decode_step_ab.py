"""The packaged decode step (AOTInductor, what `model.compile` runs on CPU) against `torch.compile`
of `model.forward` (the CPU path before it: full graph, static shapes, no module guards), side by
side in one process: alternated 64-token greedy replies over one `StaticCache` each, paired ratios.

    .venv/bin/python scripts/decode_step_ab.py configs/int4-calibrated.yaml [--replies 5]

One process, so both steps share the machine's state of the moment (a 2-core cloud CPU's rate
moves by a third between minutes); the first reply of each compiles its step and is not timed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import StaticCache

import workbench
from workbench.engine.packaged_step import PackagedStep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--replies", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    session = workbench.load(args.config, quiet=True)
    model = session.model
    ids = session.tokenizer("Write one sentence about the sea.", return_tensors="pt").input_ids
    steps = {
        "packaged": PackagedStep(model),
        "torch.compile": torch.compile(  # type: ignore[call-overload]
            model.forward,
            fullgraph=True,
            dynamic=False,
            options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe},
        ),
        "eager": model,
    }

    def reply(step) -> tuple[float, list[int]]:
        cache = StaticCache(config=model.config, max_cache_len=256)
        with torch.inference_mode():
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        tokens = []
        start = time.perf_counter()
        for _ in range(args.tokens):
            token = logits.argmax(-1, keepdim=True)
            tokens.append(int(token))
            with torch.inference_mode():
                logits = step(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        return args.tokens / (time.perf_counter() - start), tokens

    texts = {name: reply(step)[1] for name, step in steps.items()}  # compiles both
    rates: dict[str, list[float]] = {"packaged": [], "torch.compile": []}
    for _ in range(args.replies):
        for name in rates:
            rates[name].append(reply(steps[name])[0])
    paired = [a / b for a, b in zip(rates["packaged"], rates["torch.compile"], strict=True)]
    print(f"{args.config}, {torch.get_num_threads()} threads, {args.replies} x {args.tokens} tokens (tok/s, median):")
    for name, values in rates.items():
        print(f"  {name}: {statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})")
    print(f"  packaged / torch.compile, paired: {statistics.median(paired):.3f}")
    print(
        f"  greedy tokens as eager: packaged {texts['packaged'] == texts['eager']}, "
        f"torch.compile {texts['torch.compile'] == texts['eager']}, "
        f"packaged as torch.compile {texts['packaged'] == texts['torch.compile']}"
    )


if __name__ == "__main__":
    main()
