"""The chat page's conversations: kept in the user's browser, exported and imported as files.

The page serves anyone who opens it and keeps nothing about them: each browser holds its own
conversations (gr.BrowserState, in localStorage), so a reload or a server restart loses
nothing and two people never see each other's chats. Everything here is a pure function of
that store (a JSON-able dict), so the page's handlers stay thin and the tests need no
browser.

An export is one conversation as a person would want to keep it: each reply with its
reasoning, its stats and the config (model and compression steps) that produced it, so a
chat with an int4 model can be told from one with the original a month later. Attachments are
named, not embedded (they are the user's files; a server path means nothing elsewhere).
Importing reads that same file back, checked field by field; a file that does not pass is
refused whole, naming what is wrong, and the store stays as it was.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workbench.errors import json_object
from workbench.ui.chat import EMPTY_REPLY, THOUGHT_TITLE

FORMAT = "workbench-conversation"
VERSION = 1
STORE_VERSION = 1
MAX_IMPORT_BYTES = 2_000_000
"""An export this large is thousands of turns; the browser's localStorage holds ~5 MB in all."""
TITLE_CHARS = 40
"""an untitled chat is listed by this much of its first message"""
MAX_TITLE = 200
UNTITLED = "New chat"

Store = dict[str, Any]
Conversation = dict[str, Any]


class ImportRefused(ValueError):
    """A file that is not a conversation export this page reads; the message says why."""


# --- the export format, as a schema: what import checks ---------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UserTurn(_Strict):
    role: Literal["user"]
    content: str
    attachments: list[str] = []
    """file names of the images and recordings sent with the turn"""


class Answerer(_Strict):
    name: str
    """as the stats line names it: 'original', 'compressed (int4.yaml)'"""
    config: dict[str, Any]
    """the config's model and compression sections"""


class Reply(_Strict):
    role: Literal["assistant"]
    content: str
    reasoning: str = ""
    stats: dict[str, Any] | None = None
    """the engine's Stats; None when the reply was stopped before it finished"""
    model: Answerer | None = None


class ConversationFile(_Strict):
    format: Literal["workbench-conversation"]
    version: Literal[1]
    title: str
    created: str
    updated: str
    system: str = ""
    messages: list[Annotated[UserTurn | Reply, Field(discriminator="role")]]


# --- the store --------------------------------------------------------------------------
#
# {"version": 1, "active": id or None, "conversations": [newest first], "deleted": [ids]}
# "active" is the conversation the chat shows (None: a fresh chat, stored with its first
# reply); "deleted" keeps a reply that was still streaming when its chat was deleted from
# bringing it back.

DELETED_KEPT = 100


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def new_store() -> Store:
    return {"version": STORE_VERSION, "active": None, "conversations": [], "deleted": []}


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def load_store(value: Any) -> Store:
    """A copy of the store as the browser sent it (callers change the copy); anything
    unreadable (another app's, an older page's) starts afresh rather than breaking the page."""
    if not isinstance(value, dict) or value.get("version") != STORE_VERSION:
        return new_store()
    conversations = [c for c in value.get("conversations") or [] if isinstance(c, dict) and c.get("id")]
    deleted = [d for d in value.get("deleted") or [] if isinstance(d, str)]
    store = new_store() | {"conversations": copy.deepcopy(conversations), "deleted": deleted[-DELETED_KEPT:]}
    store["active"] = value.get("active") if find(store, value.get("active")) else None
    return store


def find(store: Store, conversation_id: str | None) -> Conversation | None:
    return next((c for c in store["conversations"] if c["id"] == conversation_id), None)


def active(store: Store) -> Conversation | None:
    return find(store, store["active"])


def new(store: Store) -> Store:
    """A fresh chat: nothing is stored until its first reply (no empty conversations pile up)."""
    return load_store(store) | {"active": None}


def _gone(conversation_id: str | None) -> ValueError:
    return ValueError(
        f"that conversation ({conversation_id or 'none'}) is no longer here: deleted, perhaps in another tab"
    )


def switch(store: Store, conversation_id: str | None) -> Store:
    store = load_store(store)
    if find(store, conversation_id) is None:
        raise _gone(conversation_id)
    store["active"] = conversation_id
    return store


def rename(store: Store, conversation_id: str | None, title: str) -> Store:
    """A name of one line, 1 to MAX_TITLE characters; ValueError says what is wrong."""
    store = load_store(store)
    conversation = find(store, conversation_id)
    if conversation is None:
        raise _gone(conversation_id)
    title = " ".join(title.split())  # one line, as the list shows it
    if not title:
        raise ValueError("a chat's name cannot be empty")
    if len(title) > MAX_TITLE:
        raise ValueError(f"a chat's name is at most {MAX_TITLE} characters; this one has {len(title)}")
    conversation["title"] = title
    return store


def delete(store: Store, conversation_id: str | None) -> Store:
    """Drop a conversation; when it was the one shown, the next one down the list (else the
    one above, else a fresh chat) is shown instead."""
    store = load_store(store)
    ids = [c["id"] for c in store["conversations"]]
    if conversation_id is None:
        return store
    store["deleted"] = [*store["deleted"], conversation_id][-DELETED_KEPT:]
    if conversation_id not in ids:
        return store
    at = ids.index(conversation_id)
    del store["conversations"][at]
    if store["active"] == conversation_id:
        rest = store["conversations"]
        store["active"] = rest[min(at, len(rest) - 1)]["id"] if rest else None
    return store


def title_of(conversation: Conversation) -> str:
    """Its name, else its first words, else 'New chat'."""
    if conversation.get("title"):
        return conversation["title"]
    for message in conversation["messages"]:
        if message["role"] != "user":
            continue
        text = " ".join(message["content"].split())
        if text:
            return text if len(text) <= TITLE_CHARS else text[: TITLE_CHARS - 1].rstrip() + "…"
        if message.get("attachments"):
            return "📎 " + ", ".join(message["attachments"])
    return UNTITLED


def choices(store: Store) -> list[tuple[str, str]]:
    """(label, id) of each conversation, as the picker lists them."""
    return [(title_of(c), c["id"]) for c in store["conversations"]]


def set_system(store: Store, conversation_id: str | None, system: str) -> Store:
    store = load_store(store)
    conversation = find(store, conversation_id)
    if conversation is not None and conversation["system"] != system:
        conversation["system"] = system
        conversation["updated"] = now()
    return store


def user_turn(text: str, files: list[str]) -> dict:
    """A user turn as the store keeps it: the files' server paths (to show them and send them
    again) besides their names (what an export keeps)."""
    return {"role": "user", "content": text, "attachments": [Path(f).name for f in files], "files": list(files)}


def exchange(conversation_id: str, keep_user_turns: int, system: str, user: dict, reply: dict) -> dict:
    """One turn as the chat hands it to `record`: which conversation, how many of its user
    turns came before (fewer than it has after a regenerate or an edit), the system prompt
    it was asked under, the user turn and the reply."""
    return {
        "conversation": conversation_id,
        "keep_user_turns": keep_user_turns,
        "system": system,
        "user": user,
        "reply": reply,
    }


def record(store: Store, turn: dict) -> Store:
    """An exchange into its conversation, made if new, after its first `keep_user_turns` user
    turns. Recording the same exchange again changes nothing; one whose conversation was
    deleted meanwhile is dropped. Which conversation is shown does not change."""
    store = load_store(store)
    conversation_id = turn["conversation"]
    if conversation_id in store["deleted"]:
        return store
    conversation = find(store, conversation_id)
    if conversation is None:
        stamp = now()
        conversation = {
            "id": conversation_id,
            "title": "",
            "created": stamp,
            "updated": stamp,
            "system": "",
            "messages": [],
        }
        store["conversations"].insert(0, conversation)
    conversation["messages"] = cut(conversation["messages"], turn["keep_user_turns"]) + [turn["user"], turn["reply"]]
    conversation["system"] = turn["system"]
    conversation["updated"] = now()
    return store


def truncate(store: Store, conversation_id: str | None, keep_user_turns: int) -> Store:
    """The conversation after its first `keep_user_turns` user turns (an undo, or the start of
    a regenerate or an edit)."""
    store = load_store(store)
    conversation = find(store, conversation_id)
    if conversation is not None:
        conversation["messages"] = cut(conversation["messages"], keep_user_turns)
        conversation["updated"] = now()
    return store


def cut(messages: list[dict], user_turns: int) -> list[dict]:
    """`messages` up to (not including) the user turn after the first `user_turns`."""
    seen = 0
    for at, message in enumerate(messages):
        if message["role"] == "user":
            if seen == user_turns:
                return messages[:at]
            seen += 1
    return list(messages)


# --- export and import ------------------------------------------------------------------


def _exported_message(message: dict) -> dict:
    if message["role"] == "user":
        return {"role": "user", "content": message["content"], "attachments": list(message.get("attachments", []))}
    return {
        "role": "assistant",
        "content": message["content"],
        "reasoning": message.get("reasoning", ""),
        "stats": message.get("stats"),
        "model": message.get("model"),
    }


def export_data(conversation: Conversation) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "title": title_of(conversation),
        "created": conversation["created"],
        "updated": conversation["updated"],
        "system": conversation.get("system", ""),
        "messages": [_exported_message(m) for m in conversation["messages"]],
    }


def export_json(conversation: Conversation) -> str:
    return json.dumps(export_data(conversation), indent=2, ensure_ascii=False) + "\n"


def _stats_line(stats: dict) -> str:
    answer = stats.get("completion_tokens", 0) - stats.get("reasoning_tokens", 0)
    return (
        f"first token {stats.get('ttft_s', 0) * 1000:.0f} ms · {stats.get('decode_tokens_per_s', 0):.1f} tok/s"
        f" · {stats.get('prompt_tokens', 0)} prompt / {answer} answer / {stats.get('reasoning_tokens', 0)} reasoning"
        f" tokens · finish: {stats.get('finish_reason', '?')}"
    )


def export_markdown(conversation: Conversation) -> str:
    """For reading and pasting: each turn under a heading, reasoning folded away, the
    answering model and the reply's stats under it."""
    data = export_data(conversation)
    lines = [
        f"# {data['title']}",
        "",
        f"_{data['created']} to {data['updated']}, exported from the workbench chat_",
        "",
    ]
    if data["system"]:
        lines += ["## System", "", data["system"], ""]
    for message in data["messages"]:
        if message["role"] == "user":
            lines += ["## User", ""]
            if message["content"]:
                lines += [message["content"], ""]
            lines += [f"📎 {name}" for name in message["attachments"]]
            if message["attachments"]:
                lines.append("")
            continue
        model = message["model"]
        lines += [f"## Assistant ({model['name']})" if model else "## Assistant", ""]
        if message["reasoning"]:
            lines += ["<details><summary>Thought</summary>", "", message["reasoning"], "", "</details>", ""]
        lines += [message["content"] or "_(empty reply)_", ""]
        lines += [f"_{_stats_line(message['stats'])}_" if message["stats"] else "_(stopped before the end)_", ""]
    return "\n".join(lines)


def _where(location: tuple) -> str:
    """A pydantic error location as a person reads it: messages[2].role."""
    out = ""
    for part in location:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("user", "assistant"):  # the union's branch, not a field
            out += f".{part}" if out else str(part)
    return out or "the file"


def import_json(raw: bytes | str, *, name: str = "the file") -> Conversation:
    """A conversation from an export, with a fresh id (importing twice makes two); any
    problem is an ImportRefused naming `name` and what is wrong."""
    data = raw.encode("utf-8") if isinstance(raw, str) else raw
    if len(data) > MAX_IMPORT_BYTES:
        raise ImportRefused(
            f"{name} is {len(data) / 1e6:.1f} MB; a conversation export is at most {MAX_IMPORT_BYTES / 1e6:.0f} MB"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ImportRefused(f"{name} is not text (not UTF-8): pick a .json file exported from this page") from None
    try:
        value = json_object(text, name)
    except ValueError as exc:
        raise ImportRefused(f"{exc}: pick a conversation exported from this page") from None
    if value.get("format") != FORMAT:
        raise ImportRefused(f'{name} is not a workbench conversation export: it has no "format": "{FORMAT}" field')
    if isinstance(value.get("version"), int) and value["version"] > VERSION:
        raise ImportRefused(
            f"{name} was written by a newer workbench (format version {value['version']}); "
            f"this page reads version {VERSION}"
        )
    try:
        checked = ConversationFile.model_validate(value)
    except ValidationError as exc:
        problems = [f"{_where(e['loc'])}: {e['msg']}" for e in exc.errors()]
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ImportRefused(f"{name} is not a valid conversation export: {'; '.join(problems[:3])}{more}") from None
    data_out = checked.model_dump(mode="json")
    return {
        "id": new_id(),
        "title": data_out["title"],
        "created": data_out["created"],
        "updated": data_out["updated"],
        "system": data_out["system"],
        "messages": [
            {**m, "files": []} if m["role"] == "user" else m for m in data_out["messages"]
        ],  # attachments came by name only
    }


def add(store: Store, conversation: Conversation) -> Store:
    """An imported conversation, first in the list and active."""
    store = load_store(store)
    store["conversations"].insert(0, copy.deepcopy(conversation))
    store["active"] = conversation["id"]
    return store


# --- the chat window --------------------------------------------------------------------


def chat_messages(conversation: Conversation | None, usable: Callable[[str], bool]) -> list[dict]:
    """The conversation as gr.Chatbot shows it (as the chat streamed it): the user's files
    while `usable` (still on the server), else their names; reasoning in a folded Thought."""

    shown: list[dict] = []
    for message in (conversation or {}).get("messages", []):
        if message["role"] == "user":
            files = [f for f in message.get("files", []) if usable(f)]
            kept = {Path(f).name for f in files}
            missing = [n for n in message.get("attachments", []) if n not in kept]
            text = "\n".join([*(f"📎 {n}" for n in missing), *([message["content"]] if message["content"] else [])])
            shown.append({"role": "user", "content": [*({"path": f} for f in files), *([text] if text else [])]})
            continue
        if message.get("reasoning"):
            stats = message.get("stats") or {}
            tokens = f" ({stats['reasoning_tokens']} tokens)" if "reasoning_tokens" in stats else ""
            shown.append(
                {
                    "role": "assistant",
                    "content": message["reasoning"],
                    "metadata": {"title": f"{THOUGHT_TITLE}{tokens}", "status": "done"},
                }
            )
        shown.append({"role": "assistant", "content": message["content"] or EMPTY_REPLY})
    return shown
