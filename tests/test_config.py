from pathlib import Path

import pytest

import workbench
from workbench.config import ConfigError, WorkbenchConfig, load_config

CONFIGS = Path(__file__).parent.parent / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_default_config_file_matches_documented_defaults():
    config = load_config(CONFIGS / "default.yaml")
    assert config.model.source == "embedded:smollm2-135m-instruct"
    assert config.model.context_limit == 8192
    assert config.model.device == "auto"
    assert config.compression == []
    assert config == WorkbenchConfig()


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == WorkbenchConfig()


def test_unknown_key_is_named_with_its_file(tmp_path):
    path = write(tmp_path, "model:\n  dtyp: float32\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert "model.dtyp: unknown key" in str(err.value)


def test_unknown_section_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"generaton: unknown key"):
        load_config(write(tmp_path, "generaton:\n  temperature: 0\n"))


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("model:\n  dtype: float8\n", "model.dtype"),
        ("model:\n  device: gpu\n", "model.device"),
        ("model:\n  context_limit: 0\n", "model.context_limit"),
        ("generation:\n  temperature: -1\n", "generation.temperature"),
        ("generation:\n  top_p: 0\n", "generation.top_p"),
        ("generation:\n  max_tokens: many\n", "generation.max_tokens"),
    ],
)
def test_bad_values_name_the_key(tmp_path, yaml_text, key):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}: {key}:" in str(err.value)


def test_unknown_compression_step_fails_at_load(tmp_path):
    with pytest.raises(ConfigError, match=r"compression\.0\.step: unknown compression step 'prune_everything'"):
        load_config(write(tmp_path, "compression:\n  - step: prune_everything\n"))


def test_not_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_load_overrides_are_validated_too():
    with pytest.raises(ConfigError, match="model.devise: unknown key"):
        workbench.load("tiny:llama", devise="cpu")
    with pytest.raises(ConfigError, match="model.dtype"):
        workbench.load("tiny:llama", dtype="int3")


def test_load_override_applies():
    session = workbench.load("tiny:llama", context_limit=64, quiet=True)
    assert session.engine.context_limit == 64


def test_shipped_configs_load_by_their_repository_path_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a notebook runs in notebooks/, a user anywhere
    assert load_config("configs/thinking.yaml").model.adapter == "data/thinking"
    with pytest.raises(ConfigError, match="configs/nope.yaml does not exist"):
        load_config("configs/nope.yaml")


def test_the_models_sampling_defaults_fill_what_the_config_leaves_out(tmp_path):
    """Config file > the model's generation config > the workbench's defaults, knob by knob."""
    import workbench
    from workbench.models.loader import sampling_defaults

    base = workbench.load("tiny:llama", quiet=True)
    base.model.generation_config.repetition_penalty = 1.3
    base.model.generation_config.do_sample = True  # saving refuses sampling knobs without it
    base.model.generation_config.top_k = 20
    base.model.generation_config.min_p = 7.0  # out of the engine's bounds: ignored
    assert sampling_defaults(base.model) == {"repetition_penalty": 1.3, "top_k": 20}
    folder = base.save(tmp_path / "saved")
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  source: {folder}\ngeneration:\n  top_k: 5\n  temperature: 0.2\n")
    defaults = workbench.load(str(config), quiet=True).engine.defaults
    assert (defaults.repetition_penalty, defaults.top_k, defaults.temperature, defaults.min_p) == (1.3, 5, 0.2, 0.0)


def test_every_shipped_config_gets_the_embedded_models_frequency_penalty(tmp_path):
    import workbench

    session = workbench.load("configs/default.yaml", quiet=True)
    assert session.engine.defaults.frequency_penalty == 0.5
    # a saved model keeps it (its generation_config.json), as a hub model's comes with it
    assert workbench.load(str(session.save(tmp_path / "saved")), quiet=True).engine.defaults.frequency_penalty == 0.5
    # overriding the model section keeps the generation section as the file set it
    overridden = workbench.load("configs/default.yaml", quiet=True, device="cpu").engine.defaults
    assert (overridden.frequency_penalty, overridden.temperature, overridden.repetition_penalty) == (0.5, 0.7, 1.0)
    assert workbench.load("tiny:llama", quiet=True).engine.defaults.frequency_penalty == 0.0
