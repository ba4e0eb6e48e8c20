"""The Gradio chat, launched on a loopback port and driven through gradio_client."""

import socket

import pytest
from gradio_client import Client

from workbench.ui.app import build_app, history_to_messages


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client(embedded):
    app = build_app(embedded)
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    app.close()


@pytest.mark.embedded
def test_text_turn_streams_an_answer(client):
    messages, stats = client.predict("What is the capital of France?", False, 0.0, 48, api_name="/chat")
    assert "Paris" in messages[-1]["content"]
    assert "tok/s" in stats and "stop" in stats


@pytest.mark.embedded
def test_thinking_turn_returns_an_answer_and_no_raw_tags(client):
    messages, stats = client.predict("What is 2 + 2?", True, 0.0, 64, api_name="/chat")
    assert all("<think>" not in m["content"] for m in messages)
    assert "reasoning" in stats


@pytest.mark.embedded
def test_empty_message_is_refused_visibly_and_the_chat_keeps_working(client):
    with pytest.raises(Exception, match="Type a message first"):
        client.predict("   ", False, 0.0, 16, api_name="/chat")
    messages, _ = client.predict("Say hi.", False, 0.0, 16, api_name="/chat")
    assert messages[-1]["content"]


def test_history_drops_thought_bubbles_and_keeps_text_parts():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "thinking...", "metadata": {"title": "Thought"}},
        {"role": "assistant", "content": "hello"},
    ]
    assert history_to_messages(history) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
