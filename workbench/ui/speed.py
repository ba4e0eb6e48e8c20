"""Does the chat page decode as fast as the engine? Both, side by side, in one run.

The page's reply speed is what a user sees, and it used to be half the engine's: the fast
int8/int4 CPU kernels run slowly when called from a thread other than the one that loaded
the model (model_thread.py says why). This times the same config, prompt and greedy
64-token reply two ways, each in a process of its own as people run them, alternating
rounds so that the noise of a shared machine falls on both:

- engine: `Engine.stream` on the thread that loaded the model, in a process that does
  nothing else (what `python -m workbench.bench decode` times);
- page: the stats line of a reply asked through gradio_client of `python -m workbench.ui`,
  as a browser on the same machine asks it.

`--other-thread` adds the engine called from a thread that did not load the model: the
penalty the page paid when Gradio's worker threads generated.

    python -m workbench.ui.speed [--configs configs/int4.yaml,configs/default.yaml] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import workbench
from workbench.bench.cpu import cpu_identity
from workbench.engine import ChatRequest, Done
from workbench.serve.live import free_port, stop_process

PROMPT = "Write a long story about a lighthouse keeper and the sea."
TOKENS = 64


@dataclass
class Speeds:
    """Decode tok/s per round, by path."""

    config: str
    engine: list[float] = field(default_factory=list)
    page: list[float] = field(default_factory=list)
    other_thread: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """The page's median over the engine's: 1.0 is no penalty."""
        return statistics.median(self.page) / statistics.median(self.engine)

    def line(self) -> str:
        parts = [f"engine {_median(self.engine)}", f"page {_median(self.page)}"]
        if self.other_thread:
            parts.append(f"engine from another thread {_median(self.other_thread)}")
        return f"{self.config}: {', '.join(parts)}; page/engine {self.ratio:.2f} ({min(self.tokens)}-{max(self.tokens)} tokens)"


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} tok/s (" + "/".join(f"{v:.1f}" for v in values) + ")"


def engine_rate(session, tokens: int = TOKENS) -> tuple[float, int]:
    """(decode tok/s, tokens) of one greedy reply straight from the engine, on the calling thread."""
    request = ChatRequest.from_prompt(PROMPT, max_tokens=tokens, temperature=0, ignore_eos=True)
    stats = next(e for e in session.engine.stream(request) if isinstance(e, Done)).stats
    return stats.decode_tokens_per_s, stats.completion_tokens


def page_rate(client, tokens: int = TOKENS) -> tuple[float, int]:
    """(decode tok/s, answer tokens) from the stats line of one greedy reply asked of the page."""
    _, _, stats = client.predict(
        {"text": PROMPT, "files": []},
        [],
        thinking=False,
        temperature=0,
        top_p=1.0,
        max_tokens=tokens,
        seed=-1,
        which="compressed",  # the config as loaded (the original when it has no compression)
        api_name="/chat",
    )
    rate = re.search(r"\*\*([\d.]+) tok/s\*\*", stats)
    answer = re.search(r"(\d+) answer", stats)
    if not rate or not answer:
        raise RuntimeError(f"no speed in the page's stats line: {stats!r}")
    return float(rate[1]), int(answer[1])


def serve_engine(config: str) -> None:
    """The engine process: load `config`, then time one reply per line read ("main N" on this
    thread, "other N" on a fresh one), answering each with a JSON line."""
    session = workbench.load(config, quiet=True)
    engine_rate(session, 8)  # warm-up
    for line in sys.stdin:
        where, tokens = line.split()
        if where == "main":
            rate, n = engine_rate(session, int(tokens))
        else:
            out: list[tuple[float, int]] = []
            other = threading.Thread(target=lambda: out.append(engine_rate(session, int(tokens))))  # noqa: B023
            other.start()
            other.join()
            rate, n = out[0]
        print(json.dumps({"tok_s": rate, "tokens": n}), flush=True)


class _Engine:
    def __init__(self, config: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workbench.ui.speed", "--serve-engine", config],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def rate(self, where: str, tokens: int) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{where} {tokens}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the engine process ended without an answer")
        return json.loads(line)["tok_s"]


def _page(config: str, timeout_s: float = 600, python_args: tuple[str, ...] = ("-m", "workbench.ui")):
    """`python -m workbench.ui --config CONFIG` on a free port; (process, gradio client)."""
    import httpx
    from gradio_client import Client

    port = free_port()
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, *python_args, "--config", config, "--port", str(port)], stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return proc, Client(url, verbose=False)
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            proc.kill()
            raise RuntimeError(f"the page for {config} did not start:\n{log.read()[-2000:]}")
        time.sleep(1)


def measure(
    config: str, rounds: int, tokens: int = TOKENS, other_thread: bool = False, page_args: tuple[str, ...] = ()
) -> Speeds:
    """`page_args`: how to start the page instead of `-m workbench.ui` (a variant to compare)."""
    engine = _Engine(config)
    page, client = _page(config, python_args=page_args or ("-m", "workbench.ui"))
    speeds = Speeds(config)
    try:
        engine.rate("main", 8)  # both warm, both loaded before the first timed round
        page_rate(client, 8)
        for _ in range(rounds):
            speeds.engine.append(engine.rate("main", tokens))
            rate, n = page_rate(client, tokens)
            speeds.page.append(rate)
            speeds.tokens.append(n)
            if other_thread:
                speeds.other_thread.append(engine.rate("other", tokens))
    finally:
        client.close()
        stop_process(page, timeout_s=30)
        stop_process(engine.proc, timeout_s=30)
    return speeds


def main(argv: list[str] | None = None) -> list[Speeds]:
    parser = argparse.ArgumentParser(prog="python -m workbench.ui.speed", description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="configs/int4.yaml,configs/default.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--other-thread", action="store_true", help="also time the engine from a non-loading thread")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    parser.add_argument("--serve-engine", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_engine:
        serve_engine(args.serve_engine)
        return []
    results = []
    for config in args.configs.split(","):
        speeds = measure(config, args.rounds, args.tokens, args.other_thread)
        print(speeds.line(), flush=True)
        results.append(speeds)
    if args.out:
        record = {
            "command": "python -m workbench.ui.speed " + " ".join(argv if argv is not None else sys.argv[1:]),
            "cpu": cpu_identity(),
            "results": [asdict(s) | {"page_over_engine": s.ratio} for s in results],
        }
        args.out.write_text(json.dumps(record, indent=2))
    return results


if __name__ == "__main__":
    main()
