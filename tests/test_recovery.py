"""Quality recovery after head pruning: o_proj compensation and the `recover` step, on tiny models."""

import pytest
import torch
import yaml
from tiny_models import ARCHS, logits

import workbench
from workbench.compress import compensation
from workbench.compress.pruning import _calibration_batches, prune_heads
from workbench.compress.recovery import held_out_kl
from workbench.config import ConfigError, parse_config
from workbench.data import evaluation_texts
from workbench.models.anatomy import attention_layers

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
        report = prune_heads(
            session,
            criterion="weight_norm",
            per_layer=1,
            compensate=compensate,
            calibration_texts=4,
            calibration_tokens=128,
        )
        pruned = attention_layers(session.model)
        errors[compensate] = [
            compensation.relative_error(
                stats[layer], compensation.query_index(attns[layer], [1 - groups[0]]), pruned[layer].o_proj.weight
            )
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
    prune_heads(
        session, criterion="weight_norm", per_layer=1, compensate=True, calibration_texts=2, calibration_tokens=64
    )
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
    assert session.model.config.num_key_value_heads == 2 and not hasattr(
        session.model.config, "key_value_heads_per_layer"
    )


# --- the recover step ----------------------------------------------------------------------

FAST = {
    "steps": 24,
    "batch": 2,
    "seq_len": 64,
    "warmup": 2,
    "eval_every": 8,
    "eval_windows": 2,
    "lr": 3e-3,
    "reply_tokens": 8,
}


def recover_config(tmp_path, arch="llama", prune=None, **recover):
    prune = prune or {"criterion": "weight_norm", "per_layer": 1}
    options = {**FAST, "cache_dir": str(tmp_path / "cache"), **recover}
    return parse_config(
        {
            "model": {"source": f"tiny:{arch}"},
            "compression": [{"step": "prune_heads", **prune}, {"step": "recover", **options}],
        }
    )


@pytest.mark.parametrize("train", ["lora", "attention"])
def test_recovery_lowers_the_held_out_kl_to_the_unpruned_model(tmp_path, train):
    teacher = workbench.load("tiny:llama", quiet=True).model
    pruned = workbench.load("tiny:llama", quiet=True)
    prune_heads(pruned, criterion="weight_norm", per_layer=1)
    recovered = workbench.load(recover_config(tmp_path, train=train, keep="kl"), quiet=True)
    held_out = evaluation_texts()[5:]  # not the windows the step chose its state on
    before = held_out_kl(pruned.model, teacher, pruned.tokenizer, held_out, window=64, windows=6)
    after = held_out_kl(recovered.model, teacher, recovered.tokenizer, held_out, window=64, windows=6)
    report = recovered.reports[1]
    assert report["step"] == "recover" and report["mode"] == train and report["kl_after"] < report["kl_before"]
    assert after < 0.95 * before, (before, after)
    assert all(not p.requires_grad for p in recovered.model.parameters())
    assert type(recovered.model).__name__ == "LlamaForCausalLM"  # LoRA merged: a plain model again


def test_recovery_is_reproducible_with_its_seed(tmp_path):
    first = workbench.load(recover_config(tmp_path, keep="last"), quiet=True)
    second = workbench.load(recover_config(tmp_path, keep="last"), quiet=True)
    torch.testing.assert_close(logits(first.model), logits(second.model), atol=0, rtol=0)
    other = workbench.load(recover_config(tmp_path, keep="last", seed=1), quiet=True)
    assert not torch.equal(logits(other.model), logits(first.model))


def test_a_saved_recovered_model_reloads_with_identical_logits(tmp_path):
    from workbench.compress.__main__ import main

    path = tmp_path / "recover.yaml"
    path.write_text(yaml.safe_dump(recover_config(tmp_path, arch="qwen3").model_dump(mode="json")))
    main([str(path), "--out", str(tmp_path / "out"), "--windows", "1", "--decode-tokens", "2", "--harness", "none"])
    recovered = workbench.load(recover_config(tmp_path, arch="qwen3"), quiet=True)
    reloaded = workbench.load(str(tmp_path / "out" / "model"), quiet=True)
    assert reloaded.model.config.key_value_heads_per_layer == [1, 1]
    torch.testing.assert_close(logits(reloaded.model), logits(recovered.model), atol=0, rtol=0)


def test_a_saved_adapter_reproduces_the_recovery_and_replays_the_recorded_prune(tmp_path):
    adapter = tmp_path / "adapter"
    trained = workbench.load(
        recover_config(
            tmp_path,
            arch="glm4",
            prune={"criterion": "taylor", "ratio": 0.5, "calibration_texts": 2, "calibration_tokens": 64},
            save_adapter=str(adapter),
        ),
        quiet=True,
    )
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "recovery.json").is_file()
    loaded = workbench.load(
        parse_config(
            {
                "model": {"source": "tiny:glm4"},
                "compression": [
                    {
                        "step": "prune_heads",
                        "criterion": "taylor",
                        "ratio": 0.5,
                        "calibration_texts": 2,
                        "calibration_tokens": 64,
                    },
                    {"step": "recover", "adapter": str(adapter)},
                ],
            }
        ),
        quiet=True,
    )
    assert loaded.reports[0].get("removed_from") == "recover adapter record"
    assert loaded.reports[0]["removed"] == trained.reports[0]["removed"]
    # The adapter is stored in fp16: the same model up to that rounding.
    torch.testing.assert_close(logits(loaded.model), logits(trained.model), atol=2e-3, rtol=0)


def test_an_adapter_for_other_pruned_shapes_is_refused_with_both_shapes_named(tmp_path):
    adapter = tmp_path / "adapter"
    workbench.load(recover_config(tmp_path, save_adapter=str(adapter)), quiet=True)  # kv heads [1, 1]
    config = parse_config(
        {
            "model": {"source": "tiny:llama"},
            "compression": [{"step": "prune_heads", "remove": {0: [1]}}, {"step": "recover", "adapter": str(adapter)}],
        }
    )
    with pytest.raises(
        ValueError, match=r"trained on a model with KV heads per layer \[1, 1\], but this model has \[1, 2\]"
    ):
        workbench.load(config, quiet=True)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([{"step": "recover"}], "recover must come after prune_heads"),
        (
            [
                {"step": "prune_heads", "ratio": 0.2},
                {"step": "quantize", "scheme": "int8_weight_only"},
                {"step": "recover"},
            ],
            "recover must come before quantize",
        ),
        ([{"step": "prune_heads", "ratio": 0.2}, {"step": "recover"}, {"step": "recover"}], "recover is listed twice"),
        ([{"step": "prune_heads", "ratio": 0.2}, {"step": "recover", "lr": 0}], "lr: Input should be greater than 0"),
        ([{"step": "prune_heads", "ratio": 0.2}, {"step": "recover", "lr": 3}], "lr: Input should be less than 1"),
        ([{"step": "prune_heads", "ratio": 0.2}, {"step": "recover", "epochs": 3}], "epochs: unknown key"),
        (
            [{"step": "prune_heads", "ratio": 0.2}, {"step": "recover", "train": "mlp"}],
            "train: Input should be 'lora' or 'attention'",
        ),
        (
            [{"step": "prune_heads", "ratio": 0.2}, {"step": "recover", "steps": 10, "warmup": 10}],
            "warmup \\(10\\) must be shorter than steps \\(10\\)",
        ),
        (
            [{"step": "prune_heads", "ratio": 0.2}, {"step": "recover", "temperature": 0}],
            "temperature: Input should be greater than 0",
        ),
        (
            [{"step": "prune_heads", "ratio": 0.2}, {"step": "recover", "targets": ["attn"]}],
            "\\['attn'\\] are not linear layers",
        ),
        (
            [{"step": "prune_heads", "ratio": 0.2}, {"step": "recover", "train": "attention", "rank": 8}],
            "rank only apply to train: lora",
        ),
        (
            [{"step": "prune_heads", "ratio": 0.2}, {"step": "recover", "train": "attention", "save_adapter": "x"}],
            "save_adapter saves a LoRA",
        ),
        (
            [{"step": "prune_heads", "ratio": 0.2}, {"step": "recover", "adapter": "/nowhere"}],
            "adapter '/nowhere': no recovery.json there",
        ),
        (
            [{"step": "prune_heads", "ratio": 0.2}, {"step": "recover", "prompts": "/nowhere.txt"}],
            "prompts file '/nowhere.txt' does not exist",
        ),
        (
            [{"step": "prune_heads", "ratio": 0.2}, {"step": "recover", "keep": "best"}],
            "keep: Input should be 'perplexity', 'kl' or 'last'",
        ),
    ],
)
def test_bad_recovery_configs_fail_when_read(steps, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"compression": steps}, "recover.yaml")


def test_adapter_with_training_options_is_refused(tmp_path):
    adapter = tmp_path / "adapter"
    workbench.load(recover_config(tmp_path, save_adapter=str(adapter)), quiet=True)
    with pytest.raises(ConfigError, match="the training options lr, steps do nothing"):
        parse_config(
            {
                "compression": [
                    {"step": "prune_heads", "per_layer": 1},
                    {"step": "recover", "adapter": str(adapter), "lr": 1e-3, "steps": 5},
                ]
            },
            "x.yaml",
        )


def test_recover_without_a_teacher_is_named():
    from workbench.compress.recovery import recover

    session = workbench.load("tiny:llama", quiet=True)
    prune_heads(session, criterion="weight_norm", per_layer=1)
    with pytest.raises(ValueError, match="recover needs the unpruned model as its teacher"):
        recover(session, steps=2, warmup=0)


def test_teacher_replies_are_cached_and_no_prompt_is_a_facts_question(tmp_path):
    from workbench.bench.tasks import _facts
    from workbench.compress import recovery_data

    chats = recovery_data.load_prompts()
    questions = {item.question.lower() for item in _facts()}
    assert len(chats) >= 150 and not {c[-1]["content"].lower() for c in chats} & questions
    assert not any("capital" in c[-1]["content"].lower() for c in chats)
    session = workbench.load("tiny:llama", quiet=True)
    first = recovery_data.teacher_replies(
        session.model, session.tokenizer, chats[:3], max_tokens=4, cache_dir=tmp_path, progress=False
    )
    assert len(list(tmp_path.glob("teacher-replies-*.json"))) == 1
    with torch.no_grad():  # another teacher: the cache must not answer for it
        session.model.lm_head.weight.mul_(2)
    recovery_data.teacher_replies(
        session.model, session.tokenizer, chats[:3], max_tokens=4, cache_dir=tmp_path, progress=False
    )
    assert len(list(tmp_path.glob("teacher-replies-*.json"))) == 2 and len(first) == 3
