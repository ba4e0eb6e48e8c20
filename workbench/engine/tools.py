"""Tool calling: the tools an app offers, shown to the model, and the calls read back out of its
reply.

Models trained for tools (Qwen2.5/3, Hermes, SmolLM3, ...) get them through their own chat
template and answer with calls in the Hermes format, one JSON object per call:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A template with no tool support (SmolLM2's, the embedded model's) gets the same contract
written out in a system message, its earlier calls written into the assistant turns in that
format, and the tools' answers as user turns inside `<tool_response>` tags: the documented
fallback, so any chat model can be offered tools. One parser reads both.

`tool_choice` `required` and a named function are enforced by a grammar (structured.py):
the reply can only be well-formed calls whose arguments validate against each function's
JSON schema, so they always parse. `auto` leaves the model free and parses calls when it
makes them; `none` does not show the tools.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from workbench.errors import RequestError

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """OpenAI's rule: letters, digits, underscores, dashes (and dots), at most 64."""
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON schema of the arguments object; None takes any object."""
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    name: str
    arguments: str
    """The arguments as a JSON string, as OpenAI sends and expects them."""


class ToolCallItem(BaseModel):
    """One call in an assistant message of the history."""

    model_config = ConfigDict(extra="ignore")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


@dataclass(frozen=True)
class ToolCall:
    """A call read from the reply: its position among the reply's calls, a fresh id, the
    function's name and its arguments as a JSON string."""

    index: int
    id: str
    name: str
    arguments: str


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def template_has_tools(chat_template: str | dict | None) -> bool:
    if isinstance(chat_template, dict):
        chat_template = chat_template.get("tool_use") or chat_template.get("default")
    return bool(chat_template) and "tools" in str(chat_template)


def fallback_instruction(tools: list[Tool]) -> str:
    """The system text that offers `tools` to a model whose template cannot."""
    listed = "\n".join(json.dumps(t.function.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
    return (
        "You can call functions. Their signatures, one JSON object per line:\n"
        f"{listed}\n"
        "To call one, reply with only this, one block per call:\n"
        f'{OPEN_TAG}\n{{"name": <function name>, "arguments": <the arguments as a JSON object>}}\n{CLOSE_TAG}'
    )


def call_block(name: str, arguments: str) -> str:
    """A call as the model writes it (and as earlier calls go back into the history)."""
    try:
        parsed: Any = json.loads(arguments)
    except json.JSONDecodeError:
        parsed = arguments
    body = json.dumps({"name": name, "arguments": parsed}, ensure_ascii=False)
    return f"{OPEN_TAG}\n{body}\n{CLOSE_TAG}"


def response_block(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


def check_choice(tools: list[Tool], choice: ToolChoice | None) -> None:
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise RequestError(f"tools: function names must be unique; given twice: {', '.join(twice)}", param="tools")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        offered = ", ".join(names) or "none"
        raise RequestError(
            f"tool_choice names function {choice.function.name!r}, which is not among the tools ({offered})",
            param="tool_choice",
        )
    if choice == "required" and not tools:
        raise RequestError("tool_choice 'required' needs at least one tool in tools", param="tool_choice")


def grammar_of(tools: list[Tool], choice: ToolChoice | None, parallel: bool) -> str | None:
    """The Lark grammar that enforces `required` or a named choice, else None: only calls, each
    `{"name": ..., "arguments": ...}` whose arguments follow that function's schema."""
    if isinstance(choice, NamedToolChoice):
        chosen = [t for t in tools if t.function.name == choice.function.name]
    elif choice == "required":
        chosen = tools
    else:
        return None
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    schema: dict[str, Any] = {"anyOf": calls} if len(calls) > 1 else calls[0]
    schema["x-guidance"] = {"whitespace_flexible": False}
    repeat = ' ("\\n" call)*' if parallel and len(chosen) >= 1 and not isinstance(choice, NamedToolChoice) else ""
    return (
        f"start: call{repeat}\n"
        f'call: "{OPEN_TAG}\\n" body "\\n{CLOSE_TAG}"\n'
        f"body: %json {json.dumps(schema, ensure_ascii=False)}\n"
    )


_BLOCK = re.compile(re.escape(OPEN_TAG) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE_TAG) + r"|$)", re.DOTALL)


class ToolCallParser:
    """Splits a streaming answer into text, which passes on at once, and the calls from the
    first `<tool_call>` on, read when the reply ends. A tail that could still become the tag is
    held back until the next chunk decides it."""

    def __init__(self, names: tuple[str, ...]):
        self._names = set(names)
        self._held = ""
        self._calls: str | None = None

    def feed(self, text: str) -> str:
        if self._calls is not None:
            self._calls += text
            return ""
        self._held += text
        at = self._held.find(OPEN_TAG)
        if at >= 0:
            out, self._calls, self._held = self._held[:at], self._held[at:], ""
            return out
        keep = next(
            (n for n in range(min(len(OPEN_TAG) - 1, len(self._held)), 0, -1) if self._held.endswith(OPEN_TAG[:n])), 0
        )
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The text still held back and the calls. A block that is not a call to an offered
        function with a JSON object of arguments is not a call: the whole tail is then text."""
        tail, blocks = self._held, self._calls
        self._held, self._calls = "", None
        if blocks is None:
            return tail, []
        calls = []
        for index, body in enumerate(_BLOCK.findall(blocks)):
            try:
                call = json.loads(body)
            except json.JSONDecodeError:
                return tail + blocks, []
            if not (isinstance(call, dict) and call.get("name") in self._names):
                return tail + blocks, []
            arguments = call.get("arguments", call.get("parameters", {}))
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    return tail + blocks, []
            if not isinstance(arguments, dict):
                return tail + blocks, []
            calls.append(ToolCall(index, new_call_id(), call["name"], json.dumps(arguments, ensure_ascii=False)))
        return (tail, calls) if calls else (tail + blocks, [])
