"""`python -m workbench.bench decode [--config FILE|SOURCE] [--tokens N] [--repeats R] [--out DIR]`"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import workbench
from workbench.bench.decode import run_decode, summarise, to_markdown, write_results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workbench.bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    decode = sub.add_parser("decode", help="engine vs plain model.generate: time to first token, decode tok/s")
    decode.add_argument("--config", default=None, help="config file or model source (default: the embedded model)")
    decode.add_argument("--tokens", type=int, default=64, help="new tokens per reply (end of turn ignored)")
    decode.add_argument("--repeats", type=int, default=3, help="rounds over the fixed prompt set")
    decode.add_argument("--out", type=Path, default=None, help="results folder (default runs/decode-TIMESTAMP)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    session = workbench.load(args.config)
    load_s = time.perf_counter() - start
    runs = run_decode(session, tokens=args.tokens, repeats=args.repeats)
    meta = {
        "source": session.loaded.source,
        "dtype": str(session.loaded.dtype).removeprefix("torch."),
        "device": session.loaded.device,
        "threads": torch.get_num_threads(),
        "tokens": args.tokens,
        "repeats": args.repeats,
        "load_s": load_s,
        "torch": torch.__version__,
    }
    summary = summarise(runs)
    out = args.out or Path("runs") / time.strftime("decode-%Y%m%d-%H%M%S")
    write_results(out, runs, summary, meta)
    print(to_markdown(summary, meta))
    print(f"Results in {out}/decode.json and decode.md")


if __name__ == "__main__":
    main()
