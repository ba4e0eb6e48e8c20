"""What the page does with the browser's conversations: the handlers behind the list, its
buttons, the system prompt and each finished reply.

The store lives in the browser (conversations.py says why), so every handler takes it as an
input and hands it back changed, with everything on the page that shows part of it: the
list, the name box, the two export files and, when the conversation changes, the chat
itself. Keeping those outputs in one place means no handler leaves the page half-updated.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder, is_in_or_equal

from workbench.engine import Stats
from workbench.paths import cache_root
from workbench.session import Session
from workbench.ui import conversations as conv
from workbench.ui.chat import cut_turn, user_turns

STORAGE_KEY = "workbench-chat-conversations"
SECRET_FILE = "ui-browser-secret"
WAITING = "_Stats for the last reply appear here._"


def browser_secret() -> str:
    """The key the browser's copy is encrypted with. Gradio's default is new at every start,
    which would make every stored conversation unreadable after a restart; this one is
    $WORKBENCH_UI_SECRET, else made once and kept beside the model cache, else (a read-only
    disk) new for this run."""
    if os.environ.get("WORKBENCH_UI_SECRET"):
        return os.environ["WORKBENCH_UI_SECRET"]
    path = cache_root() / SECRET_FILE
    try:
        if path.is_file():
            return path.read_text(encoding="ascii").strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(24)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="ascii") as f:
            f.write(secret)
        return secret
    except OSError:
        return secrets.token_urlsafe(24)


def usable(path: str) -> bool:
    """A stored attachment the page may show and send again: still there, and one Gradio took
    in as an upload (the store comes from the browser, which could name any file)."""
    return os.path.isfile(path) and is_in_or_equal(path, get_upload_folder())


def answerer(session: Session, who: str) -> dict:
    """Who answered, as a reply's record names it: the stats line's name and the config's
    model and compression sections."""
    return {"name": who, "config": session.config.model_dump(mode="json", include={"model", "compression"})}


def reply_record(answer: str, reasoning: str, stats: Stats | None, model: dict) -> dict:
    """A reply as the store and the exports keep it: the text, the reasoning, the engine's
    stats (None while it streams, or when stopped) and the model that answered."""
    return {
        "role": "assistant",
        "content": answer,
        "reasoning": reasoning,
        "stats": None if stats is None else json.loads(json.dumps(asdict(stats), default=str)),
        "model": model,
    }


class Panel:
    """The handlers. Each takes the store (this page's server-side copy: the browser's is read
    once, on load, so that two handlers never work from two stale copies) and the id of the
    conversation the chat shows, and returns `view()` or `page()` with both copies updated.
    `exports` is where the export files are written for download."""

    def __init__(self, exports: Path | None = None):
        self.exports = exports or Path(tempfile.mkdtemp(prefix="workbench-chat-exports-"))

    def _files(self, conversation: conv.Conversation | None) -> tuple[Any, Any]:
        if conversation is None or not conversation["messages"]:
            return gr.DownloadButton(value=None, interactive=False), gr.DownloadButton(value=None, interactive=False)
        texts = {"json": conv.export_json(conversation), "md": conv.export_markdown(conversation)}
        stem = re.sub(r"[^A-Za-z0-9]+", "-", conv.title_of(conversation)).strip("-")[:40] or "conversation"
        buttons = []
        for ext, text in texts.items():
            # One folder per content: two tabs exporting two chats of the same name never collide.
            folder = self.exports / hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{stem}.{ext}"
            path.write_text(text, encoding="utf-8")
            buttons.append(gr.DownloadButton(value=str(path), interactive=True))
        return buttons[0], buttons[1]

    def view(self, store: conv.Store, shown: str | None) -> tuple:
        """(browser's store, page's store, list, name, JSON export, Markdown export, shown id)."""
        store = store | {"active": shown if conv.find(store, shown) else None}  # what a reload reopens
        current = conv.find(store, shown)
        return (
            store,
            store,
            gr.Radio(choices=conv.choices(store), value=store["active"]),
            conv.title_of(current) if current else "",
            *self._files(current),
            shown,
        )

    def page(self, store: conv.Store, shown: str | None) -> tuple:
        """view() and the conversation itself in the chat: its messages, its system prompt."""
        current = conv.find(store, shown)
        return (
            *self.view(store, shown),
            conv.chat_messages(current, usable),
            current["system"] if current else gr.skip(),  # a fresh chat keeps the prompt typed
            WAITING,
        )

    # --- the handlers ---

    def show(self, saved: Any) -> tuple:
        """On load: the browser's store, its last-shown conversation in the chat."""
        store = conv.load_store(saved)
        return self.page(store, store["active"])

    def new_chat(self, store: conv.Store) -> tuple:
        return self.page(conv.new(store), None)

    def switch(self, store: conv.Store, conversation_id: str | None) -> tuple:
        try:
            return self.page(conv.switch(store, conversation_id), conversation_id)
        except ValueError as exc:
            raise gr.Error(str(exc), title="Not switched") from None

    def rename(self, store: conv.Store, shown: str | None, title: str) -> tuple:
        if conv.find(store, shown) is None:
            raise gr.Error("Send a message first: a chat is kept (and named) once it has a reply.", title="Not renamed")
        try:
            return self.view(conv.rename(store, shown, title), shown)
        except ValueError as exc:
            raise gr.Error(str(exc), title="Not renamed") from None

    def delete(self, store: conv.Store, shown: str | None) -> tuple:
        store = conv.delete(store, shown)
        return self.page(store, store["active"])

    def set_system(self, store: conv.Store, shown: str | None, system: str) -> tuple:
        return self.view(conv.set_system(store, shown, (system or "").strip()), shown)

    def import_file(self, store: conv.Store, file: str | None) -> tuple:
        """A file from the Import button; a bad one is refused with the reason, and the store,
        the list and the chat stay as they were."""
        if not file:
            raise gr.Error("No file arrived; pick a .json file exported from this page.", title="Not imported")
        path = Path(file)
        try:
            conversation = conv.import_json(path.read_bytes(), name=path.name)
        except conv.ImportRefused as exc:
            raise gr.Error(str(exc), title="Not imported", duration=None) from None
        gr.Info(f"Imported “{conv.title_of(conversation)}” ({len(conversation['messages'])} messages).")
        return self.page(conv.add(store, conversation), conversation["id"])

    def remember(self, store: conv.Store, shown: str | None, turn: dict | None) -> tuple:
        """The exchange the chat just made (finished, stopped or failed part-way) into its
        conversation; then no exchange, so that nothing is recorded twice."""
        if not turn:
            return tuple(gr.skip() for _ in range(8))
        return (*self.view(conv.record(store, turn), shown), None)

    def take_back(self, store: conv.Store, shown: str | None, history: list[dict], index: int | None = None) -> tuple:
        """The user turn holding message `index` (the last, for a regenerate) and all after it
        taken out of the chat and the store; (view, chat, that turn as the message box holds it)."""
        try:
            before, text, files = cut_turn(history, index)
        except ValueError as exc:
            raise gr.Error(str(exc), title="Nothing to send again") from None
        store = conv.truncate(store, shown, user_turns(before))
        return (*self.view(store, shown), before, {"text": text, "files": files})

    def regenerate(self, store: conv.Store, shown: str | None, history: list[dict]) -> tuple:
        return self.take_back(store, shown, history)

    def edit(self, store: conv.Store, shown: str | None, history: list[dict], edited: gr.EditData) -> tuple:
        """Edit-and-resend: the edited turn goes again with the new text (its files kept)."""
        index = edited.index[0] if isinstance(edited.index, list | tuple) else edited.index
        *view, before, message = self.take_back(store, shown, history, index)
        return (*view, before, message | {"text": _text(edited.value)})

    def undo(self, store: conv.Store, shown: str | None, history: list[dict]) -> tuple:
        """The last turn out of the chat and the store, its text back in the message box."""
        *view, before, message = self.take_back(store, shown, history)
        return (*view, before, message)


def _text(value: Any) -> str:
    """The text of an edited message, in any of the shapes Gradio hands it over."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return str(value.get("text") or value.get("content") or "")
    if isinstance(value, list):
        return "".join(_text(v) for v in value)
    return ""
