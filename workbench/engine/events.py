"""What `Engine.stream` yields: deltas of answer and reasoning text, then one `Done`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from workbench.engine.tools import ToolCall


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and its most likely alternatives, as the model
    gave them (before penalties, temperature and filters, vLLM's default), for requests that
    ask for logprobs. Comes before the text deltas of that token."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token id, logprob) of the most likely tokens, best first."""


FinishReason = Literal["stop", "length", "tool_calls"]
"""OpenAI's: the reply ended by itself (or at a stop string), ran out of tokens, or called tools."""


@dataclass(frozen=True)
class Stats:
    """Token counts and timings of one reply. Times are seconds from the request's start."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    """All generated tokens, reasoning included (as OpenAI counts them)."""
    reasoning_tokens: int
    ttft_s: float
    """Time to first token: tokenising, prefill and the first sampled token."""
    decode_tokens_per_s: float
    """Tokens after the first, divided by the time they took."""
    total_s: float
    media: tuple[dict[str, Any], ...] = ()
    """One record per image seen or audio heard (a transcript, its language and timings)."""
    media_s: float = 0.0
    """Of ttft_s, the seconds spent decoding, transcribing and encoding media."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Done:
    stats: Stats


Event = TextDelta | ReasoningDelta | TokenLogprob | ToolCall | Done
"""A reply's ToolCall events come together at its end, just before Done."""


@dataclass(frozen=True)
class ChatResult:
    """A whole reply: the answer, the reasoning (empty when none or not returned), the stats."""

    text: str
    reasoning: str
    stats: Stats
    logprobs: tuple[TokenLogprob, ...] = ()
    """One per generated token when the request asked for logprobs, else empty."""
    tool_calls: tuple[ToolCall, ...] = ()

    def __str__(self) -> str:
        return self.text


class ReplyBuilder:
    """Collects a stream's events into a ChatResult; for sync and async consumers alike."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._stats: Stats | None = None
        self._logprobs: list[TokenLogprob] = []
        self._tool_calls: list[ToolCall] = []

    def add(self, event: Event) -> None:
        if isinstance(event, TextDelta):
            self._text.append(event.text)
        elif isinstance(event, ReasoningDelta):
            self._reasoning.append(event.text)
        elif isinstance(event, TokenLogprob):
            self._logprobs.append(event)
        elif isinstance(event, ToolCall):
            self._tool_calls.append(event)
        elif isinstance(event, Done):
            self._stats = event.stats

    def result(self) -> ChatResult:
        if self._stats is None:
            raise RuntimeError("the reply ended without its Done event")
        return ChatResult(
            text="".join(self._text),
            reasoning="".join(self._reasoning),
            stats=self._stats,
            logprobs=tuple(self._logprobs),
            tool_calls=tuple(self._tool_calls),
        )
