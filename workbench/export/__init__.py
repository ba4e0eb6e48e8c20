"""Export a (compressed) session to where models are deployed: llama.cpp (GGUF) or stock
transformers (and so vLLM). `python -m workbench.export SOURCE --to gguf|hf --out PATH`,
or `Session.export(PATH, to=..., type=...)`.

Every request is checked before any model is loaded or anything is written (unknown
format or type, PATH already there, a quantized session asked for a format that cannot
hold it); the file or folder is written under a temporary name next to PATH and renamed
at the end, so a failure leaves nothing at PATH.

`check=True` (`--check`) reads the export back (transformers; llama.cpp when installed) and
gives a verdict: KL(session || export) and top-1 agreement on held-out text, held to the
tolerance of the export's type (`verify.TOLERANCES`); `ExportResult.verdict` carries it. A
failed verdict still writes the export (the CLI exits 1): the figures say how far off it is.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.errors import ExportError
from workbench.export import to_gguf, to_hf, verify
from workbench.export.verify import Comparison, Tolerance, Verdict
from workbench.export.weights import float_state, head_layout, pad_attention
from workbench.step_options import QuantizeOptions

FORMATS = ("gguf", "hf")
GGUF_TYPES = ("f16", "q8_0", "q4_0")
_INTEGER_SCHEMES = {"int8_weight_only", "int8_dynamic", "int4_weight_only"}

__all__ = [
    "FORMATS",
    "GGUF_TYPES",
    "Comparison",
    "ExportError",
    "ExportResult",
    "Tolerance",
    "Verdict",
    "check_request",
    "export",
    "quantized_schemes",
]


@dataclass
class ExportResult:
    path: Path
    to: str
    type: str | None
    arch: str
    heads: list[int]
    kv_heads: list[int]
    padded: bool
    bytes: int
    checks: list[str] = field(default_factory=list)
    """what was checked, as information (the GGUF read back, llama.cpp's greedy replies, ...)"""
    verdict: Verdict | None = None
    """the `check=True` verdict (figures, tolerance, passed); None without check"""

    @property
    def passed(self) -> bool | None:
        """The verdict: True or False, None where nothing was judged (no check, or no reader)."""
        return self.verdict.passed if self.verdict is not None else None

    def summary(self) -> str:
        """One line for the export, and with check=True a second one: the verdict."""
        kind = f"GGUF {self.type} ({self.arch})" if self.to == "gguf" else f"transformers checkpoint ({self.arch})"
        heads = sorted(set(self.heads))
        line = (
            f"Exported {kind} to {self.path}: {self.bytes / 1e6:.1f} MB, query heads per layer "
            f"{heads[0] if len(heads) == 1 else heads}{' (zero-padded)' if self.padded else ''}"
        )
        return line if self.verdict is None else f"{line}\n{self.verdict.line()}"


def quantized_schemes(steps) -> set[str]:
    """Schemes other than `keep` that `quantize` steps (config steps or session reports) apply."""
    schemes: set[str] = set()
    for step in steps:
        if isinstance(step, dict):
            if step.get("step") == "quantize":
                schemes |= set(step.get("schemes", {}))
            continue
        if step.step == "quantize":
            schemes |= QuantizeOptions.model_validate(step.model_extra or {}).schemes
    return schemes - {"keep"}


def check_request(
    to: str, type: str | None, path: str | Path, *, overwrite: bool = False, schemes: AbstractSet[str] = frozenset()
) -> str | None:
    """Refuse what cannot be exported, before any work; returns the GGUF type (default f16)."""
    if to not in FORMATS:
        raise ExportError(f"unknown export format {to!r}; choose one of: {', '.join(FORMATS)}")
    if to == "hf" and type is not None:
        raise ExportError(
            "--type picks a GGUF encoding; a transformers export keeps the model's float32 weights (drop --type)"
        )
    if to == "gguf":
        type = type or "f16"
        if type not in GGUF_TYPES:
            raise ExportError(f"unknown GGUF type {type!r}; choose one of: {', '.join(GGUF_TYPES)}")
    named = ", ".join(sorted(schemes))
    if to == "hf" and schemes:
        raise ExportError(
            f"this session is quantized ({named}), and a stock transformers checkpoint cannot hold the workbench's "
            "quantized layers; export it to GGUF instead (--to gguf --type q8_0: llama.cpp runs 8-bit weights), "
            "or export the model without its quantize step to --to hf"
        )
    if to == "gguf" and type == "q4_0" and schemes & _INTEGER_SCHEMES:
        raise ExportError(
            f"this session's weights are already quantized ({named}); q4_0 would quantize them a second time "
            "and add both errors; export it as q8_0 or f16, or quantize the unquantized model to q4_0"
        )
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise ExportError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
    if path.exists() and to == "gguf" and path.is_dir():
        raise ExportError(f"{path} is a directory; a GGUF export is one file, e.g. {path}/model.gguf")
    return type


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _replace(staged: Path, path: Path) -> None:
    """Put the finished export at `path`, replacing what was there (overwrite was checked)."""
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        staged.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if staged.is_dir() and path.exists():
            path.unlink()  # a file (or link) where a checkpoint folder goes
        os.replace(staged, path)


def export(
    session,
    path: str | Path,
    *,
    to: str = "gguf",
    type: str | None = None,
    pad: bool = False,
    overwrite: bool = False,
    check: bool = False,
    tolerance: Tolerance | None = None,
    quiet: bool = True,
) -> ExportResult:
    """Write `session`'s model to `path` as `to` (see module doc and docs/export.md). With
    `check`, the verdict is held to `tolerance` (default: `verify.tolerance_for` the type, loosened
    for a session that computes in reduced precision)."""
    schemes = quantized_schemes(session.reports)
    type = check_request(to, type, path, overwrite=overwrite, schemes=schemes)
    path = Path(path).expanduser()
    model, tokenizer = session.model, session.tokenizer
    config = model.config
    if getattr(session, "processor", None) is not None or getattr(session.loaded, "processor", None) is not None:
        raise ExportError("exporting vision-language models is not supported; export a text model")
    layout = head_layout(model)
    state = float_state(model)
    padded = False
    if to == "gguf":
        arch, padded = to_gguf.choose_arch(config.model_type, layout, pad=pad)
    else:
        arch = config.model_type
        if not layout.uniform:
            if not pad:
                raise ExportError(
                    f"this model keeps a different number of heads per layer (query heads {sorted(set(layout.heads))}), "
                    "and a stock transformers config has one head count for all layers; pass --pad to zero-pad the "
                    "pruned heads back (exact outputs, the unpruned model's size), or prune with per_layer instead of ratio"
                )
            padded = True
    if padded:
        state, layout = pad_attention(state, layout)

    path.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        checks: list[str] = []
        verdict = None
        kind = type if to == "gguf" else "hf"
        assert kind is not None
        reduced = _reduced_precision(model, schemes)
        tolerance = tolerance or verify.tolerance_for(kind, reduced is not None)
        if to == "gguf":
            target = staged / path.name
            assert type is not None  # check_request gives a GGUF export its type
            eos = model.generation_config.eos_token_id if model.generation_config is not None else None
            eos = eos[0] if isinstance(eos, list) else eos
            to_gguf.write_gguf(
                target,
                state,
                config,
                tokenizer,
                to_gguf.GGUFPlan(arch, type, layout),
                name=str(session.loaded.source),
                eos_token_id=eos,
            )
            tied = bool(getattr(config, "tie_word_embeddings", False))
            count = sum(1 for k in state if not (tied and k == "lm_head.weight") and not k.endswith("inv_freq"))
            checks += verify.read_back(target, arch, layout, count)
            if check:
                verdict = Verdict(kind, tolerance, reduced_precision=reduced)
                checks += _deep_gguf_checks(target, arch, model, tokenizer, layout.head_dim, verdict)
            _replace(target, path)
        else:
            target = staged / "checkpoint"
            to_hf.write_hf(target, state, config, tokenizer, model.generation_config, layout)
            if check:
                divergence = verify.hf_divergence(target, model, tokenizer)
                comparison = Comparison("stock transformers reload", divergence, tolerance)
                verdict = Verdict(kind, tolerance, [comparison], reduced_precision=reduced)
            _replace(target, path)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    result = ExportResult(
        path=path,
        to=to,
        type=type,
        arch=arch,
        heads=layout.heads,
        kv_heads=layout.kv_heads,
        padded=padded,
        bytes=_size(path),
        checks=checks,
        verdict=verdict,
    )
    if not quiet:
        print(result.summary(), file=sys.stderr, flush=True)
    return result


def _reduced_precision(model, schemes: AbstractSet[str]) -> str | None:
    """Why the session's own forward rounds more than float32 does (None where it does not):
    its quantize schemes (int8/int4 layers multiply bf16 activations) or its dtype."""
    dtype = next(model.parameters()).dtype
    reasons = sorted(schemes) + ([f"{dtype}".removeprefix("torch.")] if dtype != torch.float32 else [])
    return ", ".join(reasons) or None


def _deep_gguf_checks(path: Path, arch: str, model, tokenizer, head_dim: int, verdict: Verdict) -> list[str]:
    """Compare every reader of the GGUF with the session into `verdict`; returns information lines."""
    checks = []
    tolerance = verdict.tolerance
    if arch in ("llama", "qwen3"):
        divergence = verify.gguf_divergence(path, model, tokenizer, head_dim)
        verdict.comparisons.append(Comparison("transformers reading the GGUF", divergence, tolerance))
    else:
        verdict.not_compared.append(f"transformers cannot read llama.cpp's {arch} architecture")
        checks.append(f"transformers cannot read llama.cpp's {arch} architecture; logits not compared there")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        verdict.not_compared.append("llama-cpp-python is not installed (scripts/install_llamacpp.sh)")
        checks.append("llama-cpp-python is not installed (scripts/install_llamacpp.sh); llama.cpp not run")
        return checks
    verdict.comparisons.append(Comparison("llama.cpp", verify.llamacpp_divergence(path, model, tokenizer), tolerance))
    ids = [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        for p in ("What is the capital of France?", "Name three colours.")
    ]
    pairs = verify.llamacpp_greedy(path, model, ids)
    checks.append(verify.greedy_line(pairs, ids, model))
    return checks
