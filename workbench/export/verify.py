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
"""

from __future__ import annotations

from pathlib import Path

import torch

from workbench.errors import ExportError
from workbench.export.weights import HeadLayout

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
    from transformers import AutoModelForCausalLM

    # transformers' GGUF config mapping does not read attention.key_length for every
    # architecture (qwen3 falls back to its default head_dim), so the head size is given.
    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, head_dim=head_dim
    ).eval()
    return compare_logits(model, loaded, tokenizer)


def hf_logits(directory: Path, model, tokenizer) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return compare_logits(model, loaded, tokenizer)


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
