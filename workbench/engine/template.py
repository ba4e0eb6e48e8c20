"""Messages to prompt token ids, with thinking switched on the way each model expects.

A template with its own `enable_thinking` switch (Qwen3, GLM-4.5 and later) gets it.
Other chat models are asked in a system instruction to reason inside `<think>…</think>`;
small models may ignore it, and then the reply simply has no reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from workbench.engine.errors import UnsupportedInputError
from workbench.engine.request import Message
from workbench.engine.thinking import CLOSE_TAG, OPEN_TAG

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


def has_thinking_switch(tokenizer: PreTrainedTokenizerBase) -> bool:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default", "")
    return bool(template) and "enable_thinking" in template


def _plain_messages(messages: list[Message]) -> list[dict]:
    out = []
    for message in messages:
        kinds = message.media_kinds()
        if kinds:
            what = " and ".join(sorted({"image_url": "image", "input_audio": "audio"}[k] for k in kinds))
            raise UnsupportedInputError(
                f"the loaded model has no {what} input: send text content only "
                "(image and speech input arrive with the multimodal adapters)"
            )
        role = "system" if message.role == "developer" else message.role
        entry = {"role": role, "content": message.text()}
        reasoning = message.reasoning_content or message.reasoning
        if role == "assistant" and reasoning:
            entry["reasoning_content"] = reasoning
        out.append(entry)
    return out


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message], enable_thinking: bool) -> Prompt:
    if not tokenizer.chat_template:
        raise UnsupportedInputError(
            "this model's tokenizer has no chat template, so it cannot hold a conversation; "
            "load an instruct/chat model or add a chat_template to its tokenizer_config.json"
        )
    plain = _plain_messages(messages)
    kwargs: dict = {}
    thinking_via = None
    if has_thinking_switch(tokenizer):
        kwargs["enable_thinking"] = enable_thinking
        thinking_via = "template" if enable_thinking else None
    elif enable_thinking:
        if plain[0]["role"] == "system":
            plain[0] = {**plain[0], "content": f"{plain[0]['content']}\n\n{THINK_INSTRUCTION}".strip()}
        else:
            plain.insert(0, {"role": "system", "content": THINK_INSTRUCTION})
        thinking_via = "instruction"
    text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True, **kwargs)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return Prompt(
        text=text,
        ids=list(ids),
        thinking_via=thinking_via,
        starts_in_reasoning=text.rstrip().endswith(OPEN_TAG),
    )
