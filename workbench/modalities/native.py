"""Vision-language models' own processors and chat templates.

When the loaded model is a VLM (GLM-4.1V, Qwen2-VL, SmolVLM, ...), images go through its
processor: the chat template puts the model's image placeholder where each
`{"type": "image"}` entry stands, the processor expands each placeholder to one token per
merged patch and turns the images into `pixel_values` (+ `image_grid_thw`, ...).

The forward contract (transformers 5.23; proved in tests/test_vlm.py):

- prefill:  `model(input_ids=ids, **prompt.inputs, past_key_values=cache, use_cache=True)`
  with `cache = DynamicCache(config=model.config)`. `prompt.inputs` holds everything the
  processor returned except input_ids/attention_mask, `mm_token_type_ids` included (GLM-4V
  and Qwen2-VL refuse image inputs without it: it is what their multimodal RoPE is built from).
- decode:   `model(input_ids=next_token, past_key_values=cache, use_cache=True)`; no
  pixel inputs, no attention_mask, no position_ids, no cache_position (these models take
  none: positions come from `cache.get_seq_length()` plus the stored `rope_deltas`).
- mRoPE models (GLM-4V, Qwen2-VL/2.5-VL) keep `rope_deltas` ON THE MODEL
  (`model.model.rope_deltas`) from one prefill to the next decode steps. A text-only prefill
  does not overwrite it, so call `reset_rope_state(model)` before every prefill, or a
  text-only request after an image request decodes at shifted positions.
- Batching / interleaving requests: prefill each VLM request on its own (batch 1, its own
  pixel inputs), read its delta with `rope_delta(model)` right after, and on every decode
  step pass explicit positions: `position_ids = own_length + delta` per row, either 2-D
  (batch, 1) (the model expands it to its 3 axes) or `decode_position_ids(...)` (3, batch, 1),
  with the attention mask for left-padded rows, as workbench.engine.batch already does for
  text models. Without explicit positions every row decodes with whichever request
  prefilled last. Text-only rows have delta 0; non-mRoPE models need nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import ProcessorMixin

from workbench.errors import UnsupportedInputError
from workbench.modalities.images import ImageInputError


@dataclass
class NativePrompt:
    text: str
    """The rendered template, before the processor expands each image placeholder."""
    ids: list[int]
    """Token ids with image placeholders expanded (what the model sees)."""
    inputs: dict[str, torch.Tensor]
    """Extra prefill kwargs: pixel_values, image_grid_thw, mm_token_type_ids, ...; floating
    tensors in the model's dtype."""
    n_images: int = 0
    image_tokens: int = 0
    """How many of `ids` are image placeholder tokens (the rest is text and markers)."""


def template_of(processor: ProcessorMixin) -> str:
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default", "")
    return template or ""


def _is_image_entry(item: Any) -> bool:
    return isinstance(item, dict) and (item.get("type") == "image" or ("image" in item and item.get("type") != "text"))


def count_image_entries(messages: list[dict]) -> int:
    return sum(
        1
        for message in messages
        if isinstance(message.get("content"), list)
        for item in message["content"]
        if _is_image_entry(item)
    )


class NativeVision:
    """A VLM processor as the engine uses it: messages + images -> prompt ids and prefill inputs."""

    def __init__(
        self, processor: ProcessorMixin, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.dtype = dtype
        self.device = device

    @property
    def has_thinking_switch(self) -> bool:
        return "enable_thinking" in template_of(self.processor)

    def render(
        self,
        messages: list[dict],
        images: list[Image.Image],
        enable_thinking: bool | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> NativePrompt:
        """`messages` are HF multimodal chat messages: content a string or a list of
        `{"type": "image"}` / `{"type": "text", "text": ...}` entries; `images` fill the image
        entries in order. `enable_thinking` reaches the template only where it has that switch
        (for the others, workbench.engine.template.render_prompt asks in the system message)."""
        if not template_of(self.processor):
            raise UnsupportedInputError("this vision-language model's processor has no chat template")
        expected = count_image_entries(messages)
        if expected != len(images):
            raise ImageInputError(f"the messages hold {expected} image entries but {len(images)} images were given")
        kwargs: dict[str, Any] = {}
        if self.has_thinking_switch and enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        batch = self.processor(text=[text], images=list(images) or None, return_tensors="pt", add_special_tokens=False)
        ids = batch["input_ids"][0].tolist()
        dtype = dtype or self.dtype
        device = device or self.device
        inputs: dict[str, torch.Tensor] = {}
        for key, value in batch.items():
            if key in ("input_ids", "attention_mask", "token_type_ids") or not isinstance(value, torch.Tensor):
                continue
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            if device is not None:
                value = value.to(device)
            inputs[key] = value
        return NativePrompt(
            text=text,
            ids=ids,
            inputs=inputs,
            n_images=len(images),
            image_tokens=ids.count(getattr(self.processor, "image_token_id", None)) if images else 0,
        )


def _rope_holder(model: torch.nn.Module):
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, "rope_deltas") else None


def uses_mrope(model: torch.nn.Module) -> bool:
    """The model keeps multimodal-RoPE `rope_deltas` between forward calls (GLM-4V, Qwen2-VL, ...)."""
    return _rope_holder(model) is not None


def reset_rope_state(model: torch.nn.Module) -> None:
    """Forget the previous request's rope_deltas; call before every prefill."""
    holder = _rope_holder(model)
    if holder is not None:
        holder.rope_deltas = None


def rope_delta(model: torch.nn.Module) -> int:
    """The rope delta the last (batch-1) prefill left on the model: the request's decode
    positions are `past_length + delta`. 0 for text-only prompts and non-mRoPE models."""
    holder = _rope_holder(model)
    deltas = None if holder is None else holder.rope_deltas
    return 0 if deltas is None else int(deltas.reshape(-1)[0])


def decode_position_ids(
    model: torch.nn.Module, past_lengths: list[int], deltas: list[int], device: str | torch.device | None = None
) -> torch.Tensor | None:
    """Explicit decode-step position ids (3, batch, 1) for mRoPE models: row i is at
    `past_lengths[i] + deltas[i]` on all three axes. None for other models (they need none)."""
    if not uses_mrope(model):
        return None
    positions = torch.tensor(
        [p + d for p, d in zip(past_lengths, deltas, strict=True)], dtype=torch.long, device=device
    )
    return positions.view(1, -1, 1).expand(3, -1, 1)
