"""OpenAI chat-completions and (legacy) completions shapes and vLLM's tokenizer endpoints, as
pydantic models, and their translation to the engine.

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
from typing import Any, Literal, Self, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workbench.engine.events import Stats, TokenLogprob
from workbench.engine.request import ChatRequest, Message, PromptRequest
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


COMPLETIONS_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = UNSUPPORTED | {
    "suffix": (_set, "inserting text before a suffix is not implemented; the reply only continues the prompt"),
}
"""The completions API refuses what chat refuses, and a suffix."""


def unsupported_field(
    data: dict[str, Any], refused: dict[str, tuple[Callable[[Any], bool], str]] = UNSUPPORTED
) -> tuple[str, str] | None:
    """(field, why) for the first field of a request body this server refuses, else None."""
    for name, (used, why) in refused.items():
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


# --- completions: the legacy text API, as vLLM serves it -------------------------------------

TokenIds = list[int]
"""A prompt already tokenized, as evaluation harnesses send it."""


class _Prompted(BaseModel):
    model: str
    prompt: str | list[str] | TokenIds | list[TokenIds]
    """One prompt (text or token ids) or a batch of them (one choice per prompt, `index` = position)."""

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        def ids(v: Any) -> bool:
            return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

        if not (
            isinstance(value, str)
            or (isinstance(value, list) and (ids(value) or all(isinstance(p, str) for p in value)))
            or (isinstance(value, list) and all(ids(p) for p in value))
        ):
            raise ValueError("must be a string, a list of strings, a list of token ids or a list of such lists")
        if value == "" or value == []:
            raise ValueError("the prompt is empty: send text, token ids, or a list of either")
        if isinstance(value, list) and any(p == "" or p == [] for p in value):
            at = next(i for i, p in enumerate(value) if p == "" or p == [])
            raise ValueError(f"prompt {at} of the batch is empty")
        return value


class CompletionRequest(SamplingOverrides, _Prompted):
    """The model and prompt(s), every sampling knob (SamplingOverrides), then the completions
    API's own fields. The reply continues the raw prompt: no chat template, no thinking split."""

    model_config = ConfigDict(extra="ignore")

    max_tokens: int | None = Field(16, ge=0)
    """OpenAI's default, 16; 0 generates nothing and, with echo, scores the prompt only (what
    lm-evaluation-harness's loglikelihood requests send); None takes the session's default."""
    echo: bool = False
    """The reply's text (and logprobs) begin with the prompt's."""
    logprobs: int | None = Field(None, ge=0, le=5)
    """Each token's logprob and the `logprobs` likeliest alternatives (OpenAI caps it at 5)."""
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    add_special_tokens: bool = True
    """Text prompts: add the tokenizer's special tokens (a BOS), as vLLM does; ids go as they are."""
    ignore_eos: bool = False

    def prompts(self) -> list[str | TokenIds]:
        """The batch: one entry per choice, text or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(token, int) for token in self.prompt):
            return [cast(TokenIds, self.prompt)]
        return list(cast(list[str] | list[TokenIds], self.prompt))

    @property
    def generates(self) -> bool:
        return self.max_tokens != 0

    def to_engine(self, prompt_ids: TokenIds) -> PromptRequest:
        knobs = {name: getattr(self, name) for name in SamplingOverrides.model_fields}
        return PromptRequest(
            prompt_ids=prompt_ids, **knobs, logprobs=self.logprobs, stop=self.stop, ignore_eos=self.ignore_eos
        )


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: parallel lists, one entry per token of the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    """None for an echoed prompt's first token: nothing comes before it."""
    top_logprobs: list[dict[str, float] | None] | None
    """Per token, its likeliest alternatives and itself, token text -> logprob (vLLM's shape)."""
    text_offset: list[int]
    """Where each token starts in the prompt followed by the reply (characters)."""


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """A whole reply, or (`stream: true`) one chunk of it: then `usage` only on the last chunk
    when `stream_options.include_usage` asks for it, with no choices."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


LogprobEntry = tuple[int, float | None, tuple[tuple[int, float], ...] | None]
"""(token id, its logprob or None, its likeliest alternatives or None): one token of a choice."""


def entries_of(generated: list[TokenLogprob]) -> list[LogprobEntry]:
    return [(e.token_id, e.logprob, e.top) for e in generated]


def completion_logprobs(
    entries: list[LogprobEntry], token_text: Callable[[int], str], start: int
) -> tuple[CompletionLogprobs, int]:
    """The legacy logprobs of these tokens, their text offsets counted from `start`; and the
    offset after the last one (where the next chunk's first token starts)."""
    tokens: list[str] = []
    offsets: list[int] = []
    tops: list[dict[str, float] | None] = []
    offset = start
    for token_id, logprob, top in entries:
        text = token_text(token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if top is None:
            tops.append(None)
        else:
            alternatives = {token_text(i): lp for i, lp in top}
            if logprob is not None:
                alternatives.setdefault(text, logprob)
            tops.append(alternatives)
    field = CompletionLogprobs(
        tokens=tokens, token_logprobs=[e[1] for e in entries], top_logprobs=tops, text_offset=offsets
    )
    return field, offset


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


# --- vLLM's tokenizer endpoints (lm-evaluation-harness's `tokenizer_backend=remote`) ----------


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    """The session's context limit in tokens."""
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """The tokenizer's configuration, in tokenizer_config.json's names (vLLM's /tokenizer_info)."""

    model_config = ConfigDict(extra="allow")

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None
    model_max_length: int
    """The session's context limit in tokens (not the tokenizer's often unbounded default)."""
