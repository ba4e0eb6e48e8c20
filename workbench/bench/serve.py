"""Serving latency over HTTP against any OpenAI-compatible endpoint.

For each concurrency level, that many streaming clients each send requests back to back;
time to first token is measured per request at the client (first content or reasoning
delta, queueing and network included), and aggregate throughput is all completion
tokens over the level's wall time. Works against this workbench's server or any other
(vLLM, a cloud endpoint): this is how "local vs cloud" latency is reproduced.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for saving battery on a phone.",
    "Explain in two sentences what a KV cache is.",
    "Write a haiku about a small language model.",
]


@dataclass(frozen=True)
class ServeRun:
    concurrency: int
    ok: bool
    ttft_s: float
    total_s: float
    completion_tokens: int
    error: str = ""


async def _one(client: httpx.AsyncClient, url: str, headers: dict, body: dict, concurrency: int) -> ServeRun:
    start = time.perf_counter()
    first = None
    tokens = chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                return ServeRun(concurrency, False, 0.0, time.perf_counter() - start, 0, f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    return ServeRun(concurrency, False, 0.0, time.perf_counter() - start, 0, str(data["error"]))
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                for choice in data.get("choices", []):
                    delta = choice.get("delta", {})
                    if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
                        chunks += 1
                        if first is None:
                            first = time.perf_counter()
    except httpx.HTTPError as exc:
        return ServeRun(concurrency, False, 0.0, time.perf_counter() - start, 0, f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    # An endpoint that sends no usage in the stream (llama-cpp-python's server) is counted by
    # its content chunks: one token each there.
    return ServeRun(concurrency, True, (first or end) - start, end - start, tokens or chunks)


async def _level(base_url: str, model: str, api_key: str | None, concurrency: int, requests_per_client: int, tokens: int):
    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:

        async def worker(w: int) -> list[ServeRun]:
            runs = []
            for r in range(requests_per_client):
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": PROMPTS[(w + r) % len(PROMPTS)]}],
                    "max_tokens": tokens,
                    "temperature": 0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                runs.append(await _one(client, url, headers, body, concurrency))
            return runs

        start = time.perf_counter()
        results = await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - start
    return [run for runs in results for run in runs], wall


def _percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def run_serve(base_url: str, model: str, *, api_key: str | None = None, levels=(1, 4, 8), requests_per_client: int = 2, tokens: int = 32):
    rows, runs = [], []
    for concurrency in levels:
        level_runs, wall = asyncio.run(_level(base_url, model, api_key, concurrency, requests_per_client, tokens))
        runs += level_runs
        ok = [r for r in level_runs if r.ok]
        ttft = [r.ttft_s * 1000 for r in ok] or [float("nan")]
        rows.append({
            "concurrency": concurrency,
            "requests": len(level_runs),
            "failed": len(level_runs) - len(ok),
            "ttft_ms_p50": statistics.median(ttft),
            "ttft_ms_p95": _percentile(ttft, 95),
            "aggregate_tok_s": sum(r.completion_tokens for r in ok) / wall,
            "wall_s": wall,
        })
    return rows, runs


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Serve bench: {meta['target']} model {meta['model']!r}, {meta['tokens']} max tokens, greedy, "
        f"{meta['requests_per_client']} requests per client, streaming",
        "",
        "| concurrent clients | requests (failed) | time to first token p50, ms | p95, ms | aggregate tok/s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['requests']} ({r['failed']}) | {r['ttft_ms_p50']:.0f} | {r['ttft_ms_p95']:.0f} | {r['aggregate_tok_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, rows: list[dict], runs: list[ServeRun], meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serve.json").write_text(json.dumps({"meta": meta, "levels": rows, "runs": [asdict(r) for r in runs]}, indent=2))
    (out_dir / "serve.md").write_text(to_markdown(rows, meta))
