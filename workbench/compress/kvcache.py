"""The KV-cache policy the engine generates with, built from transformers' cache classes.

- `dynamic`: grows with the sequence (transformers' DynamicCache); the default.
- `sliding_window`: keeps only the last `window` tokens of keys and values in every layer
  (DynamicSlidingWindowLayer), so cache memory is bounded whatever the context length; the
  model then attends only within the window (StreamingLLM without attention sinks).
- `quantized`: keys and values quantized to `nbits` past a full-precision residual of
  `residual_length` tokens (transformers' QuantizedCache, KIVI-style, optimum-quanto backend).
- `offloaded`: layers wait in CPU memory and are prefetched to the GPU one at a time; it
  saves GPU memory only, so it is refused for a model that is not on CUDA.
Policies other than `dynamic` generate one request at a time: their cache layers cannot drop
a finished row from a batch.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import DynamicCache, QuantizedCache
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from workbench.engine import CachePolicy
from workbench.models.anatomy import kv_bytes_per_token
from workbench.step_options import KVCacheOptions


@dataclass
class KVCacheReport:
    step: str
    policy: str
    kv_bytes_per_token: int
    """full-precision bytes per cached token, all layers (what `dynamic` stores)"""
    bound_tokens: int | None
    """tokens the cache holds at most (sliding_window), else None: it grows"""


def cache_factory(opts: KVCacheOptions) -> Callable[[Any], Cache]:
    """A model config (a transformers PretrainedConfig) -> a fresh cache of the policy."""
    if opts.policy == "dynamic":
        return lambda config: DynamicCache(config=config)
    if opts.policy == "sliding_window":

        def sliding(config):
            cache = DynamicCache()
            cache.layers = [
                DynamicSlidingWindowLayer(sliding_window=opts.window) for _ in range(config.num_hidden_layers)
            ]
            return cache

        return sliding
    if opts.policy == "quantized":
        # Groups of one head's width always divide what quanto groups over (tokens x heads x
        # head_dim); its default of 64 fails for small heads at some sequence lengths.
        return lambda config: QuantizedCache(
            backend="quanto",
            config=config,
            nbits=opts.nbits,
            residual_length=opts.residual_length,
            q_group_size=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        )
    return lambda config: DynamicCache(config=config, offloading=True)


def kv_cache(session, **options) -> KVCacheReport:
    opts = KVCacheOptions.model_validate(options)
    device = session.engine.device
    if opts.policy == "offloaded" and device.type != "cuda":
        raise ValueError(
            f"the offloaded KV cache moves GPU cache layers to CPU memory; this model is on {device.type}, "
            "so there is nothing to offload (use dynamic, sliding_window or quantized)"
        )
    if opts.policy == "quantized" and importlib.util.find_spec("optimum.quanto") is None:
        raise ValueError("the quantized KV cache needs optimum-quanto: pip install optimum-quanto==0.2.7")
    one_at_a_time = opts.policy != "dynamic"  # see the module docstring
    session.engine.set_cache_policy(
        CachePolicy(opts.policy, cache_factory(opts), max_batch=1 if one_at_a_time else None)
    )
    return KVCacheReport(
        step="kv_cache",
        policy=opts.policy,
        kv_bytes_per_token=kv_bytes_per_token(session.model),
        bound_tokens=opts.window,
    )
