"""The server's one HTTP error: an OpenAI-shaped JSON body with its status, for every route
module (chat, completions, transcriptions) alike."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from workbench.serve import protocol


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", *, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(protocol.error_body(self.message, self.type, param=self.param, code=self.code), self.status)
