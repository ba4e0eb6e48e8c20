"""The engine's multimodal prefill: a prompt carrying its own prefill inputs.

The modular adapter hands the engine `inputs_embeds` with image embeddings spliced in; a
vision-language model hands it pixels. The invariant checked here needs no trained vision:
a prompt whose `inputs_embeds` are exactly the embeddings of its own ids must answer exactly
as the same prompt as text, alone, batched beside text prompts, and joining a running batch.
"""

import dataclasses

import pytest
import torch

from workbench.engine import ChatRequest, Done, TextDelta, UnsupportedInputError


def _embedded_plan(engine, prompt: str, **fields):
    """A plan whose prefill goes through inputs_embeds equal to the embedding of its ids."""
    plan = engine.plan(ChatRequest.from_prompt(prompt, **fields))
    with torch.inference_mode():
        embeds = engine.model.get_input_embeddings()(torch.tensor([plan.prompt.ids]))
    return dataclasses.replace(plan, prompt=dataclasses.replace(plan.prompt, inputs={"inputs_embeds": embeds}))


def _texts(events):
    texts: dict[int, str] = {}
    for index, event in events:
        if isinstance(event, TextDelta):
            texts[index] = texts.get(index, "") + event.text
    return texts


FIELDS = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}


def test_prefill_through_inputs_embeds_answers_as_the_text_prompt(tiny):
    engine = tiny.engine
    text = _texts(engine.generate([engine.plan(ChatRequest.from_prompt("what is in the picture", **FIELDS))]))
    embedded = _texts(engine.generate([_embedded_plan(engine, "what is in the picture", **FIELDS)]))
    assert embedded == text


def test_a_prompt_with_inputs_prefills_alone_but_decodes_in_the_batch(tiny, count_forwards):
    engine = tiny.engine
    prompts = ["hi", "what is in the picture", "a third, longer text prompt here"]
    alone = [_texts(engine.generate([engine.plan(ChatRequest.from_prompt(p, **FIELDS))]))[0] for p in prompts]
    plans = [
        engine.plan(ChatRequest.from_prompt(prompts[0], **FIELDS)),
        _embedded_plan(engine, prompts[1], **FIELDS),
        engine.plan(ChatRequest.from_prompt(prompts[2], **FIELDS)),
    ]
    calls = count_forwards(tiny.model)
    texts = _texts(engine.generate(plans))
    assert [texts[i] for i in range(3)] == alone
    assert len(calls) == 2 + 7  # two prefills (text rows together, the embedded one alone), then shared steps


def test_a_prompt_with_inputs_joins_a_running_batch(tiny):
    engine = tiny.engine
    late = _embedded_plan(engine, "what is in the picture", **FIELDS)
    expected = _texts(engine.generate([engine.plan(ChatRequest.from_prompt("what is in the picture", **FIELDS))]))[0]
    asked = []

    def admit(room):
        asked.append(room)
        return [late] if len(asked) == 3 else []

    first = engine.plan(ChatRequest.from_prompt("hi", temperature=0, max_tokens=12, ignore_eos=True))
    events = list(engine.generate([first], admit=admit))
    assert _texts(events)[1] == expected
    assert sum(isinstance(e, Done) for _, e in events) == 2


def test_media_records_reach_the_stats(tiny):
    engine = tiny.engine
    plan = engine.plan(ChatRequest.from_prompt("hi", **FIELDS))
    record = {"kind": "audio", "transcript": "hi"}
    plan = dataclasses.replace(plan, prompt=dataclasses.replace(plan.prompt, media=(record,), media_s=0.25))
    stats = next(e.stats for _, e in engine.generate([plan]) if isinstance(e, Done))
    assert stats.media == (record,) and stats.media_s == 0.25


def test_a_session_without_vision_says_how_to_get_it(tiny):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(UnsupportedInputError, match="no image input: .*(adapter|vision)"):
        tiny.engine.plan({"messages": [{"role": "user", "content": [image, {"type": "text", "text": "what is it?"}]}]})


# --- native vision-language models through the engine -------------------------------------


def _image_url(colour: str, size=(64, 48)) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _ask_about(colour: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _image_url(colour)}},
                {"type": "text", "text": "what colour is this?"},
            ],
        }
    ]


@pytest.fixture(scope="module", params=["glm4v", "qwen2_vl", "smolvlm"])
def vlm(request):
    import workbench

    return workbench.load(f"tiny:{request.param}", quiet=True)


def test_a_vlm_answers_through_the_engine_as_generate_does(vlm):
    plan = vlm.engine.plan({"messages": _ask_about("red"), **FIELDS})
    assert plan.prompt.solo and "pixel_values" in plan.prompt.inputs
    sampled = []
    for _, event in vlm.engine.generate([plan]):
        if isinstance(event, Done):
            assert event.stats.media[0]["path"] == "native"
    import workbench.engine.sequence as sequence_module

    original = sequence_module.Sequence.accept

    def spy(self, logits, *raw):
        token, events = original(self, logits, *raw)
        sampled.append(token)
        return token, events

    sequence_module.Sequence.accept = spy
    try:
        list(vlm.engine.generate([vlm.engine.plan({"messages": _ask_about("red"), **FIELDS})]))
    finally:
        sequence_module.Sequence.accept = original
    ids = torch.tensor([plan.prompt.ids])
    with torch.inference_mode():
        expected = vlm.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), **plan.prompt.inputs, max_new_tokens=8, do_sample=False
        )
    assert sampled == expected[0, ids.shape[1] :].tolist()


def test_a_vlm_text_request_after_an_image_request_is_unchanged(vlm):
    """The model keeps the last prefill's position offset: the engine must reset it."""
    hello = {"messages": [{"role": "user", "content": "hello"}], **FIELDS}
    before = _texts(vlm.engine.generate([vlm.engine.plan(hello)]))
    list(vlm.engine.generate([vlm.engine.plan({"messages": _ask_about("blue"), **FIELDS})]))
    assert _texts(vlm.engine.generate([vlm.engine.plan(hello)])) == before


def test_a_vlm_session_generates_one_request_at_a_time(vlm):
    assert vlm.engine.max_batch == 1
    plans = [vlm.engine.plan({"messages": _ask_about(c), **FIELDS}) for c in ("red", "blue")]
    with pytest.raises(ValueError, match="at most 1 request"):
        list(vlm.engine.generate(plans))
