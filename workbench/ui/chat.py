"""One chat turn through the engine, as Gradio chat messages: the reasoning in a collapsible
"Thought" message above the answer, both growing as tokens arrive, then a stats line.
Shared by the chat and the compare panel, so both show the same thing the same way."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import cast

import gradio as gr

from workbench.engine import Done, ReasoningDelta, Stats, TextDelta
from workbench.sampling_params import SamplingParams
from workbench.session import Session
from workbench.ui import media
from workbench.ui.models import kv_cache_bytes, megabytes, weight_bytes

THOUGHT_TITLE = "Thought"


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

    @staticmethod
    def slider_range(knob: str) -> tuple[float, float]:
        """A knob's lowest and highest values (SamplingParams'), for a slider offering all of them."""
        bounds = SamplingParams.model_fields[knob].metadata
        return next(b.ge for b in bounds if hasattr(b, "ge")), next(b.le for b in bounds if hasattr(b, "le"))

    def request(self, messages: list[dict]) -> dict:
        knobs = {f.name: getattr(self, f.name) for f in fields(self) if f.name in SamplingParams.model_fields}
        seed = None if self.seed is None or self.seed < 0 else int(self.seed)
        return knobs | {"seed": seed, "messages": messages, "enable_thinking": bool(self.thinking)}


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
            answer.content = answer.content or "(empty reply)"
        yield ([thought] if thought.content else []) + [answer], stats
