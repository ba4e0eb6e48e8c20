"""KV-cache accounting: the config-only prediction equals the bytes a real cache holds."""

import json

import pytest

import workbench
from workbench.compress.pruning import prune_heads
from workbench.inspect.kvcache import (
    context_cost,
    fill_cache,
    kv_bytes_per_token_from_config,
    kv_shape,
    measure_cache,
    memory_curve,
)
from workbench.models.anatomy import kv_bytes_per_token


def test_predicted_equals_measured_for_the_dynamic_cache_on_each_tiny_architecture(tiny):
    predicted = kv_bytes_per_token_from_config(tiny.model.config)
    assert predicted == 2 * 2 * 16 * 2 * 4  # layers x KV heads x head_dim x (k, v) x float32
    for tokens in (1, 37, 100):
        assert measure_cache(tiny, tokens, chunk=16) == predicted * tokens


@pytest.mark.embedded
def test_predicted_equals_measured_for_the_dynamic_cache_on_the_embedded_model(embedded):
    predicted = kv_bytes_per_token_from_config(embedded.model.config)
    assert predicted == 30 * 3 * 64 * 2 * 4 == 46_080
    assert predicted == kv_bytes_per_token(embedded.model)  # the module-based count agrees
    assert measure_cache(embedded, 150, chunk=64) == predicted * 150


def test_a_pruned_model_predicts_its_smaller_cache():
    session = workbench.load("tiny:llama", quiet=True)
    prune_heads(session, criterion="weight_norm", per_layer=1)
    config = session.model.config.to_dict()
    assert kv_shape(config).kv_heads_per_layer == (1, 1)
    assert measure_cache(session, 50) == kv_bytes_per_token_from_config(config) * 50 == 256 * 50


def test_glm_4_9b_at_8k_from_its_config_file_alone():
    path = "data/glm-4-9b-chat-hf.config.json"
    shape = kv_shape(path)
    assert (shape.layers, shape.kv_heads_per_layer[0], shape.head_dim, shape.dtype) == (40, 2, 128, "bfloat16")
    assert shape.bytes_per_token == 40 * 2 * 128 * 2 * 2 == 40_960
    cost = context_cost(path, [8192])
    assert int(cost["bytes"][0]) == 40_960 * 8192 and float(cost["MiB"][0]) == 320.0


def test_chatglm_style_and_multimodal_configs_are_read(tmp_path):
    chatglm = {
        "num_layers": 40,
        "num_attention_heads": 32,
        "multi_query_group_num": 2,
        "kv_channels": 128,
        "hidden_size": 4096,
        "torch_dtype": "bfloat16",
    }
    assert kv_bytes_per_token_from_config(chatglm) == 40_960
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {**chatglm, "num_hidden_layers": 40}}))
    assert kv_bytes_per_token_from_config(tmp_path) == 40_960
    # no num_key_value_heads: multi-head attention; no head_dim: hidden_size / heads
    assert (
        kv_bytes_per_token_from_config({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64})
        == 2 * 4 * 16 * 2 * 4
    )
    assert kv_bytes_per_token_from_config(chatglm, dtype="float32") == 81_920


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"hidden_size": 64}, "no layer or attention-head count"),
        ({"num_hidden_layers": 2, "num_attention_heads": 4}, "neither head_dim nor hidden_size"),
        (
            {"num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 8, "torch_dtype": "float64x"},
            "unknown cache dtype",
        ),
    ],
)
def test_configs_that_cannot_say_their_cache_size_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        kv_shape(config)


def test_memory_curve_bounds_the_sliding_window_and_skips_offloaded_on_cpu_with_a_reason():
    session = workbench.load("tiny:llama", quiet=True)
    policies = [
        {"policy": "dynamic"},
        {"policy": "sliding_window", "window": 32},
        {"policy": "quantized", "nbits": 4, "residual_length": 16},
        {"policy": "offloaded"},
    ]
    frame = memory_curve(session, [16, 64, 128], policies=policies, chunk=16)
    dynamic = frame[frame.policy == "dynamic"]
    assert list(dynamic.cache_bytes) == [512 * 16, 512 * 64, 512 * 128] == list(dynamic.dynamic_bytes_predicted)
    window = frame[frame.policy == "sliding_window"]
    # the window keeps its last 31 tokens plus the newest: never more than 32 x 512 bytes
    assert window.cache_bytes.max() <= 512 * 32 and window.cache_bytes.iloc[-1] == window.cache_bytes.iloc[-2]
    quantized = frame[frame.policy == "quantized"]
    assert (quantized.cache_bytes.to_numpy() < dynamic.cache_bytes.to_numpy()).all()
    assert (frame[frame.skipped.isna()].process_bytes > 0).all()
    offloaded = frame[frame.policy == "offloaded"]
    if session.engine.device.type != "cuda":
        assert len(offloaded) == 1 and "needs CUDA" in offloaded.skipped.iloc[0]
        with pytest.raises(ValueError, match="needs a model on CUDA"):
            fill_cache(session, 8, policy="offloaded")


def test_a_length_over_the_model_limit_is_refused():
    session = workbench.load("tiny:qwen3", quiet=True)
    with pytest.raises(ValueError, match="max_position_embeddings of 2048"):
        measure_cache(session, 4096)
