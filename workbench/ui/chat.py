"""One chat turn through the engine, as Gradio chat messages: the reasoning in a collapsible
"Thought" message above the answer, both growing as tokens arrive, then a stats line.
Shared by the chat and the compare panel, so both show the same thing the same way."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import TypeVar, cast

import gradio as gr

from workbench.engine import Done, ReasoningDelta, Stats, TextDelta
from workbench.errors import json_object
from workbench.sampling_params import SamplingParams
from workbench.session import Session
from workbench.ui import media
from workbench.ui.models import kv_cache_bytes, megabytes, weight_bytes

THOUGHT_TITLE = "Thought"
EMPTY_REPLY = "(empty reply)"
STREAM_EVERY_S = 0.1
"""How often a streaming reply is redrawn. Each redraw costs Gradio a diff, a JSON message and
the browser a render, on the cores the model decodes on: at every token it took a sixth off
int4's speed on a 2-core machine; ten a second reads as smoothly."""

T = TypeVar("T")


@dataclass
class Settings:
    """The generation panel's controls. Those named for a SamplingParams knob go into the
    request under that name, where validation holds them to the knob's bounds."""

    thinking: bool
    temperature: float
    top_p: float
    max_tokens: int
    seed: float | None
    """negative or None: a fresh random seed each reply"""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    structured: dict | None = None
    """what the answer must match, as the engine's StructuredOutput reads it (structured_output())"""

    @staticmethod
    def slider_range(knob: str) -> tuple[float, float]:
        """A knob's lowest and highest values (SamplingParams'), for a slider offering all of them."""
        bounds = SamplingParams.model_fields[knob].metadata
        return next(b.ge for b in bounds if hasattr(b, "ge")), next(b.le for b in bounds if hasattr(b, "le"))

    def request(self, messages: list[dict]) -> dict:
        knobs = {f.name: getattr(self, f.name) for f in fields(self) if f.name in SamplingParams.model_fields}
        seed = None if self.seed is None or self.seed < 0 else int(self.seed)
        asked = {"seed": seed, "messages": messages, "enable_thinking": bool(self.thinking)}
        return knobs | asked | ({"structured": self.structured} if self.structured else {})


def structured_output(on: bool, schema: str | None) -> dict | None:
    """The page's structured-output switch and schema box as the engine's format: off is None,
    an empty box is any JSON object, else the box must hold a JSON schema (an object). A box
    that is not JSON is refused here, naming where it broke; a schema that is JSON but cannot
    be enforced is refused by the engine, before any decoding."""
    if not on:
        return None
    text = (schema or "").strip()
    if not text:
        return {"json_object": True}
    parsed = json_object(text, "the schema")
    return {"json_schema": parsed}


def _pieces(content) -> tuple[str, list[str]]:
    """(text, file paths) of a chat message's content in any of Gradio's shapes."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if isinstance(content, dict):
        content = [content]
    text, files = [], []
    for part in content:
        if isinstance(part, str):
            text.append(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            text.append(part.get("text", ""))
        elif isinstance(part, dict):
            file = part.get("file", part)
            if isinstance(file, dict) and file.get("path"):
                files.append(file["path"])
    return "".join(text), files


def history_to_messages(history: list[dict]) -> list[dict]:
    """Gradio's chat history to OpenAI-style messages: thought bubbles left out (the model
    does not see its old reasoning), a user turn's files turned back into content parts."""
    turns: list[tuple[str, str, list[str]]] = []  # (role, text, files)
    for item in history:
        if (item.get("metadata") or {}).get("title"):
            continue
        role = item["role"]
        text, files = _pieces(item.get("content"))
        if turns and turns[-1][0] == role == "user":  # Gradio may split a turn's files off
            _, prev_text, prev_files = turns.pop()
            text, files = prev_text + text, prev_files + files
        if text or files:
            turns.append((role, text, files))
    return [
        {"role": role, "content": media.content(text, files) if role == "user" else text} for role, text, files in turns
    ]


def _turn_starts(history: list[dict]) -> list[int]:
    """Where each user turn begins (Gradio may show one turn as several user messages)."""
    return [
        i for i, item in enumerate(history) if item["role"] == "user" and (i == 0 or history[i - 1]["role"] != "user")
    ]


def user_turns(history: list[dict]) -> int:
    return len(_turn_starts(history))


def cut_turn(history: list[dict], index: int | None = None) -> tuple[list[dict], str, list[str]]:
    """(the history before the user turn holding message `index`, that turn's text, its files):
    what regenerating (the last turn, `index` None) or editing a turn sends again."""
    starts = [s for s in _turn_starts(history) if index is None or s <= index]
    if not starts:
        raise ValueError("there is no message of yours to send again")
    start = starts[-1]
    end = start
    while end < len(history) and history[end]["role"] == "user":
        end += 1
    text, files = "", list[str]()
    for item in history[start:end]:
        part_text, part_files = _pieces(item.get("content"))
        text, files = text + part_text, files + part_files
    return history[:start], text, files


def user_message(text: str, files: list[str]) -> dict:
    """The user's turn as the chat shows it: attachments first, then the text."""
    return {"role": "user", "content": [*({"path": f} for f in files), *([text] if text else [])]}


def stats_markdown(stats: Stats, session: Session, who: str) -> str:
    # The cache ends holding the prompt and every reply token but the last (never fed back).
    kv, policy = kv_cache_bytes(session, stats.prompt_tokens + max(stats.completion_tokens - 1, 0))
    answer = stats.completion_tokens - stats.reasoning_tokens
    return (
        f"**{who}** · first token **{stats.ttft_s * 1000:.0f} ms** · **{stats.decode_tokens_per_s:.1f} tok/s**"
        f" · {stats.prompt_tokens} prompt / {answer} answer / {stats.reasoning_tokens} reasoning tokens"
        f" · KV cache {kv / 1e6:.2f} MB ({policy}) · weights {megabytes(weight_bytes(session))}"
        f" · finish: {stats.finish_reason}"
        f"{media_markdown(stats)}"
    )


def media_markdown(stats: Stats) -> str:
    """What the model heard (the transcript it answered) and saw, on its own lines."""
    lines = []
    for record in stats.media:
        if record["kind"] == "audio":
            lines.append(
                f"🎤 heard ({record['model']}, {record['language']}, {record['audio_s']:.1f} s of audio in "
                f"{record['transcribe_s']:.2f} s): “{record['transcript'].strip()}”"
            )
        elif record["kind"] == "image":
            lines.append(f"🖼️ saw a {record['width']}×{record['height']} image through the {record['path']} vision path")
    if lines:
        lines.append(f"media took {stats.media_s:.2f} s of the first-token time")
    return "".join(f"\n\n{line}" for line in lines)


def stream_messages(events: Iterator, started: float) -> Iterator[tuple[list[gr.ChatMessage], Stats | None]]:
    """The engine's events as the growing [thought?, answer] messages; Stats with the last."""
    thought = gr.ChatMessage(role="assistant", content="", metadata={"title": f"{THOUGHT_TITLE}…", "status": "pending"})
    answer = gr.ChatMessage(role="assistant", content="")
    thought_s = 0.0
    for event in events:
        stats = None
        if isinstance(event, ReasoningDelta):
            thought.content = cast(str, thought.content) + event.text
            thought_s = time.perf_counter() - started
        elif isinstance(event, TextDelta):
            answer.content = cast(str, answer.content) + event.text
        elif isinstance(event, Done):
            stats = event.stats
            thought.metadata = {
                "title": f"{THOUGHT_TITLE} ({stats.reasoning_tokens} tokens)",
                "status": "done",
                "duration": round(thought_s, 2),
            }
            answer.content = answer.content or EMPTY_REPLY
        yield ([thought] if thought.content else []) + [answer], stats


def throttled(
    updates: Iterator[tuple[T, Stats | None]], every_s: float | None = None
) -> Iterator[tuple[T, Stats | None]]:
    """`updates` (snapshots of a growing reply, Stats with the last) at most one per `every_s`
    seconds (STREAM_EVERY_S), and always the last: a snapshot passed over is contained in the next."""
    every_s = STREAM_EVERY_S if every_s is None else every_s
    shown_at = float("-inf")
    held = None
    for update in updates:
        now = time.perf_counter()
        if update[1] is not None or now - shown_at >= every_s:
            held = None
            shown_at = now
            yield update
        else:
            held = update
    if held is not None:
        yield held
