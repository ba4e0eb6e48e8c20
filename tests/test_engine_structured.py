"""Constrained decoding, tool calls and logit_bias in the engine, on tiny random models: a random
model writes whatever its weights say, so a reply that still follows the grammar shows the
grammar at work, not the model."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

import workbench
from workbench.engine import ChatRequest, RequestError, TextDelta
from workbench.engine.request import Message, StructuredOutput
from workbench.engine.structured import Constraint, constraint_of
from workbench.engine.template import render_prompt
from workbench.engine.tools import OPEN_TAG, Tool, ToolCall, ToolCallParser, fallback_instruction, grammar_of

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
WEATHER = Tool.model_validate(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 16}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
)
TIME = Tool.model_validate(
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["utc", "cet"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    }
)
"""Bounded arguments: a random model's free strings run on to max_tokens."""


def chat(session, **fields):
    fields.setdefault("messages", [{"role": "user", "content": "hello there"}])
    return session.chat(fields.pop("messages"), **fields)


# --- structured outputs ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_a_random_model_still_writes_valid_json(tiny, seed):
    result = chat(tiny, structured={"json_schema": PERSON}, temperature=1.0, seed=seed, max_tokens=120)
    assert result.stats.finish_reason == "stop", result.text
    person = json.loads(result.text)
    assert set(person) == {"name", "age", "tags"} and 0 <= person["age"] <= 130 and len(person["name"]) <= 12


@pytest.mark.parametrize(
    ("structured", "matches"),
    [
        ({"regex": "[a-c]{2,5}!"}, lambda t: re.fullmatch("[a-c]{2,5}!", t)),
        ({"choice": ["left", "right"]}, lambda t: t in {"left", "right"}),
        ({"grammar": 'start: "x" "y"* "z"'}, lambda t: re.fullmatch("xy*z", t)),
    ],
)
def test_each_kind_of_constraint_holds(tiny, structured, matches):
    result = chat(tiny, structured=structured, temperature=1.0, seed=0, max_tokens=200)
    assert matches(result.text), result.text


def test_free_and_constrained_rows_share_a_batch():
    session = workbench.load("tiny:llama", quiet=True)
    engine = session.engine
    free = engine.plan({"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 8})
    held = engine.plan(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0,
            "max_tokens": 8,
            "structured": {"choice": ["ok"]},
        }
    )
    texts = {0: "", 1: ""}
    for index, event in engine.generate([free, held]):
        if isinstance(event, TextDelta):
            texts[index] += event.text
    asked = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 8}
    alone = "".join(e.text for e in engine.stream(asked) if isinstance(e, TextDelta))
    assert texts[1] == "ok" and texts[0] == alone


@pytest.mark.parametrize(
    ("structured", "message"),
    [
        ({"regex": "[a-"}, "unclosed character class"),
        ({"json_schema": {"type": "frobnicate"}}, "frobnicate"),
        ({"grammar": "start: undefined_rule"}, "undefined_rule"),
    ],
)
def test_a_grammar_that_cannot_be_enforced_is_refused_before_any_work(tiny, count_forwards, structured, message):
    calls = count_forwards(tiny.model)
    with pytest.raises(RequestError, match=message) as raised:
        tiny.engine.plan({"messages": [{"role": "user", "content": "hi"}], "structured": structured})
    assert raised.value.param == "response_format" and calls == []


@pytest.mark.parametrize(
    "structured",
    [{}, {"regex": "a", "choice": ["a"]}, {"choice": []}, {"choice": [""]}, {"json_object": False}],
)
def test_a_structured_output_is_exactly_one_thing(structured):
    with pytest.raises(ValueError):
        StructuredOutput.model_validate(structured)


def test_reasoning_runs_free_and_the_grammar_holds_the_answer():
    """A template that opened a think block: tokens the grammar forbids pass while reasoning;
    after `</think>` the same forbidden token is masked away."""
    session = workbench.load("tiny:llama", quiet=True)
    session.tokenizer.chat_template += "{%- if add_generation_prompt %}{{- '<think>\n' }}{%- endif %}"
    engine = session.engine
    plan = engine.plan(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0,
            "max_tokens": 40,
            "structured": {"choice": ["yes"]},
        }
    )
    assert plan.prompt.starts_in_reasoning
    from workbench.engine.sequence import Sequence

    sequence = Sequence(
        plan, session.tokenizer, engine.eos_ids, engine.device, engine.grammars.matcher(plan.constraint)
    )
    vocab = engine.vocab_size
    forbidden = session.tokenizer.encode("zebra", add_special_tokens=False)[0]

    def pick(token: int) -> torch.Tensor:
        logits = torch.full((1, vocab), -10.0)
        logits[0, token] = 10.0
        return logits

    assert sequence.accept(pick(forbidden))[0] == forbidden  # reasoning: free
    for token in session.tokenizer.encode("</think>", add_special_tokens=False):
        sequence.accept(pick(token))
    assert sequence.parser.channel == "text"
    token, _ = sequence.accept(pick(forbidden))  # the answer: the grammar's
    assert token != forbidden and session.tokenizer.decode([token]) in "yes"


# --- logit_bias -----------------------------------------------------------------------------


def test_logit_bias_forces_and_bans(tiny):
    greedy = chat(tiny, temperature=0, max_tokens=6, logprobs=0)
    first = greedy.logprobs[0].token_id
    banned = chat(tiny, temperature=0, max_tokens=6, logprobs=0, logit_bias={first: -100})
    assert first not in [e.token_id for e in banned.logprobs]
    forced = chat(tiny, temperature=1.0, seed=1, max_tokens=6, logprobs=0, logit_bias={7: 100}, ignore_eos=True)
    assert [e.token_id for e in forced.logprobs] == [7] * 6


def test_logit_bias_off_the_vocabulary_is_refused(tiny):
    with pytest.raises(RequestError, match="outside the vocabulary") as raised:
        tiny.engine.plan({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {10**6: 1}})
    assert raised.value.param == "logit_bias"


@pytest.mark.parametrize("bias", [{1: 101}, {1: -100.5}, {"one": 1}])
def test_logit_bias_values_keep_openais_range(bias):
    with pytest.raises(ValueError):
        ChatRequest.from_prompt("hi", logit_bias=bias)


# --- tool calls -----------------------------------------------------------------------------


def test_required_tools_give_calls_that_parse_even_from_a_random_model(tiny):
    for seed in range(3):
        # One call: a random model would go on calling until max_tokens.
        result = chat(
            tiny,
            tools=[WEATHER, TIME],
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1.0,
            seed=seed,
            max_tokens=200,
        )
        assert result.stats.finish_reason == "tool_calls" and result.tool_calls, result.text
        for call in result.tool_calls:
            arguments = json.loads(call.arguments)
            assert call.name in {"get_weather", "get_time"} and isinstance(arguments, dict)
            if call.name == "get_weather":
                assert set(arguments) == {"city"}


def test_a_named_tool_and_no_parallel_calls_give_exactly_that_call(tiny):
    result = chat(
        tiny,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=1.0,
        seed=4,
        max_tokens=200,
    )
    assert [c.name for c in result.tool_calls] == ["get_weather"] and result.text == ""


def test_the_tool_grammar_accepts_calls_and_nothing_else(tiny):
    grammars = tiny.engine.grammars
    constraint = Constraint(grammar_of([WEATHER], "required", parallel=False) or "", "tool_calls")
    grammars.check(constraint, "tools")

    def walks(text: str) -> bool:
        matcher = grammars.matcher(constraint)._matcher
        return all(matcher.consume_token(t) for t in tiny.tokenizer.encode(text, add_special_tokens=False))

    assert walks(f'{OPEN_TAG}\n{{"name":"get_weather","arguments":{{"city":"Oslo"}}}}\n</tool_call>')
    assert not walks(f'{OPEN_TAG}\n{{"name":"get_time","arguments":{{}}}}')
    assert not walks(f'{OPEN_TAG}\n{{"name":"get_weather","arguments":{{"town":"Oslo"}}}}')
    assert not walks("Sure! ")


@pytest.mark.parametrize(
    ("chunks", "text", "names"),
    [
        (
            ["Let me check. <to", 'ol_call>\n{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}\n</tool_call>'],
            "Let me check. ",
            ["get_weather"],
        ),
        (
            [
                f'{OPEN_TAG}{{"name":"get_time","arguments":{{}}}}</tool_call>\n{OPEN_TAG}{{"name":"get_weather","arguments":"{{\\"city\\": \\"Rome\\"}}"}}</tool_call>'
            ],
            "",
            ["get_time", "get_weather"],
        ),
        (
            [f'{OPEN_TAG}{{"name":"launch","arguments":{{}}}}</tool_call>'],
            f'{OPEN_TAG}{{"name":"launch","arguments":{{}}}}</tool_call>',
            [],
        ),
        ([f"{OPEN_TAG}not json</tool_call>"], f"{OPEN_TAG}not json</tool_call>", []),
        (["a <b> c <tool", " d"], "a <b> c <tool d", []),
    ],
    ids=["split tag after text", "two calls, string arguments", "unknown function", "not json", "no call"],
)
def test_calls_are_read_out_of_a_streamed_answer(chunks, text, names):
    parser = ToolCallParser(("get_weather", "get_time"))
    passed = "".join(parser.feed(chunk) for chunk in chunks)
    tail, calls = parser.finish()
    assert passed + tail == text
    assert [c.name for c in calls] == names
    assert all(isinstance(json.loads(c.arguments), dict) for c in calls)
    assert len({c.id for c in calls}) == len(calls) and [c.index for c in calls] == list(range(len(calls)))


HISTORY = [
    Message(role="user", content="Weather in Oslo?"),
    Message.model_validate(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        }
    ),
    Message(role="tool", content="3 C, snow", tool_call_id="call_1"),
]


def test_a_template_without_tools_gets_the_fallback(tiny):
    prompt = render_prompt(tiny.tokenizer, HISTORY, False, tools=[WEATHER])
    assert fallback_instruction([WEATHER]) in prompt.text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in prompt.text
    assert "<tool_response>\n3 C, snow\n</tool_response>" in prompt.text


def test_a_template_with_tools_gets_them_as_they_are():
    session = workbench.load("tiny:qwen3", quiet=True)
    tokenizer = copy.deepcopy(session.tokenizer)
    tokenizer.chat_template = (
        "{% for t in tools %}TOOL {{ t.function.name }};{% endfor %}"
        "{% for m in messages %}[{{ m.role }}]{{ m.content or '' }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.city }};{% endfor %}"
        "{% if m.tool_call_id %}(for {{ m.tool_call_id }}){% endif %}{% endfor %}[assistant]"
    )
    text = render_prompt(tokenizer, HISTORY, False, tools=[WEATHER]).text
    assert (
        text
        == "TOOL get_weather;[user]Weather in Oslo?[assistant]CALL get_weather Oslo;[tool]3 C, snow(for call_1)[assistant]"
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"tools": [WEATHER.model_dump()], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER.model_dump(), WEATHER.model_dump()]}, "tools"),
        ({"tools": [WEATHER.model_dump()], "structured": {"json_object": True}}, "tool_choice"),
    ],
)
def test_tool_requests_that_cannot_be_served_are_refused(tiny, fields, param):
    with pytest.raises(RequestError) as raised:
        tiny.engine.plan({"messages": [{"role": "user", "content": "hi"}], **fields})
    assert raised.value.param == param


def test_tool_calls_are_events_before_done(tiny):
    events = list(
        tiny.engine.stream(
            {
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [WEATHER.model_dump()],
                "tool_choice": "required",
                "temperature": 0,
                "max_tokens": 200,
            }
        )
    )
    kinds = [type(e).__name__ for e in events]
    assert kinds[-1] == "Done" and kinds[-2] == "ToolCall"
    assert all(isinstance(e, ToolCall) for e in events[kinds.index("ToolCall") : -1])
    assert constraint_of(StructuredOutput(choice=["a"])).kind == "choice"
