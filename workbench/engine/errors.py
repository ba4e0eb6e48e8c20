"""Errors a request can cause; each is raised before any generation work starts."""


class RequestError(ValueError):
    """The request cannot be served as sent; the message says what to change."""


class ContextLengthError(RequestError):
    """Prompt plus requested reply do not fit the session's context limit."""


class UnsupportedInputError(RequestError):
    """The request asks for something the loaded model cannot take (an image, audio, ...)."""


class MediaInputError(RequestError):
    """An image or audio part that cannot be read: corrupt, unsupported, too large or too long."""

    code = "invalid_media"
