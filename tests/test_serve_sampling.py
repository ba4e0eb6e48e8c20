"""The server's sampling surface over real HTTP on a tiny model: penalties and min_p reach the
engine, bad values and unsupported fields are 400s naming the field, logprobs come back in
OpenAI's shape, streamed and not."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

import workbench
from workbench.serve.live import LiveServer

MODEL = "tiny:llama"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server():
    with LiveServer(workbench.load(MODEL, quiet=True)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY")


def post(server, **fields) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)


GREEDY = {"temperature": 0, "max_tokens": 16, "extra_body": {"ignore_eos": True}}


def reply_text(client, **fields) -> str:
    return (
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], **{**GREEDY, **fields}
        )
        .choices[0]
        .message.content
    )


def test_penalties_and_min_p_change_the_reply(client):
    plain = reply_text(client)
    assert reply_text(client, presence_penalty=2.0) != plain
    assert reply_text(client, frequency_penalty=2.0) != plain
    assert reply_text(client, extra_body={"ignore_eos": True, "repetition_penalty": 0.5}) != plain
    assert (
        reply_text(client, extra_body={"ignore_eos": True, "min_p": 0.5}) == plain
    )  # greedy keeps the best token anyway


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("frequency_penalty", 2.5),
        ("presence_penalty", -3),
        ("repetition_penalty", 0),
        ("min_p", 1.2),
        ("top_logprobs", 21),
    ],
)
def test_out_of_range_values_are_400s_naming_the_field(server, field, value):
    reply = post(server, **{field: value, "logprobs": True})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field and error["code"] == "invalid_value" and field in error["message"]


def test_top_logprobs_without_logprobs_is_refused(server):
    reply = post(server, top_logprobs=2)
    assert reply.status_code == 400 and "top_logprobs needs logprobs: true" in reply.json()["error"]["message"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("functions", [{"name": "f", "parameters": {}}]),
        ("function_call", "auto"),
        ("best_of", 2),
        ("modalities", ["text", "audio"]),
        ("audio", {"voice": "alloy", "format": "wav"}),
    ],
)
def test_fields_that_change_the_meaning_are_unsupported_not_ignored(server, field, value):
    reply = post(server, **{field: value})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "unsupported_parameter" and error["param"] == field and field in error["message"]


@pytest.mark.parametrize(
    "fields",
    [
        {"tools": [], "tool_choice": "none"},
        {"response_format": {"type": "text"}},
        {"n": 1, "logit_bias": {}},
        {"user": "ada"},
        {"function_call": "none", "best_of": 1, "modalities": ["text"]},
    ],
)
def test_harmless_values_of_those_fields_still_work(server, fields):
    assert post(server, **fields).status_code == 200


def test_logprobs_in_openais_shape_with_the_greedy_token_on_top(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=3, **GREEDY
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 16
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == entry.top_logprobs[0].logprob
        assert entry.bytes == list(entry.token.encode("utf-8", errors="replace"))
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    without = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], **GREEDY)
    assert without.choices[0].logprobs is None
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True, **GREEDY
    )
    assert [e.top_logprobs for e in plain.choices[0].logprobs.content] == [[]] * 16
    assert [e.logprob for e in plain.choices[0].logprobs.content] == [e.logprob for e in content]


def test_streamed_logprobs_are_the_same_entries(server, client):
    whole = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=2, **GREEDY
    ).model_dump()["choices"][0]["logprobs"]["content"]
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "logprobs": True,
        "top_logprobs": 2,
        "temperature": 0,
        "max_tokens": 16,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [
        entry
        for c in chunks
        for choice in c["choices"]
        if choice["logprobs"]
        for entry in choice["logprobs"]["content"]
    ]
    assert streamed == whole
