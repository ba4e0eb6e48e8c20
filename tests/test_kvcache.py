"""KV-cache policies: the engine generates with them, and their memory behaves as they promise."""

import dataclasses
import importlib.util

import pytest
import torch

import workbench
from workbench.compress.kvcache import kv_cache
from workbench.config import ConfigError, parse_config
from workbench.engine import ChatRequest, Done

LONG = "one two three four five six seven eight nine ten " * 6


def run(session, prompt=LONG, tokens=24):
    return [
        e
        for e in session.engine.stream(
            ChatRequest.from_prompt(prompt, max_tokens=tokens, temperature=0, ignore_eos=True)
        )
        if isinstance(e, Done)
    ][0].stats


def capture_cache(session):
    made = []
    policy = session.engine.cache_policy
    spy = dataclasses.replace(policy, factory=lambda config: made.append(policy.factory(config)) or made[-1])
    session.engine.set_cache_policy(spy)
    return made


def test_sliding_window_bounds_the_cache_whatever_the_length():
    session = workbench.load("tiny:llama", quiet=True)
    report = kv_cache(session, policy="sliding_window", window=32)
    assert report.bound_tokens == 32
    made = capture_cache(session)
    stats = run(session)
    assert stats.prompt_tokens + stats.completion_tokens > 64 and stats.completion_tokens == 24
    assert all(layer.keys.shape[2] <= 32 for layer in made[0].layers)


def test_dynamic_cache_holds_every_token():
    session = workbench.load("tiny:llama", quiet=True)
    kv_cache(session, policy="dynamic")
    made = capture_cache(session)
    stats = run(session)
    # the last sampled token is never fed back, so the cache holds one fewer than the total
    assert made[0].get_seq_length() == stats.prompt_tokens + stats.completion_tokens - 1


def test_sliding_window_changes_nothing_while_the_text_fits():
    plain = workbench.load("tiny:qwen3", quiet=True)
    windowed = workbench.load("tiny:qwen3", quiet=True)
    kv_cache(windowed, policy="sliding_window", window=256)
    assert plain.chat("hi", temperature=0, max_tokens=12).text == windowed.chat("hi", temperature=0, max_tokens=12).text


@pytest.mark.skipif(importlib.util.find_spec("optimum.quanto") is None, reason="optimum-quanto not installed")
def test_quantized_cache_generates():
    session = workbench.load("tiny:llama", quiet=True)
    kv_cache(session, policy="quantized", nbits=4, residual_length=16)
    assert run(session, prompt="hi", tokens=4).completion_tokens == 4


def test_offloaded_cache_is_refused_on_cpu_with_a_reason():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    session = workbench.load("tiny:llama", quiet=True)
    with pytest.raises(ValueError, match="nothing to offload"):
        kv_cache(session, policy="offloaded")


def test_policies_other_than_dynamic_do_not_batch():
    session = workbench.load("tiny:llama", quiet=True)
    kv_cache(session, policy="sliding_window", window=64)
    plans = [session.engine.plan(ChatRequest.from_prompt(p)) for p in ("a", "b")]
    with pytest.raises(ValueError, match="at most 1 request"):
        list(session.engine.generate(plans))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"policy": "sliding_window"}, "needs `window`"),
        ({"policy": "dynamic", "window": 64}, "applies to the sliding_window policy"),
        ({"policy": "sliding_window", "window": 4}, "window: Input should be greater than or equal to 16"),
        ({"policy": "paged"}, "policy: Input should be"),
        ({"policy": "quantized", "nbits": 3}, "nbits"),
    ],
)
def test_bad_cache_configs_fail_when_read(options, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"compression": [{"step": "kv_cache", **options}]}, "kv.yaml")


def test_pruning_after_quantization_is_refused_when_read():
    steps = [{"step": "quantize"}, {"step": "prune_heads", "ratio": 0.25}]
    with pytest.raises(ConfigError, match="prune_heads must come before quantize"):
        parse_config({"compression": steps}, "order.yaml")


def test_all_three_steps_together_still_stream(tmp_path):
    path = tmp_path / "mobile.yaml"
    path.write_text(
        "model:\n  source: tiny:glm4\ncompression:\n"
        "  - step: prune_heads\n    criterion: weight_norm\n    per_layer: 1\n"
        "  - step: quantize\n    scheme: keep\n    rules:\n      - pattern: 'model.layers.*.mlp.*'\n        scheme: int8_weight_only\n"
        "      - pattern: 'model.layers.*.self_attn.*'\n        scheme: fp16\n"
        "  - step: kv_cache\n    policy: sliding_window\n    window: 32\n"
    )
    session = workbench.load(path, quiet=True)
    assert [r["step"] for r in session.reports] == ["prune_heads", "quantize", "kv_cache"]
    assert run(session).completion_tokens == 24
