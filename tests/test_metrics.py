"""The quality figures of workbench.metrics on tiny models: divergence of a compressed model
from its original, checked against a straightforward computation and against `perplexity`."""

import copy

import pytest
import torch
import torch.nn.functional as F

import workbench
from workbench.data import evaluation_texts
from workbench.metrics import divergence, perplexity, token_windows

WINDOW, WINDOWS = 64, 3


@pytest.fixture(scope="module")
def original():
    return workbench.load("tiny:llama", quiet=True)


@pytest.fixture(scope="module")
def perturbed(original):
    model = copy.deepcopy(original.model)
    torch.manual_seed(0)
    with torch.no_grad():
        weight = model.model.layers[0].mlp.down_proj.weight
        weight.add_(torch.randn_like(weight) * 0.05)
    return model


def test_a_model_against_itself_diverges_by_nothing_and_agrees_everywhere(original):
    d = divergence(
        original.model, original.model, original.tokenizer, evaluation_texts(), window=WINDOW, max_windows=WINDOWS
    )
    assert d.kl_mean == 0 and d.kl_p99 == 0 and d.kl_max == 0
    assert d.top1_agreement == 1
    assert d.windows == WINDOWS and d.tokens == WINDOWS * (WINDOW - 1)
    assert d.original_perplexity == d.compressed_perplexity


def test_mean_kl_of_a_perturbed_copy_equals_kl_div_over_the_same_positions(original, perturbed):
    texts = evaluation_texts()
    d = divergence(original.model, perturbed, original.tokenizer, texts, window=WINDOW, max_windows=WINDOWS)
    total, agree, count = 0.0, 0, 0
    with torch.inference_mode():
        for w in token_windows(original.tokenizer, texts, window=WINDOW, max_windows=WINDOWS):
            log_p = torch.log_softmax(original.model(input_ids=w[None]).logits[0, :-1].float(), -1)
            log_q = torch.log_softmax(perturbed(input_ids=w[None]).logits[0, :-1].float(), -1)
            total += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
            agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
            count += log_p.shape[0]
    assert d.kl_mean > 0
    assert d.kl_mean == pytest.approx(total / count, abs=1e-6)
    assert d.top1_agreement == agree / count
    assert 0 <= d.kl_median <= d.kl_p99 <= d.kl_max


def test_perplexities_are_those_of_each_model_on_the_same_windows(original, perturbed):
    texts = evaluation_texts()
    d = divergence(original.model, perturbed, original.tokenizer, texts, window=WINDOW, max_windows=WINDOWS)
    expected = [
        perplexity(m, original.tokenizer, texts, window=WINDOW, max_windows=WINDOWS)
        for m in (original.model, perturbed)
    ]
    assert [d.original_perplexity, d.compressed_perplexity] == pytest.approx(expected, rel=1e-5)
    assert d.original_perplexity != d.compressed_perplexity


def test_a_model_in_another_dtype_is_compared_in_float32(original):
    half = copy.deepcopy(original.model).to(torch.bfloat16)
    d = divergence(original.model, half, original.tokenizer, evaluation_texts(), window=WINDOW, max_windows=1)
    assert 0 < d.kl_mean < 0.1 and d.top1_agreement > 0.5


def test_too_short_text_raises_the_error_perplexity_raises(original):
    with pytest.raises(ValueError, match="too short") as short:
        divergence(original.model, original.model, original.tokenizer, [""])
    with pytest.raises(ValueError) as from_perplexity:
        perplexity(original.model, original.tokenizer, [""])
    assert str(short.value) == str(from_perplexity.value)


def test_models_with_different_vocabularies_are_refused_naming_both_sizes(original):
    wider = copy.deepcopy(original.model)
    wider.resize_token_embeddings(original.model.config.vocab_size + 14)
    with pytest.raises(ValueError, match=r"vocabularies differ.*386.*400"):
        divergence(original.model, wider, original.tokenizer, evaluation_texts(), window=WINDOW, max_windows=1)
