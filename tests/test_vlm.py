"""Native vision-language models: tiny GLM-4V / Qwen2-VL / Qwen2.5-VL / SmolVLM, their processors and templates, the
loader's VLM path, and the forward contract the engine relies on (prefill with the
processor's inputs, then token-by-token decode over a DynamicCache)."""

import pytest
import torch
from PIL import Image
from transformers import (
    DynamicCache,
    Glm4vForConditionalGeneration,
    Idefics3ForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

from workbench.config import ModelConfig
from workbench.modalities.images import ImageInputError
from workbench.modalities.native import (
    NativeVision,
    decode_position_ids,
    reset_rope_state,
    rope_delta,
    uses_mrope,
)
from workbench.models.loader import LoadedModel, load_model
from workbench.models.tiny_vlm import FAMILIES, build_tiny_vlm

ARCHS = {
    "glm4v": Glm4vForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "smolvlm": Idefics3ForConditionalGeneration,
}
MROPE = {"glm4v", "qwen2_vl", "qwen2_5_vl"}
PIXEL_INPUTS = {
    "glm4v": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
    "qwen2_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
    "qwen2_5_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
    "smolvlm": {"pixel_values", "pixel_attention_mask"},
}
STEPS = 8


@pytest.fixture(scope="module", params=list(ARCHS))
def loaded(request) -> LoadedModel:
    return load_model(ModelConfig(source=f"tiny:{request.param}", device="cpu"), quiet=True)


def arch_of(loaded) -> str:
    return loaded.source.split(":")[1]


def picture(colour=(200, 30, 30), size=(112, 112), mark=(0, 0, 255)) -> Image.Image:
    image = Image.new("RGB", size, colour)
    image.paste(mark, (0, 0, size[0] // 2, size[1] // 2))
    return image


def ask(*items):
    content = [{"type": "image"} if isinstance(i, Image.Image) else {"type": "text", "text": i} for i in items]
    return [{"role": "user", "content": content}], [i for i in items if isinstance(i, Image.Image)]


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def manual_decode(model, prompt, steps=STEPS, logits=None):
    """The engine's loop: one prefill with the processor's inputs, then one token at a time."""
    ids = torch.tensor([prompt.ids])
    reset_rope_state(model)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=ids, **prompt.inputs, past_key_values=cache, use_cache=True)
        tokens = []
        for _ in range(steps):
            if logits is not None:
                logits.append(out.logits[0, -1].clone())
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            if token in eos_ids(model):
                break
            out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
    return tokens, out


def reference(model, prompt, steps=STEPS, logits=None):
    ids = torch.tensor([prompt.ids])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **prompt.inputs,
            max_new_tokens=steps,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
    if logits is not None:
        logits.extend(step[0] for step in out.logits)
    return out.sequences[0, ids.shape[1] :].tolist()


def assert_same_decode(model, prompt):
    """Same greedy tokens and, step by step, the same logits as generate(): a stronger check
    than tokens alone, which a tiny random model may repeat whatever the positions."""
    mine, theirs = [], []
    tokens, _ = manual_decode(model, prompt, logits=mine)
    expected = reference(model, prompt, logits=theirs)
    assert len(expected) >= 1 and tokens[: len(expected)] == expected
    for a, b in zip(mine, theirs, strict=False):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def prefill_logits(model, prompt):
    reset_rope_state(model)
    with torch.inference_mode():
        return model(input_ids=torch.tensor([prompt.ids]), **prompt.inputs, use_cache=False).logits[0, -1]


def test_tiny_vlms_load_through_the_loader(loaded):
    arch = loaded.source.split(":")[1]
    assert type(loaded.model) is ARCHS[arch]
    assert loaded.processor is not None
    assert loaded.tokenizer is loaded.processor.tokenizer
    assert loaded.kind == "tiny"
    config, tokenizer = loaded.model.config, loaded.tokenizer
    for key, token in FAMILIES[arch].token_ids.items():
        assert getattr(config, key) == tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
    assert config.text_config.vocab_size == len(tokenizer)
    assert uses_mrope(loaded.model) == (arch in MROPE)


def test_text_models_have_no_processor():
    assert load_model(ModelConfig(source="tiny:qwen3", device="cpu"), quiet=True).processor is None


def test_unknown_tiny_model_lists_the_vision_ones():
    from workbench.models import ModelSourceError

    with pytest.raises(ModelSourceError, match="tiny:glm4v, tiny:qwen2_vl, tiny:qwen2_5_vl, tiny:smolvlm"):
        load_model(ModelConfig(source="tiny:nope", device="cpu"), quiet=True)


def test_tiny_vlms_are_deterministic():
    a, processor = build_tiny_vlm("glm4v")
    b, _ = build_tiny_vlm("glm4v")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    prompt = NativeVision(processor).render(*ask(picture(), "hi"))
    assert torch.equal(prefill_logits(a, prompt), prefill_logits(b, prompt))


def test_templates_render_image_entries_in_the_family_format():
    _, glm = build_tiny_vlm("glm4v")
    _, qwen = build_tiny_vlm("qwen2_vl")
    _, smol = build_tiny_vlm("smolvlm")
    messages, images = ask(picture(), "What is this?")
    text = NativeVision(smol).render(messages, images).text
    assert text == "<|im_start|>User:<image>What is this?<end_of_utterance>\nAssistant:"
    text = NativeVision(smol).render([{"role": "user", "content": "Hi"}], []).text
    assert text == "<|im_start|>User: Hi<end_of_utterance>\nAssistant:"
    text = NativeVision(glm).render(messages, images).text
    assert text == "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>What is this?<|assistant|>\n"
    text = NativeVision(qwen).render(messages, images).text
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_thinking_switch_only_where_the_template_has_one():
    _, glm = build_tiny_vlm("glm4v")
    _, qwen = build_tiny_vlm("qwen2_vl")
    messages, images = ask(picture(), "Why?")
    off = NativeVision(glm).render(messages, images, enable_thinking=False)
    assert off.text.endswith("Why?/nothink<|assistant|>\n<think></think>\n")
    on = NativeVision(glm).render(messages, images, enable_thinking=True)
    assert on.text.endswith("Why?<|assistant|>\n")
    assert NativeVision(glm).has_thinking_switch and not NativeVision(qwen).has_thinking_switch
    plain = NativeVision(qwen).render(messages, images, enable_thinking=False)
    assert "think" not in plain.text
    assert NativeVision(qwen).render(messages, images, enable_thinking=True).text == plain.text


def test_render_expands_placeholders_and_returns_prefill_inputs(loaded):
    vision = NativeVision(loaded.processor)
    prompt = vision.render(*ask(picture(), "What is this?"))
    image_id = loaded.model.config.image_token_id
    assert prompt.n_images == 1
    assert prompt.ids.count(image_id) == prompt.image_tokens > 1
    assert set(prompt.inputs) == PIXEL_INPUTS[arch_of(loaded)]
    if arch_of(loaded) in MROPE:
        merge = loaded.model.config.vision_config.spatial_merge_size
        assert int(prompt.inputs["image_grid_thw"].prod()) // merge**2 == prompt.image_tokens
    else:  # 2x2 tiles + the global view, 4 tokens each
        assert prompt.inputs["pixel_values"].shape[:2] == (1, 5) and prompt.image_tokens == 20
    half = vision.render(*ask(picture(), "hi"), dtype=torch.bfloat16)
    assert half.inputs["pixel_values"].dtype == torch.bfloat16
    assert all(v.dtype in (torch.bfloat16, torch.long) for v in half.inputs.values())


def test_image_count_must_match_the_entries(loaded):
    messages, _ = ask(picture(), "hi")
    with pytest.raises(ImageInputError, match="1 image entries but 0 images"):
        NativeVision(loaded.processor).render(messages, [])


def test_prefill_then_stepwise_decode_equals_generate(loaded):
    """(a) The engine's path gives generate()'s greedy tokens; the image moves the positions
    (a non-zero rope delta), so decode must be using the stored rope_deltas."""
    prompt = NativeVision(loaded.processor).render(*ask(picture(), "What is this?"))
    assert_same_decode(loaded.model, prompt)
    reset_rope_state(loaded.model)
    with torch.inference_mode():
        loaded.model(
            input_ids=torch.tensor([prompt.ids]),
            **prompt.inputs,
            past_key_values=DynamicCache(config=loaded.model.config),
        )
    assert (rope_delta(loaded.model) < 0) == (arch_of(loaded) in MROPE)


def test_the_image_matters(loaded):
    """(b) A different image gives different logits through the same prompt text."""
    vision = NativeVision(loaded.processor)
    red = vision.render(*ask(picture((200, 30, 30)), "What is this?"))
    green = vision.render(*ask(picture((30, 200, 30), mark=(255, 255, 0)), "What is this?"))
    assert red.ids == green.ids
    assert not torch.allclose(prefill_logits(loaded.model, red), prefill_logits(loaded.model, green), atol=1e-5)


def test_text_only_prompts_take_the_same_path(loaded):
    """(c) No image: no pixel inputs, and the decode still matches generate()."""
    prompt = NativeVision(loaded.processor).render([{"role": "user", "content": "What is the capital of France?"}], [])
    assert "pixel_values" not in prompt.inputs and prompt.n_images == 0
    assert_same_decode(loaded.model, prompt)


def test_two_images_in_one_message(loaded):
    """(d) Two images, each its own run of placeholders, in order."""
    vision = NativeVision(loaded.processor)
    wide = picture((20, 20, 220), size=(168, 84))
    prompt = vision.render(*ask(picture(), "and", wide, "compare them"))
    one = vision.render(*ask(picture(), "and compare them"))
    assert prompt.n_images == 2 and prompt.image_tokens > one.image_tokens
    if arch_of(loaded) in MROPE:
        assert prompt.inputs["image_grid_thw"].shape[0] == 2
    else:
        assert prompt.inputs["pixel_values"].shape[1] > one.inputs["pixel_values"].shape[1]  # more tiles
    assert_same_decode(loaded.model, prompt)
    swapped = vision.render(*ask(wide, "and", picture(), "compare them"))
    assert not torch.allclose(prefill_logits(loaded.model, prompt), prefill_logits(loaded.model, swapped), atol=1e-5)


def test_stale_rope_deltas_shift_a_text_only_request_unless_reset(loaded):
    """transformers keeps rope_deltas on the model and a text-only prefill does not replace
    them: without reset_rope_state the next text-only request decodes at shifted positions."""
    if arch_of(loaded) not in MROPE:
        pytest.skip("no multimodal RoPE: nothing is kept between calls")
    model, vision = loaded.model, NativeVision(loaded.processor)
    image_prompt = vision.render(*ask(picture(), "What is this?"))
    text_prompt = vision.render([{"role": "user", "content": "The quick brown fox"}], [])
    good, _ = manual_decode(model, text_prompt)  # resets first

    # The image request leaves its delta behind ...
    manual_decode(model, image_prompt)
    assert rope_delta(model) != 0
    # ... and a text-only request that skips the reset decodes with it.
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(
            input_ids=torch.tensor([text_prompt.ids]), **text_prompt.inputs, past_key_values=cache, use_cache=True
        )
        first = out.logits[0, -1]
        out = model(input_ids=torch.tensor([[good[0]]]), past_key_values=cache, use_cache=True)
    assert int(first.argmax()) == good[0]  # the prefill itself is fine
    _, clean = manual_decode(model, text_prompt, steps=2)
    if len(good) > 1:
        assert not torch.allclose(out.logits[0, -1], clean.logits[0, -1], atol=1e-6)


def prefill_each(model, prompts):
    """Prefill each prompt alone, as the engine does: (caches, rope deltas, last logits)."""
    caches, deltas, logits = [], [], []
    for prompt in prompts:
        reset_rope_state(model)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=torch.tensor([prompt.ids]), **prompt.inputs, past_key_values=cache, use_cache=True)
        caches.append(cache)
        deltas.append(rope_delta(model))
        logits.append(out.logits[0, -1])
    return caches, deltas, logits


def test_interleaved_requests_are_safe_with_explicit_decode_positions(loaded):
    """Two requests prefilled one after the other, then decoded in turns: each step passes
    its own position_ids, so neither reads the other's rope_deltas."""
    model, vision = loaded.model, NativeVision(loaded.processor)
    prompts = [
        vision.render(*ask(picture(), "What is this?")),
        vision.render([{"role": "user", "content": "Attention heads and caches"}], []),
        vision.render(*ask(picture((10, 10, 10), size=(84, 168)), "and", picture(), "two")),
    ]
    expected = [reference(model, p) for p in prompts]
    got = [[] for _ in prompts]
    with torch.inference_mode():
        caches, deltas, last = prefill_each(model, prompts)
        nexts = [int(row.argmax()) for row in last]
        for _ in range(STEPS):
            for i, cache in enumerate(caches):
                if len(got[i]) >= len(expected[i]):
                    continue
                got[i].append(nexts[i])
                position_ids = decode_position_ids(model, [cache.get_seq_length()], [deltas[i]])
                out = model(
                    input_ids=torch.tensor([[nexts[i]]]),
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=True,
                )
                nexts[i] = int(out.logits[0, -1].argmax())
    assert got == expected
    assert deltas[1] == 0 and (deltas[0] != 0) == (arch_of(loaded) in MROPE)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_saved_vlm_directory_loads_back_with_its_processor(tmp_path, arch):
    """The real-checkpoint path: AutoModelForImageTextToText + the processor (rebuilt without
    a video processor where transformers would need torchvision for one)."""
    model, processor = build_tiny_vlm(arch)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = load_model(ModelConfig(source=str(tmp_path), device="cpu"), quiet=True)
    assert loaded.kind == "local"
    assert type(loaded.model) is ARCHS[arch]
    assert type(loaded.processor).__name__ == type(processor).__name__
    assert loaded.tokenizer is loaded.processor.tokenizer
    prompt = NativeVision(processor).render(*ask(picture(), "hi"))
    again = NativeVision(loaded.processor).render(*ask(picture(), "hi"))
    assert again.ids == prompt.ids and again.text == prompt.text
    assert torch.allclose(prefill_logits(model, prompt), prefill_logits(loaded.model, again), atol=1e-5)


def test_a_vlm_hub_id_loads_from_the_local_cache_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "models--workbench-test--tiny-glm4v"
    model, processor = build_tiny_vlm("glm4v")
    model.save_pretrained(repo_dir / "snapshots" / revision)
    processor.save_pretrained(repo_dir / "snapshots" / revision)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    loaded = load_model(ModelConfig(source="workbench-test/tiny-glm4v", device="cpu"), quiet=True)
    assert loaded.kind == "hub"
    assert type(loaded.model) is Glm4vForConditionalGeneration
    assert type(loaded.processor).__name__ == "Glm4vProcessor"
    prompt = NativeVision(loaded.processor).render(*ask(picture(), "hi"))
    assert torch.allclose(prefill_logits(model, prompt), prefill_logits(loaded.model, prompt), atol=1e-5)


def test_a_left_padded_batch_of_different_requests_decodes_each_as_alone(loaded):
    """Continuous batching as workbench.engine.batch does it: each request prefilled alone
    (batch 1, with its own pixel inputs), caches left-padded and stacked, then decode steps
    over the batch with an attention mask and each row's own positions. For mRoPE models
    those positions must include the row's rope delta (its own length + delta); 2-D
    (batch, 1) position_ids are enough (the model expands them to its 3 axes)."""
    import torch.nn.functional as F

    model, vision = loaded.model, NativeVision(loaded.processor)
    prompts = [
        vision.render(*ask(picture(), "What is this?")),
        vision.render([{"role": "user", "content": "Attention heads and caches decide latency"}], []),
        vision.render(*ask(picture((10, 10, 10), size=(84, 168)), "and", picture(), "two")),
    ]
    expected_logits = []
    for prompt in prompts:
        steps = []
        reference(model, prompt, steps=4, logits=steps)
        expected_logits.append(steps)
    with torch.inference_mode():
        caches, deltas, logits = prefill_each(model, prompts)
        lengths = torch.tensor([[len(p.ids)] for p in prompts])
        width = int(lengths.max())
        batch_cache = caches[0]
        for layer, *others in zip(*(c.layers for c in caches), strict=True):
            layer.keys = torch.cat([F.pad(c.keys, (0, 0, width - c.keys.shape[-2], 0)) for c in (layer, *others)])
            layer.values = torch.cat([F.pad(c.values, (0, 0, width - c.values.shape[-2], 0)) for c in (layer, *others)])
        mask = torch.stack([F.pad(torch.ones(len(p.ids), dtype=torch.long), (width - len(p.ids), 0)) for p in prompts])
        delta = torch.tensor(deltas).view(-1, 1)
        for step in range(1, 4):
            tokens = torch.stack([expected_logits[i][step - 1].argmax() for i in range(len(prompts))]).view(-1, 1)
            positions = mask.sum(-1, keepdim=True) + delta
            mask = torch.cat([mask, torch.ones_like(lengths)], dim=-1)
            out = model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=batch_cache,
                use_cache=True,
            )
            for i in range(len(prompts)):
                torch.testing.assert_close(out.logits[i, -1], expected_logits[i][step], atol=1e-4, rtol=1e-4)
    assert deltas[1] == 0 and (deltas[0] != 0 and deltas[2] != 0) == (arch_of(loaded) in MROPE)


def test_vision_language_configs_are_told_apart():
    from transformers import AutoConfig

    from workbench.models.loader import is_vision_language

    assert is_vision_language(AutoConfig.for_model("glm4v"))
    assert is_vision_language(AutoConfig.for_model("qwen2_5_vl"))
    assert is_vision_language(AutoConfig.for_model("idefics3"))
    assert not is_vision_language(AutoConfig.for_model("llama"))
    assert not is_vision_language(AutoConfig.for_model("glm4"))
    text = AutoConfig.for_model("qwen2")
    text.architectures = ["Qwen2VLForConditionalGeneration"]
    assert is_vision_language(text)
