"""What the decode bench can time, each in a process of its own.

A target is `PATH:SPEC`:
- `engine:CONFIG` — this workbench's engine on a config file or source (`configs/int8.yaml`,
  `tiny:llama`); `engine+compile:CONFIG` the same with `model.compile` on;
- `generate:CONFIG` — plain `model.generate` on the same weights;
- `llamacpp:TYPE` — llama.cpp (llama-cpp-python) on the embedded model's GGUF, re-encoded
  from the shipped Q4_1 file to TYPE (F32, F16, Q8_0 or Q4_1; same values, other storage);
  `llamacpp:PATH.gguf` — llama.cpp on a GGUF file, e.g. a compressed config exported with
  `python -m workbench.export CONFIG --to gguf`, so it is timed beside the engine on that config.

Each target lives in its own worker process so that its peak memory is its own (CUDA:
peak allocated; CPU: the process's peak resident set), and runs are interleaved by the
parent so a noisy neighbour slows every target alike.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import resource
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from workbench.export.verify import gguf_field

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for saving battery on a phone.",
    "Explain in two sentences what a KV cache is.",
]
PATHS = ("engine", "engine+compile", "generate", "llamacpp")
GGUF_TYPES = {"F32": 0, "F16": 1, "Q4_1": 3, "Q8_0": 7}
"""llama.cpp's file types (enum llama_ftype)"""


@dataclass(frozen=True)
class Target:
    path: str
    spec: str

    @property
    def name(self) -> str:
        return f"{self.path}:{self.spec}"

    @classmethod
    def parse(cls, text: str) -> Target:
        path, sep, spec = text.partition(":")
        if not sep or path not in PATHS or not spec:
            raise ValueError(
                f"bad target {text!r}: write PATH:SPEC with PATH one of {', '.join(PATHS)}, e.g. engine:configs/int8.yaml or llamacpp:Q8_0"
            )
        if path == "llamacpp" and spec.endswith(".gguf"):
            if not Path(spec).expanduser().is_file():
                raise ValueError(
                    f"bad target {text!r}: {spec} does not exist (write one with python -m workbench.export CONFIG --to gguf --out {spec})"
                )
        elif path == "llamacpp" and spec not in GGUF_TYPES:
            raise ValueError(
                f"bad target {text!r}: llama.cpp types are {', '.join(GGUF_TYPES)}, or give a PATH.gguf file"
            )
        return cls(path, spec)


def llamacpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_variant(kind: str) -> Path:
    """The embedded GGUF re-encoded to `kind`, made once and kept in the workbench cache."""
    from workbench.models.embedded import gguf_path
    from workbench.paths import cache_root

    if kind.endswith(".gguf"):
        return Path(kind).expanduser()
    source = gguf_path("smollm2-135m-instruct")
    if kind == "Q4_1":
        return source
    out = cache_root() / "gguf" / f"{source.stem.rsplit('.', 1)[0]}.{kind}.gguf"
    if not out.exists():
        import llama_cpp

        out.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = GGUF_TYPES[kind]
        params.allow_requantize = True
        partial = out.with_suffix(".partial")
        with _native_stderr_silenced():  # llama.cpp prints a line per tensor
            status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
        if status != 0:
            raise RuntimeError(f"llama.cpp could not re-encode {source.name} as {kind}")
        partial.rename(out)
    return out


def _prompt_ids(tokenizer, prompt: int) -> list[int]:
    """The ids the engine itself would prefill for this prompt."""
    from workbench.engine import ChatRequest
    from workbench.engine.template import render_prompt

    return render_prompt(tokenizer, ChatRequest.from_prompt(PROMPTS[prompt]).messages, False).ids


@contextlib.contextmanager
def _native_stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _Runner:
    """Loads one target; `run` produces `tokens` new tokens for `batch` copies of a prompt."""

    info: dict

    def run(self, prompt: int, tokens: int, batch: int) -> dict:
        raise NotImplementedError


class _EngineRunner(_Runner):
    def __init__(self, target: Target):
        import torch

        import workbench
        from workbench.compress.report import parameter_count
        from workbench.models.anatomy import weight_bytes_by_dtype

        self.session = workbench.load(
            target.spec, quiet=True, **({"compile": True} if target.path == "engine+compile" else {})
        )
        loaded = self.session.loaded
        params = parameter_count(self.session.model)
        weights = sum(weight_bytes_by_dtype(self.session.model).values())  # what the compress report counts
        self.info = {
            "source": loaded.source,
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "weight_bytes": weights,
            "bits_per_weight": 8 * weights / params,
            "attention_heads": _engine_heads(self.session.model.config),
        }

    def run(self, prompt: int, tokens: int, batch: int) -> dict:
        from workbench.engine import ChatRequest, Done

        engine = self.session.engine
        request = ChatRequest.from_prompt(PROMPTS[prompt], max_tokens=tokens, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        if batch == 1:
            stats = [next(e for e in engine.stream(request) if isinstance(e, Done)).stats]
        else:
            plans = [engine.plan(request) for _ in range(batch)]
            stats = [e.stats for _, e in engine.generate(plans) if isinstance(e, Done)]
        wall = time.perf_counter() - start
        first = max(s.ttft_s for s in stats)
        new = sum(s.completion_tokens for s in stats)
        return {
            "prompt_tokens": stats[0].prompt_tokens,
            "new_tokens": new // batch,
            "ttft_s": first,
            # the batch's tokens after the first step, over the time they took
            "decode_tokens_per_s": (new - batch) / (wall - first) if wall > first else 0.0,
        }


class _GenerateRunner(_EngineRunner):
    def run(self, prompt: int, tokens: int, batch: int) -> dict:
        import torch
        from transformers.generation.streamers import BaseStreamer

        if batch != 1:
            raise ValueError("the generate path is timed one request at a time")

        class Clock(BaseStreamer):
            """Time stamps of each `put`: the first is the prompt, then one per new token."""

            def __init__(self):
                self.stamps: list[float] = []

            def put(self, value):
                self.stamps.append(time.perf_counter())

            def end(self):
                pass

        session = self.session
        start = time.perf_counter()
        ids = _prompt_ids(session.tokenizer, prompt)
        input_ids = torch.tensor([ids], device=session.engine.device)
        clock = Clock()
        with torch.inference_mode():
            out = session.model.generate(  # type: ignore[operator]  # a transformers model
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                streamer=clock,
                pad_token_id=session.engine.pad_id,
            )
        new = out.shape[1] - input_ids.shape[1]
        first, last = clock.stamps[1], clock.stamps[-1]
        return {
            "prompt_tokens": len(ids),
            "new_tokens": new,
            "ttft_s": first - start,
            "decode_tokens_per_s": (new - 1) / (last - first),
        }


class _LlamaCppRunner(_Runner):
    def __init__(self, target: Target):
        if not llamacpp_available():
            raise RuntimeError(
                "llama-cpp-python is not installed (pip install -e .[llamacpp]; see the README for the CPU build flags)"
            )
        import llama_cpp
        import torch

        import workbench

        path = gguf_variant(target.spec)
        threads = torch.get_num_threads()
        self.llm = llama_cpp.Llama(
            str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False
        )
        tokenizer = workbench.load(quiet=True).tokenizer  # the same prompt ids as the engine's
        self.prompts = [_prompt_ids(tokenizer, i) for i in range(len(PROMPTS))]
        probe = "Paris, 2024: a KV cache."
        if self.llm.tokenize(probe.encode(), add_bos=False) != tokenizer(probe, add_special_tokens=False)["input_ids"]:
            raise RuntimeError(
                f"{path} does not share the embedded model's tokenizer, so it cannot be given the engine's prompt ids"
            )
        self.info = {
            "source": path.name,
            "device": "cpu",
            "dtype": target.spec if target.spec in GGUF_TYPES else _file_type(path),
            "threads": threads,
            "weight_bytes": path.stat().st_size,
            "bits_per_weight": 8 * path.stat().st_size / llama_cpp.llama_model_n_params(self.llm.model),
            "attention_heads": _gguf_heads(path),
            "llama_cpp": llama_cpp.__version__,
        }

    def run(self, prompt: int, tokens: int, batch: int) -> dict:
        if batch != 1:
            raise ValueError("the llama.cpp path is timed one request at a time")
        ids = self.prompts[prompt]
        self.llm.reset()
        start = time.perf_counter()
        stamps = []
        for _ in self.llm.generate(ids, top_k=1, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == tokens:
                break
        return {
            "prompt_tokens": len(ids),
            "new_tokens": len(stamps),
            "ttft_s": stamps[0] - start,
            "decode_tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0,
        }


def _engine_heads(config) -> int:
    """Query heads over all layers: the model's shape, so that a pruned config is compared with
    a pruned GGUF and not with the unpruned one that happens to have the same bits per weight."""
    per_layer = getattr(config, "attention_heads_per_layer", None)
    return int(sum(per_layer)) if per_layer else int(config.num_attention_heads * config.num_hidden_layers)


def _gguf_heads(path: Path) -> int | None:
    """The same count read from a GGUF file (a scalar for uniform models, a per-layer array for deci)."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = gguf_field(reader, "general.architecture")
    if arch is None:
        return None
    heads, blocks = gguf_field(reader, f"{arch}.attention.head_count"), gguf_field(reader, f"{arch}.block_count")
    if heads is None or blocks is None:
        return None
    return int(sum(heads)) if isinstance(heads, list) else int(heads) * int(blocks)


def _file_type(path: Path) -> str:
    """A GGUF file's encoding (F16, Q8_0, ...) from its general.file_type key."""
    import gguf

    file_type = gguf_field(gguf.GGUFReader(path), "general.file_type")
    if file_type is None:
        return "?"
    return gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")


def _runner(target: Target) -> _Runner:
    if target.path in ("engine", "engine+compile"):
        return _EngineRunner(target)
    if target.path == "generate":
        return _GenerateRunner(target)
    return _LlamaCppRunner(target)


def _peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(target: Target, conn, warmup_tokens: int) -> None:
    """Load, warm up (compiling where asked: that time is reported), then time runs on request."""
    try:
        start = time.perf_counter()
        runner = _runner(target)
        info = {**runner.info, "load_s": time.perf_counter() - start}
        start = time.perf_counter()
        runner.run(0, warmup_tokens, 1)
        info["warmup_s"] = time.perf_counter() - start
        if isinstance(runner, _EngineRunner):  # where the worker's memory goes, after a reply
            info["resident"] = runner.session.memory().as_dict()
        conn.send(("ready", info))
    except Exception as exc:  # noqa: BLE001 -- any failure to load becomes a skipped row with its reason
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    while (command := conn.recv()) is not None:
        if command[0] == "profile":
            try:
                conn.send(("ok", profile(runner, *command[1:])))
            except Exception as exc:  # noqa: BLE001 -- a profile that fails leaves the timings intact
                conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            continue
        try:
            if info["device"].startswith("cuda"):
                import torch

                torch.cuda.reset_peak_memory_stats()
            result = runner.run(*command)
            result["peak_bytes"] = _peak_bytes(info["device"])
            conn.send(("ok", result))
        except Exception as exc:  # noqa: BLE001 -- reported to the parent, which drops this target
            conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))


def _op_name(name: str) -> str:
    """Profiler names of compiled graphs carry a hash per build; one name for all of them."""
    if "CompiledFxGraph" in name:
        return "compiled graph: inductor's own kernels"
    if name.startswith("Torch-Compiled Region"):
        return "compiled region (wrapper)"
    return name


def profile(runner: _Runner, tokens: int, top: int = 12) -> dict:
    """Where one reply's time goes, by op: torch.profiler over a greedy reply of `tokens` new
    tokens to the first prompt (prefill included), each op's self time per new token and its share
    of all ops' time; the reply's wall time beside it (the difference is Python and waiting, which
    no op owns; profiling itself adds some).
    For torch targets only (llama.cpp's time is in native code the profiler cannot see)."""
    if isinstance(runner, _LlamaCppRunner):
        raise ValueError("llama.cpp runs native code the torch profiler cannot see")
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        result = runner.run(0, tokens, 1)
        wall = time.perf_counter() - start
    totals: dict[str, list] = {}
    for event in prof.key_averages():
        entry = totals.setdefault(_op_name(event.key), [0.0, 0])
        entry[0] += event.self_cpu_time_total
        entry[1] += event.count
    whole = sum(t for t, _ in totals.values()) or 1.0
    new = max(result["new_tokens"], 1)
    ops = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "wall_ms_per_token": wall * 1e3 / new,
        "ops_ms_per_token": whole / 1e3 / new,
        "ops": [
            {"op": name, "self_ms_per_token": t / 1e3 / new, "share": t / whole, "calls_per_token": n / new}
            for name, (t, n) in ops
        ],
    }
