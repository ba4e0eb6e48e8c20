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
    plans = [engine.plan(ChatRequest.from_prompt(prompts[0], **FIELDS)), _embedded_plan(engine, prompts[1], **FIELDS),
             engine.plan(ChatRequest.from_prompt(prompts[2], **FIELDS))]
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
    stats = [e.stats for _, e in engine.generate([plan]) if isinstance(e, Done)][0]
    assert stats.media == (record,) and stats.media_s == 0.25


def test_a_session_without_vision_says_how_to_get_it(tiny):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(UnsupportedInputError, match="no image input: .*(adapter|vision)"):
        tiny.engine.plan({"messages": [{"role": "user", "content": [image, {"type": "text", "text": "what is it?"}]}]})
