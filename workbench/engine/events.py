"""What `Engine.stream` yields: deltas of answer and reasoning text, then one `Done`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class Stats:
    """Token counts and timings of one reply. Times are seconds from the request's start."""

    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    """All generated tokens, reasoning included (as OpenAI counts them)."""
    reasoning_tokens: int
    ttft_s: float
    """Time to first token: tokenising, prefill and the first sampled token."""
    decode_tokens_per_s: float
    """Tokens after the first, divided by the time they took."""
    total_s: float

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Done:
    stats: Stats


Event = TextDelta | ReasoningDelta | Done
