"""Checks that an export holds what was meant, by reading it back with other code.

- `read_back` (always on, cheap): the GGUF file parsed by gguf.GGUFReader, its architecture,
  head counts (per-layer arrays for deci) and every tensor's name and shape compared with
  what was written;
- `gguf_logits` (`--check`, llama and qwen3 files): transformers itself loads the GGUF
  (`from_pretrained(dir, gguf_file=...)`, as the embedded model loads) and its logits are
  compared with the session's. transformers undoes llama.cpp's q/k permutation on load, so
  this checks the permutation round trip with code that is not ours;
- `hf_logits` (`--check`, transformers exports): the checkpoint reloaded with plain
  AutoModelForCausalLM, logits compared;
- `llamacpp_greedy` (`--check`, when llama-cpp-python is installed): llama.cpp's greedy
  tokens against the engine's.

The verdict of `--check` (`judge`): every reader of the export (transformers reloading a
checkpoint or reading a GGUF; llama.cpp when installed) is compared with the session by
KL(session || export) per token and top-1 agreement on the same windows of held-out text,
and each comparison is held to the tolerance of the export's type (`TOLERANCES`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.errors import ExportError
from workbench.export.weights import HeadLayout
from workbench.metrics import Divergence, divergence, log_prob_divergence, token_windows

PROBE = "The capital of France is Paris. A small model on a phone answers questions quickly."


def gguf_field(reader, key: str):
    """A metadata value of a gguf.GGUFReader (a number, a string or a list), None where the key is absent."""
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def read_back(path: Path, arch: str, layout: HeadLayout, tensor_count: int) -> list[str]:
    """Parse the written file; raise ExportError on any mismatch. Returns what was checked."""
    import gguf

    reader = gguf.GGUFReader(path)
    problems = []
    if gguf_field(reader, "general.architecture") != arch:
        problems.append(f"architecture {gguf_field(reader, 'general.architecture')!r}, expected {arch!r}")
    heads, kv = (
        gguf_field(reader, f"{arch}.attention.head_count"),
        gguf_field(reader, f"{arch}.attention.head_count_kv"),
    )
    want_heads = layout.heads if not layout.uniform else layout.heads[0]
    want_kv = layout.kv_heads if not layout.uniform else layout.kv_heads[0]
    if heads != want_heads or kv != want_kv:
        problems.append(f"head counts {heads}/{kv}, expected {want_heads}/{want_kv}")
    if gguf_field(reader, f"{arch}.block_count") != len(layout.heads):
        problems.append(f"block_count {gguf_field(reader, f'{arch}.block_count')}, expected {len(layout.heads)}")
    if len(reader.tensors) != tensor_count:
        problems.append(f"{len(reader.tensors)} tensors, expected {tensor_count}")
    hd = layout.head_dim
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] != "blk" or parts[2] not in ("attn_q", "attn_k", "attn_v", "attn_output"):
            continue
        layer = int(parts[1])
        rows = {
            "attn_q": layout.heads[layer] * hd,
            "attn_k": layout.kv_heads[layer] * hd,
            "attn_v": layout.kv_heads[layer] * hd,
        }.get(parts[2])
        # GGUF lists shapes innermost first: (in_features, out_features).
        got = int(t.shape[0]) if parts[2] == "attn_output" else int(t.shape[1])
        want = layout.heads[layer] * hd if parts[2] == "attn_output" else rows
        if got != want:
            problems.append(
                f"{t.name} has {got} {'inputs' if parts[2] == 'attn_output' else 'outputs'}, expected {want}"
            )
    if problems:
        raise ExportError(f"the written GGUF file does not read back as written: {'; '.join(problems[:5])}")
    return [f"GGUFReader: arch {arch}, {len(reader.tensors)} tensors, head counts as written"]


@torch.inference_mode()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.to(model.device)).logits.float().cpu()


def compare_logits(reference, candidate, tokenizer) -> tuple[float, float]:
    """(max |logit difference|, share of positions whose argmax agrees) on a probe text."""
    ids = tokenizer(PROBE, return_tensors="pt", add_special_tokens=False)["input_ids"]
    a, b = _logits(reference, ids), _logits(candidate, ids)
    return float((a - b).abs().max()), float((a.argmax(-1) == b.argmax(-1)).float().mean())


def gguf_logits(path: Path, model, tokenizer, head_dim: int) -> tuple[float, float]:
    return compare_logits(model, _load_gguf(path, head_dim), tokenizer)


def hf_logits(directory: Path, model, tokenizer) -> tuple[float, float]:
    return compare_logits(model, _load_hf(directory), tokenizer)


def llamacpp_greedy(
    path: Path, model, prompt_ids: list[list[int]], tokens: int = 16
) -> list[tuple[list[int], list[int]]]:
    """(transformers greedy, llama.cpp greedy) continuations of each prompt, same token ids in."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=2, verbose=False, logits_all=False)
    eos = {llm.token_eos()}
    pairs = []
    for ids in prompt_ids:
        # Both stop at the end-of-sequence token (kept in the list), or after `tokens`.
        with torch.inference_mode():
            ref = model.generate(
                torch.tensor([ids], device=model.device),
                max_new_tokens=tokens,
                do_sample=False,
                eos_token_id=sorted(eos),
                pad_token_id=sorted(eos)[0],
            )[0, len(ids) :].tolist()
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            got.append(int(token))
            if len(got) == tokens or token in eos:
                break
        pairs.append((ref, got))
    llm.close()
    return pairs


def llamacpp_perplexity(path: Path, tokenizer, texts: list[str], *, window: int = 512, max_windows: int = 4) -> float:
    """Perplexity of the GGUF in llama.cpp over the same windows as
    workbench.metrics.perplexity (same tokenizer, same split), so the two compare."""
    import math

    import llama_cpp
    import numpy as np

    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    windows = [ids[i : i + window] for i in range(0, len(ids) - 1, window)]
    windows = [w for w in windows if len(w) > 1][:max_windows]
    llm = llama_cpp.Llama(str(path), n_ctx=window, n_batch=window, n_threads=2, logits_all=True, verbose=False)
    total, count = 0.0, 0
    try:
        for w in windows:
            llm.reset()
            llm.eval(w)
            logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            total -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
            count += len(w) - 1
    finally:
        llm.close()
    return math.exp(total / count)


def llamacpp_logits(path: Path, ids: list[int]):
    """llama.cpp's logits at every position of `ids` (numpy, [len(ids), vocab])."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        str(path), n_ctx=max(64, len(ids)), n_batch=max(64, len(ids)), n_threads=2, logits_all=True, verbose=False
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


# --- the verdict of --check ----------------------------------------------------------------

WINDOW = 512
"""tokens per window of held-out text (`workbench.data.evaluation_texts()`), as perplexity uses"""
WINDOWS = 4
"""windows compared: 4 x 511 = 2044 scored positions, seconds on a CPU for a 135M model"""


@dataclass(frozen=True)
class Tolerance:
    """The most an export may differ from the session it was written from, per token of
    held-out text: KL(session || export) in nats, its mean and 99th percentile over all scored
    positions, and the least share of positions whose most likely next token is the same."""

    kl_mean: float
    kl_p99: float
    top1: float


HF_TOLERANCE = Tolerance(kl_mean=1e-6, kl_p99=1e-5, top1=0.999)
"""A transformers checkpoint keeps the session's float32 weights, so its reload runs the same
arithmetic: measured KL exactly 0 (mean and p99) and 100% top-1 for the embedded model, the
pruned one padded and tiny models. Anything measurable is a wrong weight or config."""

F16_TOLERANCE = Tolerance(kl_mean=1e-4, kl_p99=1e-3, top1=0.99)
"""float16 rounds each weight to 11 significant bits. Measured on the embedded model and the
pruned one (deci in llama.cpp): KL mean 2.8e-6 to 5.0e-6, p99 1.0e-5 to 2.2e-5, top-1 99.71%
to 99.95% (llama.cpp, which also rounds activations to float16, at the high end of KL). The KL
bounds are 20x (mean) and 45x (p99) the largest measurement, so another CPU's kernels do not
trip them; a wrong tensor is far beyond (the q/k permutation skipped: KL mean 3.0)."""

Q8_0_TOLERANCE = Tolerance(kl_mean=1.5e-2, kl_p99=6e-2, top1=0.94)
"""q8_0 stores blocks of 32 weights as int8 with one float16 scale, and llama.cpp quantizes
the activations of each product to q8_0 as well. Measured: transformers reading the file (the
weights' error alone) KL mean 1.2e-3 to 1.6e-3, p99 4.9e-3 to 6.9e-3, top-1 97.85% to 98.34%;
llama.cpp 4.2e-3, p99 1.7e-2, 96.58% on the embedded model and 4.8e-3, 2.0e-2, 95.94% on the
int8 config. Bounds about 3x the largest KL and two points below the lowest top-1."""

Q4_0_TOLERANCE = Tolerance(kl_mean=0.6, kl_p99=3.0, top1=0.60)
"""q4_0 stores blocks of 32 weights in 4 bits with one float16 scale (the token embeddings stay
q8_0): on a 135M model a real loss, perplexity +25% (embedded) to +50% (pruned-25). Measured:
KL mean 0.26 to 0.34, p99 1.2 to 1.4, top-1 68% to 73% (transformers and llama.cpp alike).
Bounds about 2x the KL and 8 points below the top-1: they catch a broken file (the
permutation skipped: KL mean 3.0, top-1 19%), not the 4-bit error this type is known for."""

TOLERANCES: dict[str, Tolerance] = {
    "hf": HF_TOLERANCE,
    "f16": F16_TOLERANCE,
    "q8_0": Q8_0_TOLERANCE,
    "q4_0": Q4_0_TOLERANCE,
}
"""the tolerance of each export: `hf` for transformers checkpoints, the GGUF type otherwise"""

REDUCED_PRECISION_TOLERANCE = Tolerance(kl_mean=5e-3, kl_p99=2e-2, top1=0.95)
"""The least tolerance for a session that itself computes in reduced precision: int8 and int4
layers multiply bf16 activations (torch's int8/int4 pack kernels), fp16/bf16 layers compute in
that dtype, and so does a half-precision model. The export computes in float32 (transformers)
or its own precision (llama.cpp), so the session's rounding is measured along with the
export's. Measured for f16 exports: int8 config KL mean 6.5e-4, p99 2.6e-3, top-1 97.9% (both
readers alike); int4 7.0e-4, 3.1e-3, 98.2%; bf16 1.1e-3, 4.6e-3, 96.9%. Bounds about 4.5x the
largest KL and two points below the lowest top-1. An export type's tolerance is loosened to
this one where it is stricter, never tightened (q8_0 and q4_0 keep theirs)."""

GREEDY_NOTE = (
    "where the top two next tokens are nearly tied, the smallest rounding difference flips greedy decoding "
    "and the reply goes on down the other branch; KL and top-1 agreement over many positions (the verdict) "
    "are the measure"
)


def tolerance_for(kind: str, reduced_precision: bool = False) -> Tolerance:
    """The tolerance of an export of type `kind` (`hf` or a GGUF type), loosened to
    REDUCED_PRECISION_TOLERANCE where the session computes in reduced precision."""
    t = TOLERANCES[kind]
    if not reduced_precision:
        return t
    r = REDUCED_PRECISION_TOLERANCE
    return Tolerance(max(t.kl_mean, r.kl_mean), max(t.kl_p99, r.kl_p99), min(t.top1, r.top1))


def _e(x: float) -> str:
    return f"{x:.1e}"


def _bound(x: float) -> str:
    """A tolerance in as few digits as it was written with: 1e-04, 1.5e-02."""
    return f"{x:.1e}".replace(".0e", "e")


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


@dataclass(frozen=True)
class Comparison:
    """One reader of the export (transformers or llama.cpp) against the session."""

    reader: str
    divergence: Divergence
    tolerance: Tolerance

    @property
    def failures(self) -> list[str]:
        """The figures outside the tolerance, as words (empty when it passed)."""
        d, t = self.divergence, self.tolerance
        out = []
        if not d.kl_mean <= t.kl_mean:  # `not <=` so that a NaN fails
            out.append(f"KL mean {_e(d.kl_mean)} > {_bound(t.kl_mean)}")
        if not d.kl_p99 <= t.kl_p99:
            out.append(f"KL p99 {_e(d.kl_p99)} > {_bound(t.kl_p99)}")
        if not d.top1_agreement >= t.top1:
            out.append(f"top-1 {_pct(d.top1_agreement)} < {t.top1:.1%}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def figures(self) -> str:
        d, t = self.divergence, self.tolerance
        mean = "<=" if d.kl_mean <= t.kl_mean else ">"
        p99 = "<=" if d.kl_p99 <= t.kl_p99 else ">"
        top1 = ">=" if d.top1_agreement >= t.top1 else "<"
        return (
            f"KL mean {_e(d.kl_mean)} {mean} {_bound(t.kl_mean)}, p99 {_e(d.kl_p99)} {p99} {_bound(t.kl_p99)}, "
            f"top-1 {_pct(d.top1_agreement)} {top1} {t.top1:.1%}"
        )


@dataclass(frozen=True)
class Verdict:
    """What `--check` concludes: passed when every reader that ran is within `tolerance`
    (None when no reader could compare logits, e.g. a deci GGUF without llama.cpp)."""

    kind: str
    """the tolerance's key in TOLERANCES: `hf` or the GGUF type"""
    tolerance: Tolerance
    comparisons: list[Comparison] = field(default_factory=list)
    not_compared: list[str] = field(default_factory=list)
    """readers that did not run, and why"""
    reduced_precision: str | None = None
    """why the tolerance was loosened for the session's own rounding (None: it was not)"""

    @property
    def passed(self) -> bool | None:
        if not self.comparisons:
            return None
        return all(c.passed for c in self.comparisons)

    def line(self) -> str:
        if not self.comparisons:
            return f"check gave no verdict: no reader compared logits ({'; '.join(self.not_compared)})"
        head = "check passed" if self.passed else "check FAILED"
        d = self.comparisons[0].divergence
        where = f"{d.tokens} tokens of held-out text in {d.windows} windows, {self.kind} tolerance"
        if self.reduced_precision:
            where += f" loosened for a session that computes in reduced precision ({self.reduced_precision})"
        if len(self.comparisons) == 1:
            c = self.comparisons[0]
            return f"{head}: {c.figures()} ({c.reader} vs the session; {where})"
        parts = "; ".join(f"{c.reader}: {c.figures()}" for c in self.comparisons)
        return f"{head}: {parts} ({where})"


def _texts() -> list[str]:
    from workbench.data import evaluation_texts

    return evaluation_texts()


def _load_gguf(path: Path, head_dim: int):
    from transformers import AutoModelForCausalLM

    # transformers' GGUF config mapping does not read attention.key_length for every
    # architecture (qwen3 falls back to its default head_dim), so the head size is given.
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, head_dim=head_dim
    ).eval()


def _load_hf(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def hf_divergence(directory: Path, model, tokenizer) -> Divergence:
    """The checkpoint reloaded by plain AutoModelForCausalLM against `model` on held-out text."""
    return divergence(model, _load_hf(directory), tokenizer, _texts(), window=WINDOW, max_windows=WINDOWS)


def gguf_divergence(path: Path, model, tokenizer, head_dim: int) -> Divergence:
    """The GGUF as transformers reads it (de-quantized to float32) against `model`."""
    loaded = _load_gguf(path, head_dim)
    return divergence(model, loaded, tokenizer, _texts(), window=WINDOW, max_windows=WINDOWS)


def llamacpp_divergence(path: Path, model, tokenizer) -> Divergence:
    """llama.cpp's own logits for the GGUF against `model`'s, on the windows `divergence` scores."""
    import llama_cpp

    from workbench.metrics import input_device

    windows = token_windows(tokenizer, _texts(), window=WINDOW, max_windows=WINDOWS)
    llm = llama_cpp.Llama(str(path), n_ctx=WINDOW, n_batch=WINDOW, n_threads=2, logits_all=True, verbose=False)

    def pairs() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for w in windows:
            llm.reset()
            llm.eval(w.tolist())
            theirs = torch.tensor(llm.scores[: len(w) - 1], dtype=torch.float32)
            with torch.inference_mode():
                ours = model(input_ids=w.to(input_device(model)).unsqueeze(0), use_cache=False).logits[0, :-1]
            yield (
                torch.log_softmax(ours.to("cpu", torch.float32), dim=-1),
                torch.log_softmax(theirs, dim=-1),
                w[1:],
            )

    try:
        return log_prob_divergence(pairs())
    finally:
        llm.close()


def greedy_line(pairs: list[tuple[list[int], list[int]]], prompt_ids: list[list[int]], model, tokens: int = 16) -> str:
    """The llama.cpp greedy comparison as information: how many replies are equal, and where
    one is not, where they part and how close the session's top two tokens were there."""
    same = sum(a == b for a, b in pairs)
    line = f"llama.cpp greedy {tokens} tokens equal to transformers' on {same} of {len(pairs)} prompts"
    if same == len(pairs):
        return line
    parted = []
    for ids, (ref, got) in zip(prompt_ids, pairs, strict=True):
        if ref == got:
            continue
        k = next((i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), min(len(ref), len(got)))
        if k >= len(ref):
            continue
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids + ref[:k]], device=model.device)).logits[0, -1].float()
        top = logits.topk(2).values
        parted.append(f"token {k + 1} ({float(top[0] - top[1]):.2f} logits between the top two)")
    where = f"; they part at {', '.join(parted)}" if parted else ""
    return f"{line}{where}. Information, not a failure: {GREEDY_NOTE}"
