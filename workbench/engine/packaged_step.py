"""The CPU decode step compiled ahead of time: one AOTInductor package per static-cache length.

`torch.compile` made the step fast but kept the compiler in the serving process: dynamo's traced
graph, fake tensors and inductor's modules held about 150 MB for good (compiled int8 and int4 at
0.75-0.78x the fp32 config's peak, where eager was 0.60-0.65x), and a Python wrapper ran every
kernel. Here the step (`model.forward` over a `StaticCache`, one token) is exported and compiled
to a shared library by AOTInductor in a forked child process, so the compiler's memory is the
child's and goes with it; the serving process loads the library and runs it from C++.

The package holds no weights: the library reads the model's own tensors (`load_constants`,
user-managed), so quantized weights are not copied, a weight changed in place is seen, and a
package depends on the model's structure only (module classes and their source, tensor shapes
and dtypes, config and attention implementation, torch version, thread count, CPU flags, cache
length). That structure names it on disk
(`<cache>/decode-steps/<key>`), so a second process, or a second model of the same shape, loads
it in a second instead of compiling for a minute. The one exception, constants the compiler
folds from weight values, keeps that package in the process that made it (see `_package`)."""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import torch
from transformers import PreTrainedModel, StaticCache
from transformers.cache_utils import StaticLayer

from workbench.paths import cache_root

log = logging.getLogger(__name__)

_FORMAT = 1
"""bumped when what a package holds changes, so old ones are compiled anew"""
_FOLDED_LIMIT = 64
"""elements: a compiler-made constant this small is a literal of the graph (a group size), not
something folded from weight values, which would tie the package to those values"""


class PackagedStep:
    """`model.forward`'s decode call (`input_ids` of one token, a `StaticCache`), run by the
    package compiled for that cache's length; compiled on first use, or loaded from disk."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self._runners: dict[int, torch._C._aoti.AOTIModelPackageLoader] = {}
        self._failed: set[int] = set()
        self._bound: dict[int, tuple] = {}

    def __call__(self, *, input_ids, past_key_values, **kwargs) -> SimpleNamespace:
        if input_ids.shape != (1, 1) or kwargs.get("attention_mask") is not None:
            raise ValueError("the packaged step decodes one token of one request")
        length = _layers(past_key_values)[0].max_cache_len
        runner = self._runner(length, past_key_values)
        if runner is None:  # compiling failed: this length decodes eagerly, as before
            return self.model(input_ids=input_ids, past_key_values=past_key_values, **kwargs)
        tensors = [t for layer in _layers(past_key_values) for _, t in _cache_tensors(layer)]
        (logits,) = runner.run([input_ids, *tensors])
        return SimpleNamespace(logits=logits.unsqueeze(1))

    def prepare(self, cache: StaticCache) -> None:
        """Compile or load the package for this (written) cache's length before any request."""
        self._runner(_layers(cache)[0].max_cache_len, cache)

    def failed(self, length: int) -> bool:
        """Whether compiling for this cache length failed, so its steps run eagerly."""
        return length in self._failed

    def bind(self) -> None:
        """Point every loaded package at the model's tensors again if any was replaced (a
        `Parameter` assigned anew has another address; one changed in place needs nothing)."""
        own = _model_tensors(self.model)
        for length, runner in self._runners.items():
            constants = _constants(own, self._bound[length][1])
            addresses = tuple(t.data_ptr() for t in constants.values())
            if addresses != self._bound[length][0]:
                runner.load_constants(constants, False, True, True)
                self._bound[length] = (addresses, self._bound[length][1])

    def _runner(self, length: int, cache: StaticCache) -> torch._C._aoti.AOTIModelPackageLoader | None:
        if length in self._runners:
            return self._runners[length]
        if length in self._failed:
            return None
        key = _key(self.model, length)
        home = cache_root() / "decode-steps" / key if key else None
        started = time.perf_counter()
        if home is not None and (home / "record.json").is_file():
            try:
                return self._load(length, home, f"loaded from {home}", started)
            except Exception as unloadable:  # noqa: BLE001  # a stored package that will not load is compiled anew
                log.warning("the stored decode step %s did not load (%s); compiling it anew", home, unloadable)
                shutil.rmtree(home, ignore_errors=True)
        if home is not None:  # made beside its final place: a rename across file systems fails
            home.parent.mkdir(parents=True, exist_ok=True)
        made = Path(tempfile.mkdtemp(prefix=".making-", dir=home.parent if home is not None else None))
        error, peak = _compile_elsewhere(self.model, cache, made)
        if error is not None:
            shutil.rmtree(made, ignore_errors=True)
            self._failed.add(length)
            log.warning(
                "could not compile the decode step for %d-token caches ahead of time; they decode eagerly:\n%s",
                length,
                error,
            )
            return None
        record = json.loads((made / "record.json").read_text())
        if home is not None and record["portable"]:
            try:
                made.rename(home)
                made = home
            except OSError:  # another process stored it first: theirs is the same
                pass
        where = made if made == home else "a temporary folder (this process only)"
        source = f"compiled in {record['seconds']:.0f} s (the compiler's process peaked at {peak:.0f} MB) to {where}"
        try:
            return self._load(length, made, source, started)
        finally:
            if made != home:  # the library is loaded: a package for this process only goes
                shutil.rmtree(made, ignore_errors=True)

    def _load(self, length: int, made: Path, source: str, started: float) -> torch._C._aoti.AOTIModelPackageLoader:
        runner = torch._C._aoti.AOTIModelPackageLoader(str(made / "step.pt2"), "model", False, 1, -1)
        folded = torch.load(made / "folded.pt", weights_only=True)
        constants = _constants(_model_tensors(self.model), folded)
        runner.load_constants(constants, False, True, True)
        self._runners[length] = runner
        self._bound[length] = (tuple(t.data_ptr() for t in constants.values()), folded)
        log.info("decode step for %d-token caches %s (%.1f s)", length, source, time.perf_counter() - started)
        return runner


class _Step(torch.nn.Module):
    """What is exported: one decode forward, the cache's tensors as inputs (mutated in place by
    the package, as `StaticLayer.update` does), its other state fixed as traced."""

    def __init__(self, model: PreTrainedModel, cache: StaticCache):
        super().__init__()
        self.model = model
        self.length = _layers(cache)[0].max_cache_len
        self.fixed = [
            {k: v for k, v in vars(layer).items() if not isinstance(v, torch.Tensor)} for layer in _layers(cache)
        ]
        self.names = [[name for name, _ in _cache_tensors(layer)] for layer in _layers(cache)]

    def forward(self, input_ids: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
        cache = StaticCache(config=self.model.config, max_cache_len=self.length)
        flat = iter(tensors)
        for layer, fixed, names in zip(_layers(cache), self.fixed, self.names, strict=True):
            vars(layer).update(fixed)
            vars(layer).update({name: next(flat) for name in names})
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]


def _layers(cache: StaticCache) -> list[StaticLayer]:
    return cast(list[StaticLayer], cache.layers)


def _cache_tensors(layer) -> list[tuple[str, torch.Tensor]]:
    return sorted((k, v) for k, v in vars(layer).items() if isinstance(v, torch.Tensor))


def _model_tensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Every tensor the forward can read, by the name export gives it (under `model.`)."""
    found: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        prefix = f"model.{name}." if name else "model."
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                found[prefix + attr] = value
        for attr, value in [*module._parameters.items(), *module._buffers.items()]:
            if value is not None:
                found[prefix + attr] = value
    return found


def _constants(own: dict[str, torch.Tensor], folded: dict) -> dict[str, torch.Tensor]:
    """What the library reads, by name (`folded["__names__"]`, as `_package` stored them): the
    compiler's own constants from `folded`, every other one the model's tensor (`own`)."""
    names = folded["__names__"]
    missing = [n for n in names if n not in own and n not in folded]
    if missing:
        raise RuntimeError(f"the packaged decode step reads tensors the model lacks: {missing[:3]}")
    return {n: (folded[n] if n in folded else own[n]).detach() for n in names}


def _key(model: PreTrainedModel, length: int) -> str | None:
    """The package's name from everything the compiled code depends on; None (compile for this
    process only) when a hook is attached: its function cannot be named across processes."""
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return None
    digest = hashlib.sha256()
    sources: set[str] = {__file__}
    for name, module in model.named_modules(remove_duplicate=False):
        if module._forward_hooks or module._forward_pre_hooks:
            return None
        cls = type(module)
        digest.update(f"{name}:{cls.__module__}.{cls.__qualname__}:{module.training};".encode())
        for klass in cls.__mro__:
            if klass.__module__.startswith(("torch.", "builtins")):
                continue
            try:
                sources.add(inspect.getfile(klass))
            except TypeError:
                pass
    for name, tensor in sorted(_model_tensors(model).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:{tensor.stride()}:{tensor.device};".encode())
    for path in sorted(sources):
        digest.update(Path(path).read_bytes())
    digest.update(model.config.to_json_string(use_diff=False).encode())
    digest.update(str(getattr(model.config, "_attn_implementation", None)).encode())  # not in the JSON
    digest.update(f"{_FORMAT}:{torch.__version__}:{length}:{torch.get_num_threads()}:{_cpu_flags()}".encode())
    return digest.hexdigest()[:32]


def _cpu_flags() -> str:
    """The generated kernels use the vector instructions of the CPU that compiled them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return torch.backends.cpu.get_cpu_capability()


def _compile_elsewhere(model: PreTrainedModel, cache: StaticCache, out: Path) -> tuple[str | None, float]:
    """Run `_package` in a forked child (its memory, compiler and all, leaves with it); returns
    (the child's error, or None; its peak resident MB). Without fork, in this process."""
    if not hasattr(os, "fork"):
        try:
            _package(model, cache, out, torch.get_num_threads())
        except Exception:  # noqa: BLE001  # export and inductor fail in many types; any means eager
            return traceback.format_exc(limit=-3), 0.0
        return None, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    errors = out / "error.txt"
    threads = torch.get_num_threads()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: no OpenMP after fork (one thread), and no parent's exit handlers
        code = 1
        try:
            torch.set_num_threads(1)
            # Another thread of the parent (a server's HTTP thread) may have held a stream's or a
            # handler's lock at the fork: the child writes only to files of its own.
            logging.disable(logging.CRITICAL)
            sys.stdout = sys.stderr = (out / "compiler.log").open("w")
            _package(model, cache, out, threads)
            code = 0
        except BaseException:  # noqa: BLE001  # whatever ends the child is the parent's warning
            errors.write_text(traceback.format_exc(limit=-4))
        finally:
            os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    peak = usage.ru_maxrss / 1024
    if os.waitstatus_to_exitcode(status) != 0:
        return (errors.read_text() if errors.is_file() else f"the compiler's process ended with {status}"), peak
    return None, peak


def _package(model: PreTrainedModel, cache: StaticCache, out: Path, threads: int) -> None:
    """Export the step and compile it with AOTInductor into `out`: step.pt2 without the model's
    tensors, folded.pt with the few constants the compiler made itself, and record.json.
    `threads`: the serving process's; inductor writes its kernels for a fixed team size, and a
    package made for one thread beside ATen's two-thread products ran slower than one thread."""
    started = time.perf_counter()
    with torch.inference_mode(False), torch.no_grad():  # a reply runs under inference mode
        template = StaticCache(config=model.config, max_cache_len=_layers(cache)[0].max_cache_len)
        for layer, live in zip(_layers(template), _layers(cache), strict=True):
            assert live.keys is not None and live.values is not None  # the prefill wrote them
            layer.lazy_initialization(torch.empty_like(live.keys[:, :, :1]), torch.empty_like(live.values[:, :, :1]))
        step = _Step(model, template).eval()
        example = (
            torch.zeros(1, 1, dtype=torch.long),
            [t for layer in _layers(template) for _, t in _cache_tensors(layer)],
        )
        exported = torch.export.export(step, example, strict=False)
        with tempfile.TemporaryDirectory() as scratch:
            full = Path(scratch) / "full.pt2"
            torch._inductor.aoti_compile_and_package(
                exported,
                package_path=str(full),
                inductor_configs={
                    "aot_inductor.package_constants_in_so": False,
                    "aot_inductor.package_constants_on_disk_format": "pickle_weights",
                    "cpp.threads": threads,
                },
            )
            folded, names = _strip(full, out / "step.pt2", _model_tensors(model))
    portable = all(t.numel() <= _FOLDED_LIMIT for t in folded.values())
    torch.save({**folded, "__names__": names}, out / "folded.pt")
    (out / "record.json").write_text(
        json.dumps({"seconds": time.perf_counter() - started, "portable": portable, "torch": torch.__version__})
    )


def _strip(full: Path, to: Path, own: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Copy the package without the model's tensors (the library is given them at load); return
    the constants the compiler made itself, and the name of every constant the library reads."""
    folded: dict[str, torch.Tensor] = {}
    with zipfile.ZipFile(full) as source, zipfile.ZipFile(to, "w", zipfile.ZIP_STORED) as target:
        (config_name,) = [n for n in source.namelist() if n.endswith("weights_config.json")]
        config = json.loads(source.read(config_name))
        for name, (filename, shape, stride, offset) in config.items():
            if name not in own:
                (member,) = [n for n in source.namelist() if n.endswith(f"/weights/{filename}")]
                whole = torch.load(io.BytesIO(source.read(member)), weights_only=True)
                folded[name] = torch.as_strided(whole, shape, stride, offset).clone()
        for info in source.infolist():
            if "/weights/" not in info.filename and info.filename != config_name:
                target.writestr(info, source.read(info))
    return folded, list(config)
