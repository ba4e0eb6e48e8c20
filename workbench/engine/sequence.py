"""One reply in progress: the per-request half of the generation loop.

The loop in engine.py owns the model, the batch and the KV cache; each `Sequence` owns
what belongs to one request: its sampler, detokenizer, stop matcher, thinking parser,
counters and clocks. A sampled token goes in, events come out, and the sequence says
when it is finished. Kept apart so that one request and eight batched requests run
through exactly the same code.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import cast

import torch
from transformers import PreTrainedTokenizerBase

from workbench.engine.detokenize import IncrementalDetokenizer
from workbench.engine.events import Done, Event, FinishReason, ReasoningDelta, Stats, TextDelta, TokenLogprob
from workbench.engine.sampling import Sampler
from workbench.engine.stops import StopMatcher
from workbench.engine.structured import Constraint, Matcher
from workbench.engine.template import Prompt
from workbench.engine.thinking import ThinkingParser
from workbench.engine.tools import ToolCallParser
from workbench.sampling_params import SamplingParams


@dataclass(frozen=True)
class Plan:
    """A validated request with every default filled in: what the loop will do."""

    prompt: Prompt
    sampling: SamplingParams
    """Each knob as the request set it, else the session's default; max_tokens fits the context."""
    stop: list[str]
    return_reasoning: bool
    ignore_eos: bool
    started: float
    logprobs: int | None = None
    """None: no logprobs; n: each token's logprob and its n most likely alternatives."""
    completion: bool = False
    """A raw prompt's continuation (the completions API), not a chat reply: `<think>` tags are
    text like any other, and the end token is listed among the logprobs, as vLLM lists it."""
    logit_bias: tuple[tuple[int, ...], tuple[float, ...]] = ((), ())
    """Token ids and what is added to their logits before sampling."""
    constraint: Constraint | None = None
    """The grammar the answer must follow, checked already."""
    tool_names: tuple[str, ...] | None = None
    """The functions offered: calls to them are read out of the answer. None reads none."""

    @property
    def max_new_tokens(self) -> int:
        return self.sampling.max_tokens


class Sequence:
    def __init__(
        self,
        plan: Plan,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: set[int],
        device: torch.device,
        matcher: Matcher | None = None,
    ):
        self.plan = plan
        self.matcher = matcher
        """The plan's constraint, walked token by token (None: a free reply)."""
        self.tools = ToolCallParser(plan.tool_names) if plan.tool_names is not None else None
        ids, values = plan.logit_bias
        self._bias = (torch.tensor(ids, device=device), torch.tensor(values, device=device)) if ids else None
        self.eos_ids = eos_ids
        # Every knob but the length, which is this sequence's to count.
        knobs = plan.sampling.model_dump(exclude={"max_tokens"})
        self.sampler = Sampler(**knobs, device=device, prompt_ids=plan.prompt.ids)
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(plan.stop)
        self.parser = ThinkingParser(start_in_reasoning=plan.prompt.starts_in_reasoning)
        self.generated = 0
        self.reasoning_tokens = 0
        self.first_token_at = 0.0
        self.last_token_at = 0.0
        self.finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def accept(self, logits: torch.Tensor, raw: torch.Tensor | None = None) -> tuple[int, list[Event]]:
        """Sample from this sequence's (1, vocab) logits (penalties applied); return the token
        and its events. `raw` are the model's own logits, for logprobs (default: `logits`)."""
        raw = logits if raw is None else raw
        if self._bias is not None:
            logits = logits.float().clone()
            logits[0, self._bias[0]] += self._bias[1]
        # The grammar holds the answer only: reasoning the template opened runs free.
        constrained = self.matcher is not None and self.parser.channel == "text"
        if constrained:
            assert self.matcher is not None
            logits = self.matcher.mask(logits)
        token = self.sampler(logits)
        self.generated += 1
        self.last_token_at = time.perf_counter()
        if self.generated == 1:
            self.first_token_at = self.last_token_at
        if token in self.eos_ids and not self.plan.ignore_eos:
            self.finish_reason = "stop"
            end: list[Event] = []
            if self.plan.logprobs is not None and self.plan.completion:
                # lm-eval drops the last listed token as the generated one, so without the end
                # token a reply that ends at once would lose the prompt's last token instead.
                end = [self._logprob(token, raw)]
            return token, end + list(self._finish())
        if constrained:
            assert self.matcher is not None
            self.matcher.take(token)
        was_reasoning = self.parser.channel == "reasoning"
        events: list[Event] = [] if self.plan.logprobs is None else [self._logprob(token, raw)]
        events += list(self._events(self._parse(self.stops.feed(self.detokenizer.add(token)))))
        if was_reasoning or self.parser.channel == "reasoning":
            self.reasoning_tokens += 1
        if self.stops.stopped or (constrained and self.matcher is not None and self.matcher.done):
            self.finish_reason = "stop"
        elif self.generated >= self.plan.max_new_tokens:
            self.finish_reason = "length"
        if self.finished:
            events.extend(self._finish())
        return token, events

    def _logprob(self, token: int, logits: torch.Tensor) -> TokenLogprob:
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        top: tuple[tuple[int, float], ...] = ()
        if self.plan.logprobs:
            values, ids = logprobs.topk(self.plan.logprobs)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        return TokenLogprob(token, float(logprobs[token]), top)

    def _finish(self) -> Iterator[Event]:
        tail = self.stops.feed(self.detokenizer.flush()) + self.stops.flush()
        if self.stops.stopped:
            self.finish_reason = "stop"
        flushed: list[tuple[str, str]] = list(self.parser.flush()) if not self.plan.completion else []
        yield from self._events(self._parse(tail) + flushed)
        if self.tools is not None:
            text, calls = self.tools.finish()
            if text:
                yield TextDelta(text)
            yield from calls
            if calls:
                self.finish_reason = "tool_calls"
        decode_s = self.last_token_at - self.first_token_at
        yield Done(
            Stats(
                finish_reason=cast(FinishReason, self.finish_reason),  # set before _finish runs
                prompt_tokens=len(self.plan.prompt.ids),
                completion_tokens=self.generated,
                reasoning_tokens=self.reasoning_tokens,
                ttft_s=self.first_token_at - self.plan.started,
                decode_tokens_per_s=(self.generated - 1) / decode_s if self.generated > 1 and decode_s > 0 else 0.0,
                total_s=time.perf_counter() - self.plan.started,
                media=self.plan.prompt.media,
                media_s=self.plan.prompt.media_s,
            )
        )

    def _parse(self, text: str) -> list[tuple[str, str]]:
        return list(self.parser.feed(text)) if not self.plan.completion else [("text", text)] if text else []

    def _events(self, parts: Iterable[tuple[str, str]]) -> Iterator[Event]:
        for channel, text in parts:
            if channel == "text":
                if self.tools is not None:
                    text = self.tools.feed(text)
                if text:
                    yield TextDelta(text)
            elif self.plan.return_reasoning:
                yield ReasoningDelta(text)
