"""OpenAI chat-completions shapes, as pydantic models, and their translation to the engine.

Requests are validated here so that every mistake a client can make becomes an
OpenAI-shaped 400 naming the field. Fields that do not change the reply (`user`,
`metadata`, `store`, ...) are accepted and ignored, as vLLM does, so stock clients keep
working; fields that would change its meaning and are not implemented (tools, a JSON
response format, `logit_bias`, n > 1, ...) are refused with code `unsupported_parameter`,
since silently ignoring them hands back a reply the client did not ask for.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from workbench.engine.events import Stats, TokenLogprob
from workbench.engine.request import ChatRequest, Message
from workbench.sampling_params import MaxTokens, SamplingOverrides, TopLogprobs


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatTemplateKwargs(BaseModel):
    model_config = ConfigDict(extra="allow")
    enable_thinking: bool | None = None


class _Addressed(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1)


class ChatCompletionRequest(SamplingOverrides, _Addressed):
    """The model and messages, every sampling knob (SamplingOverrides), then the other fields.
    Pydantic orders fields from the last base on, so a body's 400 names a missing model or
    messages before a bad knob."""

    model_config = ConfigDict(extra="ignore")

    logprobs: bool | None = False
    top_logprobs: TopLogprobs | None = None
    max_completion_tokens: MaxTokens | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    enable_thinking: bool | None = None
    return_reasoning: bool | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> Self:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def to_engine(self) -> ChatRequest:
        thinking = self.enable_thinking
        if thinking is None and self.chat_template_kwargs is not None:
            thinking = self.chat_template_kwargs.enable_thinking
        knobs = {name: getattr(self, name) for name in SamplingOverrides.model_fields}
        if self.max_completion_tokens is not None:  # OpenAI's newer name wins
            knobs["max_tokens"] = self.max_completion_tokens
        return ChatRequest(
            messages=self.messages,
            **knobs,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            stop=self.stop,
            enable_thinking=thinking,
            return_reasoning=self.return_reasoning,
            ignore_eos=self.ignore_eos,
        )


def _set(value: object) -> bool:
    return value not in (None, False, [], {}, "")


UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda v: v not in (None, 1), "only n=1 is supported (one choice per request)"),
    "best_of": (lambda v: v not in (None, 1), "only one candidate is generated (best_of 1)"),
    "use_beam_search": (_set, "beam search is not implemented; the engine samples or decodes greedily"),
    "tools": (_set, "tool calling is not implemented; the model would answer in plain text"),
    "tool_choice": (lambda v: v not in (None, "none"), "tool calling is not implemented"),
    "functions": (_set, "function calling is not implemented"),
    "function_call": (lambda v: v not in (None, "none"), "function calling is not implemented"),
    "logit_bias": (_set, "logit_bias is not implemented"),
    "response_format": (
        lambda v: _set(v) and not (isinstance(v, dict) and v.get("type") == "text"),
        'only response_format {"type": "text"} is supported; JSON output is not enforced',
    ),
    "modalities": (lambda v: _set(v) and v != ["text"], "only text output is supported"),
    "audio": (_set, "audio output is not supported"),
    "prediction": (_set, "predicted outputs are not supported"),
    "guided_json": (_set, "guided decoding is not implemented"),
    "guided_regex": (_set, "guided decoding is not implemented"),
    "guided_choice": (_set, "guided decoding is not implemented"),
    "guided_grammar": (_set, "guided decoding is not implemented"),
    "structured_outputs": (_set, "structured outputs are not implemented"),
}
"""Fields that change what a reply means and are not implemented: a 400, not silence."""


def unsupported_field(data: dict[str, Any]) -> tuple[str, str] | None:
    """(field, why) for the first field of a request body this server refuses, else None."""
    for name, (used, why) in UNSUPPORTED.items():
        if name in data and used(data[name]):
            return name, f"{name} is not supported here: {why}"
    return None


def logprobs_field(entries: list[TokenLogprob], token_text: Callable[[int], str]) -> dict[str, Any]:
    """A choice's `logprobs` in OpenAI's shape: one entry per generated token."""

    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", errors="replace"))}

    return {
        "content": [one(e.token_id, e.logprob) | {"top_logprobs": [one(i, lp) for i, lp in e.top]} for e in entries]
    }


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(stats: Stats) -> dict[str, Any]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.total_tokens,
        "completion_tokens_details": {"reasoning_tokens": stats.reasoning_tokens},
    }


def _reasoning_fields(reasoning: str | None) -> dict[str, str]:
    # Both names clients read: `reasoning` (vLLM, OpenAI's guidance) and
    # `reasoning_content` (DeepSeek, SGLang and most client libraries).
    return {"reasoning_content": reasoning, "reasoning": reasoning} if reasoning else {}


def completion(
    completion_id: str, model: str, text: str, reasoning: str, stats: Stats, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, **_reasoning_fields(reasoning)},
                "finish_reason": stats.finish_reason,
                "logprobs": logprobs,
            }
        ],
        "usage": usage(stats),
        **media_field(stats),
    }


def media_field(stats: Stats) -> dict[str, Any]:
    """What the model saw and heard (transcripts, timings): an extension field, present only
    when the request had images or audio; OpenAI clients ignore fields they do not know."""
    return {"media": list(stats.media)} if stats.media else {}


def chunk(
    completion_id: str,
    model: str,
    created: int,
    *,
    delta: dict[str, Any] | None = None,
    finish_reason: Literal["stop", "length"] | None = None,
    usage_stats: Stats | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
    if usage_stats is not None:
        body["choices"] = []
        body["usage"] = usage(usage_stats)
        body.update(media_field(usage_stats))
    else:
        body["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": logprobs}]
    return body


def text_delta(text: str) -> dict[str, str]:
    return {"content": text}


def reasoning_delta(text: str) -> dict[str, str]:
    return _reasoning_fields(text)


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
