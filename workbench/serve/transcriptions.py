"""POST /v1/audio/transcriptions: OpenAI's speech-to-text endpoint, on the Whisper the session
already loads for `input_audio` parts.

The form is OpenAI's (multipart: `file`, `model`, `language`, `prompt`, `response_format`,
`temperature`), so the openai SDK's `audio.transcriptions.create` and any app written for
OpenAI's API work unchanged. `model` may be the served model's name, the Whisper model's own
(`tiny.en`, `base`) or OpenAI's `whisper-1`: clients send the last by default, and each names
the one recogniser this server has. The form is parsed here, not by FastAPI, so that a body
over the limit is a 413 before it is read and every mistake is an OpenAI-shaped 400.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from workbench.errors import RequestError, UnsupportedInputError
from workbench.serve.errors import APIError

FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
OPENAI_MODEL = "whisper-1"


class TranscriptionForm(BaseModel):
    """The multipart form, for /openapi.json (the route reads the form itself)."""

    file: bytes
    """The audio file: wav, flac, mp3, ogg, webm, m4a, ..."""
    model: str
    language: str | None = None
    """ISO-639-1; detected when left out (a multilingual Whisper only)."""
    prompt: str | None = None
    """Whisper's initial prompt: spellings and style to follow."""
    response_format: Literal["json", "text", "verbose_json", "srt", "vtt"] = "json"
    temperature: float | None = None


class Segment(BaseModel):
    id: int
    start: float
    end: float
    text: str
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
    return schema


def transcription_routes(session, served_names: set[str], max_body_bytes: int) -> APIRouter:
    router = APIRouter()
    media = session.media

    def known_models() -> set[str]:
        return served_names | {OPENAI_MODEL} | ({media.speech_name} if media.speech_name else set())

    @router.post(
        "/v1/audio/transcriptions",
        response_model=Transcription,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
        openapi_extra={
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _form_schema()}}}
        },
    )
    async def transcriptions(request: Request) -> Response:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            raise APIError(
                413,
                f"request body is {int(declared)} bytes; the limit is {max_body_bytes} bytes",
                code="body_too_large",
            )
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError(
                400,
                "send the audio as multipart/form-data with a `file` field, as OpenAI's API takes it",
                param="file",
                code="invalid_value",
            )
        try:
            form = await request.form(max_files=1, max_fields=16, max_part_size=1024 * 1024)
        except (MultiPartException, ValueError, KeyError) as exc:
            raise APIError(
                400, f"the multipart form cannot be read: {exc}", param="file", code="invalid_value"
            ) from None
        try:
            return await _answer(form)
        finally:
            await form.close()

    async def _answer(form) -> Response:
        fields = {k: v for k, v in form.items() if not isinstance(v, UploadFile)}
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
            if not 0.0 <= temperature <= 1.0:
                raise APIError(
                    400, "temperature must be a number from 0 to 1", param="temperature", code="invalid_value"
                )
        blob = await upload.read(max_body_bytes + 1)
        if len(blob) > max_body_bytes:
            raise APIError(413, f"the audio is over the limit of {max_body_bytes} bytes", code="body_too_large")
        suffix = (upload.filename or "").rsplit(".", 1)[-1] if "." in (upload.filename or "") else None
        try:
            transcript = await asyncio.to_thread(_transcribe, blob, suffix, language, fields.get("prompt"), temperature)
        except UnsupportedInputError as exc:
            raise APIError(400, str(exc), param="model", code=exc.code) from None
        except RequestError as exc:
            param = (
                exc.param
                if exc.param and exc.param != "messages"
                else ("language" if "language" in str(exc) else "file")
            )
            raise APIError(400, str(exc), param=param, code=exc.code or "invalid_value") from None
        return _reply(transcript, response_format)

    def _transcribe(
        blob: bytes, suffix: str | None, language: str | None, prompt: str | None, temperature: float | None
    ):
        from workbench.modalities.audio import AudioInputError, load_audio, normalise_format

        recognizer = media.recognizer()  # UnsupportedInputError for a session that does not hear
        try:
            fmt = normalise_format(suffix) if suffix else None
        except AudioInputError:
            fmt = None  # an odd file name is no reason to refuse: the bytes' header decides
        audio = load_audio(blob, format=fmt, max_seconds=media.limits.max_audio_seconds)
        try:
            return recognizer.transcribe(
                audio, language=language or media.limits.speech_language, prompt=prompt, temperature=temperature
            )
        except ValueError as exc:
            if isinstance(exc, RequestError):
                raise
            raise RequestError(f"cannot transcribe: {exc}", param="language" if language else "file") from None

    return router


def _reply(transcript, response_format: str) -> Response:
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


def _subtitles(segments, *, vtt: bool) -> str:
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
