"""A GGUF file for llama.cpp, written with the `gguf` package (GGUFWriter, gguf.quants).

Which llama.cpp architecture carries the model:
- `llama`: Llama-shaped models whose layers all have the same head counts (unpruned, or
  pruned with `per_layer`). llama.cpp applies rotary embeddings to interleaved pairs
  while transformers rotates halves, so q and k rows are permuted per head exactly as
  llama.cpp's convert_hf_to_gguf (`LlamaModel.permute`) does;
- `deci`: Llama-shaped models with per-layer head counts (a `ratio` prune). llama.cpp's deci
  loader reads `deci.attention.head_count` / `head_count_kv` as per-layer arrays and sizes
  each layer's q/k/v/o from them (src/models/deci.cpp); the same permutation, per layer
  with that layer's head counts;
- `qwen3`: no permutation (llama.cpp rotates halves for it too) and one head count for all
  layers, so a non-uniform Qwen3 prune needs `pad` (zero heads put back, see weights.py).

Types: `f16` stores every matrix in float16; `q8_0` and `q4_0` quantize matrices in blocks
of 32 with gguf.quants (the same code llama.cpp's converter uses). Norms stay float32, as
llama.cpp expects. With `q4_0` the token embeddings stay q8_0: tied to the output layer,
they are where 4-bit error costs most (the workbench's quantize step keeps lm_head for the
same reason).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from workbench.errors import ExportError
from workbench.export.gguf_vocab import add_tokenizer
from workbench.export.weights import HeadLayout

TYPES = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "deci": gguf.MODEL_ARCH.DECI, "qwen3": gguf.MODEL_ARCH.QWEN3}
_PERMUTED = {"llama", "deci"}


@dataclass(frozen=True)
class GGUFPlan:
    arch: str
    type: str
    layout: HeadLayout


def choose_arch(model_type: str, layout: HeadLayout, *, pad: bool) -> tuple[str, bool]:
    """(llama.cpp architecture, whether the heads must be padded), or an ExportError."""
    if model_type == "llama":
        if layout.uniform:
            return "llama", False
        return ("llama", True) if pad else ("deci", False)
    if model_type == "qwen3":
        if layout.uniform:
            return "qwen3", False
        if pad:
            return "qwen3", True
        raise ExportError(
            "this Qwen3 model has per-layer head counts (heads "
            f"{sorted(set(layout.heads))}), and llama.cpp's qwen3 architecture reads one head count for all layers; "
            "pass --pad to zero-pad the pruned heads back (exact outputs, but no memory or speed saving in llama.cpp)"
        )
    raise ExportError(f"GGUF export supports llama and qwen3 models; this one is {model_type!r}")


def permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers' rotate-half layout to llama.cpp's interleaved one (convert_hf_to_gguf)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise ExportError(
            f"rope scaling {kind!r} is not exported to GGUF yet; only models with plain rotary embeddings are"
        )
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _tensor(name: str, tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType):
    """(data, raw_dtype) for GGUFWriter.add_tensor: 1-D tensors and odd-sized rows stay float32."""
    array = tensor.numpy().astype(np.float32)
    if array.ndim == 1:
        return array, None
    if name == "token_embd.weight" and qtype == gguf.GGMLQuantizationType.Q4_0:
        qtype = gguf.GGMLQuantizationType.Q8_0
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16), None
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        return array.astype(np.float16), None
    return gguf.quants.quantize(array, qtype), qtype


def write_gguf(
    path: Path,
    state: dict[str, torch.Tensor],
    config,
    tokenizer,
    plan: GGUFPlan,
    *,
    name: str,
    eos_token_id: int | None,
) -> None:
    """Write the GGUF file at `path` (the caller picks a temporary name and renames it)."""
    layout, arch = plan.layout, plan.arch
    qtype, file_type = TYPES[plan.type]
    writer = gguf.GGUFWriter(path, arch)
    per_layer = not layout.uniform
    n_layers = len(layout.heads)
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(layout.heads if per_layer else layout.heads[0])
    writer.add_head_count_kv(layout.kv_heads if per_layer else layout.kv_heads[0])
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_rope_dimension_count(layout.head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, int(config.vocab_size), eos_token_id)

    names = gguf.get_tensor_name_map(ARCHS[arch], n_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name!r} in llama.cpp's {arch} architecture")
        if arch in _PERMUTED and ".self_attn." in hf_name and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            layer = int(hf_name.split(".")[2])
            heads = layout.heads[layer] if "q_proj" in hf_name else layout.kv_heads[layer]
            tensor = permute(tensor, heads)
        data, raw = _tensor(gguf_name, tensor, qtype)
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
