"""Structured head pruning: it removes exactly what it says, and the model still works."""

import copy

import pytest
import torch
from tiny_models import ARCHS, IDS, logits
from transformers import DynamicCache

import workbench
from workbench.compress import compensation
from workbench.compress.pruning import (
    _calibration_batches,
    attention_layers,
    choose_groups,
    importance,
    keep_groups,
    kv_groups,
    prune_groups,
    prune_heads,
    split_calibration,
)
from workbench.compress.recovery import kl_loss
from workbench.config import ConfigError, parse_config
from workbench.data import calibration_texts as shipped_calibration_texts


@pytest.mark.parametrize("arch", ARCHS)
def test_pruning_a_silenced_group_leaves_the_logits_unchanged(arch):
    session = workbench.load(f"tiny:{arch}", quiet=True)
    attn = attention_layers(session.model)[1]
    hd, gs = attn.head_dim, attn.num_key_value_groups
    with torch.no_grad():  # silence KV group 0 of layer 1: its query heads' o_proj columns
        attn.o_proj.weight[:, : gs * hd] = 0
    silenced = logits(session.model)
    prune_groups(session.model, {1: [0]})
    torch.testing.assert_close(logits(session.model), silenced, atol=1e-5, rtol=0)
    assert kv_groups(attn) == 1 and attn.q_proj.out_features == gs * hd and attn.o_proj.in_features == gs * hd


@pytest.mark.parametrize("arch", ARCHS)
def test_pruning_a_live_group_changes_the_logits(arch):
    session = workbench.load(f"tiny:{arch}", quiet=True)
    before = logits(session.model)
    prune_groups(session.model, {0: [1]})
    assert not torch.allclose(logits(session.model), before, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_config_records_the_new_head_counts_and_the_kv_cache_shrinks(arch):
    session = workbench.load(f"tiny:{arch}", quiet=True)
    prune_groups(session.model, {0: [0]})
    config = session.model.config
    assert config.key_value_heads_per_layer == [1, 2]
    assert config.attention_heads_per_layer == [2, 4]
    cache = DynamicCache(config=config)
    with torch.inference_mode():
        session.model(input_ids=IDS, past_key_values=cache, use_cache=True)
    assert [layer.keys.shape[1] for layer in cache.layers] == [1, 2]


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_pruned_model_loads_back_with_the_same_outputs(arch, tmp_path):
    session = workbench.load(f"tiny:{arch}", quiet=True)
    prune_heads(session, criterion="weight_norm", per_layer=1)
    session.save(tmp_path)
    reloaded = workbench.load(str(tmp_path), quiet=True)
    assert reloaded.model.config.key_value_heads_per_layer == [1, 1]
    torch.testing.assert_close(logits(reloaded.model), logits(session.model), atol=0, rtol=0)
    assert reloaded.chat("hi", temperature=0, max_tokens=5).text == session.chat("hi", temperature=0, max_tokens=5).text


@pytest.mark.parametrize("criterion", ["taylor", "kl", "attention_entropy", "weight_norm", "random"])
def test_every_criterion_scores_every_group_and_the_pruned_model_streams(tiny, criterion):
    session = workbench.load(tiny.loaded.source, quiet=True)
    scores = importance(session.model, session.tokenizer, criterion, calibration_texts=2, calibration_tokens=64)
    assert scores.shape == (2, 2) and torch.isfinite(scores).all()
    report = prune_heads(session, criterion=criterion, ratio=0.5, calibration_texts=2, calibration_tokens=64)
    assert report.kv_heads_after == [1, 1] and report.params_after < report.params_before
    assert session.engine.stream({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}) is not None
    assert session.chat("hi", max_tokens=3, temperature=0).stats.completion_tokens <= 3


def test_taylor_importance_finds_a_silenced_group():
    session = workbench.load("tiny:llama", quiet=True)
    attn = attention_layers(session.model)[0]
    with torch.no_grad():
        attn.o_proj.weight[:, : attn.num_key_value_groups * attn.head_dim] = 0
    scores = importance(session.model, session.tokenizer, "taylor", calibration_texts=2, calibration_tokens=64)
    assert scores[0, 0] < 1e-6 < scores[0, 1]


@pytest.mark.parametrize("ridge", [None, 0.01, "auto"])
def test_kl_importance_is_the_divergence_of_the_prune_it_stands_for(ridge):
    """Each group's score is what removing it alone does, its layer refitted as compensation
    fits it: the masked, refitted model the criterion measures equals the pruned, refitted one."""
    session = workbench.load("tiny:llama", quiet=True)
    model, tokenizer = session.model, session.tokenizer
    texts = shipped_calibration_texts()
    before = logits(model)
    scores = importance(model, tokenizer, "kl", calibration_texts=4, calibration_tokens=64, compensate_ridge=ridge)
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)  # every weight restored
    assert (scores > 0).all()
    if ridge is None:
        fit = _calibration_batches(tokenizer, texts, 4, 64, "cpu")
    else:
        fit_texts, held_texts = split_calibration(texts, 4)
        fit = _calibration_batches(tokenizer, fit_texts, len(fit_texts), 64, "cpu")
        held = _calibration_batches(tokenizer, held_texts, len(held_texts), 64, "cpu")
    measured = fit[: (len(fit) + 1) // 2]
    for layer, group in [(0, 1), (1, 0)]:
        pruned = copy.deepcopy(model)
        attns = attention_layers(pruned)
        if ridge is not None:
            stats = compensation.collect(attns, [layer], pruned, fit)
            held_stats = compensation.collect(attns, [layer], pruned, held)
        prune_groups(pruned, {layer: [group]})
        if ridge is not None:  # the fit at the ridge held-out text chooses, applied whatever the check says
            o_proj = attns[layer].o_proj
            keep = compensation.query_index(attns[layer], [1 - group])
            weight, _ = compensation.fit(stats[layer], held_stats[layer], keep, o_proj.weight, ridge)
            with torch.no_grad():
                o_proj.weight.copy_(weight)
        with torch.inference_mode():
            kl = sum(
                float(kl_loss(pruned(input_ids=ids).logits, model(input_ids=ids).logits, 1.0)) * ids.shape[1]
                for ids in measured
            ) / sum(ids.shape[1] for ids in measured)
        assert scores[layer, group] == pytest.approx(kl, rel=1e-4)


def test_kl_importance_scores_a_silenced_group_zero():
    session = workbench.load("tiny:qwen3", quiet=True)
    attn = attention_layers(session.model)[1]
    with torch.no_grad():
        attn.o_proj.weight[:, attn.num_key_value_groups * attn.head_dim :] = 0
    scores = importance(session.model, session.tokenizer, "kl", calibration_texts=2, calibration_tokens=64)
    assert scores[1, 1] < 1e-9 < float(scores.flatten()[:3].min())


def test_global_ratio_ranks_across_layers_and_keeps_the_floor():
    scores = torch.tensor([[0.1, 0.2, 0.9], [0.3, 0.05, 0.8]])
    assert choose_groups(scores, [3, 3], ratio=0.5, per_layer=None) == {0: [0, 1], 1: [1]}
    assert choose_groups(scores, [3, 3], ratio=0.67, per_layer=None, min_groups_per_layer=1) == {0: [0, 1], 1: [0, 1]}
    with pytest.raises(ValueError, match="only 4 can go"):
        choose_groups(scores, [3, 3], ratio=0.9, per_layer=None)


def test_per_layer_budget_cannot_empty_a_layer():
    with pytest.raises(ValueError, match="would leave layer 0 with 0 of its 2 KV groups"):
        choose_groups(torch.zeros(2, 2), [2, 2], ratio=None, per_layer=2)
    with pytest.raises(ValueError, match="no attention heads"):
        prune_groups(workbench.load("tiny:qwen3", quiet=True).model, {0: [0, 1]})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ratio": 1.0}, "ratio: Input should be less than 1"),
        ({"ratio": -0.1}, "ratio: Input should be greater than or equal to 0"),
        ({}, "give exactly one budget"),
        ({"ratio": 0.2, "per_layer": 1}, "give exactly one budget"),
        ({"ratio": 0.2, "criterion": "vibes"}, "criterion: Input should be 'taylor'"),
        ({"ratio": 0.2, "heads": 3}, "heads: unknown key"),
    ],
)
def test_bad_pruning_configs_fail_when_read(options, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"compression": [{"step": "prune_heads", **options}]}, "pruned.yaml")


def test_a_config_with_pruning_is_applied_at_load(tmp_path):
    path = tmp_path / "pruned.yaml"
    path.write_text(
        "model:\n  source: tiny:glm4\ncompression:\n  - step: prune_heads\n    criterion: weight_norm\n    per_layer: 1\n"
    )
    session = workbench.load(path, quiet=True)
    assert session.model.config.key_value_heads_per_layer == [1, 1]
    assert session.reports[0]["step"] == "prune_heads" and session.reports[0]["heads_after"] == [2, 2]


def test_keep_groups_keeps_the_chosen_groups_weights():
    session = workbench.load("tiny:llama", quiet=True)
    attn = attention_layers(session.model)[0]
    hd = attn.head_dim
    k_group1 = attn.k_proj.weight[hd : 2 * hd].clone()
    keep_groups(attn, [1])
    torch.testing.assert_close(attn.k_proj.weight, k_group1)
