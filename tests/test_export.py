"""Export to GGUF and stock transformers checkpoints (workbench/export), without llama.cpp:
files read back with gguf.GGUFReader, GGUFs loaded by transformers' own GGUF reader (which
undoes the q/k permutation), checkpoints reloaded with plain AutoModelForCausalLM.
llama.cpp itself runs in test_export_llamacpp.py."""

from __future__ import annotations

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM

import workbench
from workbench.compress.pruning import prune_groups
from workbench.export import ExportError, Tolerance, export, verify
from workbench.export.__main__ import main
from workbench.export.gguf_vocab import pre_tokenizer_name
from workbench.export.verify import compare_logits, gguf_logits
from workbench.export.weights import float_state, head_layout, pad_attention
from workbench.metrics import divergence, log_prob_divergence, token_windows

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 64, 12]])


def _tiny(arch: str, removed: dict | None = None) -> workbench.Session:
    session = workbench.load(f"tiny:{arch}", quiet=True)
    if removed:
        prune_groups(session.model, removed)
    return session


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS).logits


def _fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def _only(path) -> list[str]:
    """What is in PATH's folder: a failed export must leave no partial file behind."""
    return sorted(p.name for p in path.parent.iterdir())


# --- GGUF ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_uniform_model_is_written_as_its_own_arch_and_reads_back(tmp_path, arch):
    session = _tiny(arch)
    result = session.export(tmp_path / "m.gguf", type="f16")
    fields, tensors = _fields(tmp_path / "m.gguf")
    assert result.arch == arch and fields["general.architecture"] == arch
    assert fields[f"{arch}.attention.head_count"] == 4 and fields[f"{arch}.attention.head_count_kv"] == 2
    assert fields[f"{arch}.attention.key_length"] == 16 and fields[f"{arch}.block_count"] == 2
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert ("blk.0.attn_q_norm.weight" in tensors) == (arch == "qwen3")
    assert "output.weight" in tensors  # the tiny models do not tie their embeddings
    # tokenizer and chat template copied
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == session.model.config.vocab_size
    assert fields["tokenizer.chat_template"] == session.tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == session.tokenizer.convert_tokens_to_ids("<|im_end|>")
    im_start = session.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert fields["tokenizer.ggml.token_type"][im_start] == gguf.TokenType.CONTROL
    assert _only(tmp_path / "m.gguf") == ["m.gguf"]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_transformers_reads_the_gguf_back_to_the_same_logits(tmp_path, arch):
    """transformers' GGUF loader reverses llama.cpp's q/k permutation; a wrong permutation
    (or none) would change the logits far beyond float16 rounding."""
    session = _tiny(arch)
    session.export(tmp_path / "m.gguf", type="f16")
    diff, agree = gguf_logits(tmp_path / "m.gguf", session.model, session.tokenizer, head_dim=16)
    assert diff < 5e-3 and agree == 1.0


def test_the_permutation_matters(tmp_path, monkeypatch):
    """The round-trip check above can fail: skipping the permutation breaks it."""
    from workbench.export import to_gguf

    session = _tiny("llama")
    session.export(tmp_path / "right.gguf", type="f16")
    right, _ = gguf_logits(tmp_path / "right.gguf", session.model, session.tokenizer, head_dim=16)
    monkeypatch.setattr(to_gguf, "permute", lambda w, n: w)
    session.export(tmp_path / "wrong.gguf", type="f16")
    wrong, _ = gguf_logits(tmp_path / "wrong.gguf", session.model, session.tokenizer, head_dim=16)
    assert wrong > 5 * right  # float16 rounding on one side, scrambled rotary pairs on the other


def test_q8_0_and_q4_0_quantize_the_matrices(tmp_path):
    session = _tiny("llama")
    q8 = session.export(tmp_path / "q8.gguf", type="q8_0")
    q4 = session.export(tmp_path / "q4.gguf", type="q4_0")
    _, t8 = _fields(tmp_path / "q8.gguf")
    _, t4 = _fields(tmp_path / "q4.gguf")
    assert t8["blk.1.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert t4["blk.1.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert t4["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # kept at 8 bits
    assert t4["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert q4.bytes < q8.bytes
    diff, agree = gguf_logits(tmp_path / "q8.gguf", session.model, session.tokenizer, head_dim=16)
    assert diff < 0.1 and agree >= 0.75


def test_non_uniform_llama_prune_is_written_as_deci_with_per_layer_head_arrays(tmp_path):
    session = _tiny("llama", {0: [1]})
    result = session.export(tmp_path / "m.gguf", type="f16")
    fields, tensors = _fields(tmp_path / "m.gguf")
    assert result.arch == "deci" and fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [2, 4] and fields["deci.attention.head_count_kv"] == [1, 2]
    assert list(tensors["blk.0.attn_q.weight"].shape) == [64, 2 * 16]
    assert list(tensors["blk.1.attn_q.weight"].shape) == [64, 4 * 16]
    assert list(tensors["blk.0.attn_output.weight"].shape) == [2 * 16, 64]
    # The decode bench pairs an engine row with the llama.cpp row of this shape.
    from workbench.bench.decode_targets import _engine_heads, _gguf_heads

    assert _gguf_heads(tmp_path / "m.gguf") == _engine_heads(session.model.config) == 6


def test_non_uniform_prune_padded_is_plain_llama_with_the_same_logits(tmp_path):
    session = _tiny("llama", {0: [1]})
    result = session.export(tmp_path / "m.gguf", type="f16", pad=True)
    fields, _ = _fields(tmp_path / "m.gguf")
    assert result.arch == "llama" and result.padded and fields["llama.attention.head_count"] == 4
    diff, agree = gguf_logits(tmp_path / "m.gguf", session.model, session.tokenizer, head_dim=16)
    assert diff < 5e-3 and agree == 1.0


def test_non_uniform_qwen3_needs_pad_and_says_so(tmp_path):
    session = _tiny("qwen3", {1: [0]})
    with pytest.raises(ExportError, match="--pad") as err:
        session.export(tmp_path / "m.gguf")
    assert "one head count for all layers" in str(err.value)
    assert list(tmp_path.iterdir()) == []
    assert session.export(tmp_path / "m.gguf", pad=True).arch == "qwen3"


@pytest.mark.parametrize("scheme", ["int8_weight_only", "int4_weight_only"])
def test_quantized_session_exports_the_weights_it_multiplies_with_to_q8_0_but_not_q4_0(tmp_path, scheme):
    from workbench.config import parse_config

    config = parse_config({"model": {"source": "tiny:llama"}, "compression": [{"step": "quantize", "scheme": scheme}]})
    session = workbench.load(config, quiet=True)
    state = float_state(session.model)
    layer = session.model.model.layers[0].mlp.up_proj  # Int8Linear / Int4Linear
    weight = state["model.layers.0.mlp.up_proj.weight"]
    assert weight.dtype == torch.float32 and weight.shape == (layer.out_features, layer.in_features)
    assert torch.equal(weight, layer.dequantized())
    assert not any(k.endswith(("scales", "scales_and_zeros")) for k in state)
    session.export(tmp_path / "m.gguf", type="q8_0")
    _, tensors = _fields(tmp_path / "m.gguf")
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    with pytest.raises(ExportError, match="second time"):
        session.export(tmp_path / "q4.gguf", type="q4_0")
    with pytest.raises(ExportError, match="q8_0"):
        session.export(tmp_path / "hf", to="hf")
    assert _only(tmp_path / "m.gguf") == ["m.gguf"]


def test_embedded_model_keeps_its_tokenizer_and_reads_back_in_transformers(tmp_path, embedded):
    assert pre_tokenizer_name(__import__("json").loads(embedded.tokenizer.backend_tokenizer.to_str())) == "gpt-2"
    result = embedded.export(tmp_path / "smollm2.gguf", type="f16")
    fields, tensors = _fields(tmp_path / "smollm2.gguf")
    assert result.arch == "llama" and "output.weight" not in tensors  # tied to token_embd
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert len(fields["tokenizer.ggml.merges"]) > 40_000
    diff, agree = gguf_logits(tmp_path / "smollm2.gguf", embedded.model, embedded.tokenizer, head_dim=64)
    assert diff < 0.05 and agree >= 0.95


# --- stock transformers ---------------------------------------------------------------------


def test_uniform_prune_loads_with_stock_transformers_and_identical_logits(tmp_path):
    session = _tiny("qwen3", {0: [0], 1: [1]})  # one KV group out of every layer
    before = _logits(session.model)
    session.export(tmp_path / "hf", to="hf", check=True)
    config = __import__("json").loads((tmp_path / "hf" / "config.json").read_text())
    assert "attention_heads_per_layer" not in config and "key_value_heads_per_layer" not in config
    assert config["num_attention_heads"] == 2 and config["num_key_value_heads"] == 1
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(_logits(stock), before, atol=0, rtol=0)


def test_non_uniform_prune_to_hf_is_refused_unless_padded(tmp_path):
    session = _tiny("llama", {0: [1]})
    with pytest.raises(ExportError, match="--pad"):
        session.export(tmp_path / "hf", to="hf")
    assert list(tmp_path.iterdir()) == []
    session.export(tmp_path / "hf", to="hf", pad=True)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert stock.config.num_attention_heads == 4
    torch.testing.assert_close(_logits(stock), _logits(session.model), atol=1e-6, rtol=0)
    diff, _ = compare_logits(session.model, stock, session.tokenizer)
    assert diff < 1e-5


def test_padding_is_exact_on_the_weights():
    session = _tiny("llama", {1: [0]})
    state, layout = pad_attention(float_state(session.model), head_layout(session.model))
    assert layout.heads == [4, 4] and state["model.layers.1.self_attn.q_proj.weight"].shape[0] == 64
    assert state["model.layers.1.self_attn.v_proj.weight"][16:].abs().sum() == 0
    assert state["model.layers.1.self_attn.o_proj.weight"][:, 32:].abs().sum() == 0


# --- bad input, nothing half-written ---------------------------------------------------------


def _cli(capsys, *argv) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse refuses unknown choices itself, with exit code 2
        code = exc.code
    return code, capsys.readouterr().err


def test_cli_exports_a_source_string(tmp_path, capsys):
    assert main(["tiny:llama", "--to", "gguf", "--out", str(tmp_path / "m.gguf"), "--type", "q8_0"]) == 0
    assert "Exported GGUF q8_0 (llama)" in capsys.readouterr().out
    assert _only(tmp_path / "m.gguf") == ["m.gguf"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tiny:llama", "--to", "onnx"], "invalid choice: 'onnx'"),
        (["tiny:llama", "--to", "gguf", "--type", "q5_k"], "invalid choice: 'q5_k'"),
        (["tiny:llama", "--to", "hf", "--type", "q8_0"], "--type picks a GGUF encoding"),
        (["./no/such/dir", "--to", "gguf"], "model directory no/such/dir does not exist"),
        (["configs/no-such.yaml", "--to", "gguf"], "config file configs/no-such.yaml does not exist"),
        (["tiny:nosuch", "--to", "gguf"], "unknown tiny model"),
        (["configs/int8.yaml", "--to", "hf"], "this session is quantized (int8_weight_only)"),
    ],
)
def test_cli_bad_input_is_a_clear_message_exit_2_and_nothing_written(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code, err = _cli(capsys, *argv, "--out", out)
    assert code == 2 and message in err
    assert list(tmp_path.iterdir()) == []


def test_existing_path_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_text("keep me")
    code, err = _cli(capsys, "tiny:llama", "--to", "gguf", "--out", out)
    assert code == 2 and "--overwrite" in err and out.read_text() == "keep me"
    code, _ = _cli(capsys, "tiny:llama", "--to", "gguf", "--out", out, "--overwrite")
    assert code == 0 and out.read_bytes()[:4] == b"GGUF"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "old.txt").write_text("old")
    assert _cli(capsys, "tiny:llama", "--to", "hf", "--out", hf, "--overwrite")[0] == 0
    assert (hf / "config.json").is_file() and not (hf / "old.txt").exists()
    assert _only(out) == ["hf", "m.gguf"]


@pytest.mark.parametrize("to", ["gguf", "hf"])
def test_a_failure_while_writing_leaves_nothing_at_path(tmp_path, monkeypatch, to):
    from workbench.export import to_gguf, to_hf

    def half_then_fail(path, *args, **kwargs):
        path = path if to == "gguf" else path / "model.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(to_gguf if to == "gguf" else to_hf, f"write_{to}", half_then_fail)
    session = _tiny("llama")
    with pytest.raises(OSError, match="disk full"):
        session.export(tmp_path / "out", to=to)
    assert list(tmp_path.iterdir()) == []


def test_benches_refuse_a_missing_gguf_target_before_anything_runs(tmp_path):
    from workbench.bench.decode_targets import Target as DecodeTarget
    from workbench.bench.targets import TargetError, parse_configs

    with pytest.raises(TargetError, match="python -m workbench.export"):
        parse_configs(f"cpp={tmp_path}/nope.gguf")
    with pytest.raises(ValueError, match="python -m workbench.export"):
        DecodeTarget.parse(f"llamacpp:{tmp_path}/nope.gguf")


def test_overwrite_replaces_a_file_with_a_checkpoint_folder(tmp_path):
    out = tmp_path / "m"
    out.write_text("an old file")
    _tiny("llama").export(out, to="hf", overwrite=True)
    assert (out / "config.json").is_file() and _only(out) == ["m"]


# --- the verdict of --check -----------------------------------------------------------------
# Tiny random models have nearly flat next-token distributions, so their KL figures are far
# below any tolerance and only exact (float32) or large (broken weights, impossible tolerance)
# differences are asserted; llama.cpp is kept out (sys.modules["llama_cpp"] = None) so the
# verdict does not depend on whether llama-cpp-python is installed or on its CPU kernels.


IMPOSSIBLE = Tolerance(kl_mean=1e-12, kl_p99=1e-12, top1=1.0)


@pytest.fixture
def no_llamacpp(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError


def _zero_tensor_in_gguf(path, name: str = "blk.0.ffn_down.weight") -> None:
    """Corrupt a written GGUF in place: one layer's MLP output weights become zeros."""
    reader = gguf.GGUFReader(path, "r+")
    (tensor,) = [t for t in reader.tensors if t.name == name]
    tensor.data[...] = 0
    reader.data.flush()


def _scramble_checkpoint(directory) -> None:
    """Corrupt a written transformers checkpoint: every MLP output matrix is reversed row-wise."""
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    state = load_file(path)
    for key in [k for k in state if k.endswith("mlp.down_proj.weight")]:
        state[key] = state[key].flip(0).contiguous() * 8
    save_file(state, path, metadata={"format": "pt"})


def test_check_of_an_exact_export_passes_and_the_verdict_is_in_the_result(tmp_path):
    session = _tiny("qwen3")
    result = session.export(tmp_path / "hf", to="hf", check=True)
    verdict = result.verdict
    assert verdict is not None and verdict.passed is True and result.passed is True
    assert verdict.kind == "hf" and verdict.tolerance == verify.HF_TOLERANCE == verify.TOLERANCES["hf"]
    (comparison,) = verdict.comparisons
    d = comparison.divergence
    assert comparison.reader == "stock transformers reload" and comparison.failures == []
    assert d.kl_mean == 0 and d.kl_p99 == 0 and d.top1_agreement == 1.0  # float32 weights, same arithmetic
    assert d.windows == verify.WINDOWS and d.tokens == verify.WINDOWS * (verify.WINDOW - 1)
    export_line, verdict_line = result.summary().split("\n")
    assert export_line.startswith("Exported transformers checkpoint")
    assert verdict_line.startswith(
        "check passed: KL mean 0.0e+00 <= 1e-06, p99 0.0e+00 <= 1e-05, top-1 100.00% >= 99.9%"
    )
    assert "stock transformers reload" in verdict_line and "hf tolerance" in verdict_line


def test_check_of_an_f16_gguf_passes_with_transformers_reading_it(tmp_path, no_llamacpp):
    session = _tiny("llama")
    result = session.export(tmp_path / "m.gguf", type="f16", check=True)
    verdict = result.verdict
    assert verdict is not None and verdict.kind == "f16" and verdict.tolerance == verify.F16_TOLERANCE
    assert result.passed is True, verdict.line()
    (comparison,) = verdict.comparisons
    assert comparison.reader == "transformers reading the GGUF"
    assert comparison.divergence.kl_mean < verify.F16_TOLERANCE.kl_mean / 100
    assert verdict.not_compared == ["llama-cpp-python is not installed (scripts/install_llamacpp.sh)"]
    assert "check passed: KL mean" in result.summary()


def test_without_check_there_is_no_verdict(tmp_path):
    result = _tiny("llama").export(tmp_path / "m.gguf")
    assert result.verdict is None and result.passed is None and "\n" not in result.summary()


def test_a_gguf_corrupted_after_writing_fails_the_check(tmp_path, monkeypatch, no_llamacpp):
    from workbench.export import to_gguf

    write = to_gguf.write_gguf

    def write_then_corrupt(path, *args, **kwargs):
        write(path, *args, **kwargs)
        _zero_tensor_in_gguf(path)

    monkeypatch.setattr(to_gguf, "write_gguf", write_then_corrupt)
    result = _tiny("llama").export(tmp_path / "m.gguf", type="f16", check=True)
    assert result.passed is False and result.verdict is not None
    (comparison,) = result.verdict.comparisons
    # A tiny random model's next-token distributions are nearly flat, so a lost layer shows
    # in which token is on top more than in KL (the embedded model: both, docs/export.md).
    assert comparison.failures and comparison.divergence.top1_agreement < 0.95
    assert result.summary().split("\n")[1].startswith("check FAILED: KL mean")
    assert (tmp_path / "m.gguf").is_file()  # written all the same: the figures say how far off it is


def test_cli_check_exits_1_and_says_failed_for_a_corrupted_checkpoint(tmp_path, monkeypatch, capsys):
    from workbench.export import to_hf

    write = to_hf.write_hf

    def write_then_corrupt(path, *args, **kwargs):
        write(path, *args, **kwargs)
        _scramble_checkpoint(path)

    monkeypatch.setattr(to_hf, "write_hf", write_then_corrupt)
    code = main(["tiny:qwen3", "--to", "hf", "--out", str(tmp_path / "hf"), "--check"])
    out = capsys.readouterr().out
    assert code == 1
    assert out.splitlines()[-1].startswith("check FAILED: KL mean")
    assert "stock transformers reload" in out


def test_cli_check_exits_0_and_says_passed_for_a_good_export(tmp_path, capsys):
    code = main(["tiny:qwen3", "--to", "hf", "--out", str(tmp_path / "hf"), "--check"])
    out = capsys.readouterr().out
    assert code == 0 and out.splitlines()[-1].startswith("check passed: KL mean")


def test_a_too_strict_tolerance_fails_through_the_parameter_and_the_cli(tmp_path, monkeypatch, capsys, no_llamacpp):
    session = _tiny("llama")
    result = export(session, tmp_path / "q8.gguf", type="q8_0", check=True, tolerance=IMPOSSIBLE)
    assert result.passed is False and result.verdict is not None and result.verdict.tolerance == IMPOSSIBLE
    (comparison,) = result.verdict.comparisons
    assert [f.split(" ")[:2] for f in comparison.failures[:2]] == [["KL", "mean"], ["KL", "p99"]]
    # the same file held to the default q8_0 tolerance passes
    assert session.export(tmp_path / "ok.gguf", type="q8_0", check=True).passed is True
    monkeypatch.setitem(verify.TOLERANCES, "q8_0", IMPOSSIBLE)
    code = main(["tiny:llama", "--to", "gguf", "--type", "q8_0", "--out", str(tmp_path / "cli.gguf"), "--check"])
    out = capsys.readouterr().out
    assert code == 1 and "check FAILED" in out and "q8_0 tolerance" in out


def test_a_refused_request_stays_exit_2_with_check(tmp_path, capsys):
    code, err = _cli(capsys, "tiny:llama", "--to", "hf", "--type", "q8_0", "--out", tmp_path / "x", "--check")
    assert code == 2 and "--type picks a GGUF encoding" in err


def test_no_reader_no_verdict(tmp_path, no_llamacpp):
    """A deci GGUF (per-layer heads) has no transformers reader: without llama.cpp nothing is judged."""
    result = _tiny("llama", {0: [1]}).export(tmp_path / "m.gguf", check=True)
    assert result.arch == "deci" and result.verdict is not None
    assert result.passed is None and result.verdict.comparisons == []
    assert result.summary().endswith(
        "check gave no verdict: no reader compared logits (transformers cannot read llama.cpp's deci "
        "architecture; llama-cpp-python is not installed (scripts/install_llamacpp.sh))"
    )


def test_verdict_line_names_every_reader_and_marks_what_failed():
    def d(kl: float, top1: float) -> verify.Divergence:
        return verify.Divergence(kl, kl, 10 * kl, 20 * kl, top1, 2044, 4, 10.0, 10.1)

    tol = Tolerance(kl_mean=5e-3, kl_p99=5e-2, top1=0.98)
    verdict = verify.Verdict(
        "q8_0",
        tol,
        [
            verify.Comparison("transformers reading the GGUF", d(4e-4, 0.99), tol),
            verify.Comparison("llama.cpp", d(6e-4, 0.97), tol),
        ],
    )
    assert verdict.passed is False
    line = verdict.line()
    assert line.startswith(
        "check FAILED: transformers reading the GGUF: KL mean 4.0e-04 <= 5e-03, p99 4.0e-03 <= 5e-02"
    )
    assert "; llama.cpp: KL mean 6.0e-04 <= 5e-03, p99 6.0e-03 <= 5e-02, top-1 97.00% < 98.0%" in line
    assert verdict.comparisons[1].failures == ["top-1 97.00% < 98.0%"]
    nan = verify.Comparison("x", d(float("nan"), 1.0), tol)
    assert not nan.passed  # a NaN is no pass


def test_greedy_mismatch_is_information_with_where_the_replies_part():
    session = _tiny("llama")
    ids = [[5, 17, 42], [7, 3, 64]]
    line = verify.greedy_line([([1, 2, 3], [1, 2, 3]), ([9, 8, 7], [9, 4, 7])], ids, session.model)
    assert line.startswith(
        "llama.cpp greedy 16 tokens equal to transformers' on 1 of 2 prompts; they part at token 2 ("
    )
    assert "logits between the top two)" in line
    assert "Information, not a failure: where the top two next tokens are nearly tied" in line
    assert verify.greedy_line([([1], [1])], ids[:1], session.model).endswith("on 1 of 1 prompts")


def test_log_prob_divergence_is_divergence_on_precomputed_log_probs(tmp_path):
    """The llama.cpp comparison feeds llama.cpp's logits through log_prob_divergence: on two
    transformers models it gives what divergence gives."""
    from workbench.data import evaluation_texts

    a, b = _tiny("llama"), _tiny("llama")
    with torch.no_grad():
        b.model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    texts = evaluation_texts()
    want = divergence(a.model, b.model, a.tokenizer, texts, window=64, max_windows=3)

    def log_probs(model, w):
        with torch.inference_mode():
            return torch.log_softmax(model(input_ids=w.unsqueeze(0)).logits[0, :-1].float(), dim=-1)

    windows = token_windows(a.tokenizer, texts, window=64, max_windows=3)
    got = log_prob_divergence((log_probs(a.model, w), log_probs(b.model, w), w[1:]) for w in windows)
    assert got == want and got.kl_mean > 0 and got.windows == 3


def test_a_session_that_computes_in_reduced_precision_gets_the_looser_tolerance(tmp_path, no_llamacpp):
    """int8 layers multiply bf16 activations, so an f16 export (float32 in transformers) differs
    from the session by the session's own rounding: its f16 tolerance is loosened, not failed."""
    from workbench.config import parse_config

    config = parse_config({"model": {"source": "tiny:llama"}, "compression": [{"step": "quantize"}]})
    result = workbench.load(config, quiet=True).export(tmp_path / "m.gguf", type="f16", check=True)
    verdict = result.verdict
    assert verdict is not None and verdict.reduced_precision == "int8_weight_only"
    assert verdict.tolerance == verify.tolerance_for("f16", reduced_precision=True)
    assert verdict.tolerance.kl_mean == max(verify.F16_TOLERANCE.kl_mean, verify.REDUCED_PRECISION_TOLERANCE.kl_mean)
    assert verdict.tolerance.top1 == min(verify.F16_TOLERANCE.top1, verify.REDUCED_PRECISION_TOLERANCE.top1)
    assert "loosened for a session that computes in reduced precision (int8_weight_only)" in result.summary()
    assert verify.tolerance_for("q4_0", reduced_precision=True) == verify.Q4_0_TOLERANCE  # never tightened
