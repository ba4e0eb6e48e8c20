"""Exported GGUF files run in llama.cpp (llama-cpp-python, `scripts/install_llamacpp.sh`):
the same greedy tokens as the engine for the first 16 tokens (f16) and perplexity within 1%
(q8_0), for the embedded model and a head-pruned one (per-layer heads: llama.cpp's deci).
Skipped where llama-cpp-python is not installed; test_export.py checks the files without it."""

from __future__ import annotations

import pytest
import torch

import workbench
from workbench.config import parse_config
from workbench.data import evaluation_texts
from workbench.export import verify
from workbench.metrics import perplexity

llama_cpp = pytest.importorskip("llama_cpp")

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for saving battery on a phone.",
    "Explain in two sentences what a KV cache is.",
]


@pytest.fixture(scope="module")
def pruned(embedded_cache) -> workbench.Session:
    """The embedded model with a quarter of its KV groups removed at random across layers:
    different head counts per layer, like configs/pruned-25.yaml, in seconds instead of minutes."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WORKBENCH_CACHE_DIR", str(embedded_cache))
    try:
        config = parse_config(
            {
                "model": {"source": "embedded:smollm2-135m-instruct", "device": "cpu"},
                "compression": [{"step": "prune_heads", "criterion": "random", "ratio": 0.25}],
            }
        )
        session = workbench.load(config, quiet=True)
    finally:
        mp.undo()
    return session


@pytest.fixture(scope="module", params=["embedded", "pruned"])
def session(request, embedded, pruned) -> workbench.Session:
    return embedded if request.param == "embedded" else pruned


def _llama(path, **kw):
    return llama_cpp.Llama(str(path), n_ctx=1024, n_threads=2, verbose=False, **kw)


@pytest.mark.parametrize("tiny_arch", ["llama", "qwen3"])
def test_tiny_models_uniform_and_pruned_give_transformers_logits(tmp_path, tiny_arch):
    """Random tiny models have near-tied logits, so greedy tokens would hinge on float16
    rounding; their logits are compared instead (the embedded model's tokens are below)."""
    import numpy as np

    from workbench.compress.pruning import prune_groups

    session = workbench.load(f"tiny:{tiny_arch}", quiet=True)
    ids = session.tokenizer("The quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]

    def gap(name: str) -> float:
        with torch.inference_mode():
            ref = session.model(input_ids=torch.tensor([ids])).logits[0].numpy()
        return float(np.abs(verify.llamacpp_logits(tmp_path / name, ids) - ref).max()), float(ref.std())

    session.export(tmp_path / "full.gguf")
    diff, spread = gap("full.gguf")
    assert diff < 0.02 * spread
    prune_groups(session.model, {0: [1]})
    result = session.export(tmp_path / "pruned.gguf", pad=tiny_arch == "qwen3")
    assert result.arch == ("deci" if tiny_arch == "llama" else "qwen3")
    diff, spread = gap("pruned.gguf")
    assert diff < 0.02 * spread


def test_llama_without_the_permutation_is_wrong_in_llamacpp(tmp_path, monkeypatch):
    from workbench.export import to_gguf

    session = workbench.load("tiny:llama", quiet=True)
    ids = session.tokenizer("The quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        ref = session.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    session.export(tmp_path / "right.gguf")
    monkeypatch.setattr(to_gguf, "permute", lambda w, n: w)
    session.export(tmp_path / "wrong.gguf")
    right = abs(verify.llamacpp_logits(tmp_path / "right.gguf", ids) - ref).max()
    wrong = abs(verify.llamacpp_logits(tmp_path / "wrong.gguf", ids) - ref).max()
    assert wrong > 5 * right


def test_llamacpp_tokenizes_like_the_engine(tmp_path, embedded):
    embedded.export(tmp_path / "m.gguf", type="q8_0")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    texts = [
        "Hello world!",
        "In 2024, 3.14159 * 42 = 131.95",
        "  leading spaces\n\nand\ttabs",
        "你好，世界",
        "<|im_start|>user\nhi<|im_end|>\n",
        "don't won't it's",
    ]
    for text in texts:
        want = embedded.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text


def test_f16_greedy_token_ids_equal_transformers(tmp_path, session):
    """llama.cpp's f16 greedy tokens are transformers' own, same ids in. (The engine's replies are
    not compared: its cached decode and llama.cpp can land on two sides of a near-tie, as they did
    on an AVX-512 EPYC for one of these prompts.)"""
    result = session.export(tmp_path / "m.gguf", type="f16")
    assert result.arch == ("deci" if len(set(result.heads)) > 1 else "llama")
    ids = [
        list(
            session.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        for p in PROMPTS
    ]
    for ref, got in verify.llamacpp_greedy(tmp_path / "m.gguf", session.model, ids):
        assert got == ref


def test_q8_0_perplexity_within_one_percent_of_the_engine(tmp_path, session):
    session.export(tmp_path / "m.gguf", type="q8_0")
    texts = evaluation_texts()
    engine = perplexity(session.model, session.tokenizer, texts, window=512, max_windows=4)
    llamacpp = verify.llamacpp_perplexity(tmp_path / "m.gguf", session.tokenizer, texts, window=512, max_windows=4)
    assert abs(llamacpp / engine - 1) < 0.01, (engine, llamacpp)


def test_check_flag_runs_llamacpp(tmp_path):
    session = workbench.load("tiny:llama", quiet=True)
    result = session.export(tmp_path / "m.gguf", check=True)
    assert any("llama.cpp greedy 16 tokens equal to transformers' on 2 of 2" in c for c in result.checks)
    assert result.verdict is not None
    assert [c.reader for c in result.verdict.comparisons] == ["transformers reading the GGUF", "llama.cpp"]


@pytest.mark.parametrize("type", ["f16", "q8_0"])
def test_check_verdict_passes_in_llamacpp(tmp_path, session, type):
    """The embedded model (llama: transformers and llama.cpp read it) and a pruned one (deci:
    llama.cpp alone) pass their type's tolerance; measured values in docs/export.md."""
    result = session.export(tmp_path / "m.gguf", type=type, check=True)
    assert result.verdict is not None
    readers = [c.reader for c in result.verdict.comparisons]
    assert readers == (["llama.cpp"] if result.arch == "deci" else ["transformers reading the GGUF", "llama.cpp"])
    assert result.passed is True, result.verdict.line()
    assert result.verdict.line().startswith("check passed: ")


def test_llamacpp_alone_judges_a_deci_file_and_fails_a_corrupted_one(tmp_path, monkeypatch):
    import gguf

    from workbench.compress.pruning import prune_groups
    from workbench.export import to_gguf

    write = to_gguf.write_gguf

    def write_then_corrupt(path, *args, **kwargs):
        write(path, *args, **kwargs)
        reader = gguf.GGUFReader(path, "r+")
        (tensor,) = [t for t in reader.tensors if t.name == "blk.0.ffn_down.weight"]
        tensor.data[...] = 0
        reader.data.flush()

    monkeypatch.setattr(to_gguf, "write_gguf", write_then_corrupt)
    session = workbench.load("tiny:llama", quiet=True)
    prune_groups(session.model, {0: [1]})
    result = session.export(tmp_path / "m.gguf", check=True)
    assert result.arch == "deci" and result.verdict is not None
    assert [c.reader for c in result.verdict.comparisons] == ["llama.cpp"]
    assert result.passed is False and "check FAILED" in result.summary()


def test_decode_bench_times_an_exported_gguf_beside_the_engine(tmp_path, embedded_cache, monkeypatch):
    import json

    from workbench.bench.__main__ import main

    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(embedded_cache))
    path = tmp_path / "default-q8_0.gguf"
    workbench.load("configs/default.yaml", device="cpu", quiet=True).export(path, type="q8_0")
    main(
        [
            "decode",
            "--targets",
            f"engine:tiny:llama,llamacpp:{path}",
            "--tokens",
            "4",
            "--repeats",
            "1",
            "--out",
            str(tmp_path / "bench"),
        ]
    )
    data = json.loads((tmp_path / "bench" / "decode.json").read_text())
    assert data["targets"][f"llamacpp:{path}"]["dtype"] == "Q8_0"
    assert not data["skipped"]


def test_compare_serves_an_exported_gguf_through_llamacpps_openai_server(tmp_path):
    import json

    from workbench.bench.__main__ import main

    pytest.importorskip("sse_starlette")
    path = tmp_path / "tiny.gguf"
    workbench.load("tiny:llama", quiet=True).export(path, type="q8_0")
    main(
        [
            "compare",
            "--configs",
            f"local=tiny:llama,cpp={path}",
            "--tasks",
            "facts",
            "--limit",
            "2",
            "--windows",
            "1",
            "--concurrency",
            "1",
            "--requests",
            "1",
            "--tokens",
            "4",
            "--out",
            str(tmp_path / "compare"),
        ]
    )
    data = json.loads((tmp_path / "compare" / "compare.json").read_text())
    columns = {c["name"]: c for c in data["columns"]}
    assert columns["cpp"]["error"] in (None, ""), columns["cpp"]["error"]
    (level,) = columns["cpp"]["serve"]
    assert level["failed"] == 0 and level["aggregate_tok_s"] > 0
    assert columns["cpp"]["quality"]["tasks"]["facts"]["asked"] == 2
    assert "llama.cpp (llama-cpp-python server)" in (tmp_path / "compare" / "compare.md").read_text()
