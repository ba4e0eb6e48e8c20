"""Quantization and mixed precision through torchao, on tiny models (CPU)."""

import pytest
import torch

import workbench
from workbench.compress.quantization import (
    QuantizeOptions,
    linear_bytes,
    plan_schemes,
    quantize,
)
from workbench.config import ConfigError, parse_config

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 31]])


def logits(session):
    with torch.inference_mode():
        return session.model(input_ids=IDS).logits


@pytest.mark.parametrize("scheme", ["int8_weight_only", "int8_dynamic"])
def test_int8_shrinks_the_quantized_layers_about_four_times_and_stays_close(scheme):
    session = workbench.load("tiny:qwen3", quiet=True)
    before = logits(session)
    report = quantize(session, scheme=scheme, rules=[{"pattern": "lm_head", "scheme": scheme}], group_size=32)
    assert report.schemes == {scheme: 15}
    assert report.linear_bytes_before / report.linear_bytes_after > 3.5
    assert report.changed_bytes_before == report.linear_bytes_before
    after = logits(session)
    assert not torch.equal(after, before)
    assert torch.nn.functional.cosine_similarity(after.flatten(), before.flatten(), dim=0) > 0.99
    assert session.chat("hi", max_tokens=4, temperature=0).stats.completion_tokens <= 4


def test_lm_head_is_kept_unless_a_rule_names_it():
    session = workbench.load("tiny:llama", quiet=True)
    plan = plan_schemes(session.model, QuantizeOptions(scheme="int8_weight_only"))
    assert plan["lm_head"] == "keep"
    assert plan["model.layers.0.mlp.down_proj"] == "int8_weight_only"


def test_mixed_rules_first_match_wins_and_fp16_layers_mix_with_fp32():
    session = workbench.load("tiny:glm4", quiet=True)
    before = logits(session)
    report = quantize(
        session,
        scheme="keep",
        rules=[
            {"pattern": "model.layers.*.mlp.*", "scheme": "int8_weight_only"},
            {"pattern": "model.layers.*.self_attn.*", "scheme": "fp16"},
        ],
    )
    assert report.schemes == {"int8_weight_only": 4, "fp16": 8, "keep": 1}
    attn = session.model.model.layers[0].self_attn
    assert attn.q_proj.weight.dtype == torch.float16
    after = logits(session)
    assert after.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(after.flatten(), before.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("arch", ["llama", "qwen3", "glm4"])
def test_bf16_everywhere_halves_the_block_weights_and_callers_keep_their_dtype(arch):
    session = workbench.load(f"tiny:{arch}", quiet=True)
    report = quantize(session, scheme="bf16", rules=[{"pattern": "lm_head", "scheme": "bf16"}])
    assert report.linear_bytes_before == 2 * report.linear_bytes_after
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
        for m in session.model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    try:
        assert logits(session).dtype == torch.float32
    finally:
        for h in hooks:
            h.remove()
    assert seen and set(seen) == {torch.float32}
    assert session.chat("hi", max_tokens=3, temperature=0).stats.completion_tokens <= 3


def test_a_scheme_without_a_kernel_here_fails_before_any_change():
    # PyTorch's CPU int4 kernel takes groups of 32, 64 or 128: 16 has none
    session = workbench.load("tiny:llama", quiet=True)
    before = linear_bytes(session.model)
    with pytest.raises(
        ValueError, match="int4_weight_only is not available.*group size = 32/64/128.*choose another scheme"
    ):
        quantize(session, scheme="int4_weight_only", group_size=16)
    assert linear_bytes(session.model) == before


def test_int4_runs_on_the_cpu_through_the_packed_kernel_with_bf16_activations():
    from torch.utils._python_dispatch import TorchDispatchMode

    from workbench.compress.int4_linear import Int4Linear
    from workbench.compress.report import parameter_count

    session = workbench.load("tiny:qwen3", quiet=True)
    before = logits(session)
    count = parameter_count(session.model)
    report = quantize(session, scheme="int4_weight_only")  # group_size 32 by default
    assert parameter_count(session.model) == count  # two weights a byte still count as two (bits/weight)
    layer = session.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, Int4Linear) and type(layer.weight) is torch.nn.Parameter  # plain tensors, no subclass
    seen = []

    class KernelInputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._weight_int4pack_mm_for_cpu.default and args[1] is layer.weight:
                seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with KernelInputs():
        after = logits(session)
    assert not layer._forward_pre_hooks and not layer._forward_hooks
    assert seen == [torch.bfloat16] and after.dtype == torch.float32
    # 4 bits per weight plus a bf16 scale and zero point per 32: 5 bits, 6.4x under float32
    assert report.changed_bytes_before / report.changed_bytes_after == pytest.approx(6.4, rel=0.01)
    assert report.modules["lm_head"] == "keep"
    assert torch.nn.functional.cosine_similarity(after.flatten(), before.flatten(), dim=0) > 0.98
    assert session.chat("hi", max_tokens=4, temperature=0).stats.completion_tokens <= 4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scheme": "int3"}, "scheme: Input should be"),
        ({"rules": [{"pattern": "*", "scheme": "fp8"}]}, "rules.0.scheme"),
        ({"rules": [{"glob": "*", "scheme": "fp16"}]}, "rules.0.glob: unknown key"),
        ({"group_size": 4}, "group_size: Input should be greater than or equal to 16"),
    ],
)
def test_bad_quantize_configs_fail_when_read(options, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"compression": [{"step": "quantize", **options}]}, "q.yaml")


def test_shipped_configs_are_valid():
    from pathlib import Path

    from workbench.config import load_config

    for path in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")):
        load_config(path)


def test_saving_a_torchao_subclass_session_says_what_to_do_instead(tmp_path):
    """int8/int4 layers save as they are held (tests/test_quantized_checkpoint.py); a torchao
    tensor subclass has no plain tensors to write, so that save is refused before any file."""
    session = workbench.load(
        str(
            _write(
                tmp_path, "model:\n  source: tiny:llama\ncompression:\n  - step: quantize\n    scheme: int8_dynamic\n"
            )
        ),
        quiet=True,
    )
    with pytest.raises(ValueError, match="tensor subclass.*rebuild with workbench.load"):
        session.save(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_a_scheme_without_a_kernel_fails_before_the_model_loads(tmp_path, monkeypatch):
    from workbench.compress import quantization

    def unsupported(scheme, group_size, device, dtype):
        if scheme == "int4_weight_only":
            raise ValueError("int4_weight_only is not available for torch.float32 on cpu")

    monkeypatch.setattr(quantization, "check_supported", unsupported)
    import workbench.session as session_module

    loads = []
    monkeypatch.setattr(session_module, "load_model", lambda *a, **k: loads.append(1))
    path = _write(
        tmp_path, "model:\n  source: tiny:llama\ncompression:\n  - step: quantize\n    scheme: int4_weight_only\n"
    )
    with pytest.raises(ValueError, match="int4_weight_only is not available"):
        workbench.load(path)
    assert loads == []


def test_int8_weight_only_uses_the_packed_kernel_with_torchaos_int8_values():
    import copy

    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from workbench.compress.int8_linear import Int8Linear

    session = workbench.load("tiny:llama", quiet=True)
    original = copy.deepcopy(session.model.model.layers[0].mlp.up_proj)
    report = quantize(session, scheme="int8_weight_only")
    layer = session.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, Int8Linear) and layer.weight.dtype == torch.int8
    # the same symmetric per-channel int8 values as torchao's own int8 weight-only tensor
    reference = torch.nn.Sequential(copy.deepcopy(original))
    quantize_(reference, Int8WeightOnlyConfig())
    assert torch.equal(layer.weight, reference[0].weight.qdata)
    # scales count in the bytes: int8 weights plus one bf16 scale per output row
    assert report.linear_bytes_after == sum(
        m.weight.numel() + m.scales.numel() * 2 if isinstance(m, Int8Linear) else m.weight.numel() * 4
        for m in session.model.modules()
        if isinstance(m, torch.nn.Linear)
    )
    x = torch.randn(2, 3, original.in_features)
    expected = torch.nn.functional.linear(x.bfloat16().float(), layer.dequantized())
    assert layer(x).dtype == torch.float32
    torch.testing.assert_close(layer(x), expected, atol=2e-2, rtol=2e-2)
    assert torch.nn.functional.cosine_similarity(layer(x).flatten(), original(x).flatten(), dim=0) > 0.999


def test_int4_layer_holds_torchaos_packed_values_and_dequantizes_to_what_it_multiplies():
    import copy

    from torchao.prototype.quantization.int4 import Int4OpaqueTensor

    session = workbench.load("tiny:llama", quiet=True)
    original = copy.deepcopy(session.model.model.layers[0].mlp.down_proj)
    quantize(session, scheme="int4_weight_only", group_size=32)
    layer = session.model.model.layers[0].mlp.down_proj
    reference = Int4OpaqueTensor.from_hp(original.weight.detach().bfloat16(), [1, 32])
    assert torch.equal(layer.weight, reference.qdata) and torch.equal(layer.scales_and_zeros, reference.scale_and_zero)
    w = layer.dequantized()
    assert w.shape == original.weight.shape and w.dtype == torch.float32
    x = torch.randn(2, 3, original.in_features)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x.bfloat16().float(), w), atol=3e-2, rtol=3e-2)
    # 16 levels per group of 32: close to the float weights, not equal
    assert 0 < (w - original.weight).abs().max() < 0.2 * original.weight.abs().max()
    assert torch.nn.functional.cosine_similarity(w.flatten(), original.weight.detach().flatten(), dim=0) > 0.99
    with pytest.raises(TypeError, match="only plain nn.Linear"):
        from workbench.compress.quantization import _cast_io

        _cast_io(layer, torch.float16)


def _tied(arch="llama"):
    """A tiny model whose lm_head shares the embedding table, as the embedded SmolLM2's does."""
    session = workbench.load(f"tiny:{arch}", quiet=True)
    session.model.lm_head.weight = session.model.get_input_embeddings().weight
    session.model.config.tie_word_embeddings = True
    return session


@pytest.mark.parametrize("scheme", ["int8_weight_only", "bf16", "fp16"])
def test_quantizing_a_tied_lm_head_leaves_the_embedding_table_untouched(scheme):
    session = _tied()
    embedding = session.model.get_input_embeddings().weight
    table = embedding.detach().clone()
    before = logits(session)
    quantize(session, scheme="keep", rules=[{"pattern": "lm_head", "scheme": scheme}])
    after_embedding = session.model.get_input_embeddings().weight
    assert after_embedding.dtype == torch.float32 and torch.equal(after_embedding, table)
    assert session.model.lm_head.weight.data_ptr() != after_embedding.data_ptr()
    assert session.model.config.tie_word_embeddings is False
    after = logits(session)
    assert after.dtype == torch.float32 and not torch.equal(after, before)
    assert torch.nn.functional.cosine_similarity(after.flatten(), before.flatten(), dim=0) > 0.99


def test_an_untied_lm_head_is_not_copied():
    session = workbench.load("tiny:llama", quiet=True)
    from workbench.compress.quantization import untie_from_embedding

    head = session.model.lm_head.weight
    assert not untie_from_embedding(session.model, "lm_head")
    assert session.model.lm_head.weight is head


def test_int8_lm_head_on_the_embedded_model_keeps_perplexity_within_one_percent(embedded_cache, monkeypatch):
    """The int8 config quantizes the tied lm_head too; its perplexity must stay within 1% of
    fp32 on held-out windows (16 windows measured 14.772 -> 14.888; these 2: 14.691 -> 14.791)."""
    from workbench.data import evaluation_texts
    from workbench.metrics import perplexity

    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(embedded_cache))
    session = workbench.load("configs/default.yaml", device="cpu", quiet=True)
    texts = evaluation_texts()
    fp32 = perplexity(session.model, session.tokenizer, texts, max_windows=2)
    table = session.model.get_input_embeddings().weight.detach().clone()
    from workbench.config import load_config

    (step,) = load_config("configs/int8.yaml").compression
    report = quantize(session, **step.model_extra)
    assert report.modules["lm_head"] == "int8_weight_only"
    assert torch.equal(session.model.get_input_embeddings().weight, table)
    int8 = perplexity(session.model, session.tokenizer, texts, max_windows=2)
    assert int8 != fp32 and int8 < fp32 * 1.01
