"""The vision adapter: the generated shapes set, the adapter's files, the prompt splice that
training and inference share, and the shipped adapter's answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import workbench
from workbench.modalities import shapes
from workbench.modalities.adapter import (
    IMAGE_SENTINEL,
    AdapterConfig,
    VisionAdapter,
    build_inputs,
    chat_prompt,
    placeholder_id,
    shipped_adapter_dir,
)
from workbench.modalities.train_adapter import (
    answer_questions,
    is_correct,
    main,
    vision_pictures,
)


def _small_adapter(lm_hidden: int = 32) -> VisionAdapter:
    torch.manual_seed(0)
    return VisionAdapter(AdapterConfig(lm_hidden_size=lm_hidden, image_size=32, vit_layers=1)).eval()


@pytest.fixture(scope="module")
def tiny_llama() -> workbench.Session:
    return workbench.load("tiny:llama", quiet=True)


# --- the generated set ------------------------------------------------------------------


def test_generator_is_deterministic_by_seed():
    a, b, c = shapes.generate(15, seed=7), shapes.generate(15, seed=7), shapes.generate(15, seed=8)
    assert [(i.question, i.answer, i.qtype) for i in a] == [(i.question, i.answer, i.qtype) for i in b]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b))
    assert [i.image.tobytes() for i in a] != [i.image.tobytes() for i in c]
    assert {i.qtype for i in a} == set(shapes.QUESTION_TYPES)
    assert all(i.image.mode == "RGB" and i.image.size == (shapes.CANVAS, shapes.CANVAS) for i in a)


def _colour_mask(image: Image.Image, name: str) -> np.ndarray:
    return (np.asarray(image) == np.array(shapes.COLOURS[name], dtype=np.uint8)).all(-1)


def test_answers_agree_with_what_is_drawn():
    items = shapes.generate(200, seed=3)
    for item in items:
        present = {name for name in shapes.COLOURS if _colour_mask(item.image, name).any()}
        if item.qtype in ("colour", "shape", "position"):
            # one object: exactly one palette colour, and it is the one the labels name
            assert present == {list(shapes.COLOURS)[item.labels["colour"]]}
        if item.qtype == "colour":
            assert item.answer in present
        if item.qtype == "shape":
            assert item.answer == shapes.SHAPES[item.labels["shape"]]
        if item.qtype == "position":
            ys, xs = np.nonzero(_colour_mask(item.image, present.pop()))
            centre = shapes.CANVAS / 2
            side = {
                "left": xs.max() < centre,
                "right": xs.min() >= centre,
                "top": ys.max() < centre,
                "bottom": ys.min() >= centre,
            }
            assert side[item.answer], (item.question, item.answer)
        if item.qtype == "count":
            assert item.answer in {"1", "2", "3", "4"} and 1 <= len(present) <= int(item.answer)
        if item.qtype == "text":
            assert item.answer in shapes.WORDS and not present
            assert (np.asarray(item.image).min(-1) < 100).any()  # dark ink was printed


def test_unknown_question_type_is_refused():
    import random

    with pytest.raises(ValueError, match="unknown question type"):
        shapes.make_item(random.Random(0), "smell")


def test_stage_one_draws_fresh_pictures_each_epoch_without_words():
    first, again, second = vision_pictures(40, 0, 0), vision_pictures(40, 0, 0), vision_pictures(40, 0, 1)
    assert [i.image.tobytes() for i in first] == [i.image.tobytes() for i in again]
    assert not {i.image.tobytes() for i in first} & {i.image.tobytes() for i in second}
    assert {i.qtype for i in first + second} == {"colour", "shape", "position", "count"}
    held_out = {i.image.tobytes() for i in shapes.generate(200, 1000)}
    assert not held_out & {i.image.tobytes() for e in range(8) for i in vision_pictures(40, 0, e)}


# --- the adapter's files and inputs ---------------------------------------------------


def test_config_mistakes_are_named():
    with pytest.raises(ValueError, match="image_tokens must be at least 1"):
        VisionAdapter(AdapterConfig(lm_hidden_size=8, image_tokens=0))
    with pytest.raises(ValueError, match="must split into patches of 8"):
        VisionAdapter(AdapterConfig(lm_hidden_size=8, image_size=60))
    with pytest.raises(ValueError, match="multiple of the stem's stride 4"):
        VisionAdapter(AdapterConfig(lm_hidden_size=8, patch_size=6, image_size=60))


def test_save_load_round_trip_is_float16_on_disk(tmp_path):
    adapter = _small_adapter()
    folder = adapter.save(tmp_path / "a", lm="tiny:test", seed=5, held_out_accuracy={"colour": {"accuracy": 1.0}})
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    config = json.loads((folder / "config.json").read_text())
    for key in ("image_size", "n_image_tokens", "lm_hidden_size", "lm", "training_data", "seed", "held_out_accuracy"):
        assert key in config
    assert config["n_image_tokens"] == 4 and config["lm"] == "tiny:test" and config["seed"] == 5

    loaded = VisionAdapter.load(folder)
    assert loaded.dtype == torch.float32 and not loaded.training
    expected = adapter.half().float()  # what survives the float16 round trip
    images = [item.image for item in shapes.generate(3, seed=1)]
    assert torch.equal(loaded.encode(images), expected.encode(images))
    assert loaded.encode(images).shape == (3, 4, 32)


def test_load_names_the_missing_file(tmp_path):
    folder = _small_adapter().save(tmp_path / "a")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        VisionAdapter.load(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        VisionAdapter.load(folder)
    with pytest.raises(FileNotFoundError, match="no vision adapter folder"):
        VisionAdapter.load(tmp_path / "nowhere")


def test_odd_images_are_handled():
    adapter = _small_adapter()
    rgba = Image.new("RGBA", (40, 20), (255, 0, 0, 0))  # fully transparent red: looks white
    palette = Image.new("P", (7, 9))
    palette.putpalette([0, 0, 255] * 256)
    odd = [
        Image.new("RGB", (1, 1), (9, 9, 9)),
        palette,
        rgba,
        Image.new("L", (300, 50), 128),
        Image.new("1", (5, 5)),
        Image.new("CMYK", (16, 16)),
    ]
    pixels = adapter.preprocess(odd)
    assert pixels.shape == (len(odd), 3, 32, 32) and torch.isfinite(pixels).all()
    white = (1.0 - adapter.config.image_mean) / adapter.config.image_std
    assert torch.allclose(pixels[2], torch.full_like(pixels[2], white))
    assert pixels[1][2].mean() > pixels[1][0].mean()  # the palette's blue survives
    assert adapter.encode(odd).shape == (len(odd), 4, 32)
    with pytest.raises(TypeError, match="not a PIL image"):
        adapter.preprocess([np.zeros((4, 4, 3))])


def test_build_inputs_splices_images_at_the_placeholders(tiny_llama):
    tokenizer, embed = tiny_llama.tokenizer, tiny_llama.model.get_input_embeddings()
    hidden = embed.weight.shape[1]
    text = chat_prompt(tokenizer, "Which is bigger?", n_images=2)
    assert text.count(IMAGE_SENTINEL) == 2 and IMAGE_SENTINEL + "\n" + IMAGE_SENTINEL + "\nWhich" in text
    images = [torch.randn(3, hidden), torch.randn(1, 3, hidden)]
    ids, embeds = build_inputs(tokenizer, embed, text, images)

    pieces = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in text.split(IMAGE_SENTINEL)]
    fill = placeholder_id(tokenizer)
    assert ids == pieces[0] + [fill] * 3 + pieces[1] + [fill] * 3 + pieces[2]
    assert embeds.shape == (1, len(ids), hidden)
    a, b = len(pieces[0]), len(pieces[0]) + 3 + len(pieces[1])
    assert torch.equal(embeds[0, a : a + 3], images[0])
    assert torch.equal(embeds[0, b : b + 3], images[1][0])
    text_positions = [i for i in range(len(ids)) if not (a <= i < a + 3 or b <= i < b + 3)]
    with torch.no_grad():
        assert torch.equal(embeds[0, text_positions], embed(torch.tensor(ids)[text_positions]))

    with pytest.raises(ValueError, match="2 image sentinel"):
        build_inputs(tokenizer, embed, text, images[:1])
    with pytest.raises(ValueError, match="expected"):
        build_inputs(tokenizer, embed, chat_prompt(tokenizer, "x"), [torch.randn(3, hidden + 1)])


def test_build_inputs_lets_gradients_reach_the_images(tiny_llama):
    tokenizer, embed = tiny_llama.tokenizer, tiny_llama.model.get_input_embeddings()
    image = torch.randn(4, embed.weight.shape[1], requires_grad=True)
    _, embeds = build_inputs(tokenizer, embed, chat_prompt(tokenizer, "Hi"), [image])
    embeds.sum().backward()
    assert image.grad is not None and torch.equal(image.grad, torch.ones_like(image))


def test_batched_answers_match_one_at_a_time(tiny_llama):
    """Left padding in a batch must not change any row's greedy answer."""
    adapter = _small_adapter(lm_hidden=tiny_llama.model.config.hidden_size)
    items = shapes.generate(4, seed=1)
    questions = [item.question + " please" * k for k, item in enumerate(items)]  # unequal lengths
    images = [item.image for item in items]
    batched = answer_questions(adapter, tiny_llama, images, questions, max_new_tokens=5, batch=4)
    single = [answer_questions(adapter, tiny_llama, [i], [q], max_new_tokens=5)[0] for i, q in zip(images, questions)]
    assert batched == single


def test_answers_are_normalised_before_scoring():
    assert is_correct("Red.", "red") and is_correct("It is red", "red")
    assert is_correct("three", "3") and is_correct("3 shapes", "3")
    assert not is_correct("reddish", "red") and not is_correct("", "red")


# --- training and the shipped adapter ------------------------------------------------


def test_quick_training_writes_a_loadable_adapter(tmp_path, tiny_llama):
    out = tmp_path / "adapter"
    assert main(["--quick", "--model", "tiny:llama", "--out", str(out), "--eval-items", "5"]) == 0
    adapter = VisionAdapter.load(out)
    config = json.loads((out / "config.json").read_text())
    assert config["lm_hidden_size"] == tiny_llama.model.config.hidden_size
    assert set(config["held_out_accuracy"]) >= {"seed", "all"}
    assert config["training"]["stage2"]["steps"] == 4
    embeds = adapter.encode([Image.new("RGB", (10, 10))])
    assert embeds.shape == (1, adapter.n_tokens, tiny_llama.model.config.hidden_size)


@pytest.mark.embedded
def test_shipped_adapter_sees_colour_and_shape(embedded):
    folder = shipped_adapter_dir()
    adapter = VisionAdapter.load(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["lm_hidden_size"] == embedded.model.config.hidden_size
    assert (folder / "model.safetensors").stat().st_size < 15 * 2**20
    items = shapes.generate(20, seed=4242, qtypes=("colour", "shape"))
    answers = answer_questions(adapter, embedded, [i.image for i in items], [i.question for i in items])
    right = sum(is_correct(a, i.answer) for a, i in zip(answers, items))
    # 20/20 on this machine; the held-out target is 90% per type (README), kept here with
    # room for a different CPU's rounding.
    assert right >= 18, list(zip([i.answer for i in items], answers))
