"""What the KV cache costs: predicted from a config alone, measured on a real cache object.

The prediction needs no weights, so it answers "what does an 8K context cost on GLM-4-9B?"
from a `config.json`: every layer stores one key and one value vector of `head_dim` numbers
per KV head per token. The measurement sums the bytes of the tensors a transformers cache
really holds after N tokens; for the `dynamic` policy the two must agree to the byte, and
that agreement is what makes the prediction trustworthy for models we cannot load.

The curves run each cache policy of `workbench.compress.kvcache` over growing sequence
lengths and record the cache's bytes beside the process's memory, so a bounded policy
(sliding window) or a compressed one (quantized) shows its shape against the dynamic line.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import torch
from tqdm.auto import tqdm

from workbench.compress.kvcache import KVCacheOptions, cache_factory
from workbench.data import evaluation_texts
from workbench.models.anatomy import tensor_bytes

_DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
}

# Keys some checkpoints use instead of transformers' standard names (ChatGLM-format GLM-4
# configs in particular: num_layers, multi_query_group_num, kv_channels).
_ALIASES = {
    "num_hidden_layers": ("num_hidden_layers", "num_layers", "n_layer", "n_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "n_heads"),
    "num_key_value_heads": ("num_key_value_heads", "multi_query_group_num", "n_kv_heads", "num_kv_heads"),
    "head_dim": ("head_dim", "kv_channels"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
}


@dataclass(frozen=True)
class KVShape:
    """What sets the cache's size, read from a config."""

    layers: int
    kv_heads_per_layer: tuple[int, ...]
    head_dim: int
    dtype: str
    dtype_bytes: int

    @property
    def bytes_per_token(self) -> int:
        # keys and values (x2), every layer's KV heads, head_dim numbers each
        return sum(self.kv_heads_per_layer) * self.head_dim * 2 * self.dtype_bytes

    def bytes_for(self, tokens: int, batch: int = 1) -> int:
        return self.bytes_per_token * tokens * batch


def _as_dict(config) -> dict:
    if isinstance(config, (str, Path)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        return json.loads(path.read_text())
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()  # keeps a pruned model's key_value_heads_per_layer
    raise TypeError(f"expected a config.json path, a dict or a transformers config, got {type(config).__name__}")


def _pick(data: dict, key: str):
    for name in _ALIASES[key]:
        if data.get(name) is not None:
            return data[name]
    return None


def kv_shape(config, *, dtype: str | torch.dtype | None = None) -> KVShape:
    """The cache's shape from a config.json path, a model folder, a dict or a transformers config.

    `dtype` is what the cache stores (the model's compute dtype); by default the config's own
    `dtype` / `torch_dtype`, else float32. Multimodal configs are read through `text_config`."""
    data = _as_dict(config)
    source = str(config) if isinstance(config, (str, Path)) else "the config"
    if _pick(data, "num_hidden_layers") is None and isinstance(data.get("text_config"), dict):
        data = {
            **data["text_config"],
            "dtype": data["text_config"].get("dtype") or data.get("dtype") or data.get("torch_dtype"),
        }
    layers = _pick(data, "num_hidden_layers")
    heads = _pick(data, "num_attention_heads")
    if layers is None or heads is None:
        raise ValueError(
            f"{source} has no layer or attention-head count (num_hidden_layers, num_attention_heads): "
            "is it a decoder language model's config.json?"
        )
    kv_heads = _pick(data, "num_key_value_heads") or heads  # absent: multi-head attention
    head_dim = _pick(data, "head_dim")
    if head_dim is None:
        hidden = _pick(data, "hidden_size")
        if hidden is None:
            raise ValueError(f"{source} gives neither head_dim nor hidden_size")
        head_dim = hidden // heads
    per_layer = data.get("key_value_heads_per_layer")  # written by prune_heads
    if per_layer:
        if len(per_layer) != layers:
            raise ValueError(f"{source}: key_value_heads_per_layer has {len(per_layer)} entries for {layers} layers")
        kv_per_layer = tuple(int(n) for n in per_layer)
    else:
        kv_per_layer = (int(kv_heads),) * int(layers)
    if dtype is None:
        dtype = data.get("dtype") or data.get("torch_dtype") or "float32"
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown cache dtype {dtype!r} (known: {', '.join(sorted(_DTYPE_BYTES))})")
    return KVShape(
        layers=int(layers),
        kv_heads_per_layer=kv_per_layer,
        head_dim=int(head_dim),
        dtype=name,
        dtype_bytes=_DTYPE_BYTES[name],
    )


def kv_bytes_per_token_from_config(config, *, dtype: str | torch.dtype | None = None) -> int:
    """layers x KV heads x head_dim x 2 (keys and values) x bytes per number; no weights needed."""
    return kv_shape(config, dtype=dtype).bytes_per_token


def context_cost(
    config, tokens: int | list[int], *, dtype: str | torch.dtype | None = None, batch: int = 1
) -> pd.DataFrame:
    """Cache bytes of a `dynamic` cache at each context length, for one config."""
    shape = kv_shape(config, dtype=dtype)
    lengths = [tokens] if isinstance(tokens, int) else list(tokens)
    return pd.DataFrame(
        {
            "tokens": lengths,
            "bytes": [shape.bytes_for(n, batch) for n in lengths],
            "MiB": [shape.bytes_for(n, batch) / 2**20 for n in lengths],
            "bytes_per_token": shape.bytes_per_token,
            "dtype": shape.dtype,
        }
    )


# --- measured ----------------------------------------------------------------------------


def cache_bytes(cache) -> int:
    """Bytes of every tensor the cache object holds: full-precision keys/values and, for the
    quantized policy, the packed quantized tensors with their scales."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor_bytes(tensor)
    return total


def _token_stream(tokenizer, tokens: int) -> torch.Tensor:
    """`tokens` ids of the shipped held-out text (documents in order, repeated if it is
    shorter); only as many documents are tokenized as the length needs."""
    pieces, have = [], 0
    documents = evaluation_texts()
    while have < tokens:
        for doc in documents:
            ids = tokenizer(doc + "\n\n", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            pieces.append(ids)
            have += len(ids)
            if have >= tokens:
                break
    return torch.cat(pieces)[:tokens]


def _check_length(model, tokens: int) -> None:
    if tokens < 1:
        raise ValueError(f"tokens must be at least 1, got {tokens}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and tokens > limit:
        raise ValueError(f"{tokens} tokens is over this model's max_position_embeddings of {limit}")


def fill_cache(
    session,
    tokens: int,
    *,
    policy: KVCacheOptions | dict | str = "dynamic",
    chunk: int = 256,
    checkpoints: list[int] | None = None,
    on_checkpoint=None,
):
    """Feed `tokens` tokens of held-out text through the model into a fresh cache of `policy`,
    `chunk` tokens per forward (as a long prompt's chunked prefill would). Returns the cache."""
    model = session.model
    _check_length(model, tokens)
    opts = (
        policy
        if isinstance(policy, KVCacheOptions)
        else KVCacheOptions.model_validate({"policy": policy} if isinstance(policy, str) else policy)
    )
    device = model.get_input_embeddings().weight.device
    if opts.policy == "offloaded" and device.type != "cuda":
        raise ValueError(
            f"the offloaded KV cache needs a model on CUDA (it moves GPU cache layers to CPU memory); "
            f"this model is on {device.type}"
        )
    cache = cache_factory(opts)(model.config)
    ids = _token_stream(session.tokenizer, tokens).to(device)
    stops = sorted(set(checkpoints or []) | {tokens})
    done = 0
    with torch.inference_mode():
        for stop in stops:
            while done < stop:
                step = min(chunk, stop - done)
                model(input_ids=ids[None, done : done + step], past_key_values=cache, use_cache=True, logits_to_keep=1)
                done += step
            if on_checkpoint is not None:
                on_checkpoint(done, cache)
    return cache


def measure_cache(session, tokens: int, *, policy: KVCacheOptions | dict | str = "dynamic", chunk: int = 256) -> int:
    """Measured bytes of a real cache of `policy` after `tokens` tokens."""
    return cache_bytes(fill_cache(session, tokens, policy=policy, chunk=chunk))


def _policy_label(opts: KVCacheOptions) -> str:
    if opts.policy == "sliding_window":
        return f"sliding_window({opts.window})"
    if opts.policy == "quantized":
        return f"quantized({opts.nbits}-bit, residual {opts.residual_length})"
    return opts.policy


DEFAULT_POLICIES = (
    {"policy": "dynamic"},
    {"policy": "sliding_window", "window": 256},
    {"policy": "quantized", "nbits": 4, "residual_length": 64},
    {"policy": "offloaded"},
)


def memory_curve(session, lengths: list[int], *, policies=DEFAULT_POLICIES, chunk: int = 64) -> pd.DataFrame:
    """Cache bytes and process memory against sequence length, one row per (policy, length).

    Each policy fills one cache up to the longest length and is measured at every length on
    the way. A policy that cannot run here (offloaded without CUDA, quantized without
    optimum-quanto) gets one row with `skipped` saying why instead of numbers. Process memory
    is the resident set (CPU) or CUDA memory allocated, read after each checkpoint: it moves
    with the allocator as well as with the cache, so it is shown beside the exact cache bytes."""
    lengths = sorted(set(int(n) for n in lengths))
    if not lengths:
        raise ValueError("give at least one sequence length")
    predicted_per_token = kv_bytes_per_token_from_config(
        session.model.config, dtype=session.model.get_input_embeddings().weight.dtype
    )
    device = session.model.get_input_embeddings().weight.device
    process = psutil.Process()
    rows = []
    for raw in tqdm(policies, desc="KV-cache policies"):
        opts = (
            raw
            if isinstance(raw, KVCacheOptions)
            else KVCacheOptions.model_validate({"policy": raw} if isinstance(raw, str) else raw)
        )
        label = _policy_label(opts)
        base = {"policy": opts.policy, "label": label}
        if opts.policy == "offloaded" and device.type != "cuda":
            rows.append(
                {
                    **base,
                    "skipped": f"offloaded needs CUDA (it moves GPU cache layers to CPU memory); "
                    f"this model is on {device.type}",
                }
            )
            continue
        if opts.policy == "quantized" and importlib.util.find_spec("optimum.quanto") is None:
            rows.append(
                {**base, "skipped": "the quantized cache needs optimum-quanto (pip install optimum-quanto==0.2.7)"}
            )
            continue

        def record(done, cache, base=base):
            memory = torch.cuda.memory_allocated(device) if device.type == "cuda" else process.memory_info().rss
            rows.append(
                {
                    **base,
                    "tokens": done,
                    "cache_bytes": cache_bytes(cache),
                    "dynamic_bytes_predicted": predicted_per_token * done,
                    "process_bytes": memory,
                    "skipped": None,
                }
            )

        fill_cache(session, lengths[-1], policy=opts, chunk=chunk, checkpoints=lengths, on_checkpoint=record)
    frame = pd.DataFrame(
        rows,
        columns=["policy", "label", "tokens", "cache_bytes", "dynamic_bytes_predicted", "process_bytes", "skipped"],
    )
    frame["cache_MiB"] = frame["cache_bytes"] / 2**20
    frame["process_MiB"] = frame["process_bytes"] / 2**20
    return frame
