"""A stock transformers checkpoint: loads with plain `AutoModelForCausalLM.from_pretrained`
(and so with vLLM, TGI, ExecuTorch's exporters, ...), no workbench code needed.

A head-pruned checkpoint saved by the workbench records its per-layer head counts in
`attention_heads_per_layer` / `key_value_heads_per_layer`, which only this workbench reads.
When every layer kept the same number of heads (a `per_layer` prune) the stock config can
say so with `num_attention_heads` / `num_key_value_heads`; otherwise the heads are either
zero-padded back (`pad`, exact outputs) or the export is refused, since no stock config
field holds per-layer head counts.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from workbench.export.weights import HeadLayout

PER_LAYER_KEYS = ("attention_heads_per_layer", "key_value_heads_per_layer")


def stock_config(config, layout: HeadLayout):
    """The model's config with its head counts in the standard fields and the workbench's
    per-layer fields removed. `layout` must be uniform."""
    config = copy.deepcopy(config)
    for key in PER_LAYER_KEYS:
        if hasattr(config, key):
            delattr(config, key)
    config.num_attention_heads = layout.heads[0]
    config.num_key_value_heads = layout.kv_heads[0]
    config.head_dim = layout.head_dim  # never re-derived from hidden_size / heads
    config.quantization_config = None
    return config


def write_hf(
    directory: Path,
    state: dict[str, torch.Tensor],
    config,
    tokenizer,
    generation_config,
    layout: HeadLayout,
    *,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Build the stock model from `stock_config`, load `state` strictly, save it with its tokenizer."""
    from transformers import AutoModelForCausalLM

    config = stock_config(config, layout)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    tied = {model.get_parameter(k).data_ptr() for k in state if k in dict(model.named_parameters())}
    missing = [k for k in missing if model.get_parameter(k).data_ptr() not in tied]
    if missing or unexpected:
        raise RuntimeError(
            f"the exported weights do not fit the stock {config.model_type} model "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if generation_config is not None:
        model.generation_config = copy.deepcopy(generation_config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
