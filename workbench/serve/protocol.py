"""OpenAI chat-completions and (legacy) completions shapes and vLLM's tokenizer endpoints, as
pydantic models, and their translation to the engine.

Requests are validated here so that every mistake a client can make becomes an
OpenAI-shaped 400 naming the field. Fields that do not change the reply (`user`,
`metadata`, `store`, ...) are accepted and ignored, as vLLM does, so stock clients keep
working; fields that would change its meaning and are not implemented (beam search, audio
output, legacy `functions`, ...) are refused with code `unsupported_parameter`, since
silently ignoring them hands back a reply the client did not ask for.

A structured output can be asked for four ways, all read into the engine's one
`StructuredOutput`: OpenAI's `response_format` (`json_object`, `json_schema`), vLLM's older
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` and its newer
`structured_outputs` object. Two of them in one request is a 400.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal, Self, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workbench.engine.events import FinishReason, Stats, TokenLogprob
from workbench.engine.request import ChatRequest, LogitBias, Message, PromptRequest, StructuredOutput
from workbench.engine.tools import Tool, ToolCall, ToolChoice
from workbench.errors import json_object
from workbench.sampling_params import MaxTokens, SamplingOverrides, TopLogprobs

MAX_CHOICES = 16
"""n's ceiling: the choices decode as one batch."""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatTemplateKwargs(BaseModel):
    model_config = ConfigDict(extra="allow")
    enable_thinking: bool | None = None


class ResponseFormatText(BaseModel):
    type: Literal["text"]


class ResponseFormatJSONObject(BaseModel):
    type: Literal["json_object"]


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormatJSONSchema(BaseModel):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema, Field(discriminator="type")
]


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` request field."""

    model_config = ConfigDict(extra="ignore")

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


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
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    """Choices of one prompt, decoded as one batch; with a seed, choice i draws with seed + i."""
    enable_thinking: bool | None = None
    return_reasoning: bool | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    ignore_eos: bool = False
    logit_bias: LogitBias | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    """A Lark grammar (llguidance's dialect)."""
    structured_outputs: StructuredOutputs | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> Self:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @model_validator(mode="after")
    def _one_structured_output(self) -> Self:
        self.structured()
        return self

    def structured(self) -> StructuredOutput | None:
        """The one structured output asked for, however it was spelled; ValueError for two."""
        asked: dict[str, StructuredOutput] = {}
        fmt = self.response_format
        if isinstance(fmt, ResponseFormatJSONObject):
            asked["response_format"] = StructuredOutput(json_object=True)
        elif isinstance(fmt, ResponseFormatJSONSchema):
            asked["response_format"] = StructuredOutput(json_schema=fmt.json_schema.schema_)
        if self.guided_json is not None:
            asked["guided_json"] = StructuredOutput(json_schema=_schema(self.guided_json, "guided_json"))
        if self.guided_regex is not None:
            asked["guided_regex"] = StructuredOutput(regex=self.guided_regex)
        if self.guided_choice is not None:
            asked["guided_choice"] = StructuredOutput(choice=self.guided_choice)
        if self.guided_grammar is not None:
            asked["guided_grammar"] = StructuredOutput(grammar=self.guided_grammar)
        if (so := self.structured_outputs) is not None:
            fields = {
                "json_schema": _schema(so.json_, "structured_outputs.json") if so.json_ is not None else None,
                "regex": so.regex,
                "choice": so.choice,
                "grammar": so.grammar,
                "json_object": bool(so.json_object),
            }
            asked["structured_outputs"] = StructuredOutput(**fields)
        if len(asked) > 1:
            raise ValueError(f"ask for one structured output, not several: {', '.join(asked)}")
        return next(iter(asked.values()), None)

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
            logit_bias=self.logit_bias,
            structured=self.structured(),
            tools=self.tools,
            tool_choice=self.tool_choice,
            parallel_tool_calls=self.parallel_tool_calls is not False,
        )


def _schema(value: dict[str, Any] | str, field: str) -> dict[str, Any]:
    """A schema sent as an object or as a JSON string (vLLM takes both)."""
    if isinstance(value, str):
        return json_object(value, field)
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be a JSON schema object")
    return value


def _set(value: object) -> bool:
    return value not in (None, False, [], {}, "")


UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "best_of": (
        lambda v: v not in (None, 1),
        "only one candidate is generated per choice (best_of 1); n gives several",
    ),
    "use_beam_search": (_set, "beam search is not implemented; the engine samples or decodes greedily"),
    "functions": (_set, "the legacy `functions` field is not implemented: send `tools`"),
    "function_call": (
        lambda v: v not in (None, "none"),
        "the legacy `function_call` is not implemented: send `tool_choice`",
    ),
    "modalities": (lambda v: _set(v) and v != ["text"], "only text output is supported"),
    "audio": (_set, "audio output is not supported"),
    "prediction": (_set, "predicted outputs are not supported"),
}
"""Fields that change what a reply means and are not implemented: a 400, not silence."""


COMPLETIONS_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = UNSUPPORTED | {
    "suffix": (_set, "inserting text before a suffix is not implemented; the reply only continues the prompt"),
    "response_format": (_set, "structured outputs are served on /v1/chat/completions"),
    "guided_json": (_set, "structured outputs are served on /v1/chat/completions"),
    "guided_regex": (_set, "structured outputs are served on /v1/chat/completions"),
    "guided_choice": (_set, "structured outputs are served on /v1/chat/completions"),
    "guided_grammar": (_set, "structured outputs are served on /v1/chat/completions"),
    "structured_outputs": (_set, "structured outputs are served on /v1/chat/completions"),
    "tools": (_set, "tool calls are served on /v1/chat/completions"),
}
"""The completions API refuses what chat refuses, a suffix, and what only chat serves."""


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


def tool_calls_field(calls: tuple[ToolCall, ...] | list[ToolCall], *, streamed: bool = False) -> list[dict[str, Any]]:
    """OpenAI's `tool_calls`; a streamed delta's entries carry their `index` too."""
    return [
        ({"index": c.index} if streamed else {})
        | {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


def choice_message(text: str, reasoning: str, calls: tuple[ToolCall, ...]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        message["tool_calls"] = tool_calls_field(calls)
    return message | _reasoning_fields(reasoning)


def total_stats(stats: list[Stats]) -> Stats:
    """One request's usage over its n choices: the prompt once, every choice's tokens."""
    first = stats[0]
    return dataclasses.replace(
        first,
        completion_tokens=sum(s.completion_tokens for s in stats),
        reasoning_tokens=sum(s.reasoning_tokens for s in stats),
    )


def completion(completion_id: str, model: str, choices: list[dict[str, Any]], stats: list[Stats]) -> dict[str, Any]:
    """A whole chat completion; `choices` as `choice_message` and their finish and logprobs."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(total_stats(stats)),
        **media_field(stats[0]),
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
    finish_reason: FinishReason | None = None,
    usage_stats: Stats | None = None,
    logprobs: dict[str, Any] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    body: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
    if usage_stats is not None:
        body["choices"] = []
        body["usage"] = usage(usage_stats)
        body.update(media_field(usage_stats))
    else:
        body["choices"] = [{"index": index, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": logprobs}]
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
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    """Choices per prompt (index = prompt's position * n + j); with a seed, choice j draws with seed + j."""
    logit_bias: LogitBias | None = None
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
            prompt_ids=prompt_ids,
            **knobs,
            logprobs=self.logprobs,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
            logit_bias=self.logit_bias,
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
    finish_reason: FinishReason | None = None


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


# --- response shapes, for /openapi.json (the handlers build the same JSON) -------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx body: OpenAI's error shape."""

    error: ErrorDetail


class FunctionCallOut(BaseModel):
    name: str
    arguments: str
    """A JSON object, as a string."""


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    """None when the reply is only tool calls."""
    tool_calls: list[ToolCallOut] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    """Every choice's tokens, reasoning included."""
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails


class ChatCompletion(BaseModel):
    """A whole reply (`stream: false`); with `stream: true` the body is server-sent
    `chat.completion.chunk` events instead, ending with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    media: list[dict[str, Any]] | None = None
    """What the model saw and heard, when the request had images or audio."""


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    source: str
    device: str
    vision: Literal["native", "adapter"] | None
    speech: str | None
    in_flight: int
    uptime_s: float
