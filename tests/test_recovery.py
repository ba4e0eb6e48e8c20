"""Quality recovery after head pruning: o_proj compensation and the `recover` step, on tiny models."""

import pytest
import torch

import workbench
from workbench.compress import compensation
from workbench.compress.data import evaluation_texts
from workbench.compress.pruning import _calibration_batches, attention_layers, prune_heads
from workbench.config import ConfigError, parse_config

ARCHS = ["llama", "qwen3", "glm4"]
IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 31, 64, 12]])


def logits(model, ids=IDS):
    with torch.inference_mode():
        return model(input_ids=ids).logits


# --- compensation --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_compensation_lowers_the_pruned_layers_output_error_on_held_out_text(arch):
    reference = workbench.load(f"tiny:{arch}", quiet=True)
    attns = attention_layers(reference.model)
    # Held-out: the evaluation text, never seen by the fit (which uses the calibration text).
    held_out = _calibration_batches(reference.tokenizer, evaluation_texts(), 4, 128, "cpu")
    stats = compensation.collect(attns, [0, 1], reference.model, held_out)
    errors = {}
    for compensate in (False, True):
        session = workbench.load(f"tiny:{arch}", quiet=True)
        report = prune_heads(session, criterion="weight_norm", per_layer=1, compensate=compensate,
                             calibration_texts=4, calibration_tokens=128)
        pruned = attention_layers(session.model)
        errors[compensate] = [
            compensation.relative_error(stats[layer], compensation.query_index(attns[layer], [1 - groups[0]]),
                                        pruned[layer].o_proj.weight)
            for layer, groups in report.removed.items()
        ]
        assert bool(report.compensation) == compensate
    assert all(after < 0.9 * before for before, after in zip(errors[False], errors[True])), errors


def test_compensation_without_removal_of_a_group_fits_the_original_weight():
    """Nothing removed from a layer's point of view = the full least-squares problem, whose
    solution is the original o_proj: the fit itself is exact, not just 'smaller error'."""
    session = workbench.load("tiny:llama", quiet=True)
    attns = attention_layers(session.model)
    batches = _calibration_batches(session.tokenizer, evaluation_texts(), 4, 128, "cpu")
    stats = compensation.collect(attns, [0], session.model, batches)
    keep = compensation.query_index(attns[0], [0, 1])
    weight = compensation.solve(stats[0], keep, ridge=1e-9)
    torch.testing.assert_close(weight.float(), attns[0].o_proj.weight.detach(), atol=1e-3, rtol=1e-3)
    assert compensation.relative_error(stats[0], keep, attns[0].o_proj.weight) < 1e-6


def test_compensated_pruned_model_reloads_with_identical_logits(tmp_path):
    session = workbench.load("tiny:qwen3", quiet=True)
    prune_heads(session, criterion="weight_norm", per_layer=1, compensate=True, calibration_texts=2, calibration_tokens=64)
    session.save(tmp_path)
    reloaded = workbench.load(str(tmp_path), quiet=True)
    torch.testing.assert_close(logits(reloaded.model), logits(session.model), atol=0, rtol=0)


def test_explicit_removal_matches_the_criterion_that_chose_it():
    chosen = workbench.load("tiny:glm4", quiet=True)
    report = prune_heads(chosen, criterion="taylor", ratio=0.5, calibration_texts=2, calibration_tokens=64)
    given = workbench.load("tiny:glm4", quiet=True)
    again = prune_heads(given, remove=report.removed)
    assert again.removed == report.removed and again.criterion == "given"
    torch.testing.assert_close(logits(given.model), logits(chosen.model), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ratio": 0.2, "compensate": "maybe"}, "compensate: Input should be a valid boolean"),
        ({"ratio": 0.2, "compensate": True, "compensate_ridge": 0}, "compensate_ridge: Input should be greater than 0"),
        ({"ratio": 0.2, "remove": {0: [1]}}, "give exactly one budget"),
        ({"remove": {0: [1, 1]}}, "layers and groups are distinct"),
    ],
)
def test_bad_compensation_options_fail_when_read(options, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"compression": [{"step": "prune_heads", **options}]}, "pruned.yaml")


def test_removing_groups_a_layer_does_not_have_is_named():
    session = workbench.load("tiny:llama", quiet=True)
    with pytest.raises(ValueError, match="layer 0 has KV groups 0..1, not"):
        prune_heads(session, remove={0: [2]})
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        prune_heads(session, remove={5: [0]})
    with pytest.raises(ValueError, match="would keep 0 of its 2"):
        prune_heads(session, remove={0: [0, 1]})
    assert session.model.config.num_key_value_heads == 2 and not hasattr(session.model.config, "key_value_heads_per_layer")
