"""Tiny randomly initialised vision-language models of real transformers architectures.

`tiny:glm4v` (Glm4vForConditionalGeneration, GLM-4.1V / 4.5V layout), `tiny:qwen2_vl`
(Qwen2VLForConditionalGeneration), `tiny:qwen2_5_vl` (Qwen2_5_VLForConditionalGeneration:
windowed vision attention, same tokens and template) and `tiny:smolvlm` (Idefics3ForConditionalGeneration, the
architecture of SmolVLM-256M/500M-Instruct) are the real model classes with ~150-200k
parameters: a 2-layer text model (hidden 64, 4 query heads over 2 KV heads; multimodal
RoPE for the GLM and Qwen ones) and a 1-layer vision tower (patch 14). Each comes with the real
processor class (Glm4vProcessor / Qwen2VLProcessor / Idefics3Processor) holding

- the family's image processor (PIL backend) with small pixel bounds, so a test image
  becomes a handful of patches (at most 16 image tokens; SmolVLM: 56-pixel tiles of 4
  tokens, up to 2x2 tiles plus a global view);
- a byte-level BPE tokenizer trained in milliseconds (as in tiny.py) that carries the
  family's special tokens (image placeholder, image start/end, video tokens), with ids
  wired into the model config's image_token_id & co;
- a chat template in the family's own format: `{"type": "image"}` content entries become
  `<|begin_of_image|><|image|><|end_of_image|>` (GLM) or
  `<|vision_start|><|image_pad|><|vision_end|>` (Qwen2-VL) or `<image>` (SmolVLM), which
  the processor expands to one placeholder per merged patch (SmolVLM: per tile, between
  row/column markers). The GLM template has GLM-4.5V's `enable_thinking` switch; the
  others have none (as the real ones).

The processors are built without a video processor: transformers' video processors need
torchvision, which the workbench does not install (see `image_only`). SmolVLM2 (model type
`smolvlm`) is not built: its processor needs the num2words package; SmolVLM v1 checkpoints
are Idefics3 and need nothing more. Init is seeded:
same arch, same weights, in every test and run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

from workbench.errors import ModelSourceError
from workbench.models.tiny import _THINK_TOKENS, byte_level_tokenizer

# Images are resized so that pixels fall within these bounds (a multiple of 28 = patch 14
# x merge 2 per side): 4 to 16 merged tokens per image.
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 16
# SmolVLM (Idefics3) instead splits an image (longest edge resized to 2 tiles) into tiles
# of this side plus a downscaled global view.
SMOLVLM_TILE = 56

# Content items: a string, or a list of {"type": "text"|"image"|"video", ...} entries.
_GLM4V = (
    "[gMASK]<sop>"
    "{%- macro visible(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is not none -%}{%- for item in content -%}"
    "{%- if item.type == 'image' or 'image' in item -%}{{- '<|begin_of_image|><|image|><|end_of_image|>' -}}"
    "{%- elif item.type == 'video' or 'video' in item -%}{{- '<|begin_of_video|><|video|><|end_of_video|>' -}}"
    "{%- elif item.type == 'text' -%}{{- item.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}{{- '<|system|>\n' + visible(m.content) -}}"
    "{%- elif m.role == 'user' -%}{{- '<|user|>\n' + visible(m.content) -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{- '/nothink' -}}{%- endif -%}"
    "{%- elif m.role == 'assistant' -%}{{- '<|assistant|>\n' -}}"
    "{%- if m.reasoning_content -%}{{- '<think>' + m.reasoning_content + '</think>\n' -}}{%- endif -%}"
    "{{- visible(m.content) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{- '<think></think>\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

_QWEN2_VL = (
    "{%- macro visible(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is not none -%}{%- for item in content -%}"
    "{%- if item.type == 'image' or 'image' in item -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item.type == 'video' or 'video' in item -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif item.type == 'text' -%}{{- item.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for m in messages -%}"
    "{%- if loop.first and m.role != 'system' -%}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + m.role + '\n' + visible(m.content) + '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


# SmolVLM-256M/500M-Instruct (Idefics3 architecture): the role name capitalised, "User:"
# before an image, each image one `<image>` expanded by the processor into tiles.
_SMOLVLM = (
    "<|im_start|>"
    "{%- for m in messages -%}"
    "{%- set items = [{'type': 'text', 'text': m.content}] if m.content is string else (m.content or []) -%}"
    "{{- m.role | capitalize -}}"
    "{%- if items and items[0].type == 'image' -%}{{- ':' -}}{%- else -%}{{- ': ' -}}{%- endif -%}"
    "{%- for item in items -%}"
    "{%- if item.type == 'text' -%}{{- item.text -}}{%- elif item.type == 'image' -%}{{- '<image>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<end_of_utterance>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)
_ROW_COL = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))


@dataclass(frozen=True)
class _VlmFamily:
    special_tokens: tuple[str, ...]
    eos_tokens: tuple[str, ...]
    pad_token: str
    chat_template: str
    token_ids: dict[str, str]
    """model config field -> the special token whose id it holds"""
    extra_tokens: tuple[str, ...] = field(default=())


_QWEN_VL = _VlmFamily(
    special_tokens=(
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ),
    eos_tokens=("<|im_end|>", "<|endoftext|>"),
    pad_token="<|endoftext|>",
    chat_template=_QWEN2_VL,
    token_ids={
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    },
)

FAMILIES = {
    "glm4v": _VlmFamily(
        special_tokens=(
            "<|endoftext|>",
            "[gMASK]",
            "<sop>",
            "<|system|>",
            "<|user|>",
            "<|assistant|>",
            "<|observation|>",
            "<|begin_of_image|>",
            "<|end_of_image|>",
            "<|image|>",
            "<|begin_of_video|>",
            "<|end_of_video|>",
            "<|video|>",
        ),
        eos_tokens=("<|endoftext|>", "<|user|>", "<|observation|>"),
        pad_token="<|endoftext|>",
        chat_template=_GLM4V,
        token_ids={
            "image_token_id": "<|image|>",
            "video_token_id": "<|video|>",
            "image_start_token_id": "<|begin_of_image|>",
            "image_end_token_id": "<|end_of_image|>",
            "video_start_token_id": "<|begin_of_video|>",
            "video_end_token_id": "<|end_of_video|>",
        },
        extra_tokens=tuple(_THINK_TOKENS),
    ),
    "qwen2_vl": _QWEN_VL,
    "qwen2_5_vl": _QWEN_VL,
    "smolvlm": _VlmFamily(
        special_tokens=(
            "<|endoftext|>",
            "<|im_start|>",
            "<end_of_utterance>",
            "<fake_token_around_image>",
            "<image>",
            "<global-img>",
            *_ROW_COL,
        ),
        eos_tokens=("<end_of_utterance>", "<|endoftext|>"),
        pad_token="<|endoftext|>",
        chat_template=_SMOLVLM,
        token_ids={"image_token_id": "<image>"},
    ),
}


def image_only(processor_cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`processor_cls` without its video processor attribute.

    transformers 5 builds a processor's attributes from its __init__ signature and checks
    each against its base class; a video processor needs torchvision, so without it a
    Glm4vProcessor / Qwen2VLProcessor cannot be built at all (AutoProcessor raises "Can't
    load video processor"). The subclass keeps the class name, so a processor saved from
    it loads back as the real class wherever torchvision is installed.
    """

    import inspect

    if "video_processor" not in inspect.signature(processor_cls.__init__).parameters:
        return processor_cls

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_cls.__init__(
            self,
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )

    return type(
        processor_cls.__name__, (processor_cls,), {"__init__": __init__, "__module__": processor_cls.__module__}
    )


def _tokenizer(family: _VlmFamily) -> PreTrainedTokenizerFast:
    return byte_level_tokenizer(
        family.special_tokens, family.eos_tokens[0], family.pad_token, family.extra_tokens, family.chat_template
    )


def _configs(
    arch: str, vocab_size: int, ids: dict[str, Any], pad_token_id: int, eos: int | list[int] | None
) -> tuple[PreTrainedConfig, type[PreTrainedModel], type[Any], type[ProcessorMixin]]:
    """`ids`: model config field -> special token id (config keyword arguments)."""
    text: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "pad_token_id": pad_token_id,
        "bos_token_id": None,
        "eos_token_id": eos,
    }
    if arch == "smolvlm":
        from transformers import (
            Idefics3Config,
            Idefics3ForConditionalGeneration,
            Idefics3Processor,
        )
        from transformers.models.idefics3.image_processing_pil_idefics3 import (
            Idefics3ImageProcessorPil,
        )

        text.update(model_type="llama", head_dim=16, tie_word_embeddings=False)
        # 56-pixel tiles of 4x4 patches, pixel-shuffled 2x2: 4 image tokens per tile.
        vision: dict[str, Any] = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": SMOLVLM_TILE,
            "patch_size": 14,
        }
        config: PreTrainedConfig = Idefics3Config(text_config=text, vision_config=vision, scale_factor=2, **ids)
        return config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor
    if arch == "glm4v":
        from transformers import Glm4vConfig, Glm4vForConditionalGeneration
        from transformers.models.glm4v.image_processing_pil_glm4v import (
            Glm4vImageProcessorPil,
        )
        from transformers.models.glm4v.processing_glm4v import Glm4vProcessor

        # GLM rotates half of each 16-wide head (partial_rotary_factor 0.5): 4 frequencies,
        # split over (temporal, height, width) like the real [8, 12, 12] over 32.
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": [2, 1, 1],
        }
        vision = {
            "depth": 1,
            "hidden_size": 32,
            "num_heads": 2,
            "intermediate_size": 64,
            "out_hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "image_size": 56,
        }
        config = Glm4vConfig(text_config=text, vision_config=vision, **ids)
        return config, Glm4vForConditionalGeneration, Glm4vImageProcessorPil, Glm4vProcessor
    if arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import (
            Qwen2_5_VLProcessor,
        )
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        # Two vision blocks: the first attends within 56-pixel windows (2x2 merged patches),
        # the second over the whole image, as Qwen2.5-VL alternates them.
        vision = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        }
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        return config, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil, Qwen2_5_VLProcessor
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    # 16-wide heads: 8 rotary frequencies over (temporal, height, width), as [16, 24, 24] over 64.
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    vision = {
        "depth": 1,
        "embed_dim": 32,
        "hidden_size": 64,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    return config, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil, Qwen2VLProcessor


def build_processor(arch: str) -> ProcessorMixin:
    family = FAMILIES[arch]
    tokenizer = _tokenizer(family)
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in family.token_ids.items()}
    _, _, image_processor_cls, processor_cls = _configs(arch, len(tokenizer), ids, tokenizer.pad_token_id, None)
    if arch == "smolvlm":
        image_processor = image_processor_cls(
            size={"longest_edge": 2 * SMOLVLM_TILE},
            max_image_size={"longest_edge": SMOLVLM_TILE},
            do_image_splitting=True,
        )
        return processor_cls(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=family.chat_template
        )
    image_processor = image_processor_cls(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    return image_only(processor_cls)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=family.chat_template
    )


def build_tiny_vlm(arch: str, *, seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A tiny random `arch` vision-language model and its processor (tokenizer inside)."""
    if arch not in FAMILIES:
        known = ", ".join(f"tiny:{a}" for a in FAMILIES)
        raise ModelSourceError(f"unknown tiny vision-language model 'tiny:{arch}' (known: {known})")
    family = FAMILIES[arch]
    processor = build_processor(arch)
    tokenizer = processor.tokenizer
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in family.token_ids.items()}
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in family.eos_tokens]
    eos = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    config, model_cls, _, _ = _configs(arch, len(tokenizer), ids, tokenizer.pad_token_id, eos)
    config.tie_word_embeddings = False
    fork_devices: list[int] = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, processor
