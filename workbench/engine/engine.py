"""The one generation path: everything that answers a chat goes through this loop.

The hot loop is plain and visible, in the manner of gpt-fast: a prefill forward over the
prompts, then one forward per step against a KV cache. It runs a batch of requests at
once (a single request is a batch of one): prompts are left-padded to one length, each
row gets its own positions and mask, and a row whose reply is finished or cancelled is
dropped from the batch and the cache, so the others go on at full speed. Each sampled
token flows through its request's `Sequence` (detokenizer -> stop matcher -> thinking
parser -> events). The loop is a generator that only runs while its consumer pulls, so a
consumer that stops iterating stops generation at the next token.

With `compile_decode()`, a request that decodes alone (plain dynamic cache policy) writes
its KV cache into a `StaticCache` of a fixed bucket length instead, so every decode step
has the same shapes and runs as one compiled step (on CPU a library AOTInductor built,
`packaged_step`; on CUDA a `torch.compile`d graph replayed as a CUDA graph): the Python and
dispatch work per token, which is most of the time a small model spends per token, goes away. The prefill stays eager: prompt lengths vary and it runs once
per request. The server's lone requests take this path too: when another request arrives
mid-reply (continuous batching), the filled part of the static cache moves into a dynamic
one and the batch goes on eagerly, so nobody waits for a compiled reply to end. Compiling
is logged: on CPU the 256-token step at `compile_decode()` (a minute, once per model
structure, then loaded from disk), any other length at its first request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import cast

import torch
from transformers import (
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StaticCache,
)
from transformers.cache_utils import Cache

from workbench.config import GenerationConfig
from workbench.engine.batch import Batch, can_join, to_dynamic
from workbench.engine.events import Event
from workbench.engine.media import Media
from workbench.engine.packaged_step import PackagedStep
from workbench.engine.request import ChatRequest, PromptRequest
from workbench.engine.sampling import penalize
from workbench.engine.scoring import PromptLogprobs, score_prompts
from workbench.engine.sequence import Plan, Sequence
from workbench.engine.structured import Constraint, Grammars, constraint_of
from workbench.engine.template import Prompt, render_prompt
from workbench.engine.tools import NamedToolChoice, Tool, check_choice, grammar_of
from workbench.errors import ContextLengthError, RequestError
from workbench.sampling_params import SamplingParams

log = logging.getLogger(__name__)


def _dynamic_cache(config) -> Cache:
    return DynamicCache(config=config)


@dataclass(frozen=True)
class CachePolicy:
    """How each generation's KV cache is built, and how many requests such a cache can batch.

    The kv_cache compression step makes one (workbench/compress/kvcache.py) and hands it to
    `Engine.set_cache_policy`; only a `dynamic` one may be swapped for the compiled static path."""

    name: str
    factory: Callable[[object], Cache]
    """model config -> a fresh cache for one generate()"""
    max_batch: int | None = None
    """None: no limit (plain dynamic layers drop and stack rows); 1 for caches that cannot"""


DYNAMIC = CachePolicy("dynamic", _dynamic_cache)


class Engine:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        context_limit: int = 8192,
        defaults: GenerationConfig | None = None,
        media: Media | None = None,
    ):
        self.model = model
        self.media = media
        """What the session sees and hears besides text; None refuses image and audio parts."""
        self.tokenizer = tokenizer
        self.defaults = defaults or GenerationConfig()
        model_limit = getattr(model.config, "max_position_embeddings", None) or context_limit
        self.context_limit = min(context_limit, model_limit)
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0
        self._cache_policy = DYNAMIC
        self._batch_limits: dict[str, int] = {}
        """reason -> most requests per generate(), from `limit_batch`"""
        self._compiled_step: Callable | None = None
        self._compiled_lengths: set[int] = set()
        """static cache lengths whose decode graph is compiled already"""
        self._compiled_layout: tuple = ()
        self._packaged: PackagedStep | None = None
        self._changed_since_compile = False
        self._grammars: Grammars | None = None

    @property
    def grammars(self) -> Grammars:
        """The tokenizer as the grammar engine reads it: built on the first constrained request."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_ids)
        return self._grammars

    def set_cache_policy(self, policy: CachePolicy) -> None:
        """Generate with `policy`'s caches from now on. Its batch limit replaces only the
        previous policy's: limits from `limit_batch` (a VLM's 1) stay, whatever the policy."""
        self._cache_policy = policy

    def limit_batch(self, n: int, *, reason: str) -> None:
        """At most `n` requests per generate() because of `reason` (said when a bigger batch is
        refused). Limits compose, the smallest wins; a second call with the same reason replaces it."""
        if n < 1:
            raise ValueError(f"a batch limit is at least 1 request, not {n}")
        self._batch_limits[reason] = n

    @property
    def cache_policy(self) -> CachePolicy:
        return self._cache_policy

    @property
    def max_batch(self) -> int | None:
        """Most requests one generate() may batch: the smallest of the cache policy's and every
        `limit_batch` limit; None is no limit."""
        limit = self._binding_limit()
        return limit[0] if limit else None

    def _binding_limit(self) -> tuple[int, str] | None:
        """The smallest batch limit and its reason, or None when nothing limits the batch."""
        limits = [(n, reason) for reason, n in self._batch_limits.items()]
        if self._cache_policy.max_batch is not None:
            name = self._cache_policy.name
            limits.append(
                (
                    self._cache_policy.max_batch,
                    f"its {name} KV-cache policy's cache cannot drop a finished row from a batch",
                )
            )
        return min(limits, key=lambda limit: limit[0], default=None)

    def compile_decode(self) -> None:
        """Decode single requests through a compiled step over a static KV cache.

        On CPU the 256-token step is compiled (or loaded) here; any other cache-length bucket,
        and on CUDA every one, is compiled by its first request (seconds on a GPU, a minute on a
        small CPU); later ones reuse it.

        On CPU the step is compiled ahead of time (`packaged_step`: AOTInductor, in a child
        process, stored on disk by the model's structure), so the compiler neither stays in this
        process's memory nor runs again in the next one, and no Python runs between kernels. On
        CUDA it is `torch.compile`d and replayed as a CUDA graph.

        Neither checks the model at every step (dynamo's some 6,000 module guards cost 2.4 of
        13.5 ms a token on a 2-core EPYC): the engine checks instead, once per request, that the
        model is the one it compiled (`_layout`: its modules, their hooks and mode, every
        tensor's shape and dtype); a request that finds it changed (a probe's hook, a swapped
        layer) decodes eagerly. `isolate_recompiles`: graphs of one model class are shared between
        engines by default, and without the module guards nothing would tell two models apart."""
        if self.device.type == "cpu":
            self._packaged = PackagedStep(self.model)
            self._compiled_step = self._packaged
        else:
            options: dict = {
                "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                "triton.cudagraphs": self.device.type == "cuda",  # what mode="reduce-overhead" sets
            }
            self._compiled_step = torch.compile(  # type: ignore[call-overload]  # torch's overloads omit isolate_recompiles
                self.model.forward, fullgraph=True, dynamic=False, options=options, isolate_recompiles=True
            )
        self._compiled_layout = _layout(self.model)
        native_vlm = self.media is not None and self.media.native is not None  # its prompts decode eagerly
        if self._packaged is not None and not native_vlm:
            self._prepare(min(_bucket(1), self.context_limit))

    def _prepare(self, length: int) -> None:
        """Compile (or load) the CPU step of the common cache length now, so that the first
        request, a server's included, does not wait for the compiler."""
        assert self._packaged is not None
        log.warning(
            "preparing the decode step for %d-token caches: compiled once per model structure (about "
            "a minute on a small CPU), loaded from the cache folder after",
            length,
        )
        started = time.perf_counter()
        cache = StaticCache(config=self.model.config, max_cache_len=length)
        token = torch.tensor([[self.pad_id]], device=self.device)
        self._forward(token, cache)  # the cache's tensors exist once a forward wrote them
        self._packaged.prepare(cache)
        self._compiled_lengths.add(length)
        if not self._packaged.failed(length):
            log.warning("prepared the decode step for %d-token caches in %.1f s", length, time.perf_counter() - started)

    @property
    def compiled(self) -> bool:
        return self._compiled_step is not None

    @property
    def device(self) -> torch.device:
        return cast(torch.device, self.model.get_input_embeddings().weight.device)

    def stream(self, request: ChatRequest | dict) -> Iterator[Event]:
        """Validate `request` now (raising RequestError before any work), then generate lazily."""
        return _events_of(self.generate([self.plan(request)]))

    def plan(self, request: ChatRequest | PromptRequest | dict) -> Plan:
        """What the loop will do for `request`: a chat through the model's template, or a raw
        prompt's token ids (PromptRequest) continued as they are, with no thinking split."""
        started = time.perf_counter()
        d = self.defaults
        constraint: Constraint | None = None
        tool_names: tuple[str, ...] | None = None
        if isinstance(request, PromptRequest):
            prompt = self.raw_prompt(request.prompt_ids)
            completion, return_reasoning, what = True, False, "the prompt"
        else:
            if not isinstance(request, ChatRequest):
                request = ChatRequest.model_validate(request)
            enable_thinking = d.enable_thinking if request.enable_thinking is None else request.enable_thinking
            constraint, tool_names, offered = self._constraint_and_tools(request)
            prompt = render_prompt(self.tokenizer, request.messages, enable_thinking, self.media, offered)
            completion, what = False, "the conversation"
            return_reasoning = d.return_reasoning if request.return_reasoning is None else request.return_reasoning
        bias = self._logit_bias(request.logit_bias)
        n_prompt = len(prompt.ids)
        room = self.context_limit - n_prompt
        if room < 1:
            raise ContextLengthError(
                f"the prompt has {n_prompt} tokens, which leaves no room for a reply within this "
                f"session's context limit of {self.context_limit} tokens; shorten {what}"
            )
        if request.max_tokens is not None and request.max_tokens > room:
            raise ContextLengthError(
                f"the prompt has {n_prompt} tokens and max_tokens is {request.max_tokens}: together "
                f"{n_prompt + request.max_tokens}, over this session's context limit of "
                f"{self.context_limit} tokens; lower max_tokens to at most {room} or shorten {what}"
            )
        # The session's defaults (the default length cut to fit), then every knob the request sets.
        knobs = set(SamplingParams.model_fields)
        chosen = d.model_dump(include=knobs) | {"max_tokens": min(d.max_tokens, room)}
        chosen |= request.model_dump(include=knobs, exclude_none=True)
        return Plan(
            prompt=prompt,
            sampling=SamplingParams(**chosen),
            stop=request.stop,
            return_reasoning=return_reasoning,
            ignore_eos=request.ignore_eos,
            started=started,
            logprobs=request.logprobs,
            completion=completion,
            logit_bias=bias,
            constraint=constraint,
            tool_names=tool_names,
        )

    def _constraint_and_tools(
        self, request: ChatRequest
    ) -> tuple[Constraint | None, tuple[str, ...] | None, list[Tool] | None]:
        """The grammar the answer must follow (a structured output, or tool calls that
        `tool_choice` requires), the function names to read calls of, and the tools to show."""
        tools = request.tools or []
        choice = request.tool_choice if request.tool_choice is not None else ("auto" if tools else "none")
        if choice != "none":
            check_choice(tools, choice)
        if request.structured is not None:
            if tools and choice != "none":
                raise RequestError(
                    "a structured output and tool calls cannot both shape one reply: send tool_choice "
                    "'none' with the response format, or drop the response format",
                    param="tool_choice",
                )
            constraint = constraint_of(request.structured)
            self.grammars.check(constraint, "response_format")
            return constraint, None, None
        if not tools or choice == "none":
            return None, None, None
        grammar = grammar_of(tools, choice, request.parallel_tool_calls)
        calls = Constraint(grammar, "tool_calls") if grammar is not None else None
        if calls is not None:
            self.grammars.check(calls, "tools")
        names: tuple[str, ...]
        if isinstance(choice, NamedToolChoice):
            names = (choice.function.name,)
        else:
            names = tuple(t.function.name for t in tools)
        return calls, names, tools

    def _logit_bias(self, bias: dict[int, float] | None) -> tuple[tuple[int, ...], tuple[float, ...]]:
        if not bias:
            return (), ()
        vocab = self.vocab_size
        if (bad := next((t for t in bias if not 0 <= t < vocab), None)) is not None:
            raise RequestError(
                f"logit_bias names token id {bad}, outside the vocabulary (0 to {vocab - 1})", param="logit_bias"
            )
        return tuple(bias), tuple(bias.values())

    @property
    def vocab_size(self) -> int:
        """Token ids the model takes: its embedding rows (at least the tokenizer's ids)."""
        return int(cast(torch.Tensor, self.model.get_input_embeddings().weight).shape[0])

    def raw_prompt(self, ids: list[int]) -> Prompt:
        """A prompt of token ids as given, no template; refused (RequestError) when empty, when
        an id is outside the vocabulary or when it does not fit the context limit."""
        if not ids:
            raise RequestError("the prompt is empty: send at least one token")
        vocab = self.vocab_size
        for position, token in enumerate(ids):
            if not 0 <= token < vocab:
                raise RequestError(
                    f"token id {token} at position {position} is outside the vocabulary (0 to {vocab - 1})"
                )
        if len(ids) > self.context_limit:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens, over this session's context limit of "
                f"{self.context_limit} tokens; shorten the prompt"
            )
        text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return Prompt(text=cast(str, text), ids=list(ids), thinking_via=None, starts_in_reasoning=False)

    def score(self, prompts: list[list[int]], top: int = 0) -> list[PromptLogprobs]:
        """Each prompt's own per-token logprobs (each given the tokens before it; the first has
        none) and `top` alternatives per position: one forward per batch of prompts, no reply.
        Checks every prompt first (`raw_prompt`), so a bad one refuses the lot before any work."""
        for ids in prompts:
            self.raw_prompt(ids)
        return score_prompts(self.model, prompts, top=top, pad_id=self.pad_id, device=self.device)

    def _forward(
        self, input_ids, cache, attention_mask=None, position_ids=None, forward=None, inputs=None
    ) -> torch.Tensor:
        """One forward; `inputs` are a multimodal prompt's prefill inputs (Prompt.inputs)."""
        kwargs = {"input_ids": input_ids}
        if inputs:
            kwargs = _on_device(inputs, input_ids.device, self.model.dtype)
            if "inputs_embeds" not in kwargs:
                kwargs["input_ids"] = input_ids
        # inference_mode is entered per forward, never held across a `yield`: a generator
        # suspended inside it would leak inference mode into the consumer's code.
        with torch.inference_mode():
            out = (forward or self.model)(
                **kwargs,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1, :]

    def _compiled_forward(self, input_ids, cache, attention_mask=None, position_ids=None, inputs=None) -> torch.Tensor:
        if input_ids.shape[1] > 1 or attention_mask is not None or inputs:  # the prefill
            return self._forward(input_ids, cache, attention_mask, position_ids, inputs=inputs)
        length = cache.layers[0].max_cache_len
        if length not in self._compiled_lengths:
            log.warning(
                "compiling the decode step for a %d-token static cache: this request waits for it "
                "(seconds on a GPU, minutes on a small CPU); later requests of this length reuse it",
                length,
            )
            started = time.perf_counter()
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        # a copy: the next replay of a CUDA graph reuses its output buffer
        logits = self._forward(input_ids, cache, forward=self._compiled_step).clone()
        if length not in self._compiled_lengths:
            self._compiled_lengths.add(length)
            if self._packaged is None or not self._packaged.failed(length):
                log.warning(
                    "compiled the decode step for %d-token caches in %.1f s", length, time.perf_counter() - started
                )
        return logits

    def _static_cache_for(self, plans: list[Plan]) -> Callable[[], Cache] | None:
        """A static cache for a lone request when the compiled path may take it, else None."""
        if not self.compiled or len(plans) != 1 or self.cache_policy.name != "dynamic":
            return None
        plan = plans[0]
        if plan.prompt.solo:  # a VLM's multimodal positions: eager only
            return None
        if _layout(self.model) != self._compiled_layout:
            if not self._changed_since_compile:
                log.warning(
                    "the model changed since its decode step was compiled (a hook, a replaced layer or "
                    "tensor, train mode): requests decode eagerly while it differs"
                )
            self._changed_since_compile = True
            return None
        self._changed_since_compile = False
        if self._packaged is not None:
            self._packaged.bind()
        needed = len(plan.prompt.ids) + plan.max_new_tokens
        length = min(_bucket(needed), self.context_limit)
        return lambda: StaticCache(config=self.model.config, max_cache_len=length)

    def generate(
        self,
        plans: list[Plan],
        is_cancelled: Callable[[int], bool] | None = None,
        admit: Callable[[int], list[Plan]] | None = None,
        max_rows: int | None = None,
    ) -> Generator[tuple[int, Event], None, None]:
        """Generate every plan in one batch; yields (plan index, event). A plan whose
        `is_cancelled(index)` turns true is dropped at the next step, with no more events.
        `admit(room)`, asked before each step, may return up to `room` more plans to join the
        running batch (continuous batching); they take the next indices, in order. At most
        `max_rows` requests decode at once (and at most the engine's `max_batch`)."""
        if (binding := self._binding_limit()) is not None and len(plans) > binding[0]:
            raise ValueError(f"this engine generates at most {binding[0]} request(s) at a time: {binding[1]}")
        device = self.device
        sequences: list[Sequence] = []
        static = self._static_cache_for(plans)
        dynamic = lambda: self.cache_policy.factory(self.model.config)  # noqa: E731
        batch = (
            Batch(self._compiled_forward, static, self.pad_id, device)
            if static
            else Batch(self._forward, dynamic, self.pad_id, device)
        )

        def join(new: list[Plan]) -> None:
            if self.media is not None and self.media.native is not None:
                # A VLM keeps the last prefill's multimodal position offset on the model.
                from workbench.modalities.native import reset_rope_state

                reset_rope_state(self.model)
            first = len(sequences)
            sequences.extend(
                Sequence(
                    plan,
                    self.tokenizer,
                    self.eos_ids,
                    device,
                    self.grammars.matcher(plan.constraint) if plan.constraint is not None else None,
                )
                for plan in new
            )
            indices = range(first, len(sequences))
            text = [i for i in indices if sequences[i].plan.prompt.inputs is None]
            if text:  # text prompts prefill together; a prompt with images prefills on its own
                batch.add(text, [sequences[i].plan.prompt.ids for i in text])
            for i in indices:
                if (inputs := sequences[i].plan.prompt.inputs) is not None:
                    batch.add([i], [sequences[i].plan.prompt.ids], inputs)

        join(plans)
        limit = min(n for n in (self.max_batch, max_rows, 1 << 30) if n is not None)
        while batch.rows:
            assert batch.cache is not None and batch.logits is not None  # rows are only added prefilled
            room = limit - len(batch.rows)
            if admit is not None and room > 0 and (can_join(batch.cache) or static is not None):
                new = admit(room)[:room]
                if new:
                    if not can_join(batch.cache):  # a compiled lone decode hands over to the eager batch
                        to_dynamic(batch, self._forward, dynamic)
                    join(new)
            keep, tokens = [], []
            # penalties run over the whole batch at once, each row with its own values
            logits = penalize(batch.logits, [sequences[index].sampler for index in batch.rows])
            for row, index in enumerate(batch.rows):
                if is_cancelled is not None and is_cancelled(index):
                    continue
                token, events = sequences[index].accept(logits[row : row + 1], batch.logits[row : row + 1])
                for event in events:
                    yield index, event
                if not sequences[index].finished:
                    keep.append(row)
                    tokens.append(token)
            if not keep:
                return
            batch.keep(keep)
            batch.step(tokens)


def _layout(model: torch.nn.Module) -> tuple:
    """What a compiled decode step took as fixed about `model`, in what dynamo's module guards
    would have checked at every step: each module's class, mode and hooks (the global ones too),
    each parameter's and buffer's shape, stride and dtype, and the attention implementation.
    About 1 ms for the embedded model's 400 modules, once per request."""
    hooks = torch.nn.modules.module
    modules = tuple(
        (name, type(m), m.training, tuple(m._forward_hooks), tuple(m._forward_pre_hooks))
        for name, m in model.named_modules(remove_duplicate=False)
    )
    tensors = tuple(
        (name, t.dtype, t.shape, t.stride(), t.device)
        for name, t in [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]
    )
    worldwide = (tuple(hooks._global_forward_hooks), tuple(hooks._global_forward_pre_hooks))
    attention = getattr(model.config, "_attn_implementation", None)
    return modules, tensors, worldwide, attention


def _bucket(tokens: int) -> int:
    """Cache lengths come in powers of two from 256, so a handful of graphs serve every request."""
    length = 256
    while length < tokens:
        length *= 2
    return length


def _on_device(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Prefill inputs on the model's device; floating ones (embeddings, pixels) in its dtype."""
    return {
        key: value.to(device, dtype=dtype if value.is_floating_point() else None) if torch.is_tensor(value) else value
        for key, value in inputs.items()
    }


def _events_of(batch: Generator[tuple[int, Event], None, None]) -> Iterator[Event]:
    try:
        for _, event in batch:
            yield event
    finally:
        batch.close()  # a consumer that stops here stops the loop, not just this wrapper


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids
