"""What apps and agents call on the server, through the clients they use: structured outputs
(the openai SDK's `parse`, LangChain's `with_structured_output`, vLLM's guided fields), tool
calls (`bind_tools` round trip, streamed deltas), n > 1 and logit_bias, on the embedded model."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from workbench.serve.live import LiveServer

MODEL = "autoglm-phone-9b"
pytestmark = [pytest.mark.embedded, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def server(embedded):
    with LiveServer(embedded) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY")


def post(server, **fields) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=300)


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    name: str = Field(max_length=20)


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int
    pets: list[Pet] = Field(max_length=3)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


# --- structured outputs ---------------------------------------------------------------------


def test_twenty_sdk_parse_replies_validate_against_a_nested_schema(client):
    """The issue's bar: 20 of 20 `chat.completions.parse` replies (sampled, two seeds of n=10)
    are a valid Person, pets and all, parsed by the SDK itself."""
    parsed = []
    for seed in (1, 2):
        reply = client.chat.completions.parse(
            model=MODEL,
            messages=[{"role": "user", "content": "Make up a person who has pets."}],
            response_format=Person,
            n=10,
            seed=seed,
            temperature=0.8,
            max_tokens=160,
        )
        assert len(reply.choices) == 10
        for choice in reply.choices:
            assert choice.finish_reason == "stop", choice.message.content
            parsed.append(choice.message.parsed)
    assert len(parsed) == 20 and all(isinstance(p, Person) for p in parsed)
    assert len({p.model_dump_json() for p in parsed}) > 1  # sampled: not one reply twenty times


def test_langchain_with_structured_output_returns_the_model(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=server.base_url + "/v1", api_key="EMPTY", temperature=0, max_tokens=160)
    person = llm.with_structured_output(Person, method="json_schema").invoke("Make up a person who has a dog.")
    assert isinstance(person, Person)


@pytest.mark.parametrize(
    ("fields", "check"),
    [
        ({"guided_choice": ["yes", "no"]}, lambda text: text in {"yes", "no"}),
        ({"guided_regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"}, lambda text: re.fullmatch(r"\d{4}-\d{2}-\d{2}", text)),
        ({"response_format": {"type": "json_object"}}, lambda text: isinstance(json.loads(text), dict)),
        ({"structured_outputs": {"choice": ["red", "green"]}}, lambda text: text in {"red", "green"}),
        (
            {"guided_json": json.dumps({"type": "array", "items": {"type": "integer"}, "maxItems": 4})},
            lambda t: isinstance(json.loads(t), list),
        ),
        ({"guided_grammar": 'start: "A" | "B" "!"'}, lambda text: text in {"A", "B!"}),
    ],
    ids=["choice", "regex", "json_object", "structured_outputs", "guided_json string", "lark"],
)
def test_every_way_to_ask_for_a_format_is_kept(server, fields, check):
    reply = post(
        server,
        messages=[{"role": "user", "content": "Is the sky blue? Tell me."}],
        temperature=0,
        max_tokens=60,
        **fields,
    )
    assert reply.status_code == 200, reply.text
    text = reply.json()["choices"][0]["message"]["content"]
    assert check(text), text


def test_constrained_and_free_requests_decode_together(server):
    """A constrained row and free rows in one batch: each keeps its own rule."""
    asks = [
        {"guided_choice": ["alpha", "beta"]},
        {},
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": Person.model_json_schema()},
            }
        },
        {},
    ]
    with ThreadPoolExecutor(len(asks)) as pool:
        replies = list(
            pool.map(
                lambda fields: post(
                    server,
                    messages=[{"role": "user", "content": "Tell me about a person."}],
                    temperature=0,
                    max_tokens=200,
                    frequency_penalty=0,  # the batching is under test, not the model's default penalty
                    **fields,
                ),
                asks,
            )
        )
    texts = [r.json()["choices"][0]["message"]["content"] for r in replies]
    assert texts[0] in {"alpha", "beta"}
    Person.model_validate_json(texts[2])
    assert texts[1] == texts[3] and not texts[1].startswith("{")  # free rows: the model's own prose


def test_a_streamed_structured_reply_is_the_whole_json(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Make up a person."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": Person.model_json_schema()},
        },
        temperature=0,
        max_tokens=160,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    Person.model_validate_json(text)


# --- tool calls -----------------------------------------------------------------------------


def test_required_tool_choice_returns_parseable_arguments(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        temperature=0,
        max_tokens=120,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in {"get_weather", "get_time"}
        arguments = json.loads(call.function.arguments)
        assert set(arguments) <= {"city", "unit"} and "city" in arguments


def test_a_named_tool_is_the_one_called(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
        max_tokens=120,
    )
    calls = reply.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"]
    assert set(json.loads(calls[0].function.arguments)) == {"city"}


def test_tool_calls_stream_as_deltas_that_add_up(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What's the weather in Oslo?"}],
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=120,
        stream=True,
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and "city" in json.loads(calls[0]["arguments"])


def test_langchain_bind_tools_round_trip(server):
    """The call comes back as LangChain tool calls; the tool's answer goes back in the history
    (assistant tool_calls, then a tool message) and the model answers in text."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city now."""
        return f"18 C and sunny in {city}"

    llm = ChatOpenAI(model=MODEL, base_url=server.base_url + "/v1", api_key="EMPTY", temperature=0, max_tokens=80)
    asked = [HumanMessage("What's the weather in Paris?")]
    called = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(asked)
    assert [c["name"] for c in called.tool_calls] == ["get_weather"]
    call = called.tool_calls[0]
    assert isinstance(call["args"].get("city"), str)
    answer = llm.bind_tools([get_weather]).invoke(
        [*asked, called, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    )
    assert isinstance(answer.content, str) and answer.content.strip()


def test_tool_choice_none_answers_in_text(server):
    reply = post(server, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=20)
    choice = reply.json()["choices"][0]
    assert choice["finish_reason"] in {"stop", "length"} and "tool_calls" not in choice["message"]


# --- n and logit_bias -----------------------------------------------------------------------


def test_n_choices_are_each_a_seeded_single_request(client):
    """n=3 with seed 5 gives three choices; choice i is what a lone request with seed 5 + i gets."""
    asked = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name a fruit."}],
        "temperature": 1.0,
        "max_tokens": 12,
    }
    reply = client.chat.completions.create(n=3, seed=5, **asked)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    alone = [client.chat.completions.create(seed=5 + i, **asked).choices[0].message.content for i in range(3)]
    assert [c.message.content for c in reply.choices] == alone
    assert reply.usage.completion_tokens == sum(
        client.chat.completions.create(seed=5 + i, **asked).usage.completion_tokens for i in range(3)
    )


def test_n_choices_stream_with_their_indices(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        n=2,
        seed=3,
        temperature=1.0,
        max_tokens=8,
        stream=True,
    )
    texts, finished = {0: "", 1: ""}, set()
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1} and all(texts.values())


def test_logit_bias_bans_and_forces_tokens(embedded, client):
    asked = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 20,
    }
    assert "Paris" in client.chat.completions.create(**asked).choices[0].message.content
    banned = {
        str(i): -100
        for word in ("Paris", " Paris")
        for i in embedded.tokenizer.encode(word, add_special_tokens=False)[:1]
    }
    reply = client.chat.completions.create(logit_bias=banned, logprobs=True, **asked)
    assert "Paris" not in reply.choices[0].message.content
    bang = embedded.tokenizer.encode("!", add_special_tokens=False)[0]
    forced = client.chat.completions.create(
        logit_bias={str(bang): 100}, max_tokens=5, **{k: v for k, v in asked.items() if k != "max_tokens"}
    )
    assert forced.choices[0].message.content == "!" * 5


def test_completions_take_n_and_logit_bias(server, embedded):
    bang = embedded.tokenizer.encode("!", add_special_tokens=False)[0]
    body = {
        "model": MODEL,
        "prompt": ["Once upon", "The cat"],
        "n": 2,
        "max_tokens": 3,
        "logit_bias": {str(bang): 100},
        "temperature": 0,
    }
    reply = httpx.post(server.base_url + "/v1/completions", json=body, timeout=120).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == "!!!" for c in reply["choices"])
    prompt_tokens = sum(len(embedded.tokenizer.encode(p)) for p in body["prompt"])
    assert reply["usage"]["prompt_tokens"] == prompt_tokens and reply["usage"]["completion_tokens"] == 12
