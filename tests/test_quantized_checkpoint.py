"""Quantized checkpoints (workbench/compress/checkpoint.py): saved as held, read back with no
float32 copy and no re-quantization, bit-identical; bad folders refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import workbench
from workbench.compress.checkpoint import FORMAT_VERSION, WEIGHTS
from workbench.compress.int4_linear import Int4Linear
from workbench.compress.int8_linear import Int8Linear
from workbench.compress.quantization import CastIOLinear, quantize
from workbench.config import ModelConfig
from workbench.errors import ModelSourceError
from workbench.models import load_model
from workbench.models.loader import QUANTIZED_MANIFEST

ROOT = Path(__file__).resolve().parents[1]
MIXED = """model:
  source: tiny:llama
  device: cpu
compression:
  - step: prune_heads
    criterion: weight_norm
    per_layer: 1
  - step: quantize
    scheme: int4_weight_only
    group_size: 32
    rules:
      - pattern: "*.self_attn.o_proj"
        scheme: int8_weight_only
      - pattern: "*.mlp.down_proj"
        scheme: fp16
      - pattern: lm_head
        scheme: int8_weight_only
  - step: kv_cache
    policy: sliding_window
    window: 64
"""


def _logits(session, text="The quick brown fox jumps over the lazy dog"):
    ids = session.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return session.model(input_ids=ids).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("q")
    config = folder / "mixed.yaml"
    config.write_text(MIXED)
    session = workbench.load(str(config), quiet=True)
    return session, session.save(folder / "model")


def test_a_pruned_mixed_model_comes_back_bit_identical_without_float32_copies(saved):
    session, folder = saved
    again = workbench.load(str(folder), quiet=True)
    assert torch.equal(_logits(again), _logits(session))
    reply = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}
    assert again.chat("Hello there", **reply).text == session.chat("Hello there", **reply).text
    kinds = {n: type(m) for n, m in again.model.named_modules()}
    for name, module in session.model.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear, CastIOLinear)):
            assert kinds[name] is type(module), name
    o_proj = again.model.model.layers[0].self_attn.o_proj
    assert (
        o_proj.weight.dtype == torch.int8
        and o_proj.in_features == session.model.model.layers[0].self_attn.o_proj.in_features
    )
    assert again.model.model.layers[0].mlp.down_proj.weight.dtype == torch.float16
    assert again.model.model.layers[0].mlp.up_proj.weight.dtype == torch.uint8
    # the pruned shapes and the KV-cache policy came back; no step quantized anything again
    assert again.model.config.key_value_heads_per_layer == session.model.config.key_value_heads_per_layer
    assert [r["step"] for r in again.reports] == ["kv_cache"]
    # every tensor is the file's, mapped: none was allocated (as float32 or otherwise) at load
    assert again.memory().weights_file_backed > 0
    # a loaded checkpoint (no quantize step in its reports) saves as one again
    third = workbench.load(str(again.save(folder.parent / "again")), quiet=True)
    assert torch.equal(_logits(third), _logits(session))


def test_the_kernels_operands_start_on_aligned_addresses(saved):
    # safetensors packs tensors back to back: o_proj's int8 weight lies 12 bytes past a 64-byte
    # boundary in this file, and PyTorch's int8 kernel on an AVX-512 CPU crashed on it (SIGSEGV)
    # once a prompt of four or more tokens was multiplied
    session, folder = saved
    with safe_open(folder / WEIGHTS, framework="pt") as f:
        in_file = {k: f.get_tensor(k).data_ptr() % 64 for k in f.keys() if "o_proj" in k or "lm_head" in k}
    assert any(in_file.values()), in_file  # else this test would prove nothing
    again = workbench.load(str(folder), quiet=True)
    operands = {
        f"{name}.{part}": getattr(module, part)
        for name, module in again.model.named_modules()
        if isinstance(module, (Int8Linear, Int4Linear))
        for part in ("weight", *module.qparams)
    }
    assert {k: t.data_ptr() % 64 for k, t in operands.items() if t.data_ptr() % 64} == {}
    assert torch.equal(_logits(again), _logits(session))


def test_the_file_holds_the_quantized_tensors_and_the_config_that_made_it(saved):
    session, folder = saved
    with safe_open(folder / WEIGHTS, framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.layers.0.self_attn.o_proj.weight"] == "I8"
    assert dtypes["model.layers.0.self_attn.o_proj.scales"] == "BF16"
    assert dtypes["model.layers.0.mlp.up_proj.weight"] == "U8"
    assert dtypes["lm_head.weight"] == "I8"
    manifest = json.loads((folder / QUANTIZED_MANIFEST).read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["made_by"]["compression"][1]["scheme"] == "int4_weight_only"
    saved_config = (folder / "workbench.yaml").read_text()
    assert "kv_cache" in saved_config and "quantize" not in saved_config
    float_bytes = sum(
        p.numel() * 4 for p in load_model(ModelConfig(source="tiny:llama"), quiet=True).model.parameters()
    )
    assert (folder / WEIGHTS).stat().st_size < 0.5 * float_bytes


def test_a_tied_lm_head_is_stored_once_and_stays_tied(tmp_path):
    session = workbench.load("tiny:llama", device="cpu", quiet=True)
    session.model.config.tie_word_embeddings = True
    session.model.tie_weights()
    session.reports = [asdict(quantize(session))]  # int8 blocks; lm_head kept: still the embedding table
    assert session.model.lm_head.weight is session.model.get_input_embeddings().weight
    folder = session.save(tmp_path / "m")
    assert "lm_head.weight" not in load_file(folder / WEIGHTS)
    again = workbench.load(str(folder), quiet=True)
    assert again.model.lm_head.weight.data_ptr() == again.model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(_logits(again), _logits(session))


def _copy(folder: Path, to: Path) -> Path:
    to.mkdir()
    for item in folder.iterdir():
        (to / item.name).write_bytes(item.read_bytes())
    return to


@pytest.mark.parametrize("missing", [WEIGHTS, "config.json"])
def test_a_folder_missing_a_file_is_refused_by_name(saved, tmp_path, missing):
    folder = _copy(saved[1], tmp_path / "m")
    (folder / missing).unlink()
    with pytest.raises(ModelSourceError, match=f"missing {missing}"):
        workbench.load(str(folder), quiet=True)


def test_a_tampered_tensor_shape_is_refused_by_name(saved, tmp_path):
    folder = _copy(saved[1], tmp_path / "m")
    with safe_open(folder / WEIGHTS, framework="pt") as f:
        metadata = f.metadata()
    state = load_file(folder / WEIGHTS)
    key = "model.layers.1.self_attn.o_proj.weight"
    state[key] = state[key][:, :-8].contiguous()
    save_file(state, folder / WEIGHTS, metadata=metadata)
    with pytest.raises(ModelSourceError, match=rf"{key} is int8 \[\d+, \d+\], the checkpoint's config"):
        workbench.load(str(folder), quiet=True)


def test_a_format_from_the_future_is_refused(saved, tmp_path):
    folder = _copy(saved[1], tmp_path / "m")
    manifest = json.loads((folder / QUANTIZED_MANIFEST).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (folder / QUANTIZED_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelSourceError, match=f"format version {FORMAT_VERSION + 1}.*newer workbench"):
        workbench.load(str(folder), quiet=True)


def test_the_plain_loader_points_at_workbench_load(saved):
    with pytest.raises(ModelSourceError, match="quantized checkpoint.*workbench.load"):
        load_model(ModelConfig(source=str(saved[1])), quiet=True)


_MEASURE = """
import json, sys, time, torch, workbench
from workbench.models.memory import process_status
start = time.perf_counter()
s = workbench.load(sys.argv[1], quiet=True)
seconds = time.perf_counter() - start
load_peak = process_status()["VmHWM"]
ids = s.tokenizer(sys.argv[2], return_tensors="pt").input_ids
with torch.no_grad():
    torch.save(s.model(input_ids=ids).logits, sys.argv[3])
text = s.chat(sys.argv[2], temperature=0, max_tokens=24, ignore_eos=True).text
status = process_status()
print(json.dumps({"seconds": seconds, "load_peak": load_peak, "rss": status["VmRSS"], "peak": status["VmHWM"], "text": text}))
"""


@pytest.mark.parametrize("config", ["int4", "int8"])
def test_the_embedded_model_saved_quantized_loads_in_seconds_at_its_steady_footprint(
    config, embedded, embedded_cache, tmp_path, monkeypatch
):
    """The issue's bar: a saved int4 (and int8) model of the embedded SmolLM2 loads with its peak
    within 10% of its steady RSS, in seconds, and answers exactly as the session that saved it.
    Measured in a fresh process, so VmHWM is this load's and nobody else's."""
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(embedded_cache))
    session = workbench.load(str(ROOT / "configs" / f"{config}.yaml"), quiet=True)
    folder = session.save(tmp_path / "model")
    prompt = "What is the capital of France?"
    expected_text = session.chat(prompt, temperature=0, max_tokens=24, ignore_eos=True).text
    expected_logits = _logits(session, prompt)
    del session
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(folder), prompt, str(tmp_path / "logits.pt")],
        capture_output=True,
        text=True,
        env={**os.environ, "WORKBENCH_CACHE_DIR": str(tmp_path / "no-cache")},  # the folder alone suffices
        check=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["text"] == expected_text
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected_logits)
    assert got["seconds"] < 10, got  # quantizing the same model takes ~16 s on this CPU
    assert got["peak"] <= 1.10 * got["rss"], got
    assert got["load_peak"] <= got["peak"]
    on_disk = sum(p.stat().st_size for p in folder.iterdir())
    assert on_disk < 0.5 * 538e6, on_disk  # the float32 checkpoint is 538 MB


def test_compress_saves_quantized_only_what_has_plain_tensors_here():
    from workbench.compress.checkpoint import storable_schemes
    from workbench.config import parse_config

    def steps(**options):
        return parse_config({"compression": [{"step": "quantize", **options}]}, "q.yaml").compression

    int4 = steps(scheme="int4_weight_only", rules=[{"pattern": "lm_head", "scheme": "fp16"}])
    assert storable_schemes(int4, "cpu")
    assert storable_schemes(steps(), "cpu")  # the default scheme: int8 through PyTorch's kernel
    assert not storable_schemes(steps(rules=[{"pattern": "*.mlp.*", "scheme": "int8_dynamic"}]), "cpu")


def test_a_half_precision_layer_with_a_bias_loads_frozen(tmp_path):
    """GLM-4's q/k/v carry a bias: read back, it is half precision and, like the weight, frozen
    (the layer is the checkpoint's cast, not a parameter to train)."""
    config = tmp_path / "glm4-fp16.yaml"
    config.write_text(
        "model:\n  source: tiny:glm4\ncompression:\n  - step: quantize\n    scheme: fp16\n"
        "    rules:\n      - pattern: lm_head\n        scheme: keep\n"
    )
    session = workbench.load(str(config), quiet=True)
    again = workbench.load(str(session.save(tmp_path / "model")), quiet=True)
    q_proj = again.model.model.layers[0].self_attn.q_proj
    assert q_proj.bias is not None and q_proj.bias.dtype == torch.float16
    assert not q_proj.weight.requires_grad and not q_proj.bias.requires_grad
    assert torch.equal(_logits(again), _logits(session))
