"""Streaming chat generation: requests in OpenAI's shape, events out, thinking split once."""

from workbench.engine.engine import CachePolicy, Engine
from workbench.engine.events import Done, Event, ReasoningDelta, Stats, TextDelta, TokenLogprob
from workbench.engine.request import ChatRequest, Message
from workbench.engine.thinking import ThinkingParser, split_thinking
from workbench.errors import (
    ContextLengthError,
    MediaInputError,
    RequestError,
    UnsupportedInputError,
)

__all__ = [
    "CachePolicy",
    "ChatRequest",
    "ContextLengthError",
    "Done",
    "Engine",
    "Event",
    "MediaInputError",
    "Message",
    "ReasoningDelta",
    "RequestError",
    "Stats",
    "TextDelta",
    "ThinkingParser",
    "TokenLogprob",
    "UnsupportedInputError",
    "split_thinking",
]
