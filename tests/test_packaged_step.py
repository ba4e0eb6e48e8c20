"""The CPU decode step compiled ahead of time (workbench.engine.packaged_step): compiled once per
model structure in a child process, stored without weights, loaded by the next engine, reading
the model's own tensors, and never in the way of a reply when it cannot be built."""

import json
import zipfile

import pytest
import torch

import workbench
from workbench.engine import packaged_step

FIELDS = {"temperature": 0, "max_tokens": 10, "ignore_eos": True}


@pytest.fixture
def steps_home(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "decode-steps"


def _compiled(tmp_path, name="c.yaml"):
    config = tmp_path / name
    config.write_text("model:\n  source: tiny:llama\n  compile: true\n")
    return workbench.load(str(config), quiet=True)


def test_a_step_is_compiled_once_per_structure_stored_without_weights_and_loaded_after(tmp_path, steps_home, caplog):
    caplog.set_level("INFO", logger="workbench.engine.packaged_step")
    eager = workbench.load("tiny:llama", quiet=True)
    expected = eager.chat("hello there", **FIELDS).text
    first = _compiled(tmp_path)
    assert first.chat("hello there", **FIELDS).text == expected
    (home,) = steps_home.iterdir()
    record = json.loads((home / "record.json").read_text())
    assert record["portable"] and record["torch"] == torch.__version__
    with zipfile.ZipFile(home / "step.pt2") as package:
        stored = sum(i.file_size for i in package.infolist() if not i.filename.endswith((".so", ".cpp", ".json")))
        assert not [n for n in package.namelist() if "/weights/" in n], "the model's tensors were packaged"
    weights = sum(p.numel() * p.element_size() for p in first.model.parameters())
    assert stored < weights / 10

    second = _compiled(tmp_path, "d.yaml")  # another engine, the same structure: no compiler
    assert second.chat("hello there", **FIELDS).text == expected
    said = [r.getMessage() for r in caplog.records if r.name == packaged_step.__name__]
    assert sum(" compiled in " in m for m in said) == 1 and sum(" loaded from " in m for m in said) == 1, said
    assert len(list(steps_home.iterdir())) == 1
    long = second.chat("hello there", **{**FIELDS, "max_tokens": 300})  # past 256 tokens: compiled on demand
    assert long.text == eager.chat("hello there", **{**FIELDS, "max_tokens": 300}).text
    said = [r.getMessage() for r in caplog.records]
    assert sum("compiling the decode step for a 512-token static cache" in m for m in said) == 1, said
    assert len(list(steps_home.iterdir())) == 2

    (home / "step.pt2").write_bytes(b"half a package")  # a stored step that will not load: made anew
    third = _compiled(tmp_path, "e.yaml")
    assert third.chat("hello there", **FIELDS).text == expected
    said = [r.getMessage() for r in caplog.records if r.name == packaged_step.__name__]
    assert sum("did not load" in m for m in said) == 1 and sum(" compiled in " in m for m in said) == 3, said
    assert zipfile.is_zipfile(home / "step.pt2")


def test_the_step_reads_the_models_tensors_replaced_or_changed_in_place(tmp_path, steps_home):
    compiled, eager = _compiled(tmp_path), workbench.load("tiny:llama", quiet=True)
    plain = compiled.chat("hello there", **FIELDS).text
    noise = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    for session in (compiled, eager):  # a new Parameter at another address
        down = session.model.model.layers[-1].mlp.down_proj
        assert down.weight.shape == noise.shape
        down.weight = torch.nn.Parameter(noise.clone(), requires_grad=False)
    replaced = eager.chat("hello there", **FIELDS).text
    assert replaced != plain
    steps = []
    inner = compiled.engine._compiled_step
    compiled.engine._compiled_step = lambda **kw: steps.append(1) or inner(**kw)
    assert compiled.chat("hello there", **FIELDS).text == replaced and len(steps) == 9
    with torch.no_grad():
        for session in (compiled, eager):  # the same tensor, new values
            session.model.model.layers[-1].mlp.down_proj.weight.mul_(-1.0)
    assert compiled.chat("hello there", **FIELDS).text == eager.chat("hello there", **FIELDS).text != replaced
    assert len(steps) == 18


def test_a_step_that_cannot_be_compiled_leaves_its_length_to_the_eager_path(tmp_path, steps_home, caplog, monkeypatch):
    def broken(model, cache, out, threads):
        raise RuntimeError("no C++ compiler on this machine")

    monkeypatch.setattr(packaged_step, "_package", broken)  # the forked child inherits it
    caplog.set_level("WARNING", logger="workbench.engine.packaged_step")
    compiled, eager = _compiled(tmp_path), workbench.load("tiny:llama", quiet=True)
    for prompt in ("hello there", "again"):
        assert compiled.chat(prompt, **FIELDS).text == eager.chat(prompt, **FIELDS).text
    warned = [r.getMessage() for r in caplog.records if r.name == packaged_step.__name__]
    assert len(warned) == 1 and "decode eagerly" in warned[0] and "no C++ compiler on this machine" in warned[0]
    assert not steps_home.exists() or not list(steps_home.iterdir())
    assert not any("compiled the decode step" in r.getMessage() for r in caplog.records)


def test_a_model_with_a_hook_gets_a_step_of_its_own_that_is_never_stored(tmp_path, steps_home):
    session = _compiled(tmp_path)
    handle = session.model.model.layers[0].register_forward_hook(lambda m, i, o: None)
    assert packaged_step._key(session.model, 256) is None
    handle.remove()
    key = packaged_step._key(session.model, 256)
    assert key is not None and key != packaged_step._key(session.model, 512)
    session.model.config._attn_implementation = "eager"  # another attention: another package
    assert packaged_step._key(session.model, 256) != key
    session.model.config._attn_implementation = "sdpa"
    assert packaged_step._key(session.model, 256) == key
    session.model.model.layers[0].mlp.act_fn = torch.nn.Tanh()  # another class: another package
    assert packaged_step._key(session.model, 256) != key
