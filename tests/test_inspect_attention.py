"""Attention capture, per-head statistics, run-time head ablation and head importance."""

import pytest
import torch

import workbench
from workbench.compress.pruning import (
    attention_layers,
    prune_groups,
    weight_norm_importance,
)
from workbench.inspect.attention import (
    AttentionCapture,
    ablate_heads,
    ablation_loss,
    ablation_scan,
    capture_attention,
    head_importance,
    head_stats,
)

TEXT = "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris."


def logits(session, text=TEXT):
    ids = session.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return session.model(input_ids=ids, use_cache=False).logits


def assert_rows_are_distributions(capture):
    for layer, probs in capture.probs.items():
        n = len(capture.tokens)
        assert probs.shape == (len(capture.heads[layer]), n, n)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]), atol=1e-5, rtol=0)
        assert float(probs.triu(diagonal=1).abs().max()) == 0.0  # causal: no query sees a later key


def test_attention_rows_sum_to_one_on_each_tiny_architecture(tiny):
    before = tiny.model.config._attn_implementation
    capture = capture_attention(tiny, TEXT)
    assert sorted(capture.probs) == [0, 1] and capture.heads[0] == [0, 1, 2, 3]
    assert_rows_are_distributions(capture)
    assert tiny.model.config._attn_implementation == before  # switched to eager and back


@pytest.mark.embedded
def test_attention_rows_sum_to_one_on_the_embedded_model(embedded):
    capture = capture_attention(embedded, TEXT, layers=[0, 15, 29], heads=[0, 8])
    assert sorted(capture.probs) == [0, 15, 29] and capture.heads[15] == [0, 8]
    assert_rows_are_distributions(capture)
    assert capture.frame(29, 8).shape == (len(capture.tokens),) * 2


def test_head_stats_of_known_patterns():
    n = 5
    previous = torch.zeros(n, n)
    previous[0, 0] = 1.0
    for q in range(1, n):
        previous[q, q - 1] = 1.0
    sink = torch.zeros(n, n)
    sink[:, 0] = 1.0
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1).view(n, 1)
    capture = AttentionCapture(
        tokens=list("abcde"),
        token_ids=list(range(n)),
        probs={3: torch.stack([previous, sink, uniform])},
        heads={3: [0, 1, 2]},
    )
    stats = head_stats(capture).set_index("head")
    assert (
        stats.loc[0, "previous_token"] == 1.0
        and stats.loc[0, "mean_distance"] == 1.0
        and stats.loc[0, "entropy"] == 0.0
    )
    assert stats.loc[1, "sink"] == 1.0 and stats.loc[1, "mean_distance"] == pytest.approx((1 + 2 + 3 + 4) / 4)
    # uniform over q+1 keys: entropy log(q+1), distance q/2, averaged over queries 1..4
    assert stats.loc[2, "entropy"] == pytest.approx(sum(torch.log(torch.tensor([2.0, 3.0, 4.0, 5.0]))).item() / 4)
    assert stats.loc[2, "mean_distance"] == pytest.approx((0.5 + 1 + 1.5 + 2) / 4)
    assert stats.loc[2, "sink"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 4)


def test_ablating_a_head_changes_the_output_and_ablating_none_changes_nothing(tiny):
    weights = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    plain = logits(tiny)
    with ablate_heads(tiny, {}):
        assert torch.equal(logits(tiny), plain)
    with ablate_heads(tiny, {1: [2]}):
        ablated = logits(tiny)
    assert (ablated - plain).abs().max() > 1e-4
    assert torch.equal(logits(tiny), plain)  # hooks gone on exit
    assert all(torch.equal(v, weights[k]) for k, v in tiny.model.state_dict().items())  # weights never touched
    assert ablation_loss(tiny, TEXT, []) == 0.0
    assert ablation_loss(tiny, TEXT, [(0, 1), (1, 3)]) != 0.0


def test_ablating_a_whole_kv_group_equals_pruning_it():
    ablated = workbench.load("tiny:llama", quiet=True)
    pruned = workbench.load("tiny:llama", quiet=True)
    group_size = attention_layers(ablated.model)[0].num_key_value_groups
    with ablate_heads(ablated, {1: list(range(group_size, 2 * group_size))}):  # layer 1, KV group 1
        expected = logits(ablated)
    prune_groups(pruned.model, {1: [1]})
    torch.testing.assert_close(logits(pruned), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.embedded
def test_ablation_on_the_embedded_model(embedded):
    plain = logits(embedded)
    with ablate_heads(embedded, {}):
        assert torch.equal(logits(embedded), plain)
    scan = ablation_scan(embedded, TEXT, layers=[1], unit="group")
    assert list(scan.group) == [0, 1, 2] and (scan.loss_delta.abs() > 1e-4).all()
    assert torch.equal(logits(embedded), plain)


def test_a_head_scan_names_each_head_with_its_kv_group():
    session = workbench.load("tiny:qwen3", quiet=True)
    heads = ablation_scan(session, TEXT, layers=1, unit="head")
    assert list(heads["head"]) == [0, 1, 2, 3] and list(heads.group) == [0, 0, 1, 1]
    assert (heads.loss_delta != 0).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: capture_attention(s, TEXT, layers=[2]), r"layer 2 does not exist: this model has layers 0\.\.1"),
        (lambda s: capture_attention(s, TEXT, heads=[4]), r"head 4 does not exist in layer 0: it has heads 0\.\.3"),
        (lambda s: ablation_loss(s, TEXT, {-1: [0]}), "layer -1 does not exist"),
        (lambda s: ablation_loss(s, TEXT, [3]), r"\{layer: \[head, \.\.\.\]\} or \[\(layer, head\), \.\.\.\]"),
        (lambda s: capture_attention(s, "a"), "at least 2 tokens"),
        (lambda s: capture_attention(s, TEXT).pattern(0, 9), "head 9 of layer 0 was not captured"),
        (lambda s: head_importance(s, "magnitude"), "unknown importance criterion"),
        (lambda s: ablation_scan(s, TEXT, unit="layer"), "unit must be"),
    ],
)
def test_bad_layer_and_head_numbers_are_refused_with_the_valid_range(call, message):
    session = workbench.load("tiny:llama", quiet=True)
    with pytest.raises(ValueError, match=message):
        call(session)


def test_head_importance_uses_the_pruning_criteria():
    session = workbench.load("tiny:qwen3", quiet=True)
    frame = head_importance(session, "weight_norm")
    expected = weight_norm_importance(attention_layers(session.model))
    assert list(frame.score) == pytest.approx(expected.flatten().tolist())
    assert sorted(frame["rank"]) == [0, 1, 2, 3] and list(frame.heads[1]) == [2, 3]
    taylor = head_importance(session, "taylor", calibration_texts=2, calibration_tokens=32)
    assert (taylor.score >= 0).all() and taylor.score.sum() > 0
