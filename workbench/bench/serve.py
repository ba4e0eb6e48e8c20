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
from collections.abc import AsyncIterator
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
    path: str
    """which server: eager, compiled, or endpoint (a --base-url)"""
    concurrency: int
    ok: bool
    ttft_s: float
    total_s: float
    completion_tokens: int
    error: str = ""


async def event_chunks(response: httpx.Response) -> AsyncIterator[dict]:
    """A streamed chat completion's chunks: each server-sent `data: {...}` line, parsed
    (`data: [DONE]`, blank lines and other event fields are skipped)."""
    async for line in response.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


async def _one(client: httpx.AsyncClient, url: str, headers: dict, body: dict, concurrency: int, path: str) -> ServeRun:
    start = time.perf_counter()
    first = None
    tokens = chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                return ServeRun(
                    path,
                    concurrency,
                    False,
                    0.0,
                    time.perf_counter() - start,
                    0,
                    f"HTTP {response.status_code}: {(await response.aread())[:200]!r}",
                )
            async for data in event_chunks(response):
                if "error" in data:
                    return ServeRun(path, concurrency, False, 0.0, time.perf_counter() - start, 0, str(data["error"]))
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                for choice in data.get("choices", []):
                    delta = choice.get("delta", {})
                    if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
                        chunks += 1
                        if first is None:
                            first = time.perf_counter()
    except httpx.HTTPError as exc:
        return ServeRun(path, concurrency, False, 0.0, time.perf_counter() - start, 0, f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    # An endpoint that sends no usage in the stream (llama-cpp-python's server) is counted by
    # its content chunks: one token each there.
    return ServeRun(path, concurrency, True, (first or end) - start, end - start, tokens or chunks)


async def _level(
    base_url: str,
    model: str,
    api_key: str | None,
    concurrency: int,
    requests_per_client: int,
    tokens: int,
    path: str = "endpoint",
):
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
                runs.append(await _one(client, url, headers, body, concurrency, path))
            return runs

        start = time.perf_counter()
        results = await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - start
    return [run for runs in results for run in runs], wall


def _percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _row(path: str, concurrency: int, level_runs: list[ServeRun], wall: float) -> dict:
    ok = [r for r in level_runs if r.ok]
    ttft = [r.ttft_s * 1000 for r in ok] or [float("nan")]
    return {
        "path": path,
        "concurrency": concurrency,
        "requests": len(level_runs),
        "failed": len(level_runs) - len(ok),
        "ttft_ms_p50": statistics.median(ttft),
        "ttft_ms_p95": _percentile(ttft, 95),
        "aggregate_tok_s": sum(r.completion_tokens for r in ok) / wall,
        "wall_s": wall,
    }


def run_paths(
    servers: dict[str, tuple[str, str]],
    *,
    api_key: str | None = None,
    levels=(1, 4, 8),
    requests_per_client: int = 2,
    tokens: int = 32,
):
    """Every level against every server ({path: (base_url, model)}), interleaved level by
    level, so two paths measured in one run share the machine's state."""
    rows, runs = [], []
    for concurrency in levels:
        for path, (base_url, model) in servers.items():
            level_runs, wall = asyncio.run(
                _level(base_url, model, api_key, concurrency, requests_per_client, tokens, path)
            )
            runs += level_runs
            rows.append(_row(path, concurrency, level_runs, wall))
    return rows, runs


def run_serve(
    base_url: str,
    model: str,
    *,
    api_key: str | None = None,
    levels=(1, 4, 8),
    requests_per_client: int = 2,
    tokens: int = 32,
):
    return run_paths(
        {"endpoint": (base_url, model)},
        api_key=api_key,
        levels=levels,
        requests_per_client=requests_per_client,
        tokens=tokens,
    )


def warm_up(base_url: str, model: str, *, tokens: int) -> float:
    """Seconds of one lone request: on a compiled CUDA server, the compilation of its cache bucket
    (a CPU server has compiled its step before it serves)."""
    (run,), _ = asyncio.run(_level(base_url, model, None, 1, 1, tokens, "warm-up"))
    if not run.ok:
        raise RuntimeError(f"the warm-up request failed: {run.error}")
    return round(run.total_s, 1)


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Serve bench: {meta['target']} model {meta['model']!r}, {meta['tokens']} max tokens, greedy, "
        f"{meta['requests_per_client']} requests per client, streaming"
        + (
            f"; the compiled server's first request took {meta['compiled_first_request_s']} s, not counted "
            "(on CPU the server compiles its step before serving; on CUDA this request compiles it)"
            if meta.get("compiled_first_request_s") is not None
            else ""
        ),
        "",
        "| server | concurrent clients | requests (failed) | time to first token p50, ms | p95, ms | aggregate tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['path']} | {r['concurrency']} | {r['requests']} ({r['failed']}) | {r['ttft_ms_p50']:.0f} | {r['ttft_ms_p95']:.0f} | {r['aggregate_tok_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, rows: list[dict], runs: list[ServeRun], meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serve.json").write_text(
        json.dumps({"meta": meta, "levels": rows, "runs": [asdict(r) for r in runs]}, indent=2)
    )
    (out_dir / "serve.md").write_text(to_markdown(rows, meta))
