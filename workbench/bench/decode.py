"""Decode speed of the engine against plain `model.generate` on the same weights.

Both paths get the same chat prompts and produce the same number of tokens (greedy, end
of turn ignored); runs alternate engine / generate so that a noisy neighbour slows both
alike, and the table reports medians with min–max spreads. Numbers from one run are
comparable with each other, not with another machine's or another day's.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

from workbench.engine import ChatRequest, Done
from workbench.session import Session

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for saving battery on a phone.",
    "Explain in two sentences what a KV cache is.",
]


@dataclass(frozen=True)
class Run:
    path: str
    prompt: int
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    decode_tokens_per_s: float


class _TokenClock(BaseStreamer):
    """Time stamps of each `put` from `generate`: the first is the prompt, then one per token."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def _engine_run(session: Session, index: int, tokens: int) -> Run:
    request = ChatRequest.from_prompt(PROMPTS[index], max_tokens=tokens, temperature=0, ignore_eos=True)
    stats = next(e for e in session.engine.stream(request) if isinstance(e, Done)).stats
    return Run("engine", index, stats.prompt_tokens, stats.completion_tokens, stats.ttft_s, stats.decode_tokens_per_s)


def _generate_run(session: Session, index: int, tokens: int) -> Run:
    start = time.perf_counter()
    inputs = session.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[index]}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(session.engine.device)
    clock = _TokenClock()
    with torch.inference_mode():
        out = session.model.generate(
            **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=clock,
            pad_token_id=session.tokenizer.pad_token_id or session.tokenizer.eos_token_id,
        )
    new = out.shape[1] - inputs["input_ids"].shape[1]
    first, last = clock.stamps[1], clock.stamps[-1]
    return Run("generate", index, inputs["input_ids"].shape[1], new, first - start, (new - 1) / (last - first))


def run_decode(session: Session, *, tokens: int = 64, repeats: int = 3, progress: bool = True) -> list[Run]:
    # One untimed pass of each path first: allocators and kernels warm up on the first call.
    _engine_run(session, 0, min(tokens, 4))
    _generate_run(session, 0, min(tokens, 4))
    plan = [(r, i) for r in range(repeats) for i in range(len(PROMPTS))]
    runs = []
    for _, index in tqdm(plan, desc="decode bench", disable=not progress):
        runs.append(_engine_run(session, index, tokens))
        runs.append(_generate_run(session, index, tokens))
    return runs


def summarise(runs: list[Run]) -> dict[str, dict[str, float]]:
    table = {}
    for path in sorted({r.path for r in runs}):
        mine = [r for r in runs if r.path == path]
        ttft = [r.ttft_s * 1000 for r in mine]
        tps = [r.decode_tokens_per_s for r in mine]
        table[path] = {
            "runs": len(mine),
            "ttft_ms_median": statistics.median(ttft),
            "ttft_ms_min": min(ttft),
            "ttft_ms_max": max(ttft),
            "decode_tok_s_median": statistics.median(tps),
            "decode_tok_s_min": min(tps),
            "decode_tok_s_max": max(tps),
        }
    if "generate" in table and "engine" in table:
        table["engine"]["decode_ratio_to_generate"] = (
            table["engine"]["decode_tok_s_median"] / table["generate"]["decode_tok_s_median"]
        )
    return table


def to_markdown(summary: dict, meta: dict) -> str:
    lines = [
        f"Decode bench: {meta['source']} ({meta['dtype']}, {meta['device']}, {meta['threads']} threads), "
        f"{meta['tokens']} new tokens, greedy, {meta['repeats']} x {len(PROMPTS)} prompts, interleaved",
        "",
        "| path | time to first token, ms (median, min–max) | decode tok/s (median, min–max) | ratio to generate |",
        "|---|---|---|---|",
    ]
    for path, s in summary.items():
        ratio = s.get("decode_ratio_to_generate", 1.0 if path == "generate" else float("nan"))
        lines.append(
            f"| {path} | {s['ttft_ms_median']:.0f} ({s['ttft_ms_min']:.0f}–{s['ttft_ms_max']:.0f}) "
            f"| {s['decode_tok_s_median']:.1f} ({s['decode_tok_s_min']:.1f}–{s['decode_tok_s_max']:.1f}) | {ratio:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, runs: list[Run], summary: dict, meta: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "decode.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": [asdict(r) for r in runs]}, indent=2)
    )
    (out_dir / "decode.md").write_text(to_markdown(summary, meta))
    return out_dir
