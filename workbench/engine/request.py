"""A chat request in OpenAI's message shape, as the server receives it and the UI builds it.

Content is a string or a list of parts (`text`, `image_url`, `input_audio`). Assistant
messages may carry their earlier reasoning under either name clients use
(`reasoning_content` or `reasoning`). Sampling fields left unset take the session's
config defaults.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


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


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    """Drop tokens less likely than min_p times the most likely one (0 is off)."""
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    """OpenAI's: minus this times a token's count in the reply so far, from its logit."""
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    """OpenAI's: minus this from the logit of every token already in the reply."""
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    """vLLM's / transformers': logits of tokens in the prompt or reply divided (if positive) or
    multiplied (if negative) by this; 1 is off."""
    logprobs: int | None = Field(None, ge=0, le=20)
    """None: no logprobs; n: each generated token's logprob and its n most likely alternatives."""
    seed: int | None = None
    stop: list[str] = []
    enable_thinking: bool | None = None
    return_reasoning: bool | None = None
    ignore_eos: bool = False
    """Keep generating past end-of-turn (vLLM's name): benchmarks need equal token counts."""

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if any(isinstance(s, str) and s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @classmethod
    def from_prompt(cls, prompt: str, **fields) -> ChatRequest:
        return cls(messages=[Message(role="user", content=prompt)], **fields)
