"""The divergence map finds what was changed, and only that: zero for identical models, the one
ablated head, the one quantized module, the pruned heads, and a sliding window past its window."""

from dataclasses import asdict

import pandas as pd
import pytest
import torch

import workbench
from workbench.compress.kvcache import kv_cache
from workbench.compress.pruning import prune_heads
from workbench.compress.quantization import quantize
from workbench.inspect import figures
from workbench.inspect.attention import ablate_heads
from workbench.inspect.divergence import divergence_map

TEXT = "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris. " * 3
ARCHS = ["llama", "qwen3", "glm4"]


def fresh(arch: str) -> workbench.Session:
    """A private copy: the maps below change their compressed model, never a shared fixture."""
    return workbench.load(f"tiny:{arch}", quiet=True)


@pytest.fixture(scope="module", params=ARCHS)
def original(request):
    return fresh(request.param)


@pytest.fixture
def arch(original):
    return original.model.config.model_type


def test_identical_models_give_zero_divergence_everywhere(original, arch):
    m = divergence_map(original, fresh(arch), TEXT)
    assert len(m.tokens) > 50
    assert (m.layers.logit_lens_kl.abs() < 1e-7).all()
    assert (m.layers.relative_difference == 0).all()
    assert m.layers.cosine.min() > 1 - 1e-6
    assert (m.heads.status == "kept").all() and len(m.heads) == sum(
        a.num_key_value_groups * (a.k_proj.out_features // a.head_dim)
        for a in (layer.self_attn for layer in original.model.model.layers)
    )
    assert m.heads.pattern_js.abs().max() < 1e-6 and (m.heads.output_error == 0).all()
    assert m.heads.own_pattern_js.abs().max() < 1e-6 and m.heads.own_error.abs().max() < 1e-6
    assert len(m.modules) > 0 and (m.modules.relative_mse == 0).all()
    assert "lm_head" in set(m.modules.module) or original.model.config.tie_word_embeddings
    assert m.output["kl_mean"] < 1e-7 and m.output["top1_agreement"] == 1.0


def test_a_single_ablated_head_is_the_top_head(original, arch):
    compressed = fresh(arch)
    attn = compressed.model.model.layers[1].self_attn
    with torch.no_grad():
        attn.o_proj.weight[:, 2 * attn.head_dim : 3 * attn.head_dim] = 0
    m = divergence_map(original, compressed, TEXT)
    top = m.top_heads(2)
    assert (top.iloc[0].layer, top.iloc[0]["head"]) == (1, 2)
    assert top.iloc[0].own_error == pytest.approx(1.0) and top.iloc[0].output_error == pytest.approx(1.0)
    assert top.iloc[1].own_error < 1e-5  # every other head computes what the original's would on its input
    # its own attention pattern is untouched: it is what the head writes that changed
    assert m.heads.set_index(["layer", "head"]).loc[(1, 2), "pattern_js"] < 1e-6
    # and layer 0, before it, is exactly as it was
    assert m.layers.set_index("layer").loc[0, "relative_difference"] == 0
    assert m.layers.set_index("layer").loc[1, "relative_difference"] > 0


def test_a_head_ablated_at_run_time_is_found_too(original, arch):
    compressed = fresh(arch)
    with ablate_heads(compressed, {0: [1]}):
        m = divergence_map(original, compressed, TEXT)
    top = m.top_heads(1).iloc[0]
    assert (top.layer, top["head"], top.own_error) == (0, 1, pytest.approx(1.0))
    assert m.top_heads(2).iloc[1].own_error < 1e-5


def test_a_single_int4_module_is_the_top_module(original, arch):
    compressed = fresh(arch)
    name = "model.layers.1.self_attn.o_proj"
    quantize(compressed, scheme="keep", group_size=32, rules=[{"pattern": name, "scheme": "int4_weight_only"}])
    m = divergence_map(original, compressed, TEXT)
    top = m.top_modules(2)
    assert top.iloc[0].module == name and top.iloc[0].layer == 1
    assert 0 < top.iloc[0].relative_mse < 0.1 and 10 < top.iloc[0].sqnr_db < 60
    assert "Int4Linear" in top.iloc[0].kind
    assert top.iloc[1].relative_mse == 0  # every other module is exactly the original on the same input
    assert m.layers.set_index("layer").loc[0, "logit_lens_kl"] < 1e-7


def test_an_int4_lm_head_is_the_top_module():
    original, compressed = fresh("llama"), fresh("llama")
    quantize(compressed, scheme="keep", group_size=32, rules=[{"pattern": "lm_head", "scheme": "int4_weight_only"}])
    m = divergence_map(original, compressed, TEXT)
    assert m.top_modules(1).iloc[0].module == "lm_head"
    assert pd.isna(m.top_modules(1).iloc[0].layer)
    # the hidden states are untouched: only the lens through the quantized head parts
    assert (m.layers.relative_difference == 0).all() and m.layers.logit_lens_kl.min() > 0


def test_pruned_heads_are_marked_removed_and_the_rest_compared_in_the_original_numbering(original, arch):
    compressed = fresh(arch)
    report = prune_heads(compressed, criterion="weight_norm", per_layer=1)
    compressed.reports = [asdict(report)]
    m = divergence_map(original, compressed, TEXT)
    removed = m.heads[m.heads.status == "removed"]
    expected = {(layer, g) for layer, groups in report.removed.items() for g in groups}
    assert set(zip(removed.layer, removed.group)) == expected
    assert removed.output_error.isna().all()
    # slicing the original's projections to the surviving heads reproduces the pruned ones exactly
    assert (m.modules.relative_mse == 0).all()
    # the first layer's surviving heads read the same input, so their patterns are unchanged
    first = m.heads[(m.heads.layer == 0) & (m.heads.status == "kept")]
    assert len(first) > 0 and first.pattern_js.max() < 1e-5
    assert m.output["kl_mean"] > 0


def test_a_sliding_window_parts_from_the_original_only_past_its_window(original, arch):
    compressed = fresh(arch)
    kv_cache(compressed, policy="sliding_window", window=16)
    m = divergence_map(original, compressed, TEXT)
    inside, past = m.positions.kl[:16], m.positions.kl[16:]
    assert inside.max() < 1e-4  # read token by token: the same numbers up to float rounding
    assert past.mean() > 100 * max(inside.mean(), 1e-9)
    assert (m.modules.relative_mse < 1e-9).all()  # no weight changed


def test_the_last_layers_lens_is_the_output():
    original, compressed = fresh("qwen3"), fresh("qwen3")
    quantize(compressed, scheme="int8_weight_only")
    m = divergence_map(original, compressed, TEXT)
    assert m.layers.logit_lens_kl.iloc[-1] == pytest.approx(m.output["kl_mean"], rel=1e-4)
    assert m.positions.kl.mean() == pytest.approx(m.output["kl_mean"], rel=1e-4)
    assert m.top_layers(1).iloc[0].kl_increase > 0


def test_a_config_is_loaded_as_the_compressed_model(original, arch):
    m = divergence_map(original, f"tiny:{arch}", TEXT, max_tokens=16)
    assert len(m.tokens) == 16 and m.output["kl_mean"] < 1e-7


def test_bad_input_is_refused_with_a_reason(original, arch):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        divergence_map(original, fresh(arch), "a", max_tokens=1)
    other = "qwen3" if arch != "qwen3" else "llama"
    different = fresh(other)
    if different.model.config.num_hidden_layers == original.model.config.num_hidden_layers:
        different.model.model.layers = different.model.model.layers[:1]
        different.model.config.num_hidden_layers = 1
    with pytest.raises(ValueError, match="num_hidden_layers"):
        divergence_map(original, different, TEXT)
    with pytest.raises(TypeError, match="Session or a transformers model"):
        divergence_map("not a model", original, TEXT)
    with pytest.raises(ValueError, match="tokenizer"):
        divergence_map(original.model, fresh(arch).model, TEXT)


def test_figures_draw_every_part_of_the_map(original, arch):
    compressed = fresh(arch)
    report = prune_heads(compressed, criterion="weight_norm", per_layer=1)
    compressed.reports = [asdict(report)]
    m = divergence_map(original, compressed, TEXT)
    overview = figures.divergence_overview(m, title="tiny")
    kinds = [trace.type for trace in overview.data]
    assert kinds.count("heatmap") == 2 and kinds.count("bar") >= 1 and kinds.count("scatter") == 2
    layers = figures.divergence_layers({"a": m, "b": m})
    assert [t.name for t in layers.data].count("a") == 2 and len(layers.data) == 4
