"""The one generation path: everything that answers a chat calls `Engine.stream`.

The hot loop is plain and visible, in the manner of gpt-fast: a prefill forward over the
prompt, then one forward per token against a KV cache, each token flowing through
detokenizer -> stop matcher -> thinking parser -> events. Because the loop is a
generator that only runs while its consumer pulls, a consumer that stops iterating (a
closed UI tab, a disconnected HTTP client) stops generation at the next token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from workbench.config import GenerationConfig
from workbench.engine.detokenize import IncrementalDetokenizer
from workbench.engine.errors import ContextLengthError
from workbench.engine.events import Done, Event, ReasoningDelta, Stats, TextDelta
from workbench.engine.request import ChatRequest
from workbench.engine.sampling import Sampler
from workbench.engine.stops import StopMatcher
from workbench.engine.template import Prompt, render_prompt
from workbench.engine.thinking import ThinkingParser


@dataclass(frozen=True)
class _Plan:
    """A validated request with every default filled in: what the loop will do."""

    prompt: Prompt
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    return_reasoning: bool
    ignore_eos: bool
    started: float


class Engine:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        context_limit: int = 8192,
        defaults: GenerationConfig | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.defaults = defaults or GenerationConfig()
        model_limit = getattr(model.config, "max_position_embeddings", None) or context_limit
        self.context_limit = min(context_limit, model_limit)
        self.eos_ids = _eos_ids(model, tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def stream(self, request: ChatRequest | dict) -> Iterator[Event]:
        """Validate `request` now (raising RequestError before any work), then generate lazily."""
        return self._generate(self.plan(request))

    def plan(self, request: ChatRequest | dict) -> _Plan:
        started = time.perf_counter()
        if not isinstance(request, ChatRequest):
            request = ChatRequest.model_validate(request)
        d = self.defaults
        enable_thinking = d.enable_thinking if request.enable_thinking is None else request.enable_thinking
        prompt = render_prompt(self.tokenizer, request.messages, enable_thinking)
        n_prompt = len(prompt.ids)
        room = self.context_limit - n_prompt
        if room < 1:
            raise ContextLengthError(
                f"the prompt has {n_prompt} tokens, which leaves no room for a reply within this "
                f"session's context limit of {self.context_limit} tokens; shorten the conversation"
            )
        if request.max_tokens is not None and request.max_tokens > room:
            raise ContextLengthError(
                f"the prompt has {n_prompt} tokens and max_tokens is {request.max_tokens}: together "
                f"{n_prompt + request.max_tokens}, over this session's context limit of "
                f"{self.context_limit} tokens; lower max_tokens to at most {room} or shorten the conversation"
            )
        return _Plan(
            prompt=prompt,
            max_new_tokens=request.max_tokens if request.max_tokens is not None else min(d.max_tokens, room),
            temperature=d.temperature if request.temperature is None else request.temperature,
            top_p=d.top_p if request.top_p is None else request.top_p,
            top_k=d.top_k if request.top_k is None else request.top_k,
            seed=d.seed if request.seed is None else request.seed,
            stop=request.stop,
            return_reasoning=d.return_reasoning if request.return_reasoning is None else request.return_reasoning,
            ignore_eos=request.ignore_eos,
            started=started,
        )

    def _forward(self, input_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        # inference_mode is entered per forward, never held across a `yield`: a generator
        # suspended inside it would leak inference mode into the consumer's code.
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _generate(self, plan: _Plan) -> Iterator[Event]:
        device = self.device
        prompt_ids = torch.tensor([plan.prompt.ids], device=device)
        sampler = Sampler(temperature=plan.temperature, top_p=plan.top_p, top_k=plan.top_k, seed=plan.seed, device=device)
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        stops = StopMatcher(plan.stop)
        parser = ThinkingParser(start_in_reasoning=plan.prompt.starts_in_reasoning)
        cache = DynamicCache(config=self.model.config)

        logits = self._forward(prompt_ids, cache)
        generated = reasoning_tokens = 0
        first_token_at = last_token_at = 0.0
        finish_reason = "length"
        while generated < plan.max_new_tokens:
            token = sampler(logits, prompt_ids)
            generated += 1
            last_token_at = time.perf_counter()
            if generated == 1:
                first_token_at = last_token_at
            if token in self.eos_ids and not plan.ignore_eos:
                finish_reason = "stop"
                break
            was_reasoning = parser.channel == "reasoning"
            parts = parser.feed(stops.feed(detokenizer.add(token)))
            if was_reasoning or parser.channel == "reasoning":
                reasoning_tokens += 1
            yield from _events(parts, plan.return_reasoning)
            if stops.stopped:
                finish_reason = "stop"
                break
            if generated < plan.max_new_tokens:
                logits = self._forward(torch.tensor([[token]], device=device), cache)

        tail = stops.feed(detokenizer.flush()) + stops.flush()
        if stops.stopped:
            finish_reason = "stop"
        yield from _events(parser.feed(tail) + parser.flush(), plan.return_reasoning)
        decode_s = last_token_at - first_token_at
        yield Done(
            Stats(
                finish_reason=finish_reason,
                prompt_tokens=len(plan.prompt.ids),
                completion_tokens=generated,
                reasoning_tokens=reasoning_tokens,
                ttft_s=first_token_at - plan.started,
                decode_tokens_per_s=(generated - 1) / decode_s if generated > 1 and decode_s > 0 else 0.0,
                total_s=time.perf_counter() - plan.started,
            )
        )


def _events(parts: list[tuple[str, str]], return_reasoning: bool) -> Iterator[Event]:
    for channel, text in parts:
        if channel == "text":
            yield TextDelta(text)
        elif return_reasoning:
            yield ReasoningDelta(text)


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids
