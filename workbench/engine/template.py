"""Messages to prompt token ids, with thinking switched on the way each model expects.

A template with its own `enable_thinking` switch (Qwen3, GLM-4.5 and later) gets it.
Other chat models are asked in a system instruction to reason inside `<think>…</think>`;
small models may ignore it, and then the reply simply has no reasoning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from workbench.engine.request import Message
from workbench.engine.thinking import CLOSE_TAG, OPEN_TAG
from workbench.engine.tools import Tool, call_block, fallback_instruction, response_block, template_has_tools
from workbench.errors import UnsupportedInputError

if TYPE_CHECKING:
    from workbench.engine.media import Media, MediaReader

THINK_INSTRUCTION = (
    f"Before answering, think step by step inside {OPEN_TAG} and {CLOSE_TAG} tags. "
    f"After {CLOSE_TAG}, give only the final answer."
)


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: list[int]
    thinking_via: str | None
    """'template' (the model's own switch), 'instruction' (our system prompt) or None."""
    starts_in_reasoning: bool
    """The template already opened a think block, so the reply begins inside it."""
    inputs: dict[str, Any] | None = None
    """Extra prefill inputs for a prompt with images: `inputs_embeds` (the modular adapter's
    image embeddings spliced in), or a vision-language model's own `pixel_values`, ..."""
    solo: bool = False
    """Must prefill and decode alone (a native VLM's multimodal positions do not batch)."""
    media: tuple[dict, ...] = field(default_factory=tuple)
    """What was seen and heard: one record per image or audio part (transcript, timings)."""
    media_s: float = 0.0
    """Seconds spent decoding, transcribing and encoding media before the prefill."""


def has_thinking_switch(tokenizer: PreTrainedTokenizerBase) -> bool:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default", "")
    return bool(template) and "enable_thinking" in template


def _plain_messages(
    messages: list[Message], media: MediaReader | None, native_tools: bool = False
) -> tuple[list[dict], list[list]]:
    """Chat-template messages with text content, and each message's images in order.

    Audio parts become their transcript, in place, so speech joins the dialogue as text. Tool
    calls and tool answers go to a template that knows them as they are (`native_tools`), to
    any other written out in the fallback format (tools.py)."""
    out, images = [], []
    for message in messages:
        if media is None and (kinds := message.media_kinds()):
            what = " and ".join(sorted({"image_url": "image", "input_audio": "audio"}[k] for k in kinds))
            raise UnsupportedInputError(f"the loaded model has no {what} input: send text content only")
        seen: list = []
        if isinstance(message.content, list) and media is not None:
            text = media.resolve_parts(message.content, seen)
        else:
            text = message.text()
        role = "system" if message.role == "developer" else message.role
        entry: dict[str, Any] = {"role": role, "content": text}
        reasoning = message.reasoning_content or message.reasoning
        if role == "assistant" and reasoning:
            entry["reasoning_content"] = reasoning
        if message.tool_calls:
            if native_tools:
                entry["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)},
                    }
                    for c in message.tool_calls
                ]
            else:
                blocks = "\n".join(call_block(c.function.name, c.function.arguments) for c in message.tool_calls)
                entry["content"] = f"{text}\n{blocks}".strip()
        if role == "tool":
            if native_tools:
                entry["tool_call_id"] = message.tool_call_id
            else:
                entry = {"role": "user", "content": response_block(text)}
        out.append(entry)
        images.append(seen)
    return out, images


def _arguments(arguments: str) -> Any:
    """Templates (Qwen's, Hermes') write a call's arguments as a JSON object, not a string."""
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    enable_thinking: bool,
    media: Media | None = None,
    tools: list[Tool] | None = None,
) -> Prompt:
    """`media` (the session's image and speech inputs) turns image and audio parts into model
    inputs; without it, such parts are refused. `tools` are offered to the model: through its
    template when the template takes them, else in a system message."""
    native = media is not None and media.native is not None
    if not tokenizer.chat_template and not native:
        raise UnsupportedInputError(
            "this model's tokenizer has no chat template, so it cannot hold a conversation; "
            "load an instruct/chat model or add a chat_template to its tokenizer_config.json"
        )
    reader = media.reader() if media is not None else None
    native_tools = template_has_tools(tokenizer.chat_template) and not native
    plain, images = _plain_messages(messages, reader, native_tools)
    kwargs: dict = {}
    if tools and native_tools:
        kwargs["tools"] = [t.model_dump(exclude_none=True) for t in tools]
    elif tools:
        if plain and plain[0]["role"] == "system":
            plain[0] = {**plain[0], "content": f"{plain[0]['content']}\n\n{fallback_instruction(tools)}".strip()}
        else:
            plain.insert(0, {"role": "system", "content": fallback_instruction(tools)})
            images.insert(0, [])
    thinking_via = None
    if media is not None and media.native is not None and native:
        switch = media.native.has_thinking_switch
    else:
        switch = has_thinking_switch(tokenizer)
    if switch:
        kwargs["enable_thinking"] = enable_thinking
        thinking_via = "template" if enable_thinking else None
    elif enable_thinking:
        if plain[0]["role"] == "system":
            plain[0] = {**plain[0], "content": f"{plain[0]['content']}\n\n{THINK_INSTRUCTION}".strip()}
        else:
            plain.insert(0, {"role": "system", "content": THINK_INSTRUCTION})
            images.insert(0, [])
        thinking_via = "instruction"
    inputs, solo = None, False
    if any(images) or native:  # a VLM's own processor renders all its prompts
        assert reader is not None  # images or a native processor come with the session's media
        text, ids, inputs, solo = reader.render(tokenizer, plain, images, kwargs)
    else:
        text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True, **kwargs)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return Prompt(
        text=text,
        ids=list(ids),
        thinking_via=thinking_via,
        starts_in_reasoning=text.rstrip().endswith(OPEN_TAG),
        inputs=inputs,
        solo=solo,
        media=tuple(reader.records) if reader is not None else (),
        media_s=reader.seconds if reader is not None else 0.0,
    )
