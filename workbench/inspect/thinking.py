"""A generation with thinking on, token by token: which phase each token is in, what it cost.

The timeline runs the real engine (`Engine.generate`, the path the chat UI and the server
use) and clocks every forward pass it makes with a forward hook on the model: the engine
runs one forward per generated token (the prefill gives the first), so the gap between two
hooks is that token's latency, measured, not estimated. The timeline is greedy: the hook
reads each token as the argmax of the logits the engine sampled from, which is the engine's
own choice exactly when temperature is 0. Each token's text goes through the engine's
detokenizer and thinking parser, so phases agree with `stats.reasoning_tokens`.

Small models rarely think on request (the embedded SmolLM2-135M ignores the instruction),
so `think_budget` forces both phases the way "budget forcing" does (Muennighoff et al.
2025, s1): the prompt opens the `<think>` block, the model reasons for up to the budget
(or until it closes the block itself), then `</think>` is appended and the model answers in
a second engine call. That call re-reads the whole prompt (the engine has no API to
continue a cache), and its first token's latency includes that prefill: it is shown as is.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import pandas as pd

from workbench.engine import ChatRequest
from workbench.engine.detokenize import IncrementalDetokenizer
from workbench.engine.events import Done, ReasoningDelta, Stats, TextDelta
from workbench.engine.template import Prompt
from workbench.engine.thinking import CLOSE_TAG, OPEN_TAG, ThinkingParser

COLUMNS = ["step", "call", "token_id", "text", "phase", "latency_s", "at_s"]


@dataclass
class ThinkingSummary:
    reasoning_tokens: int
    answer_tokens: int
    end_tokens: int
    """end-of-sequence tokens: generated, counted by the engine, carrying no text"""
    time_to_first_token_s: float
    time_to_first_answer_token_s: float | None
    """from the request's start to the first answer token; None when no answer came"""
    reasoning_s: float
    answer_s: float
    total_s: float


@dataclass
class ThinkingTimeline:
    tokens: pd.DataFrame
    """one row per generated token: step, call (1, or 2 for the answer after a forced
    close), token_id, text, phase (reasoning / answer / end), latency_s, at_s (since start)"""
    reasoning: str
    answer: str
    thinking_via: str
    """'template' (the model's switch), 'instruction' (a system prompt), 'budget' (forced)"""
    forced_close: bool
    """the budget ran out (or the model closed the block) and `</think>` was appended for it"""
    prompt_tokens: list[int]
    """prompt length of each engine call"""
    stats: list[Stats]
    """the engine's own stats for each call"""

    def summary(self) -> ThinkingSummary:
        t = self.tokens
        answer = t[t.phase == "answer"]
        return ThinkingSummary(
            reasoning_tokens=int((t.phase == "reasoning").sum()),
            answer_tokens=len(answer),
            end_tokens=int((t.phase == "end").sum()),
            time_to_first_token_s=float(t.at_s.iloc[0]) if len(t) else 0.0,
            time_to_first_answer_token_s=float(answer.at_s.iloc[0]) if len(answer) else None,
            reasoning_s=float(t[t.phase == "reasoning"].latency_s.sum()),
            answer_s=float(answer.latency_s.sum()),
            total_s=float(t.at_s.iloc[-1]) if len(t) else 0.0,
        )


class _ForwardClock:
    """Time and greedy token of every forward pass of `model` while installed."""

    def __init__(self, model):
        self.model = model
        self.stamps: list[float] = []
        self.tokens: list[int] = []

    def __enter__(self):
        def hook(module, args, output):
            logits = output.logits if hasattr(output, "logits") else output[0]
            self.tokens.append(int(logits[0, -1].argmax()))
            self.stamps.append(time.perf_counter())

        self._handle = self.model.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def _generate(session, plan, origin: float):
    """Run one plan through the engine; returns (token ids, stamps relative to origin, start
    relative to origin, reasoning text, answer text, stats)."""
    engine = session.engine
    plan = dataclasses.replace(plan, started=time.perf_counter())
    reasoning, answer, stats = [], [], None
    with _ForwardClock(session.model) as clock:
        for _, event in engine.generate([plan]):
            if isinstance(event, ReasoningDelta):
                reasoning.append(event.text)
            elif isinstance(event, TextDelta):
                answer.append(event.text)
            elif isinstance(event, Done):
                stats = event.stats
    if stats is None or len(clock.stamps) != stats.completion_tokens:
        raise RuntimeError(
            f"the engine ran {len(clock.stamps)} forward passes for {stats and stats.completion_tokens} tokens; "
            "the timeline needs one forward per generated token to attribute latencies"
        )
    return (
        clock.tokens,
        [s - origin for s in clock.stamps],
        plan.started - origin,
        "".join(reasoning),
        "".join(answer),
        stats,
    )


def _phases(session, ids: list[int], start_in_reasoning: bool) -> list[tuple[str, str]]:
    """(text, phase) per token, by the engine's rule: a token is reasoning when the parser is
    in the reasoning channel before or after it; the end-of-sequence token is `end`."""
    detok = IncrementalDetokenizer(session.tokenizer)
    parser = ThinkingParser(start_in_reasoning=start_in_reasoning)
    out = []
    for token in ids:
        if token in session.engine.eos_ids:
            out.append(("", "end"))
            continue
        was = parser.channel == "reasoning"
        text = detok.add(token)
        parser.feed(text)
        out.append((text, "reasoning" if was or parser.channel == "reasoning" else "answer"))
    return out


def _prompt(session, text: str) -> Prompt:
    ids = session.tokenizer(text, add_special_tokens=False)["input_ids"]
    return Prompt(text=text, ids=list(ids), thinking_via="budget", starts_in_reasoning=text.rstrip().endswith(OPEN_TAG))


def thinking_timeline(
    session,
    prompt: str | list[dict],
    *,
    max_tokens: int = 64,
    think_budget: int | None = None,
    ignore_eos: bool = False,
) -> ThinkingTimeline:
    """A greedy generation with thinking on, as a per-token timeline.

    Without `think_budget` the model thinks if it will (its template switch or the engine's
    instruction), within `max_tokens`. With `think_budget=N` both phases are forced: up to N
    reasoning tokens, then `</think>` and up to `max_tokens` answer tokens."""
    if think_budget is not None and think_budget < 1:
        raise ValueError(f"think_budget must be at least 1 token, got {think_budget}")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    engine = session.engine
    base = dict(messages=messages, temperature=0, enable_thinking=True, ignore_eos=ignore_eos)
    origin = time.perf_counter()
    rows: list[dict] = []
    stats: list[Stats] = []
    prompt_lengths: list[int] = []

    def record(call: int, plan, result) -> tuple[str, str]:
        ids, stamps, started, reasoning, answer, call_stats = result
        previous = started
        for (text, phase), token, at in zip(_phases(session, ids, plan.prompt.starts_in_reasoning), ids, stamps):
            rows.append(
                {
                    "step": len(rows),
                    "call": call,
                    "token_id": token,
                    "text": text,
                    "phase": phase,
                    "latency_s": at - previous,
                    "at_s": at,
                }
            )
            previous = at
        stats.append(call_stats)
        prompt_lengths.append(len(plan.prompt.ids))
        return reasoning, answer

    if think_budget is None:
        plan = engine.plan(ChatRequest(**base, max_tokens=max_tokens))
        reasoning, answer = record(1, plan, _generate(session, plan, origin))
        return ThinkingTimeline(
            pd.DataFrame(rows, columns=COLUMNS),
            reasoning,
            answer,
            plan.prompt.thinking_via or "none",
            False,
            prompt_lengths,
            stats,
        )

    plan = engine.plan(ChatRequest(**base, max_tokens=think_budget, stop=[CLOSE_TAG]))
    text = plan.prompt.text
    if not plan.prompt.starts_in_reasoning:
        text += f"{OPEN_TAG}\n"
    plan = dataclasses.replace(plan, prompt=_prompt(session, text))
    result = _generate(session, plan, origin)
    thought = session.tokenizer.decode(result[0], skip_special_tokens=True).split(CLOSE_TAG)[0].rstrip()
    reasoning, early_answer = record(1, plan, result)
    answer_plan = engine.plan(ChatRequest(**base, max_tokens=max_tokens))
    answer_plan = dataclasses.replace(answer_plan, prompt=_prompt(session, f"{text}{thought}\n{CLOSE_TAG}\n\n"))
    more_reasoning, answer = record(2, answer_plan, _generate(session, answer_plan, origin))
    return ThinkingTimeline(
        pd.DataFrame(rows, columns=COLUMNS),
        reasoning + more_reasoning,
        early_answer + answer,
        "budget",
        True,
        prompt_lengths,
        stats,
    )
