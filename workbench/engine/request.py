"""A chat request in OpenAI's message shape, as the server receives it and the UI builds it;
and a raw prompt's token ids to continue with no chat template (the completions API).

Content is a string or a list of parts (`text`, `image_url`, `input_audio`). Assistant
messages may carry their earlier reasoning under either name clients use
(`reasoning_content` or `reasoning`). Sampling fields left unset take the session's
config defaults.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workbench.engine.tools import Tool, ToolCallItem, ToolChoice
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

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallItem] | None = None
    """An assistant turn's earlier calls."""
    tool_call_id: str | None = None
    """A tool turn: the call it answers."""
    name: str | None = None

    @model_validator(mode="after")
    def _tool_turns(self) -> Message:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

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


LogitBias = dict[int, Annotated[float, Field(ge=-100, le=100)]]
"""Token id -> a number added to its logit before sampling (OpenAI's range: -100 bans it,
100 all but forces it). JSON's string keys are read as ids."""


class StructuredOutput(BaseModel):
    """What the reply must match, exactly one of these (vLLM's `structured_outputs` names)."""

    model_config = ConfigDict(extra="forbid")

    json_schema: dict[str, Any] | None = None
    json_object: bool = False
    """Any JSON object."""
    regex: str | None = None
    choice: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    grammar: str | None = None
    """A Lark grammar, llguidance's dialect (`%json {...}` embeds a schema)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutput:
        given = [n for n in ("json_schema", "regex", "choice", "grammar") if getattr(self, n) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(
                "give exactly one of json_schema, json_object, regex, choice, grammar"
                + (f"; given: {', '.join(given)}" if given else "")
            )
        return self

    @property
    def kind(self) -> str:
        return (
            next(n for n in ("json_schema", "regex", "choice", "grammar") if getattr(self, n) is not None)
            if not self.json_object
            else "json_object"
        )


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
    logit_bias: LogitBias | None = None
    structured: StructuredOutput | None = None
    """A format the answer must match, enforced token by token (structured.py)."""
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    """None: `auto` when tools are given."""
    parallel_tool_calls: bool = True

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
    logit_bias: LogitBias | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        return _stop_list(value)
