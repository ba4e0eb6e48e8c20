"""The OpenAI-compatible HTTP app on top of the one engine: HTTP in, engine calls, HTTP out.

Chat completions are served here; the completions API in completions.py; vLLM's tokenizer
endpoints (/tokenize, /detokenize, /tokenizer_info) at the root, as vLLM serves them.

The event loop accepts connections, validates requests (errors come back at once, without
waiting for generation) and streams tokens out; the engine's scheduler
(workbench/engine/scheduler.py) decodes waiting requests together on one generation thread.
A client that disconnects cancels its request; the others go on.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from workbench.engine import (
    ContextLengthError,
    Done,
    Event,
    ReasoningDelta,
    RequestError,
    TextDelta,
    TokenLogprob,
    UnsupportedInputError,
)
from workbench.engine.events import ReplyBuilder, Stats
from workbench.engine.scheduler import GenerationQueue
from workbench.engine.sequence import Plan
from workbench.engine.tools import ToolCall
from workbench.errors import MediaInputError
from workbench.serve import completions, protocol
from workbench.serve.choices import choices_of, merged
from workbench.serve.errors import APIError
from workbench.serve.metrics import ServerMetrics
from workbench.serve.status_page import render_status
from workbench.serve.transcriptions import transcription_routes
from workbench.session import Session

M = TypeVar("M", bound=BaseModel)
MEMORY_EVERY_S = 30.0
"""How old the status page's memory split may be (it refreshes itself every few seconds)."""

REQUEST_BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": protocol.ChatCompletionRequest,
    "/v1/completions": protocol.CompletionRequest,
    "/tokenize": protocol.TokenizeRequest,
    "/detokenize": protocol.DetokenizeRequest,
}
"""The bodies the POST endpoints read, for /openapi.json: they parse them themselves (the body
limit, then OpenAI-shaped 400s), so FastAPI does not see them by itself."""


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    max_batch: int = 8


def _validation_error(exc: ValidationError) -> APIError:
    errors = exc.errors()
    param = ".".join(str(p) for p in errors[0]["loc"]) if errors else None
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5])
    return APIError(400, f"invalid request: {detail}", param=param, code="invalid_value")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {int(declared)} bytes; the limit is {limit} bytes", code="body_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")
    return bytes(body)


def create_app(session: Session, settings: ServerSettings, *, own_thread: bool = True) -> FastAPI:
    """`own_thread=False`: the caller runs `app.state.generation.run()` on the thread that
    loaded the model (see GenerationQueue.run)."""
    generation = GenerationQueue(session.engine, max_batch=settings.max_batch, own_thread=own_thread)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        generation.shutdown()

    app = FastAPI(title="workbench OpenAI-compatible server", docs_url="/docs", redoc_url=None, lifespan=lifespan)
    metrics = ServerMetrics()
    started = time.time()
    served_names = {settings.model_name, session.loaded.source}
    memory_seen: dict[str, Any] = {}  # the status page's last memory split, and when it was taken
    app.state.metrics = metrics
    app.state.generation = generation

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        response = APIError(exc.status_code, str(exc.detail), type_).response()
        response.headers.update(exc.headers or {})  # a 405's Allow
        return response

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if settings.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {settings.api_key}":
                return APIError(
                    401,
                    "missing or wrong API key: send `Authorization: Bearer <key>`",
                    "authentication_error",
                    code="invalid_api_key",
                ).response()
        return await call_next(request)

    def _parse_as(
        body: bytes, model: type[M], refused: dict[str, Any] | None = None, *, model_required: bool = True
    ) -> M:
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        if refused is not None and (field := protocol.unsupported_field(data, refused)) is not None:
            raise APIError(400, field[1], param=field[0], code="unsupported_parameter")
        try:
            req = model.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        name = getattr(req, "model", None)
        if (model_required or name is not None) and name not in served_names:
            raise APIError(
                404,
                f"model {name!r} is not served here; this server serves {settings.model_name!r}",
                param="model",
                code="model_not_found",
            )
        return req

    def _parse(body: bytes) -> protocol.ChatCompletionRequest:
        return _parse_as(body, protocol.ChatCompletionRequest, protocol.UNSUPPORTED)

    def token_text(token_id: int) -> str:
        return cast(str, session.tokenizer.decode([token_id]))

    def _plan(req: protocol.ChatCompletionRequest) -> Plan:
        try:
            return session.engine.plan(req.to_engine())
        except ValidationError as exc:
            raise _validation_error(exc) from None
        except ContextLengthError as exc:
            raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
        except UnsupportedInputError as exc:
            raise APIError(400, str(exc), param="messages", code="unsupported_content") from None
        except MediaInputError as exc:
            raise APIError(400, str(exc), param="messages", code=exc.code) from None
        except RequestError as exc:
            raise APIError(400, str(exc), param=exc.param, code=exc.code or "invalid_value") from None

    @app.post("/v1/chat/completions", response_model=protocol.ChatCompletion)
    async def chat_completions(request: Request):
        req = _parse(await _read_body(request, settings.max_body_bytes))
        # Off the event loop: decoding images and transcribing audio take real time.
        plan = await asyncio.to_thread(_plan, req)
        plans = choices_of(plan, req.n)
        completion_id = protocol.new_id()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _sse(
                    merged(generation, plans), len(plans), completion_id, req.model, include_usage, metrics, token_text
                ),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        metrics.started()
        replies = [ReplyBuilder() for _ in plans]
        try:
            async for index, event in merged(generation, plans):
                replies[index].add(event)
            results = [reply.result() for reply in replies]
        except Exception:
            metrics.finished(stream=False, stats=None, status=500, outcome="error")
            raise
        finally:
            metrics.ended()
        stats = [r.stats for r in results]
        metrics.finished(stream=False, stats=protocol.total_stats(stats))
        choices = [
            {
                "index": index,
                "message": protocol.choice_message(r.text, r.reasoning, r.tool_calls),
                "finish_reason": r.stats.finish_reason,
                "logprobs": protocol.logprobs_field(list(r.logprobs), token_text)
                if plan.logprobs is not None
                else None,
            }
            for index, r in enumerate(results)
        ]
        return JSONResponse(protocol.completion(completion_id, req.model, choices, stats))

    def _prepare(req: protocol.CompletionRequest) -> list[completions.PreparedPrompt]:
        try:
            return completions.prepare(session, req)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        except ContextLengthError as exc:
            raise APIError(400, str(exc), param="prompt", code="context_length_exceeded") from None
        except RequestError as exc:
            raise APIError(400, str(exc), param="prompt", code="invalid_value") from None

    @app.post("/v1/completions", response_model=protocol.CompletionResponse)
    async def text_completions(request: Request):
        req = _parse_as(
            await _read_body(request, settings.max_body_bytes),
            protocol.CompletionRequest,
            protocol.COMPLETIONS_UNSUPPORTED,
        )
        if not req.generates and not req.echo:
            raise APIError(
                400,
                "max_tokens 0 generates nothing: with echo: true it scores the prompt",
                param="max_tokens",
                code="invalid_value",
            )
        prepared = await asyncio.to_thread(_prepare, req)  # tokenizing a batch takes real time
        if req.stream:
            return StreamingResponse(
                completions.stream(generation, session, req, prepared, token_text, metrics),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        body = await completions.reply(generation, session, req, prepared, token_text, metrics)
        return JSONResponse(body.model_dump())

    app.include_router(transcription_routes(session, served_names, settings.max_body_bytes, metrics))

    @app.post("/tokenize", response_model=protocol.TokenizeResponse)
    async def tokenize(request: Request):
        req = _parse_as(
            await _read_body(request, settings.max_body_bytes), protocol.TokenizeRequest, model_required=False
        )
        ids = list(session.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens))
        strs = session.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return protocol.TokenizeResponse(
            count=len(ids), max_model_len=session.engine.context_limit, tokens=ids, token_strs=strs
        )

    @app.post("/detokenize", response_model=protocol.DetokenizeResponse)
    async def detokenize(request: Request):
        body = await _read_body(request, settings.max_body_bytes)
        req = _parse_as(body, protocol.DetokenizeRequest, model_required=False)
        vocab = session.engine.vocab_size
        if (bad := next((t for t in req.tokens if not 0 <= t < vocab), None)) is not None:
            raise APIError(
                400,
                f"token id {bad} is outside the vocabulary (0 to {vocab - 1})",
                param="tokens",
                code="invalid_value",
            )
        return protocol.DetokenizeResponse(prompt=cast(str, session.tokenizer.decode(req.tokens)))

    @app.get("/tokenizer_info", response_model=protocol.TokenizerInfoResponse)
    async def tokenizer_info():
        tokenizer = session.tokenizer
        template = tokenizer.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        return protocol.TokenizerInfoResponse(
            tokenizer_class=type(tokenizer).__name__,
            bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token,
            pad_token=tokenizer.pad_token,
            unk_token=tokenizer.unk_token,
            chat_template=template,
            model_max_length=session.engine.context_limit,
        )

    @app.get("/v1/models", response_model=protocol.ModelList)
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": settings.model_name,
                    "object": "model",
                    "created": int(started),
                    "owned_by": "workbench",
                    "max_model_len": session.engine.context_limit,
                }
            ],  # vLLM's name for the context length
        }

    @app.get("/health", response_model=protocol.Health)
    async def health():
        return {
            "status": "ok",
            "model": settings.model_name,
            "source": session.loaded.source,
            "device": session.loaded.device,
            "vision": session.media.vision,
            "speech": session.media.speech_name,
            "in_flight": metrics.active,
            "uptime_s": round(time.time() - started, 1),
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def status():
        # Splitting the process's memory walks every live object (~0.2 s holding the GIL): off the
        # event loop, and at most once per MEMORY_EVERY_S however often the page refreshes.
        now = time.monotonic()
        if not memory_seen or now - memory_seen["at"] > MEMORY_EVERY_S:
            memory_seen.update(at=now, report=await asyncio.to_thread(session.memory))
        return render_status(session, settings.model_name, metrics, started, memory_seen["report"])

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document_bodies(get_openapi(title=app.title, version=app.version, routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


STREAMS = {"/v1/chat/completions", "/v1/completions"}
"""Routes that answer `stream: true` with server-sent events."""

ERRORS = {
    "400": "The request cannot be served as sent: the error names the field",
    "401": "Missing or wrong API key (when the server has one)",
    "404": "No such model here",
    "413": "The body is over the server's limit",
}
"""What any POST route can answer besides its result, all in OpenAI's error shape."""


def _document_bodies(schema: dict[str, Any]) -> dict[str, Any]:
    """/openapi.json as the routes behave: each POST endpoint's request body (REQUEST_BODIES,
    which they parse themselves for the body limit and OpenAI-shaped 400s, so FastAPI does not
    see them), its errors in OpenAI's shape instead of FastAPI's 422, and the event stream."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})

    def ref(model: type[BaseModel]) -> dict[str, str]:
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = {"content": {"application/json": {"schema": ref(protocol.ErrorResponse)}}}
    for path, model in REQUEST_BODIES.items():
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref(model)}},
        }
    for path, methods in schema["paths"].items():
        if "post" not in methods:
            continue
        responses = methods["post"].setdefault("responses", {})
        responses.pop("422", None)
        responses.update({status: {"description": why, **error} for status, why in ERRORS.items()})
        if path in STREAMS:
            content = responses["200"].setdefault("content", {})
            content["text/event-stream"] = {
                "schema": {"type": "string", "description": "`data: {chunk}` events, then `data: [DONE]`"}
            }
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    return schema


async def _sse(
    events: AsyncIterator[tuple[int, Event]],
    n: int,
    completion_id: str,
    model: str,
    include_usage: bool,
    metrics: ServerMetrics,
    token_text: Callable[[int], str],
) -> AsyncIterator[str]:
    """OpenAI's chunks: a role chunk per choice, then each choice's deltas as they come (tool
    calls whole, each in one delta, when the reply ends), a finishing chunk per choice, usage."""
    created = int(time.time())
    waiting: list[list[TokenLogprob]] = [[] for _ in range(n)]
    """Logprobs of tokens whose text has not gone out yet (the detokenizer and stop matcher
    hold text back); they ride on the choice's next chunk, the rest on its finishing one."""

    def frame(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def logprobs(index: int) -> dict | None:
        if not waiting[index]:
            return None
        field = protocol.logprobs_field(waiting[index], token_text)
        waiting[index].clear()
        return field

    def delta(index: int, body: dict[str, Any]) -> str:
        return frame(protocol.chunk(completion_id, model, created, delta=body, logprobs=logprobs(index), index=index))

    metrics.started()
    stats: list[Stats] = []
    try:
        for index in range(n):
            yield frame(
                protocol.chunk(completion_id, model, created, delta={"role": "assistant", "content": ""}, index=index)
            )
        async for index, event in events:
            if isinstance(event, TokenLogprob):
                waiting[index].append(event)
            elif isinstance(event, TextDelta):
                yield delta(index, protocol.text_delta(event.text))
            elif isinstance(event, ReasoningDelta):
                yield delta(index, protocol.reasoning_delta(event.text))
            elif isinstance(event, ToolCall):
                yield delta(index, {"tool_calls": protocol.tool_calls_field([event], streamed=True)})
            elif isinstance(event, Done):
                stats.append(event.stats)
                finish = protocol.chunk(
                    completion_id,
                    model,
                    created,
                    finish_reason=event.stats.finish_reason,
                    logprobs=logprobs(index),
                    index=index,
                )
                yield frame(finish | protocol.media_field(event.stats))
        assert len(stats) == n  # the engine ends every choice's stream with Done
        total = protocol.total_stats(stats)
        if include_usage:
            yield frame(protocol.chunk(completion_id, model, created, usage_stats=total))
        yield "data: [DONE]\n\n"
        metrics.finished(stream=True, stats=total)
    except (asyncio.CancelledError, GeneratorExit):
        metrics.finished(stream=True, stats=None, status=499, outcome="client disconnected")
        raise
    except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band, as OpenAI does, then end the stream
        metrics.finished(stream=True, stats=None, status=500, outcome=f"error: {exc}")
        yield frame(protocol.error_body(f"generation failed: {exc}", "server_error"))
        yield "data: [DONE]\n\n"
    finally:
        metrics.ended()
