"""POST /v1/audio/transcriptions: OpenAI's speech-to-text endpoint, on the Whisper the session
already loads for `input_audio` parts.

The form is OpenAI's (multipart: `file`, `model`, `language`, `prompt`, `response_format`,
`temperature`), so the openai SDK's `audio.transcriptions.create` and any app written for
OpenAI's API work unchanged. `model` may be the served model's name, the Whisper model's own
(`tiny.en`, `base`) or OpenAI's `whisper-1`: clients send the last by default, and each names
the one recogniser this server has. The form is parsed here, not by FastAPI, so that a body
over the limit is a 413 while it streams in (a chunked upload too, not only one that declares
its length) and every mistake is an OpenAI-shaped 4xx naming its field, never a 422 or a 500.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from workbench.errors import RequestError
from workbench.modalities.audio import AudioInputError, load_audio, normalise_format
from workbench.modalities.speech import MODELS, SpeechModelError
from workbench.serve import protocol
from workbench.serve.errors import APIError
from workbench.serve.metrics import ServerMetrics

if TYPE_CHECKING:
    from workbench.modalities.speech import Transcript
    from workbench.session import Session

FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
OPENAI_MODEL = "whisper-1"
MAX_FIELD_BYTES = 64 * 1024
"""Each text field (a prompt included): Whisper reads at most 224 prompt tokens anyway."""


class TranscriptionForm(BaseModel):
    """The multipart form, for /openapi.json (the route reads the form itself)."""

    file: bytes
    """The audio file: wav, flac, mp3, ogg, webm, m4a, ..."""
    model: str
    """The served model's name, the Whisper model's own (tiny.en, base) or whisper-1."""
    language: str | None = None
    """ISO-639-1; detected when left out (a multilingual Whisper only)."""
    prompt: str | None = None
    """Whisper's initial prompt: spellings and style to follow."""
    response_format: Literal["json", "text", "verbose_json", "srt", "vtt"] = "json"
    temperature: float | None = None
    """0 to 1: decode at this temperature instead of Whisper's fallback ladder."""


class Segment(BaseModel):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    temperature: float


class Transcription(BaseModel):
    """`response_format: json`; `verbose_json` adds the task, language, duration and segments."""

    text: str
    task: Literal["transcribe"] | None = None
    language: str | None = None
    duration: float | None = None
    segments: list[Segment] | None = None


def _form_schema() -> dict[str, Any]:
    schema = TranscriptionForm.model_json_schema()
    schema["properties"]["file"] = {"type": "string", "format": "binary", "description": "the audio file"}
    schema["properties"]["timestamp_granularities[]"] = {
        "type": "array",
        "items": {"type": "string", "enum": ["segment", "word"]},
        "description": "segment only: `word` is refused with 400 unsupported_parameter",
    }
    return schema


_ERROR = {"model": protocol.ErrorResponse}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "the transcript"},
    400: {**_ERROR, "description": "The form cannot be served as sent: the error names the field"},
    404: {**_ERROR, "description": "No such model here"},
    413: {**_ERROR, "description": "The body is over the server's limit"},
}


def transcription_routes(
    session: Session, served_names: set[str], max_body_bytes: int, metrics: ServerMetrics
) -> APIRouter:
    """The route, closed over the session whose Whisper it shares with the chat path (one model
    loaded once, one lock), the chat route's names and body limit, so both answer alike, and the
    server's metrics, where each answer is counted by status (/metrics)."""
    router = APIRouter()
    media = session.media

    def known_models() -> set[str]:
        return served_names | {OPENAI_MODEL} | ({media.speech_name} if media.speech_name else set())

    @router.post(
        "/v1/audio/transcriptions",
        response_model=Transcription,
        responses=RESPONSES,
        openapi_extra={
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _form_schema()}}}
        },
    )
    async def transcriptions(request: Request) -> Response:
        try:
            response = await _transcriptions(request)
        except APIError as exc:
            metrics.transcribed(status=exc.status)
            raise
        except Exception:
            metrics.transcribed(status=500)
            raise
        return response

    async def _transcriptions(request: Request) -> Response:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            raise APIError(
                413,
                f"request body is {int(declared)} bytes; the limit is {max_body_bytes} bytes",
                code="body_too_large",
            )
        kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind != "multipart/form-data":
            raise APIError(
                400,
                "send the audio as multipart/form-data with a `file` field, as OpenAI's API takes it",
                param="file",
                code="invalid_value",
            )
        form = await _read_form(request)
        try:
            return await _answer(form)
        finally:
            await form.close()

    async def _read_form(request: Request) -> FormData:
        async def limited() -> AsyncGenerator[bytes, None]:
            seen = 0
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > max_body_bytes:
                    raise APIError(
                        413, f"request body is over the limit of {max_body_bytes} bytes", code="body_too_large"
                    )
                yield chunk

        try:
            async with aclosing(limited()) as stream:
                parser = MultiPartParser(
                    request.headers, stream, max_files=1, max_fields=16, max_part_size=MAX_FIELD_BYTES
                )
                return await parser.parse()  # closes its spooled files itself when this raises
        except MultiPartException as exc:
            raise APIError(
                400,
                f"the multipart form cannot be read: {exc.message} (one file; text fields of at most "
                f"{MAX_FIELD_BYTES // 1024} KiB each)",
                code="invalid_value",
            ) from None

    async def _answer(form: FormData) -> Response:
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        upload = form.get("file")
        model = fields.get("model")
        if not model:
            raise APIError(400, "model is required (e.g. whisper-1)", param="model", code="invalid_value")
        if model not in known_models():
            raise APIError(
                404,
                f"model {model!r} is not served here; this server transcribes with {sorted(known_models())}",
                param="model",
                code="model_not_found",
            )
        if not media.hears:
            raise APIError(
                400,
                f"this server's session has no speech input ({media.no_speech_reason}): serve a config whose "
                f"media.speech names a Whisper model ({' or '.join(repr(m) for m in MODELS)}, or a CTranslate2 "
                "Whisper folder) to transcribe",
                param="model",
                code="unsupported_content",
            )
        if not isinstance(upload, UploadFile):
            raise APIError(
                400, "file is required: the audio to transcribe, as a file upload", param="file", code="invalid_value"
            )
        response_format = fields.get("response_format") or "json"
        if response_format not in FORMATS:
            raise APIError(
                400,
                f"response_format {response_format!r} is not one of {', '.join(FORMATS)}",
                param="response_format",
                code="invalid_value",
            )
        if "word" in form.getlist("timestamp_granularities[]"):
            raise APIError(
                400,
                "word timestamps are not implemented here: leave timestamp_granularities at 'segment'",
                param="timestamp_granularities",
                code="unsupported_parameter",
            )
        if (fields.get("stream") or "").strip().lower() == "true":
            raise APIError(
                400,
                "streamed transcription is not implemented here (OpenAI streams only its gpt-4o models): leave stream off",
                param="stream",
                code="unsupported_parameter",
            )
        language = (fields.get("language") or "").strip().lower() or None
        if language is not None and not re.fullmatch(r"[a-z]{2,3}", language):
            raise APIError(
                400,
                f"language {language!r} is not an ISO-639-1 code such as 'en'",
                param="language",
                code="invalid_value",
            )
        temperature = None
        if fields.get("temperature") not in (None, ""):
            try:
                temperature = float(fields["temperature"])
            except ValueError:
                temperature = -1.0
            if not 0.0 <= temperature <= 1.0:  # NaN fails this too
                raise APIError(
                    400, "temperature must be a number from 0 to 1", param="temperature", code="invalid_value"
                )
        blob = await upload.read()
        name = upload.filename or ""
        suffix = name.rsplit(".", 1)[-1] if "." in name else None
        started = time.perf_counter()
        transcript = await asyncio.to_thread(_transcribe, blob, suffix, language, fields.get("prompt"), temperature)
        metrics.transcribed(status=200, audio_s=transcript.audio_seconds, wall_s=time.perf_counter() - started)
        return _reply(transcript, response_format)

    def _transcribe(
        blob: bytes, suffix: str | None, language: str | None, prompt: str | None, temperature: float | None
    ) -> Transcript:
        """Decoding and Whisper, on a worker thread: seconds of CPU that must not stall the loop."""
        try:
            recognizer = media.recognizer()
        except SpeechModelError as exc:  # the server's install, not the request: a 500 that says what to fix
            raise APIError(500, str(exc), "server_error", code="speech_model_unavailable") from None
        try:
            fmt = normalise_format(suffix) if suffix else None
        except AudioInputError:
            fmt = None  # an odd file name is no reason to refuse: the bytes' header decides
        try:
            audio = load_audio(blob, format=fmt, max_seconds=media.limits.max_audio_seconds)
        except RequestError as exc:
            raise APIError(400, str(exc), param="file", code=exc.code or "invalid_audio") from None
        try:
            return recognizer.transcribe(
                audio, language=language or media.limits.speech_language, prompt=prompt, temperature=temperature
            )
        except SpeechModelError as exc:
            raise APIError(500, str(exc), "server_error", code="speech_model_unavailable") from None
        except ValueError as exc:  # an English-only model asked for another language; a code Whisper lacks
            message = str(exc) if isinstance(exc, RequestError) else f"cannot transcribe: {exc}"
            raise APIError(400, message, param="language", code="invalid_value") from None

    return router


def _reply(transcript: Transcript, response_format: str) -> Response:
    if response_format == "text":
        return PlainTextResponse(transcript.text)
    if response_format in ("srt", "vtt"):
        return PlainTextResponse(_subtitles(transcript.segments, vtt=response_format == "vtt"))
    body: dict[str, Any] = {"text": transcript.text}
    if response_format == "verbose_json":
        body |= {
            "task": "transcribe",
            "language": transcript.language,
            "duration": round(transcript.audio_seconds, 3),
            "segments": list(transcript.segments),
        }
    return JSONResponse(body)


def _subtitles(segments: tuple[dict[str, Any], ...], *, vtt: bool) -> str:
    def stamp(seconds: float) -> str:
        ms = int(round(seconds * 1000))
        h, ms = divmod(ms, 3_600_000)
        m, ms = divmod(ms, 60_000)
        s, ms = divmod(ms, 1000)
        return f"{h:02d}:{m:02d}:{s:02d}{'.' if vtt else ','}{ms:03d}"

    blocks = [
        ("" if vtt else f"{i + 1}\n") + f"{stamp(seg['start'])} --> {stamp(seg['end'])}\n{seg['text'].strip()}\n"
        for i, seg in enumerate(segments)
    ]
    return ("WEBVTT\n\n" if vtt else "") + "\n".join(blocks)
