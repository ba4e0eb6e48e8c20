"""The errors a user can cause, as one family.

Each carries the OpenAI error `type`, `code` and `param` it is answered with over HTTP, so
the server maps any of them to a 400 without a table of its own, and a notebook user who
catches `WorkbenchError` catches every one. All are ValueErrors: the value given was wrong,
and the message says what to change.
"""

from __future__ import annotations

import json
from typing import Any


class WorkbenchError(ValueError):
    """Something the user asked for that the workbench cannot do as asked."""

    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None

    def __init__(self, message: str = "", *, param: str | None = None, code: str | None = None):
        """`param` and `code` name the request field at fault where the class cannot know it."""
        super().__init__(message)
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code


class ConfigError(WorkbenchError):
    """A config file or value the workbench cannot use; the message says what to change."""


class ModelSourceError(WorkbenchError):
    """The model source cannot be resolved or loaded; the message says why and what to do."""


class ExportError(WorkbenchError):
    """The export cannot be written as asked; the message says why and what to do instead."""


class RequestError(WorkbenchError):
    """The request cannot be served as sent; raised before any generation work starts."""


class ContextLengthError(RequestError):
    """Prompt plus requested reply do not fit the session's context limit."""

    code = "context_length_exceeded"
    param = "messages"


class UnsupportedInputError(RequestError):
    """The request asks for something the loaded model cannot take (an image, audio, ...)."""

    code = "unsupported_content"
    param = "messages"


class MediaInputError(RequestError):
    """An image or audio part that cannot be read: corrupt, unsupported, too large or too long."""

    code = "invalid_media"
    param = "messages"


def json_object(text: str, what: str) -> dict[str, Any]:
    """`text` read as a JSON object. Schemas and exports arrive as text typed or uploaded by a
    user, so a failure is a ValueError naming `what` and where the text broke (line, column)
    or what it held instead of an object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} holds a JSON {type(value).__name__}, not an object")
    return value
