"""The sampling knobs, each declared once: its type, its bounds, its default, what it does.

Three shapes carry them and must agree on every bound: a config's `generation` section (the
session's defaults), a chat request (the engine's and the server's, where a knob left out
takes the session's default) and the plan the loop runs (every knob settled). So
`SamplingParams` declares the knobs with the session's defaults; `config.GenerationConfig`
subclasses it, and `SamplingOverrides`, the request's shape, is generated from its fields:
the same types and bounds, each also accepting None and defaulting to it. Generated rather
than written per knob as shared `Annotated` aliases because aliases still leave every model
listing every knob by name, in lists that drift apart; here a new knob is its field below and
the code that uses it (the `Sampler`), and the engine settles requests over
`SamplingParams.model_fields`.

Two bounds are also used under another name, so they are `Annotated` aliases: `MaxTokens`
(OpenAI's `max_completion_tokens` too) and `TopLogprobs` (the engine's `logprobs`, OpenAI's
`top_logprobs`; not a knob, since a reply's logprobs are asked for per request and a config
has no default for them).

Imports nothing from workbench: config.py, on the ground floor, builds on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field, create_model

MaxTokens = Annotated[int, Field(ge=1)]

TopLogprobs = Annotated[int, Field(ge=0, le=20)]
"""How many of the likeliest alternatives a reply's logprobs list for each token (OpenAI's cap)."""


class SamplingParams(BaseModel):
    """How a reply is drawn and how long it may run, with the defaults of a session whose
    config does not say otherwise."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: MaxTokens = 512
    """A request's own must leave room for the prompt within the context limit; the default is
    cut to fit."""
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    """0 means greedy decoding."""
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    """Sample from the likeliest tokens whose probabilities add up to top_p; 1 is off."""
    top_k: int = Field(50, ge=0)
    """0 disables top-k filtering."""
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    """Drop tokens less likely than min_p times the most likely one; 0 is off."""
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    """OpenAI's: minus this times a token's count in the reply so far, from its logit; 0 is off."""
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    """OpenAI's: minus this from the logit of every token already in the reply; 0 is off."""
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    """vLLM's / transformers': logits of tokens in the prompt or reply divided (if positive) or
    multiplied (if negative) by this; 1 is off. The embedded model loops on some prompts at the
    default temperature (`你是谁?`: 2 of 4 seeds ran to 512 tokens); with 1.1 none did
    (scripts/repetition_loops.py)."""
    seed: int | None = None
    """The same seed draws the same reply; None draws a fresh one each time."""


def _optional(name: str) -> tuple[object, None]:
    """`name`'s type with its bounds, or None (the default): a create_model field."""
    field = SamplingParams.model_fields[name]
    kind = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return kind | None, None  # type: ignore[operator]  # a runtime type built from the field's


if TYPE_CHECKING:

    class SamplingOverrides(BaseModel):
        """What a type checker sees of the generated model below, which it cannot follow: the knobs'
        names and types only (tests/test_sampling_params.py checks they match SamplingParams)."""

        max_tokens: int | None = None
        temperature: float | None = None
        top_p: float | None = None
        top_k: int | None = None
        min_p: float | None = None
        frequency_penalty: float | None = None
        presence_penalty: float | None = None
        repetition_penalty: float | None = None
        seed: int | None = None

else:
    SamplingOverrides = create_model(
        "SamplingOverrides",
        __doc__="Every knob of SamplingParams, bounds kept, each None unless a request sets it: "
        "None takes the session's default.",
        __module__=__name__,
        **{name: _optional(name) for name in SamplingParams.model_fields},
    )
