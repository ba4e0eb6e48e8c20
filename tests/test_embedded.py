"""The engine on the real embedded SmolLM2-135M-Instruct: short replies, real behaviour."""

import pytest

from workbench.engine import ContextLengthError, Done, TextDelta
from workbench.engine.request import ChatRequest
from workbench.engine.template import THINK_INSTRUCTION, render_prompt

pytestmark = pytest.mark.embedded

FRANCE = "What is the capital of France?"


def test_answers_a_factual_question_and_stops_at_end_of_turn(embedded):
    result = embedded.chat(FRANCE, temperature=0, max_tokens=48)
    assert "Paris" in result.text
    assert result.stats.finish_reason == "stop"
    assert result.stats.completion_tokens < 48
    assert result.stats.ttft_s > 0 and result.stats.decode_tokens_per_s > 0
    assert "<|im_end|>" not in result.text


def test_streams_in_several_deltas(embedded):
    deltas = [
        e
        for e in embedded.engine.stream(ChatRequest.from_prompt(FRANCE, temperature=0, max_tokens=48))
        if isinstance(e, TextDelta)
    ]
    assert len(deltas) > 3
    assert "Paris" in "".join(d.text for d in deltas)


def test_stop_string_cuts_the_real_answer(embedded):
    """The stopped reply is the unstopped greedy reply cut before the stop string: two paths
    agreeing on this machine, not one exact sentence that another CPU's kernels may word differently."""
    full = embedded.chat(FRANCE, temperature=0, max_tokens=48).text
    assert "Paris" in full
    result = embedded.chat(FRANCE, temperature=0, max_tokens=48, stop=["Paris"])
    assert result.text == full[: full.index("Paris")]
    assert result.stats.finish_reason == "stop"


def test_thinking_asks_through_a_system_instruction_and_never_leaks_tags(embedded):
    prompt = render_prompt(embedded.tokenizer, ChatRequest.from_prompt(FRANCE).messages, enable_thinking=True)
    assert prompt.thinking_via == "instruction" and THINK_INSTRUCTION in prompt.text
    result = embedded.chat(FRANCE, enable_thinking=True, temperature=0, max_tokens=96)
    assert "<think>" not in result.text and "</think>" not in result.text
    assert (result.text + result.reasoning).strip()
    assert result.stats.reasoning_tokens <= result.stats.completion_tokens


def test_sampling_with_a_seed_is_reproducible(embedded):
    a = embedded.chat("Name a colour.", temperature=1.0, seed=3, max_tokens=16)
    b = embedded.chat("Name a colour.", temperature=1.0, seed=3, max_tokens=16)
    assert a.text == b.text


def test_context_overflow_is_refused_before_generation(embedded, count_forwards):
    calls = count_forwards(embedded.model)
    with pytest.raises(ContextLengthError, match="context limit of 8192 tokens"):
        embedded.engine.stream(ChatRequest.from_prompt("phone " * 9000))
    assert calls == []


def test_stopping_iteration_cancels_generation(embedded, count_forwards):
    calls = count_forwards(embedded.model)
    stream = embedded.engine.stream(ChatRequest.from_prompt("Tell me a long story.", max_tokens=400, temperature=0))
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    assert len(calls) < 10


def test_multi_turn_history_is_used(embedded):
    history = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada!"},
        {"role": "user", "content": "What is my name?"},
    ]
    result = embedded.chat(history, temperature=0, max_tokens=32)
    assert "Ada" in result.text


def test_done_carries_usage(embedded):
    events = list(embedded.engine.stream(ChatRequest.from_prompt(FRANCE, temperature=0, max_tokens=8)))
    done = events[-1]
    assert isinstance(done, Done)
    assert done.stats.prompt_tokens == len(
        embedded.tokenizer.apply_chat_template(
            [{"role": "user", "content": FRANCE}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )


def test_a_batch_answers_exactly_as_one_request_at_a_time(embedded):
    prompts = [
        "What is the capital of France?",
        "Hi",
        "Name one thing that is blue.",
        "Explain in two sentences what a KV cache is.",
    ]
    alone = [embedded.chat(p, temperature=0, max_tokens=20).text for p in prompts]
    plans = [embedded.engine.plan(ChatRequest.from_prompt(p, temperature=0, max_tokens=20)) for p in prompts]
    together = [""] * len(prompts)
    for index, event in embedded.engine.generate(plans):
        if isinstance(event, TextDelta):
            together[index] += event.text
    assert together == alone


def test_a_request_that_joins_mid_batch_answers_as_it_would_alone(embedded):
    late = embedded.engine.plan(ChatRequest.from_prompt("Name one thing that is blue.", temperature=0, max_tokens=20))
    expected = embedded.chat("Name one thing that is blue.", temperature=0, max_tokens=20).text
    calls = []

    def admit(room):
        calls.append(1)
        return [late] if len(calls) == 5 else []

    first = embedded.engine.plan(
        ChatRequest.from_prompt("Tell me a story about a phone.", temperature=0, max_tokens=30, ignore_eos=True)
    )
    text = "".join(
        e.text for i, e in embedded.engine.generate([first], admit=admit) if i == 1 and isinstance(e, TextDelta)
    )
    assert text == expected
