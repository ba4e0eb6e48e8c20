"""How often the embedded model loops until max_tokens, with and without penalties.

The reference client's prompt `你是谁?` at the default temperature (0.7) sometimes makes
SmolLM2-135M repeat one character until it hits 512 tokens. This counts, over a few seeds,
how many replies run to the limit with no penalty, with repetition_penalty=1.1 and with
frequency_penalty=0.5:

    PYTHONPATH=. nice -n 10 python scripts/repetition_loops.py [--seeds 4] [--prompt 你是谁?]
        [--temperature 0.5 --thinking]  # the README's LangChain snippet
"""

import argparse

import torch

import workbench

SETTINGS = {
    "no penalty": {},
    "repetition_penalty=1.1": {"repetition_penalty": 1.1},
    "repetition_penalty=1.2": {"repetition_penalty": 1.2},
    "frequency_penalty=0.5": {"frequency_penalty": 0.5},
}

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--prompt", default="你是谁?")
parser.add_argument("--seeds", type=int, default=4)
parser.add_argument("--max-tokens", type=int, default=512)
parser.add_argument("--temperature", type=float, default=0.7)
parser.add_argument("--thinking", action="store_true", help="enable_thinking, as the README's LangChain snippet asks")
parser.add_argument("--config", default="configs/default.yaml")
args = parser.parse_args()
torch.set_num_threads(2)
session = workbench.load(args.config, device="cpu")
for name, fields in SETTINGS.items():
    lengths = []
    for seed in range(args.seeds):
        reply = session.chat(
            args.prompt,
            temperature=args.temperature,
            seed=seed,
            max_tokens=args.max_tokens,
            enable_thinking=args.thinking,
            **fields,
        )
        lengths.append(reply.stats.completion_tokens)
        print(
            f"  {name} seed {seed}: {reply.stats.completion_tokens} tokens, {reply.stats.finish_reason}: {reply.text[:60]!r}",
            flush=True,
        )
    hit = sum(n >= args.max_tokens for n in lengths)
    print(f"{name}: {hit} of {args.seeds} replies hit {args.max_tokens} tokens (lengths {lengths})", flush=True)
