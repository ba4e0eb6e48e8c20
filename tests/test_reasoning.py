"""The thinking adapter: generated traces, the template switch, training on a tiny model, and
the shipped adapter on the real model (it thinks when asked, and only then)."""

from __future__ import annotations

import json
import re

import httpx
import pytest

import workbench
from workbench.config import ConfigError, parse_config
from workbench.engine.template import render_prompt
from workbench.models.adapters import TEMPLATE_FILE
from workbench.reasoning import problems as pb
from workbench.reasoning.template import SWITCH, with_thinking_switch
from workbench.reasoning.train import ThinkingOptions, encode, held_out_accuracy, train
from workbench.serve.live import LiveServer

MODEL = "autoglm-phone-9b"


# --- problems --------------------------------------------------------------------------------


def _value(expression: str) -> int:
    return eval(expression.replace(pb.TIMES, "*"), {"__builtins__": {}})  # digits and + - * only


def test_every_step_of_every_trace_is_true_and_ends_at_the_answer():
    for problem in pb.generate(2000, seed=3):
        for line in problem.trace.splitlines():
            left, right = line.split("=", 1)
            assert _value(left) == _value(right), (problem.question, line)
        assert problem.trace.splitlines()[-1].endswith(f"= {problem.value}")
        expression, value = problem.answer.split(" = ")
        assert _value(expression) == problem.value == int(value)


def test_no_held_out_question_is_trained_on_under_any_phrasing():
    held = pb.held_out_keys()
    from workbench.bench.tasks import arithmetic_items

    assert len(held) >= 90 and len(arithmetic_items(20)) == 20
    problems = pb.generate(6000, seed=0)
    assert not {p.key[:3] for p in problems if len(p.key) == 3} & held
    assert len({p.key for p in problems}) == 6000  # distinct problems


def test_generation_is_deterministic_per_seed():
    assert pb.generate(50, seed=1) == pb.generate(50, seed=1)
    assert pb.generate(50, seed=1) != pb.generate(50, seed=2)


def test_traces_split_into_tens_and_units():
    assert pb.make("+", 47, 38).trace.splitlines() == [
        "47 + 38 = 40 + 30 + 7 + 8",
        "40 + 30 = 70",
        "7 + 8 = 15",
        "70 + 15 = 85",
    ]
    assert pb.make("-", 83, 47).trace.splitlines() == ["83 - 47 = 83 - 40 - 7", "83 - 40 = 43", "43 - 7 = 36"]
    assert pb.make("x", 47, 8).trace.splitlines() == [
        "47 \u00d7 8 = 40 \u00d7 8 + 7 \u00d7 8",
        "40 \u00d7 8 = 320",
        "7 \u00d7 8 = 56",
        "320 + 56 = 376",
    ]


# --- the template switch ---------------------------------------------------------------------


def test_the_switch_opens_the_think_block_on_and_leaves_the_prompt_alone_off(embedded):
    tokenizer = embedded.tokenizer
    messages = [{"role": "user", "content": "What is 47 + 38?"}]
    stock = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    switched = with_thinking_switch(tokenizer.chat_template)

    def render(**kw):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=switched, **kw
        )

    assert render(enable_thinking=True) == stock + "<think>\n"
    assert render(enable_thinking=False) == render() == stock
    with pytest.raises(ValueError, match="already has an enable_thinking switch"):
        with_thinking_switch(switched)


def test_a_bad_adapter_path_is_refused_when_the_config_is_read(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.adapter: .*is not an adapter folder \(no recovery.json there\)"):
        parse_config({"model": {"adapter": str(tmp_path)}})


def test_bad_training_options_say_what_to_change():
    with pytest.raises(ValueError, match="shares"):
        ThinkingOptions(shares={"think": 1.0, "poetry": 1.0})
    with pytest.raises(ValueError, match="warmup"):
        ThinkingOptions(steps=5, warmup=5)


# --- training, on a tiny model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory):
    """tiny:llama trained for three steps, its adapter folder, and the merged session."""
    out = tmp_path_factory.mktemp("thinking-adapter")
    session = workbench.load("tiny:llama", quiet=True)
    opts = ThinkingOptions(
        steps=3, batch=2, warmup=1, problems=20, reply_tokens=8, cache_dir=str(tmp_path_factory.mktemp("replies"))
    )
    report = train(session, opts, out, progress=False)
    return session, out, report


def test_training_writes_an_adapter_with_the_switched_template_and_a_record(tiny_trained):
    session, out, report = tiny_trained
    assert {"adapter_model.safetensors", "adapter_config.json", "recovery.json", TEMPLATE_FILE, "held_out.json"} <= {
        p.name for p in out.iterdir()
    }
    assert (out / TEMPLATE_FILE).read_text().endswith(SWITCH)
    record = json.loads((out / "recovery.json").read_text())
    assert record["purpose"] == "thinking" and record["source"] == "tiny:llama"
    assert record["held_out"]["on"]["asked"] == record["held_out"]["off"]["asked"] == 20
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny:llama"
    assert report.steps == 3 and [h["step"] for h in report.history] == [3] and report.trainable_params > 0
    assert set(report.examples) == {"think", "plain", "general", "general-think"}


def test_the_report_gives_perplexity_on_both_held_out_texts_before_and_after(tiny_trained):
    from workbench.data import held_out_texts
    from workbench.metrics import perplexity

    session, out, report = tiny_trained
    stock = workbench.load("tiny:llama", quiet=True)
    for name, before, after in (
        ("reference", report.perplexity_before, report.perplexity_after),
        ("prose", report.perplexity_prose_before, report.perplexity_prose_after),
    ):
        texts = held_out_texts(name)
        assert before == pytest.approx(perplexity(stock.model, stock.tokenizer, texts, max_windows=4))
        assert after == pytest.approx(perplexity(session.model, session.tokenizer, texts, max_windows=4))
        assert before > 1 and after > 1
    assert report.perplexity_prose_before != report.perplexity_before
    record = json.loads((out / "recovery.json").read_text())
    assert record["perplexity_prose_before"] == report.perplexity_prose_before
    assert record["perplexity_prose_after"] == report.perplexity_prose_after
    assert record["perplexity_before"] == report.perplexity_before  # the reference text's, as before


def test_the_loss_covers_the_reply_only(tiny_trained):
    from workbench.reasoning.train import Example

    session, _, _ = tiny_trained

    ids, labels = encode(
        session.tokenizer,
        Example("think", [{"role": "user", "content": "What is 2 + 3?"}], True, "2 + 3 = 5\n</think>\n\n5"),
    )
    reply = [t for t in labels if t != -100]
    assert session.tokenizer.decode(reply) == "2 + 3 = 5\n</think>\n\n5" + session.tokenizer.eos_token
    assert ids[-len(reply) :] == reply and labels[: len(ids) - len(reply)] == [-100] * (len(ids) - len(reply))
    assert session.tokenizer.decode(ids[: len(ids) - len(reply)]).endswith("<think>\n")


def test_length_sorted_micro_batches_give_the_whole_batch_loss(tiny_trained):
    import random

    import torch

    from workbench.reasoning.train import arithmetic_examples, collate, micro_batches

    session, _, _ = tiny_trained
    tokenizer, rng = session.tokenizer, random.Random(0)
    pools = arithmetic_examples(pb.generate(6, seed=5), rng)
    rows = [encode(tokenizer, e) for e in pools["think"][:3] + pools["plain"][:3]]
    pad = tokenizer.pad_token_id
    with torch.inference_mode():
        whole = session.model(**collate(rows, pad)).loss
        parts = micro_batches(rows)
        split = sum(session.model(**collate(part, pad)).loss * weight for part, weight in parts)
    assert len(parts) == 2 and sum(w for _, w in parts) == pytest.approx(1.0)
    assert max(len(r[0]) for r in parts[0][0]) <= min(len(r[0]) for r in parts[1][0])
    assert float(split) == pytest.approx(float(whole), rel=1e-4)


def test_a_config_with_the_adapter_loads_the_trained_model(tiny_trained):
    import torch

    session, out, _ = tiny_trained
    loaded = workbench.load(parse_config({"model": {"source": "tiny:llama", "adapter": str(out)}}), quiet=True)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        assert torch.allclose(loaded.model(input_ids=ids).logits, session.model(input_ids=ids).logits, atol=1e-3)
    assert loaded.tokenizer.chat_template == session.tokenizer.chat_template
    prompt = render_prompt(loaded.tokenizer, [workbench.engine.request.Message(role="user", content="hi")], True)
    assert prompt.thinking_via == "template" and prompt.starts_in_reasoning


def test_an_adapter_for_another_model_is_refused_with_both_shapes(tiny_trained):
    _, out, _ = tiny_trained
    with pytest.raises(Exception, match="was trained on a model with (model_type|hidden_size|KV heads)"):
        workbench.load(parse_config({"model": {"source": "tiny:glm4", "adapter": str(out)}}), quiet=True)


# --- the shipped adapter, on the real model ----------------------------------------------------


@pytest.fixture(scope="module")
def thinker(embedded_cache, monkeypatch_module):
    monkeypatch_module.setenv("WORKBENCH_CACHE_DIR", str(embedded_cache))
    return workbench.load("configs/thinking.yaml", device="cpu", quiet=True)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.embedded
def test_the_real_model_closes_a_think_block_with_thinking_on_and_opens_none_off(thinker):
    on = held_out_accuracy(thinker.model, thinker.tokenizer, thinking=True, count=4, max_tokens=160, batch=4)
    off = held_out_accuracy(thinker.model, thinker.tokenizer, thinking=False, count=4, max_tokens=24, batch=4)
    assert on["closed_think_blocks"] == 4
    assert all(r["reasoning"] and re.search(r"\d+ [-+\u00d7] \d+ = ", r["reasoning"]) for r in on["replies"])
    assert all(r["answer"] for r in on["replies"])
    assert all(not r["reasoning"] and "<think>" not in r["answer"] for r in off["replies"])


@pytest.mark.embedded
def test_reasoning_streams_as_reasoning_content_over_the_server(thinker):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is 58 + 27?"}],
        "max_tokens": 160,
        "temperature": 0,
        "stream": True,
    }
    with LiveServer(thinker) as live:
        reasoning, content = "", ""
        with httpx.stream("POST", live.base_url + "/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        reasoning += choice["delta"].get("reasoning_content") or ""
                        content += choice["delta"].get("content") or ""
        plain = httpx.post(
            live.base_url + "/v1/chat/completions",
            timeout=120,
            json={**body, "stream": False, "enable_thinking": False, "max_tokens": 24},
        ).json()
    assert "58 + 27 = " in reasoning and "<think>" not in content and "</think>" not in content and content.strip()
    message = plain["choices"][0]["message"]
    assert not message.get("reasoning_content") and message["content"].strip()


@pytest.mark.embedded
def test_the_chat_page_shows_the_real_models_reasoning_as_a_thought(thinker):
    from gradio_client import Client

    from workbench.ui.app import build_app
    from workbench.ui.browser import launch

    app = build_app(thinker)
    try:
        client = Client(launch(app), verbose=False)
        turn = {"temperature": 0.0, "top_p": 1.0, "seed": -1, "which": "compressed"}
        history, _, stats = client.predict(
            {"text": "What is 58 + 27?", "files": []}, [], **turn, thinking=True, max_tokens=160, api_name="/chat"
        )
    finally:
        app.close()
    thought, answer = history[-2], history[-1]

    def text(m):
        if isinstance(m["content"], str):
            return m["content"]
        return "".join(p if isinstance(p, str) else p.get("text", "") for p in m["content"])

    assert thought["metadata"]["title"].startswith("Thought (") and "58 + 27 = " in text(thought)
    assert text(answer).strip() and "<think>" not in text(answer) and "</think>" not in text(answer)
    assert "0 reasoning tokens" not in stats
