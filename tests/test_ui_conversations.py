"""The chat page's conversation store (workbench/ui/conversations.py) and the handlers behind
its panel: kept, switched, renamed, deleted, exported as JSON and Markdown, imported back
identical, and bad files refused with the reason and nothing lost. No browser, no model:
tests/test_ui_browser.py drives the same thing in Chromium."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import gradio as gr
import pytest

from workbench.ui import conversations as conv
from workbench.ui.chat import cut_turn, user_turns
from workbench.ui.conversation_panel import Panel

CONFIG = {"model": {"source": "embedded:smollm2-135m-instruct"}, "compression": [{"step": "quantize"}]}
STATS = {
    "finish_reason": "stop",
    "prompt_tokens": 31,
    "completion_tokens": 7,
    "reasoning_tokens": 4,
    "ttft_s": 0.12,
    "decode_tokens_per_s": 15.5,
    "total_s": 0.6,
    "media": [],
    "media_s": 0.0,
}


def reply(text: str, reasoning: str = "", stats: dict | None = STATS) -> dict:
    return {
        "role": "assistant",
        "content": text,
        "reasoning": reasoning,
        "stats": stats,
        "model": {"name": "compressed (int4.yaml)", "config": CONFIG},
    }


def turn(conversation_id: str, keep: int, question: str, answer: str, system: str = "Be brief.", **kw) -> dict:
    return conv.exchange(conversation_id, keep, system, conv.user_turn(question, []), reply(answer, **kw))


def chat(*exchanges: tuple[str, str], cid: str = "c1", store: conv.Store | None = None) -> conv.Store:
    store = store or conv.new_store()
    for keep, (question, answer) in enumerate(exchanges):
        store = conv.record(store, turn(cid, keep, question, answer, reasoning="Let me think."))
    return store


def test_a_first_reply_keeps_the_chat_named_by_its_first_words_with_its_record():
    store = chat(("What is the capital of France?", "Paris."))
    (current,) = store["conversations"]
    assert conv.title_of(current) == "What is the capital of France?" and current["system"] == "Be brief."
    user, answer = current["messages"]
    assert user == {"role": "user", "content": "What is the capital of France?", "attachments": [], "files": []}
    assert answer["reasoning"] == "Let me think." and answer["stats"]["decode_tokens_per_s"] == 15.5
    assert answer["model"]["config"]["compression"] == [{"step": "quantize"}]
    assert store["active"] is None  # recording never changes which chat is shown
    long = chat(("word " * 30, "ok"))
    assert conv.title_of(long["conversations"][0]).endswith("…") and len(conv.title_of(long["conversations"][0])) == 40


def test_recording_is_idempotent_and_a_regenerate_replaces_the_last_reply():
    store = chat(("Hi", "Hello."), ("And?", "More."))
    again = conv.record(store, turn("c1", 1, "And?", "More.", reasoning="Let me think."))
    assert again["conversations"][0]["messages"] == store["conversations"][0]["messages"]
    regenerated = conv.record(store, turn("c1", 1, "And?", "Something else."))
    assert [m["content"] for m in regenerated["conversations"][0]["messages"]] == [
        "Hi",
        "Hello.",
        "And?",
        "Something else.",
    ]
    edited = conv.record(store, turn("c1", 0, "Hey", "Hey there."))
    assert [m["content"] for m in edited["conversations"][0]["messages"]] == ["Hey", "Hey there."]
    assert [m["content"] for m in conv.truncate(store, "c1", 1)["conversations"][0]["messages"]] == ["Hi", "Hello."]


def test_the_store_functions_never_change_what_they_are_given():
    store = chat(("Hi", "Hello."))
    before = copy.deepcopy(store)
    conv.record(store, turn("c1", 1, "x", "y"))
    conv.rename(store, "c1", "Greetings")
    conv.delete(store, "c1")
    conv.switch(store, "c1")
    conv.set_system(store, "c1", "Be verbose.")
    assert store == before


def test_new_switch_rename_and_delete():
    store = chat(("Hi", "Hello."), cid="a")
    store = chat(("Bye", "Goodbye."), cid="b", store=store)
    assert [cid for _, cid in conv.choices(store)] == ["b", "a"]  # newest first
    store = conv.switch(store, "a")
    assert conv.active(store)["messages"][-1]["content"] == "Hello."
    store = conv.rename(store, "a", "  Greetings \n twice ")
    assert conv.choices(store) == [("Bye", "b"), ("Greetings twice", "a")]
    assert conv.new(store)["active"] is None  # a fresh chat: nothing stored until it has a reply
    store = conv.delete(store, "a")  # the shown one, last in the list: the one above is shown
    assert store["active"] == "b" and conv.choices(store) == [("Bye", "b")]
    store = conv.delete(store, "b")
    assert store["active"] is None and conv.choices(store) == []


def test_a_reply_still_streaming_when_its_chat_is_deleted_stays_deleted():
    store = conv.delete(chat(("Hi", "Hel"), cid="a"), "a")
    assert conv.record(store, turn("a", 0, "Hi", "Hello, how can I help?"))["conversations"] == []
    # and a fresh chat deleted before its first reply was stored is not brought back either
    assert conv.record(conv.delete(conv.new_store(), "fresh"), turn("fresh", 0, "Hi", "Hello"))["conversations"] == []


@pytest.mark.parametrize(
    ("title", "message"), [("", "cannot be empty"), (" \n ", "cannot be empty"), ("x" * 201, "at most 200")]
)
def test_a_bad_name_is_refused_with_the_reason(title, message):
    with pytest.raises(ValueError, match=message):
        conv.rename(chat(("Hi", "Hello.")), "c1", title)


def test_switching_to_a_deleted_conversation_says_so():
    with pytest.raises(ValueError, match="no longer here"):
        conv.switch(conv.delete(chat(("Hi", "Hello.")), "c1"), "c1")


def test_unreadable_browser_data_becomes_a_fresh_store():
    for value in (None, "x", {}, {"version": 99, "conversations": []}, {"version": 1, "conversations": "no"}):
        assert conv.load_store(value) == conv.new_store()
    kept = conv.load_store({"version": 1, "active": "gone", "conversations": [{"id": "a", "messages": []}, 3]})
    assert kept["active"] is None and [c["id"] for c in kept["conversations"]] == ["a"]


def test_export_imports_back_identical():
    store = conv.set_system(chat(("What is 2 + 2?", "4."), ("Ünïcode? 🎉", "Yes: ✓.")), "c1", "Answer in one word.")
    exported = conv.export_json(store["conversations"][0])
    data = json.loads(exported)
    assert data["format"] == "workbench-conversation" and data["version"] == 1
    assert data["system"] == "Answer in one word." and data["messages"][1]["reasoning"] == "Let me think."
    assert data["messages"][1]["model"] == {"name": "compressed (int4.yaml)", "config": CONFIG}
    assert data["messages"][1]["stats"] == STATS and "files" not in data["messages"][0]  # server paths stay here
    imported = conv.import_json(exported)
    assert conv.export_json(imported) == exported
    both = conv.add(store, imported)  # beside itself: a fresh id, shown
    assert imported["id"] != "c1" and both["active"] == imported["id"] and len(both["conversations"]) == 2


def test_attachments_are_exported_by_name_and_shown_while_the_file_is_there(tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(b"png")
    store = conv.record(conv.new_store(), conv.exchange("c1", 0, "", conv.user_turn("", [str(image)]), reply("A cat.")))
    current = store["conversations"][0]
    assert conv.title_of(current) == "📎 cat.png"
    assert json.loads(conv.export_json(current))["messages"][0] == {
        "role": "user",
        "content": "",
        "attachments": ["cat.png"],
    }
    shown = conv.chat_messages(current, usable=lambda path: True)
    assert shown[0]["content"] == [{"path": str(image)}]
    gone = conv.chat_messages(current, usable=lambda path: False)
    assert gone[0]["content"] == ["📎 cat.png"]


def test_the_chat_shows_reasoning_folded_above_the_answer():
    shown = conv.chat_messages(chat(("Hi", ""))["conversations"][0], usable=lambda path: True)
    assert shown[1] == {
        "role": "assistant",
        "content": "Let me think.",
        "metadata": {"title": "Thought (4 tokens)", "status": "done"},
    }
    assert shown[2] == {"role": "assistant", "content": "(empty reply)"}


def test_markdown_export_reads_as_a_transcript():
    store = chat(("What is the capital of France?", "Paris."))
    store = conv.record(store, turn("c1", 1, "And Spain?", "Mad", stats=None))  # stopped part-way
    text = conv.export_markdown(store["conversations"][0])
    assert text.startswith("# What is the capital of France?\n")
    assert "## System\n\nBe brief.\n" in text and "## User\n\nWhat is the capital of France?\n" in text
    assert "## Assistant (compressed (int4.yaml))" in text
    assert "<details><summary>Thought</summary>\n\nLet me think.\n\n</details>" in text
    assert "_first token 120 ms · 15.5 tok/s · 31 prompt / 3 answer / 4 reasoning tokens · finish: stop_" in text
    assert text.rstrip().endswith("Mad\n\n_(stopped before the end)_")


GOOD = json.loads(conv.export_json(chat(("Hi", "Hello."))["conversations"][0]))


def _with(**changes) -> str:
    return json.dumps(GOOD | changes)


BAD_FILES = {
    "not JSON": (b"{'format': 1}", "notes.json is not valid JSON: Expecting property name"),
    "not UTF-8": (b"\xff\xfe{}", "notes.json is not text"),
    "a list": (b"[1, 2]", "notes.json holds a JSON list, not an object: pick a conversation exported"),
    "another format": (_with(format="chatgpt").encode(), 'no "format": "workbench-conversation" field'),
    "a newer version": (_with(version=2).encode(), r"newer workbench \(format version 2\); this page reads version 1"),
    "a missing field": (
        json.dumps({k: v for k, v in GOOD.items() if k != "created"}).encode(),
        "created: Field required",
    ),
    "a bad role": (
        _with(messages=[{"role": "wizard", "content": "x"}]).encode(),
        r"messages\[0\]: Input tag 'wizard' found using 'role' does not match",
    ),
    "a wrong type": (
        _with(messages=[{"role": "user", "content": 3}]).encode(),
        r"messages\[0\].content: Input should be a valid string",
    ),
    "an unknown field": (
        _with(messages=[{"role": "user", "content": "x", "secret": 1}]).encode(),
        r"messages\[0\].secret: Extra inputs are not permitted",
    ),
    "too big": (b" " * (conv.MAX_IMPORT_BYTES + 1), "notes.json is 2.0 MB; a conversation export is at most 2 MB"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_file_is_refused_with_the_reason(case):
    data, message = BAD_FILES[case]
    with pytest.raises(conv.ImportRefused, match=message):
        conv.import_json(data, name="notes.json")


def test_the_panel_refuses_a_bad_file_on_the_page_and_loses_nothing(tmp_path):
    panel = Panel(tmp_path / "exports")
    store = chat(("Hi", "Hello."))
    before = copy.deepcopy(store)
    bad = tmp_path / "notes.json"
    bad.write_bytes(BAD_FILES["a bad role"][0])
    with pytest.raises(gr.Error) as refused:
        panel.import_file(store, str(bad))
    assert (
        refused.value.title == "Not imported"
        and "notes.json is not a valid conversation export" in refused.value.message
    )
    assert store == before
    good = tmp_path / "good.json"
    good.write_text(conv.export_json(store["conversations"][0]), encoding="utf-8")
    saved, kept, picker, name, as_json, as_md, shown, messages, system, _ = panel.import_file(store, str(good))
    assert saved == kept and shown == kept["active"] != "c1" and name == "Hi" and system == "Be brief."
    assert [m["content"] for m in messages][-1] == "Hello." and len(picker.choices) == 2
    assert Path(as_json.value["path"]).read_text(encoding="utf-8") == good.read_text(encoding="utf-8")
    assert Path(as_md.value["path"]).read_text(encoding="utf-8").startswith("# Hi\n")


def test_the_panel_records_a_turn_once_and_then_nothing(tmp_path):
    panel = Panel(tmp_path)
    saved, store, _, name, *_, shown, pending = panel.remember(conv.new_store(), None, turn("c1", 0, "Hi", "Hello."))
    assert pending is None and shown is None and name == "" and [c["id"] for c in store["conversations"]] == ["c1"]
    assert all(out is gr.skip() or isinstance(out, type(gr.skip())) for out in panel.remember(store, "c1", None))


def test_a_regenerate_takes_the_last_turn_back_from_the_chat_and_the_store(tmp_path):
    store = chat(("Hi", "Hello."), ("And?", "More."))
    history = conv.chat_messages(store["conversations"][0], usable=lambda path: True)
    *_, before, message = Panel(tmp_path).regenerate(store, "c1", history)
    assert message == {"text": "And?", "files": []} and user_turns(before) == 1 and before[-1]["content"] == "Hello."
    kept = Panel(tmp_path).regenerate(store, "c1", history)[1]
    assert [m["content"] for m in kept["conversations"][0]["messages"]] == ["Hi", "Hello."]


def test_a_turn_split_over_several_messages_is_taken_back_whole():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "file", "file": {"path": "/tmp/cat.png"}}]},
        {"role": "user", "content": [{"type": "text", "text": "what is it?"}]},
        {"role": "assistant", "content": "thinking", "metadata": {"title": "Thought"}},
        {"role": "assistant", "content": "a cat"},
    ]
    assert user_turns(history) == 2
    assert cut_turn(history) == (history[:2], "what is it?", ["/tmp/cat.png"])
    assert cut_turn(history, index=3) == cut_turn(history)  # editing its text part
    assert cut_turn(history, index=0) == ([], "hi", [])
    with pytest.raises(ValueError, match="no message of yours"):
        cut_turn([])
