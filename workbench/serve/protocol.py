"""OpenAI chat-completions shapes, as pydantic models, and their translation to the engine.

Requests are validated here so that every mistake a client can make becomes an
OpenAI-shaped 400 naming the field. Fields OpenAI clients send that the workbench does
not act on (`user`, `presence_penalty`, `logprobs`, ...) are accepted and ignored, as vLLM
does, so stock clients keep working.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from workbench.engine.events import Stats
from workbench.engine.request import ChatRequest, Message


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatTemplateKwargs(BaseModel):
    model_config = ConfigDict(extra="allow")
    enable_thinking: bool | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    enable_thinking: bool | None = None
    return_reasoning: bool | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    ignore_eos: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported (one choice per request), got n={n}")
        return n

    def to_engine(self) -> ChatRequest:
        thinking = self.enable_thinking
        if thinking is None and self.chat_template_kwargs is not None:
            thinking = self.chat_template_kwargs.enable_thinking
        return ChatRequest(
            messages=self.messages,
            max_tokens=self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stop,
            enable_thinking=thinking,
            return_reasoning=self.return_reasoning,
            ignore_eos=self.ignore_eos,
        )


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


def completion(completion_id: str, model: str, text: str, reasoning: str, stats: Stats) -> dict[str, Any]:
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
                "logprobs": None,
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
) -> dict[str, Any]:
    body: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
    if usage_stats is not None:
        body["choices"] = []
        body["usage"] = usage(usage_stats)
        body.update(media_field(usage_stats))
    else:
        body["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}]
    return body


def text_delta(text: str) -> dict[str, str]:
    return {"content": text}


def reasoning_delta(text: str) -> dict[str, str]:
    return _reasoning_fields(text)


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
