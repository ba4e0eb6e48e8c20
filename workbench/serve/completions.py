"""POST /v1/completions: raw prompts in, the engine's work, OpenAI's `text_completion` out.

Each prompt of a request (text is tokenized here, ids go as sent) becomes one choice. Its reply
is a `PromptRequest` plan that the engine's scheduler decodes with everyone else's requests,
chat included, so the batching is the same; the prompt is continued as it is, no chat template.
An echoed prompt's logprobs come from one scoring forward over the request's prompts
(`Engine.score`), which runs on the generation thread too (`GenerationQueue.call`), never on
the event loop. `max_tokens: 0` with echo is that forward alone: how evaluation harnesses
(lm-evaluation-harness's loglikelihood) score a context and its continuation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from workbench.engine import Done, Stats, TextDelta, TokenLogprob
from workbench.engine.events import ChatResult, FinishReason, ReplyBuilder
from workbench.engine.scheduler import GenerationQueue
from workbench.engine.scoring import PromptLogprobs
from workbench.engine.sequence import Plan
from workbench.errors import RequestError
from workbench.serve import protocol
from workbench.serve.choices import choices_of
from workbench.serve.metrics import ServerMetrics
from workbench.session import Session

Finish = FinishReason | None


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


@dataclass(frozen=True)
class PreparedPrompt:
    """One choice's prompt, checked: its token ids, its text (what echo returns) and the plan of
    its reply (None with max_tokens 0)."""

    ids: list[int]
    text: str
    plan: Plan | None
    copy: int = 0
    """Which of the prompt's n choices this is (its prompt tokens are counted once, on copy 0)."""


def prepare(session: Session, req: protocol.CompletionRequest) -> list[PreparedPrompt]:
    """Every prompt of the request tokenized, checked and planned; the first bad one refuses the
    request (RequestError, ContextLengthError), naming its place in a batch, before any work."""
    prompts = req.prompts()
    prepared: list[PreparedPrompt] = []
    for index, prompt in enumerate(prompts):
        try:
            if isinstance(prompt, str):
                ids = list(session.tokenizer.encode(prompt, add_special_tokens=req.add_special_tokens))
                if not ids:
                    raise RequestError("the prompt is empty: it has no tokens")
            else:
                ids = prompt
            checked = session.engine.raw_prompt(ids)  # ids in the vocabulary, within the context limit
            text = prompt if isinstance(prompt, str) else checked.text
            plan = session.engine.plan(req.to_engine(ids)) if req.generates else None
        except RequestError as exc:
            if len(prompts) == 1:
                raise
            raise type(exc)(f"prompt {index} of the batch: {exc}") from None
        plans = choices_of(plan, req.n) if plan is not None else [None] * req.n
        prepared.extend(PreparedPrompt(ids, text, p, copy) for copy, p in enumerate(plans))
    return prepared


async def _score(
    generation: GenerationQueue, session: Session, req: protocol.CompletionRequest, prepared: list[PreparedPrompt]
) -> list[PromptLogprobs] | None:
    """The prompts' own logprobs when the reply echoes them with logprobs, else None."""
    if not (req.echo and req.logprobs is not None):
        return None
    top = req.logprobs
    return await generation.call(lambda: session.engine.score([p.ids for p in prepared], top=top))


async def _collect(generation: GenerationQueue, plan: Plan) -> ChatResult:
    reply = ReplyBuilder()
    async for event in generation.events(plan):
        reply.add(event)
    return reply.result()


def _prompt_entries(scored: PromptLogprobs) -> list[protocol.LogprobEntry]:
    return list(zip(scored.token_ids, scored.logprobs, scored.top, strict=True))


def _usage(prepared: list[PreparedPrompt], stats: list[Stats]) -> protocol.CompletionUsage:
    prompt_tokens = sum(len(p.ids) for p in prepared if p.copy == 0)
    completion_tokens = sum(s.completion_tokens for s in stats)
    return protocol.CompletionUsage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def _record(stats: list[Stats], prepared: list[PreparedPrompt]) -> Stats | None:
    """One request's line in the metrics: its choices' tokens added up; None when nothing was generated."""
    if not stats:
        return None
    return dataclasses.replace(
        stats[0],
        prompt_tokens=sum(len(p.ids) for p in prepared if p.copy == 0),
        completion_tokens=sum(s.completion_tokens for s in stats),
        reasoning_tokens=0,
    )


async def reply(
    generation: GenerationQueue,
    session: Session,
    req: protocol.CompletionRequest,
    prepared: list[PreparedPrompt],
    token_text: Callable[[int], str],
    metrics: ServerMetrics,
) -> protocol.CompletionResponse:
    """The whole reply: every choice generated (and scored) at once, then assembled."""
    metrics.started()
    try:
        async with asyncio.TaskGroup() as group:  # a failure cancels the rest
            scoring = group.create_task(_score(generation, session, req, prepared))
            results = [group.create_task(_collect(generation, p.plan)) if p.plan else None for p in prepared]
    except BaseExceptionGroup as failed:  # the first failure, as chat raises it
        metrics.finished(stream=False, stats=None, status=500, outcome="error")
        raise failed.exceptions[0] from None
    except BaseException:
        metrics.finished(stream=False, stats=None, status=500, outcome="error")
        raise
    finally:
        metrics.ended()
    scored = scoring.result()
    done = [r.result() if r else None for r in results]
    choices = []
    for index, (prompt, result) in enumerate(zip(prepared, done, strict=True)):
        text = (prompt.text if req.echo else "") + (result.text if result else "")
        logprobs = None
        if req.logprobs is not None:
            entries = _prompt_entries(scored[index]) if scored is not None else []
            entries += protocol.entries_of(list(result.logprobs)) if result else []
            logprobs, _ = protocol.completion_logprobs(entries, token_text, 0 if req.echo else len(prompt.text))
        finish = result.stats.finish_reason if result else "length"
        choices.append(protocol.CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish))
    stats = [r.stats for r in done if r]
    metrics.finished(stream=False, stats=_record(stats, prepared), outcome="" if stats else "scored")
    return protocol.CompletionResponse(
        id=protocol.new_completion_id(),
        created=int(time.time()),
        model=req.model,
        choices=choices,
        usage=_usage(prepared, stats),
    )


async def stream(
    generation: GenerationQueue,
    session: Session,
    req: protocol.CompletionRequest,
    prepared: list[PreparedPrompt],
    token_text: Callable[[int], str],
    metrics: ServerMetrics,
) -> AsyncIterator[str]:
    """Server-sent `text_completion` chunks, OpenAI's way: each carries one choice's new text
    (an echoed prompt first, whole), its tokens' logprobs, and at its end its finish reason;
    the choices of a batch interleave as their tokens come. Then `data: [DONE]`."""
    completion_id, created = protocol.new_completion_id(), int(time.time())
    offsets = [0 if req.echo else len(p.text) for p in prepared]
    waiting: list[list[TokenLogprob]] = [[] for _ in prepared]
    """Logprobs of tokens whose text has not gone out yet (the detokenizer and stop matcher
    hold text back); they ride on the choice's next chunk."""

    def frame(index: int, text: str, entries: list[protocol.LogprobEntry], finish: Finish = None) -> str:
        logprobs = None
        if req.logprobs is not None:
            logprobs, offsets[index] = protocol.completion_logprobs(entries, token_text, offsets[index])
        choice = protocol.CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)
        body = protocol.CompletionResponse(id=completion_id, created=created, model=req.model, choices=[choice])
        return _event(body.model_dump(exclude={"usage"}))

    def pending(index: int) -> list[protocol.LogprobEntry]:
        entries = protocol.entries_of(waiting[index])
        waiting[index].clear()
        return entries

    metrics.started()
    stats: list[Stats] = []
    inbox: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

    async def pump(index: int, plan: Plan) -> None:
        try:
            async for event in generation.events(plan):
                inbox.put_nowait((index, event))
        except Exception as exc:  # noqa: BLE001 - reported in-band by the stream below
            inbox.put_nowait((index, exc))

    pumps: list[asyncio.Task] = []
    try:
        if req.echo:
            scored = await _score(generation, session, req, prepared)
            for index, prompt in enumerate(prepared):
                entries = _prompt_entries(scored[index]) if scored is not None else []
                yield frame(index, prompt.text, entries, None if prompt.plan else "length")
        pumps = [asyncio.create_task(pump(i, p.plan)) for i, p in enumerate(prepared) if p.plan]
        running = len(pumps)
        while running:
            index, event = await inbox.get()
            if isinstance(event, Exception):
                raise event
            if isinstance(event, TokenLogprob):
                waiting[index].append(event)
            elif isinstance(event, TextDelta):
                yield frame(index, event.text, pending(index))
            elif isinstance(event, Done):
                stats.append(event.stats)
                running -= 1
                yield frame(index, "", pending(index), event.stats.finish_reason)
        if req.stream_options and req.stream_options.include_usage:
            usage = protocol.CompletionResponse(
                id=completion_id, created=created, model=req.model, choices=[], usage=_usage(prepared, stats)
            )
            yield _event(usage.model_dump())
        yield "data: [DONE]\n\n"
        metrics.finished(stream=True, stats=_record(stats, prepared), outcome="" if stats else "scored")
    except (asyncio.CancelledError, GeneratorExit):
        metrics.finished(stream=True, stats=None, status=499, outcome="client disconnected")
        raise
    except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band, as OpenAI does, then end the stream
        metrics.finished(stream=True, stats=None, status=500, outcome=f"error: {exc}")
        yield _event(protocol.error_body(f"generation failed: {exc}", "server_error"))
        yield "data: [DONE]\n\n"
    finally:
        for task in pumps:
            task.cancel()
        metrics.ended()
