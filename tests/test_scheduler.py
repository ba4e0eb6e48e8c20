"""Who decides how many requests decode together: the engine's batch limits (its KV-cache
policy's and the model's, the smallest wins) and the scheduler that batches waiting requests
under them (workbench/engine/scheduler.py)."""

import asyncio
import importlib.util

import pytest

import workbench
from workbench.compress.kvcache import kv_cache
from workbench.engine import ChatRequest, Done
from workbench.engine.scheduler import GenerationQueue

ASK = {"max_tokens": 2, "temperature": 0, "ignore_eos": True}


def serve_together(engine, prompts: list[str], monkeypatch, **queue_options) -> list[list[int]]:
    """Send `prompts` to a scheduler at once and let every reply finish; for each generate()
    the scheduler started, how many requests it started with, then how many joined it later."""
    batches: list[list[int]] = []
    generate = engine.generate

    def spy(plans, is_cancelled=None, admit=None, max_rows=None):
        batches.append([len(plans)])

        def counted(room):
            joined = admit(room)
            if joined:
                batches[-1].append(len(joined))
            return joined

        return generate(plans, is_cancelled=is_cancelled, admit=counted if admit else None, max_rows=max_rows)

    monkeypatch.setattr(engine, "generate", spy)
    scheduler = GenerationQueue(engine, **queue_options)

    async def reply(prompt: str) -> list:
        return [event async for event in scheduler.events(engine.plan(ChatRequest.from_prompt(prompt, **ASK)))]

    async def all_replies() -> list[list]:
        return await asyncio.gather(*(reply(prompt) for prompt in prompts))

    try:
        replies = asyncio.run(all_replies())
    finally:
        scheduler.shutdown()
    assert all(isinstance(events[-1], Done) for events in replies)
    return batches


def test_the_dynamic_policy_alone_leaves_the_batch_unlimited():
    session = workbench.load("tiny:llama", quiet=True)
    assert session.engine.max_batch is None
    kv_cache(session, policy="dynamic")
    assert session.engine.max_batch is None


@pytest.mark.parametrize(
    "options",
    [
        {"policy": "sliding_window", "window": 64},
        pytest.param(
            {"policy": "quantized"},
            marks=pytest.mark.skipif(
                importlib.util.find_spec("optimum.quanto") is None, reason="optimum-quanto not installed"
            ),
        ),
    ],
)
def test_policies_other_than_dynamic_limit_the_batch_to_one_until_replaced(options):
    session = workbench.load("tiny:llama", quiet=True)
    kv_cache(session, **options)
    assert session.engine.max_batch == 1
    kv_cache(session, policy="dynamic")
    assert session.engine.max_batch is None


def test_batch_limits_compose_and_the_smallest_wins():
    session = workbench.load("tiny:llama", quiet=True)
    engine = session.engine
    engine.limit_batch(3, reason="a test keeps three at most")
    assert engine.max_batch == 3
    kv_cache(session, policy="sliding_window", window=64)
    assert engine.max_batch == 1
    kv_cache(session, policy="dynamic")  # the policy's limit goes, the other one stays
    assert engine.max_batch == 3
    plans = [engine.plan(ChatRequest.from_prompt(p, **ASK)) for p in "abcd"]
    with pytest.raises(ValueError, match="at most 3 request.*a test keeps three at most"):
        list(engine.generate(plans))


def test_a_batch_limit_below_one_is_refused():
    session = workbench.load("tiny:llama", quiet=True)
    with pytest.raises(ValueError, match="at least 1"):
        session.engine.limit_batch(0, reason="nothing at all")


def test_the_scheduler_batches_what_arrives_together(monkeypatch):
    session = workbench.load("tiny:llama", quiet=True)
    assert serve_together(session.engine, ["a", "b", "c"], monkeypatch, gather_s=1.0) == [[3]]


def test_the_scheduler_respects_the_cache_policy(monkeypatch):
    session = workbench.load("tiny:llama", quiet=True)
    kv_cache(session, policy="sliding_window", window=64)
    assert serve_together(session.engine, ["a", "b", "c"], monkeypatch, gather_s=1.0) == [[1], [1], [1]]


def test_a_vlm_with_the_dynamic_cache_policy_still_serves_one_request_at_a_time(tmp_path, monkeypatch):
    """The kv_cache step once reset the batch limit to none, undoing the vision-language
    model's limit of one (its multimodal rotary positions are kept per model, not per row)."""
    config = tmp_path / "vlm.yaml"
    config.write_text("model:\n  source: tiny:smolvlm\ncompression:\n  - step: kv_cache\n    policy: dynamic\n")
    session = workbench.load(config, quiet=True)
    assert [report["step"] for report in session.reports] == ["kv_cache"]
    assert session.engine.max_batch == 1
    plans = [session.engine.plan(ChatRequest.from_prompt(p, **ASK)) for p in ("a", "b")]
    with pytest.raises(ValueError, match="at most 1 request.*vision-language model"):
        list(session.engine.generate(plans))
    assert serve_together(session.engine, ["a", "b", "c"], monkeypatch, gather_s=1.0) == [[1], [1], [1]]
