"""A chat request in OpenAI's message shape, as the server receives it and the UI builds it;
and a raw prompt's token ids to continue with no chat template (the completions API).

Content is a string or a list of parts (`text`, `image_url`, `input_audio`). Assistant
messages may carry their earlier reasoning under either name clients use
(`reasoning_content` or `reasoning`). Sampling fields left unset take the session's
config defaults.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from workbench.sampling_params import SamplingOverrides, TopLogprobs


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Part):
    type: Literal["text"]
    text: str


class ImageURL(_Part):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Part):
    data: str
    """base64-encoded audio bytes"""
    format: str


class AudioPart(_Part):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    def media_kinds(self) -> set[str]:
        if not isinstance(self.content, list):
            return set()
        return {part.type for part in self.content if not isinstance(part, TextPart)}


class _Conversation(BaseModel):
    messages: list[Message] = Field(min_length=1)


class ChatRequest(SamplingOverrides, _Conversation):
    """The conversation, the sampling knobs (SamplingOverrides: None takes the session's
    default) and what else shapes the reply. Pydantic orders fields from the last base on, so
    validation looks at the messages first, then the knobs, then the rest."""

    model_config = ConfigDict(extra="forbid")

    logprobs: TopLogprobs | None = None
    """None: no logprobs; n: each generated token's logprob and its n most likely alternatives."""
    stop: list[str] = []
    enable_thinking: bool | None = None
    return_reasoning: bool | None = None
    ignore_eos: bool = False
    """Keep generating past end-of-turn (vLLM's name): benchmarks need equal token counts."""

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        return _stop_list(value)

    @classmethod
    def from_prompt(cls, prompt: str, **fields: Any) -> ChatRequest:
        return cls(messages=[Message(role="user", content=prompt)], **fields)


def _stop_list(value: Any) -> Any:
    """A stop field as a list: None is none, a string is one; empty strings are refused."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if any(isinstance(s, str) and s == "" for s in value):
        raise ValueError("stop strings must not be empty")
    return value


class _PromptIds(BaseModel):
    prompt_ids: list[int] = Field(min_length=1)


class PromptRequest(SamplingOverrides, _PromptIds):
    """A raw prompt, as token ids, that the reply continues: no chat template, no thinking split
    (the completions API). The same sampling knobs as a chat request."""

    model_config = ConfigDict(extra="forbid")

    logprobs: TopLogprobs | None = None
    """None: no logprobs; n: each generated token's logprob and its n most likely alternatives."""
    stop: list[str] = []
    ignore_eos: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        return _stop_list(value)
