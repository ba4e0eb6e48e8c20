"""Thinking timelines: per-token phases agree with the engine, latencies are measured."""

import time

import pytest

import workbench
from workbench.inspect.thinking import thinking_timeline


def check_agrees_with_engine(timeline):
    t = timeline.tokens
    assert list(t.step) == list(range(len(t)))
    for call, stats in enumerate(timeline.stats, start=1):
        rows = t[t.call == call]
        assert len(rows) == stats.completion_tokens
        assert int((rows.phase == "reasoning").sum()) == stats.reasoning_tokens
    assert (t.latency_s > 0).all() and t.at_s.is_monotonic_increasing


def test_budget_forcing_gives_both_phases_with_the_budget_respected():
    session = workbench.load("tiny:llama", quiet=True)
    timeline = thinking_timeline(session, "What is 2 + 2?", think_budget=6, max_tokens=5, ignore_eos=True)
    check_agrees_with_engine(timeline)
    summary = timeline.summary()
    assert (summary.reasoning_tokens, summary.answer_tokens, summary.end_tokens) == (6, 5, 0)
    assert list(timeline.tokens.phase) == ["reasoning"] * 6 + ["answer"] * 5
    assert timeline.forced_close and timeline.thinking_via == "budget"
    # the answer call re-reads the prompt, the thought and the appended close tag
    assert timeline.prompt_tokens[1] > timeline.prompt_tokens[0]
    first_answer = timeline.tokens[timeline.tokens.phase == "answer"].iloc[0]
    assert summary.time_to_first_answer_token_s == first_answer.at_s > timeline.tokens.at_s.iloc[5]
    assert summary.reasoning_s + summary.answer_s <= summary.total_s


def test_the_template_switch_path_counts_like_the_engine():
    session = workbench.load("tiny:qwen3", quiet=True)
    timeline = thinking_timeline(session, "hi", max_tokens=12, ignore_eos=True)
    assert timeline.thinking_via == "template" and not timeline.forced_close
    check_agrees_with_engine(timeline)


def test_each_token_latency_is_measured_not_averaged():
    session = workbench.load("tiny:glm4", quiet=True)
    forwards = []

    def slow_third(module, args, kwargs):
        forwards.append(1)
        if len(forwards) == 3:
            time.sleep(1.0)

    handle = session.model.register_forward_pre_hook(slow_third, with_kwargs=True)
    try:
        timeline = thinking_timeline(session, "hi", max_tokens=6, ignore_eos=True)
    finally:
        handle.remove()
    latency = list(timeline.tokens.latency_s)
    # a second's sleep, so a busy shared CPU (tiny-model tokens slowed to tenths of a second)
    # cannot make another token look like the slow one
    assert latency[2] >= 1.0
    assert max(latency[:2] + latency[3:]) < latency[2] - 0.5


def test_a_budget_below_one_token_is_refused():
    session = workbench.load("tiny:llama", quiet=True)
    with pytest.raises(ValueError, match="think_budget must be at least 1"):
        thinking_timeline(session, "hi", think_budget=0)


@pytest.mark.embedded
def test_the_embedded_model_thinks_when_forced_and_not_when_asked(embedded):
    asked = thinking_timeline(embedded, "What is 12 + 7?", max_tokens=12)
    assert asked.thinking_via == "instruction" and asked.summary().reasoning_tokens == 0
    forced = thinking_timeline(embedded, "What is 12 + 7?", think_budget=8, max_tokens=8)
    check_agrees_with_engine(forced)
    summary = forced.summary()
    assert 1 <= summary.reasoning_tokens <= 8 and summary.answer_tokens >= 1 and forced.reasoning
