"""The Gradio chat on the one engine: a streaming answer, with the reasoning in a
collapsible "Thought" message above it when thinking is on. (The full multimodal page
with compression and compare panels builds on this.)"""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr

from workbench.engine import Done, ReasoningDelta, RequestError, TextDelta
from workbench.session import Session

THOUGHT_TITLE = "Thought"


def history_to_messages(history: list[dict]) -> list[dict]:
    """Gradio's chat history to OpenAI-style messages, leaving out the thought bubbles."""
    messages = []
    for item in history:
        if (item.get("metadata") or {}).get("title"):
            continue
        content = item.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if isinstance(content, str) and content:
            messages.append({"role": item["role"], "content": content})
    return messages


def stats_line(stats) -> str:
    return (
        f"{stats.prompt_tokens} prompt · {stats.completion_tokens} reply tokens"
        f" ({stats.reasoning_tokens} reasoning) · first token {stats.ttft_s * 1000:.0f} ms"
        f" · {stats.decode_tokens_per_s:.1f} tok/s · {stats.finish_reason}"
    )


def reply(session: Session, message: str, history: list[dict], thinking: bool, temperature: float, max_tokens: int) -> Iterator:
    if not message or not message.strip():
        raise gr.Error("Type a message first.")
    messages = [*history_to_messages(history), {"role": "user", "content": message}]
    try:
        events = session.engine.stream(
            {"messages": messages, "enable_thinking": thinking, "temperature": temperature, "max_tokens": int(max_tokens)}
        )
    except RequestError as exc:
        raise gr.Error(str(exc)) from None
    thought = gr.ChatMessage(role="assistant", content="", metadata={"title": THOUGHT_TITLE, "status": "pending"})
    answer = gr.ChatMessage(role="assistant", content="")
    for event in events:
        if isinstance(event, ReasoningDelta):
            thought.content += event.text
        elif isinstance(event, TextDelta):
            answer.content += event.text
        elif isinstance(event, Done):
            s = event.stats
            thought.metadata = {"title": f"{THOUGHT_TITLE} ({s.reasoning_tokens} tokens)", "status": "done", "duration": s.total_s}
            answer.metadata = {}
            answer.content = answer.content or "(empty reply)"
            answer.options = []
        yield ([thought] if thought.content else []) + [answer], stats_line(event.stats) if isinstance(event, Done) else ""


def build_app(session: Session) -> gr.Blocks:
    info = session.loaded
    with gr.Blocks(title="workbench chat") as app:
        gr.Markdown(
            f"## workbench chat\n`{info.source}` · {info.weight_bytes / 1e9:.2f} GB weights · "
            f"device {info.device} · context {session.engine.context_limit} tokens"
        )
        stats = gr.Markdown(elem_id="stats", render=False)

        # A generator function (not a lambda returning one): Gradio streams only those.
        def respond(message, history, thinking, temperature, max_tokens):
            yield from reply(session, message, history, thinking, temperature, max_tokens)

        gr.ChatInterface(
            fn=respond,
            additional_inputs=[
                gr.Checkbox(value=session.config.generation.enable_thinking, label="Thinking", render=False),
                gr.Slider(0.0, 2.0, value=session.config.generation.temperature, step=0.05, label="Temperature", render=False),
                gr.Slider(1, 2048, value=min(session.config.generation.max_tokens, 2048), step=1, label="Max tokens", render=False),
            ],
            additional_inputs_accordion=gr.Accordion("Generation settings", open=False, render=False),
            additional_outputs=[stats],
            examples=[["What is the capital of France?"], ["Give me three tips for saving phone battery."]],
            api_name="chat",
        )
        stats.render()
    return app
