"""The model's weights as plain float32 tensors, the per-layer head layout, and padding.

Every exporter reads the same thing: a state dict of float32 tensors in transformers'
naming (int8 / int4 layers de-quantized, fp16/bf16 layers widened) plus, per layer, how many
query and KV heads it has. A head-pruned model stores fewer heads in some layers
(`attention_heads_per_layer` / `key_value_heads_per_layer` in its config, see
compress/pruning.py); a runtime that reads one head count for all layers can still take
it after `pad_attention` puts zero heads back: a zero KV head's values are zero and its
query heads' o_proj columns are zero, so the padded model computes exactly the same
outputs, with the unpruned model's memory and speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workbench.compress.int4_linear import Int4Linear
from workbench.compress.int8_linear import Int8Linear
from workbench.models.anatomy import attention_layers, kv_groups


@dataclass(frozen=True)
class HeadLayout:
    heads: list[int]
    """query heads per layer"""
    kv_heads: list[int]
    """KV heads per layer"""
    head_dim: int

    @property
    def uniform(self) -> bool:
        return len(set(self.heads)) == 1 and len(set(self.kv_heads)) == 1

    @property
    def group_size(self) -> int:
        return self.heads[0] // self.kv_heads[0]

    def padded(self) -> HeadLayout:
        """Every layer at the largest layer's head counts."""
        return HeadLayout([max(self.heads)] * len(self.heads), [max(self.kv_heads)] * len(self.kv_heads), self.head_dim)


def head_layout(model: nn.Module) -> HeadLayout:
    attns = attention_layers(model)
    return HeadLayout(
        heads=[kv_groups(a) * a.num_key_value_groups for a in attns],
        kv_heads=[kv_groups(a) for a in attns],
        head_dim=attns[0].head_dim,
    )


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 copy of a parameter, looking through torchao's quantized tensor subclasses."""
    tensor = tensor.detach()
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "dequantize"):
        tensor = tensor.dequantize()
    return tensor.to(device="cpu", dtype=torch.float32).contiguous()


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> float32 tensor, in transformers' naming; quantized layers de-quantized.
    Tied weights appear under both names (the exporters decide whether to write both)."""
    packed = {name: m for name, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in packed:
            if leaf in packed[owner].qparams:
                continue
            if leaf == "weight":
                state[name] = packed[owner].dequantized().cpu().contiguous()
                continue
        state[name] = _plain(tensor)
    return state


def pad_attention(state: dict[str, torch.Tensor], layout: HeadLayout) -> tuple[dict[str, torch.Tensor], HeadLayout]:
    """Zero-pad every layer's attention to the largest layer's head counts (see module doc).
    New heads go after the kept ones, so query head j still reads KV head j // group_size."""
    target = layout.padded()
    hd = layout.head_dim
    out = dict(state)
    for layer, (heads, kv) in enumerate(zip(layout.heads, layout.kv_heads)):
        prefix = f"model.layers.{layer}.self_attn."
        extra_q, extra_kv = (target.heads[layer] - heads) * hd, (target.kv_heads[layer] - kv) * hd
        if not extra_kv:
            continue
        for proj, extra in (("q_proj", extra_q), ("k_proj", extra_kv), ("v_proj", extra_kv)):
            for leaf in ("weight", "bias"):
                name = prefix + proj + "." + leaf
                if name in out:
                    t = out[name]
                    out[name] = torch.cat([t, t.new_zeros(extra, *t.shape[1:])], dim=0)
        o = out[prefix + "o_proj.weight"]
        out[prefix + "o_proj.weight"] = torch.cat([o, o.new_zeros(o.shape[0], extra_q)], dim=1)
    return out, target
