"""Every sampling knob is held to the same bounds wherever it arrives: a config's defaults, an
engine request and a server request refuse the same values and take the same edges."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import workbench
from workbench.config import GenerationConfig
from workbench.engine import ChatRequest
from workbench.sampling_params import SamplingParams
from workbench.serve.protocol import ChatCompletionRequest

MESSAGES = [{"role": "user", "content": "hi"}]


STEPS = {"ge": (-1, 0), "gt": (0, 1), "le": (1, 0), "lt": (0, -1)}
"""For each kind of bound, the steps from it to a value past it and to the nearest value it admits."""


def _edges() -> list:
    """(knob, a value past one of its bounds, the nearest value it takes) for every bound of
    every knob, read from SamplingParams; a knob with no bounds is refused a string."""
    cases = []
    for name, field in SamplingParams.model_fields.items():
        step = 1 if field.annotation is int else 0.01
        for bound in field.metadata:
            for kind, (past, edge) in STEPS.items():
                if hasattr(bound, kind):
                    value = getattr(bound, kind)
                    cases.append(pytest.param(name, value + past * step, value + edge * step, id=f"{name}-{kind}"))
        if not field.metadata:
            cases.append(pytest.param(name, "many", 7, id=f"{name}-type"))
    return cases


def config(name, value):
    return GenerationConfig(**{name: value})


def engine_request(name, value):
    return ChatRequest(messages=MESSAGES, **{name: value})


def server_request(name, value):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, name: value})


@pytest.mark.parametrize(("name", "past", "edge"), _edges())
@pytest.mark.parametrize("build", [config, engine_request, server_request])
def test_each_knob_has_the_same_bounds_in_config_engine_and_server(build, name, past, edge):
    with pytest.raises(ValidationError) as refused:
        build(name, past)
    assert [e["loc"] for e in refused.value.errors()] == [(name,)]
    assert getattr(build(name, edge), name) == edge


def _refuses(build) -> bool:
    try:
        build()
    except ValidationError:
        return True
    return False


@pytest.mark.parametrize("value", [-1, 0, 1, 20, 21])
def test_the_servers_other_names_for_a_bound_keep_it(value):
    top = {"model": "m", "messages": MESSAGES, "logprobs": True, "top_logprobs": value}
    server_refuses = _refuses(lambda: ChatCompletionRequest.model_validate(top))
    assert server_refuses == _refuses(lambda: engine_request("logprobs", value))
    server_refuses = _refuses(lambda: server_request("max_completion_tokens", value))
    assert server_refuses == _refuses(lambda: engine_request("max_tokens", value))


# One value inside the bounds for each knob, none of them its default.
ASKED = {
    "max_tokens": 9,
    "temperature": 0.3,
    "top_p": 0.5,
    "top_k": 4,
    "min_p": 0.1,
    "frequency_penalty": 0.2,
    "presence_penalty": -0.2,
    "repetition_penalty": 1.3,
    "seed": 11,
}


def test_the_asked_values_cover_every_knob():
    assert set(ASKED) == set(SamplingParams.model_fields)
    assert all(getattr(SamplingParams(), name) != value for name, value in ASKED.items())


def test_a_server_request_hands_every_knob_to_the_engine():
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **ASKED}).to_engine()
    assert request.model_dump(include=set(ASKED)) == ASKED


@pytest.fixture(scope="module")
def llama():
    return workbench.load("tiny:llama", quiet=True)


def test_a_plan_takes_each_knob_from_the_request_else_the_sessions_default(llama):
    defaults = llama.engine.defaults
    assert llama.engine.plan(ChatRequest.from_prompt("hi")).sampling == SamplingParams(
        **defaults.model_dump(include=set(SamplingParams.model_fields))
    )
    for name, value in ASKED.items():
        sampling = llama.engine.plan(ChatRequest.from_prompt("hi", **{name: value})).sampling
        assert getattr(sampling, name) == value
        assert all(getattr(sampling, other) == getattr(defaults, other) for other in ASKED if other != name)


def test_the_type_checkers_view_of_the_overrides_lists_every_knob():
    """SamplingOverrides is generated at run time; its TYPE_CHECKING stand-in must not drift."""
    import ast
    from pathlib import Path

    import workbench.sampling_params as module

    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    stub = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "SamplingOverrides")
    names = [n.target.id for n in stub.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    assert names == list(SamplingParams.model_fields)
