"""/openapi.json is the server's contract, and the server keeps it: schemathesis generates
requests from the document, valid and invalid, for every endpoint, and every answer must be a
documented status with a documented body (errors in OpenAI's shape) and never a 5xx.

Two of schemathesis's checks are left out, on purpose: a schema-valid request may still be
refused (a model name this server does not serve, a prompt over the context limit, a tool
choice naming no offered tool: rules no schema states), and pydantic's lax reading (`"1"` for
1) accepts some bodies the schema calls invalid, as OpenAI's own clients expect."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

import workbench
from workbench.serve.app import ServerSettings, create_app

pytestmark = pytest.mark.timeout(900)

app = create_app(workbench.load("tiny:llama", quiet=True), ServerSettings(model_name="tiny", max_batch=4))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=40, suppress_health_check=list(HealthCheck), deadline=None)
def test_every_endpoint_keeps_the_contract(case):
    if case.body is not None and isinstance(case.body, dict) and case.path.startswith("/v1/"):
        case.body.setdefault("max_tokens", 4)  # generated replies stay short; the limit is tested elsewhere
    case.call_and_validate(excluded_checks=[positive_data_acceptance, negative_data_rejection])


def test_the_document_declares_bodies_replies_and_errors():
    spec = app.openapi()
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
    assert set(chat["responses"]) == {"200", "400", "401", "404", "413"}
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    request = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"tools", "tool_choice", "response_format", "n", "logit_bias"} <= set(request)


def test_a_wrong_method_is_a_405_with_allow():
    import asyncio

    async def call():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/v1/chat/completions")

    reply = asyncio.run(call())
    assert reply.status_code == 405 and reply.headers["allow"] == "POST"
    assert reply.json()["error"]["type"] == "invalid_request_error"
