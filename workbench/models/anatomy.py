"""The anatomy of a decoder: its attention layers, KV groups and pruned shapes, and what its
weights and KV cache cost in bytes.

Compression, inspection, export and the UI all need to find a model's attention modules,
count its heads and weigh its tensors; each used to do it its own way. Here is the one way,
below every feature that uses it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

# --- layers, heads and pruned shapes -------------------------------------------------------

Attention = Any
"""A transformers attention module (q/k/v/o_proj Linears, head_dim, num_key_value_groups): its
attributes are set by each architecture, so they are not typed."""


def attention_layers(model: nn.Module) -> list[Attention]:
    """Every decoder layer's attention module; refuses a model whose attention is not separate
    q/k/v/o projections (the only kind head pruning and head inspection know how to cut)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"prune_heads needs a decoder with model.layers; {type(model).__name__} has none")
    attns = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            raise ValueError(
                f"prune_heads supports attention with separate q/k/v/o projections (llama, qwen3, glm4, ...); "
                f"layer {i} of {type(model).__name__} has {type(attn).__name__}"
            )
        attns.append(attn)
    return attns


def kv_groups(attn: Attention) -> int:
    """KV heads of one attention module as it is now (pruning lowers it layer by layer)."""
    groups: int = attn.k_proj.out_features // attn.head_dim
    return groups


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    weight = linear.weight.detach().index_select(dim, index).clone()
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        bias = linear.bias.detach() if dim == 1 else linear.bias.detach().index_select(0, index)
        new.bias = nn.Parameter(bias.clone(), requires_grad=linear.bias.requires_grad)
    return new


def keep_groups(attn: Attention, keep: Sequence[int]) -> None:
    """Shrink one attention module to the KV groups in `keep` (and their query heads)."""
    hd, gs = attn.head_dim, attn.num_key_value_groups
    device = attn.q_proj.weight.device
    q_index = torch.tensor([g * gs * hd + i for g in keep for i in range(gs * hd)], device=device)
    kv_index = torch.tensor([g * hd + i for g in keep for i in range(hd)], device=device)
    attn.q_proj = _slice_linear(attn.q_proj, q_index, 0)
    attn.k_proj = _slice_linear(attn.k_proj, kv_index, 0)
    attn.v_proj = _slice_linear(attn.v_proj, kv_index, 0)
    attn.o_proj = _slice_linear(attn.o_proj, q_index, 1)


def record_in_config(model: nn.Module, attns: list[Attention]) -> None:
    config: Any = model.config  # a transformers PretrainedConfig: new fields are set on it
    if getattr(config, "head_dim", None) is None:
        config.head_dim = attns[0].head_dim  # never re-derived from hidden_size / heads again
    config.key_value_heads_per_layer = [kv_groups(a) for a in attns]
    config.attention_heads_per_layer = [kv_groups(a) * a.num_key_value_groups for a in attns]


def restore_pruned_shapes(model: nn.Module) -> None:
    """Give a freshly built model the per-layer head counts its config records, so a pruned
    checkpoint's weights fit. Which groups survive is irrelevant: the weights overwrite them."""
    counts = getattr(model.config, "key_value_heads_per_layer", None)
    if not counts:
        return
    for attn, n in zip(attention_layers(model), counts):
        if kv_groups(attn) != n:
            keep_groups(attn, range(n))


def pruned_shape(model: nn.Module) -> list[int]:
    """KV heads per layer: the shape a pruned model (and an adapter trained on it) has."""
    return [kv_groups(a) for a in attention_layers(model)]


# --- hooks and attention implementation ----------------------------------------------------


def mask_o_proj_input(attn: Attention, mask: torch.Tensor) -> RemovableHandle:
    """Multiply o_proj's input, cut into len(mask) equal slices (query heads or whole KV
    groups), slice by slice by `mask`: zero ablates a head, a mask that requires grad
    measures a head's importance. The weights never change; remove the handle to undo."""
    slices = mask.shape[0]

    def scale(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        (x,) = args
        return ((x.view(*x.shape[:-1], slices, -1) * mask[:, None].to(x.dtype)).view_as(x),)

    handle: RemovableHandle = attn.o_proj.register_forward_pre_hook(scale)
    return handle


@contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Eager attention for the duration: the only implementation that returns probabilities.
    `model`: a transformers PreTrainedModel."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


# --- bytes ---------------------------------------------------------------------------------


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage of a tensor, looking inside torchao's subclasses (int data + scales)."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def _dtype_name(t: torch.Tensor) -> str:
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        return type(t).__name__
    return str(t.dtype).removeprefix("torch.")


def weight_bytes_by_dtype(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters and buffers per storage type (torchao's quantized tensors by their
    own name, counted inside), each tied tensor once: what a compressed model really holds."""
    seen: set[int] = set()
    by_dtype: Counter[str] = Counter()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            by_dtype[_dtype_name(tensor)] += tensor_bytes(tensor)
    return dict(by_dtype)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, each tied tensor counted once."""
    return sum(weight_bytes_by_dtype(model).values())


def kv_bytes_per_token(model: Any) -> int:
    """Full-precision bytes one cached token costs, keys and values of every layer.
    `model`: a transformers PreTrainedModel."""
    layers = model.get_decoder().layers  # a vision-language model keeps its decoder inside
    width = model.get_input_embeddings().weight.element_size()
    return sum(2 * layer.self_attn.k_proj.out_features * width for layer in layers)
