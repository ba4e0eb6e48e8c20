"""The engine on tiny random models of each architecture: behaviour, not answer quality."""

import pytest
import torch
from transformers import DynamicCache

import workbench
from workbench.engine import (
    ChatRequest,
    ContextLengthError,
    Done,
    ReasoningDelta,
    TextDelta,
    UnsupportedInputError,
)
from workbench.engine.batch import left_pad, positions_of
from workbench.engine.template import THINK_INSTRUCTION, render_prompt
from workbench.inspect.attention import ablate_heads


def collect(engine, **fields):
    fields.setdefault("messages", [{"role": "user", "content": "hello there"}])
    events = list(engine.stream(fields))
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    return events, text, reasoning


def test_stream_ends_with_exactly_one_done(tiny):
    events, _, _ = collect(tiny.engine, max_tokens=8, temperature=0)
    assert isinstance(events[-1], Done)
    assert sum(isinstance(e, Done) for e in events) == 1
    assert all(isinstance(e, (TextDelta, ReasoningDelta)) for e in events[:-1])


def test_max_tokens_bounds_the_reply_and_reports_length(tiny):
    events, _, _ = collect(tiny.engine, max_tokens=12, temperature=0)
    stats = events[-1].stats
    assert stats.completion_tokens <= 12
    if stats.finish_reason == "length":
        assert stats.completion_tokens == 12
    assert stats.prompt_tokens > 0
    assert 0 < stats.ttft_s <= stats.total_s


def test_greedy_is_deterministic(tiny):
    assert (
        collect(tiny.engine, max_tokens=16, temperature=0)[1:] == collect(tiny.engine, max_tokens=16, temperature=0)[1:]
    )


def test_a_seed_reproduces_a_sampled_reply_and_other_seeds_differ(tiny):
    same = [collect(tiny.engine, max_tokens=24, temperature=1.0, top_p=1.0, top_k=0, seed=7)[1:] for _ in range(2)]
    assert same[0] == same[1]
    others = {
        collect(tiny.engine, max_tokens=24, temperature=1.0, top_p=1.0, top_k=0, seed=s)[1:] for s in range(8, 12)
    }
    assert len(others | {same[0]}) > 1


def test_stop_string_ends_the_reply_and_never_appears(tiny):
    _, visible, _ = collect(tiny.engine, max_tokens=40, temperature=0)
    assert len(visible) >= 8, "the tiny model's greedy reply is too short to cut"
    stop = visible[len(visible) // 2 : len(visible) // 2 + 3]
    events, text, _ = collect(tiny.engine, max_tokens=40, temperature=0, stop=["never-there", stop])
    assert text == visible[: visible.find(stop)]
    assert stop not in text
    assert events[-1].stats.finish_reason == "stop"


def test_prompt_over_the_context_limit_fails_before_any_work(count_forwards):
    session = workbench.load("tiny:llama", context_limit=32, quiet=True)
    calls = count_forwards(session.model)
    with pytest.raises(ContextLengthError, match="context limit of 32 tokens"):
        session.engine.stream({"messages": [{"role": "user", "content": "word " * 100}]})
    with pytest.raises(ContextLengthError, match=r"lower max_tokens to at most \d+"):
        session.engine.stream({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 30})
    assert calls == []


def test_default_reply_length_shrinks_to_fit_the_context():
    session = workbench.load("tiny:llama", context_limit=48, quiet=True)
    events, _, _ = collect(session.engine, temperature=0)
    stats = events[-1].stats
    assert stats.prompt_tokens + stats.completion_tokens <= 48


def test_consumer_that_stops_iterating_stops_generation(count_forwards):
    session = workbench.load("tiny:qwen3", quiet=True)
    calls = count_forwards(session.model)
    stream = session.engine.stream(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 500, "temperature": 0}
    )
    taken = 0
    for _ in stream:
        taken += 1
        if taken == 3:
            break
    stream.close()
    # prefill + about one forward per token pulled, nowhere near the 500 allowed
    assert len(calls) <= 3 + 4


def test_images_and_audio_are_refused_clearly_for_a_text_model(tiny):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(UnsupportedInputError, match="has no image input: .*vision adapter"):
        tiny.engine.stream(
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}]}
        )
    deaf = workbench.load(
        tiny.config.model_copy(update={"media": tiny.config.media.model_copy(update={"speech": "none"})}), quiet=True
    )
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    with pytest.raises(UnsupportedInputError, match="no speech input: media.speech is none"):
        deaf.engine.stream({"messages": [{"role": "user", "content": [audio]}]})


def test_text_parts_are_accepted_like_a_string(tiny):
    as_parts = collect(
        tiny.engine,
        messages=[{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
        max_tokens=6,
        temperature=0,
    )
    as_string = collect(tiny.engine, max_tokens=6, temperature=0)
    assert as_parts[1:] == as_string[1:]


@pytest.mark.parametrize(
    "bad",
    [
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 5},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        {"messages": [{"role": "user", "content": "hi"}], "stop": [""]},
        {"messages": [{"role": "user", "content": "hi"}], "n": 2},
    ],
)
def test_malformed_requests_are_rejected(tiny, bad):
    with pytest.raises(ValueError):
        tiny.engine.stream(bad)


def test_assistant_reasoning_under_either_name_is_accepted(tiny):
    for name in ("reasoning_content", "reasoning"):
        history = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", name: "they greeted me"},
            {"role": "user", "content": "and?"},
        ]
        collect(tiny.engine, messages=history, max_tokens=3)


def test_template_switch_is_used_where_the_model_has_one():
    qwen = workbench.load("tiny:qwen3", quiet=True)
    msgs = ChatRequest.from_prompt("hi").messages
    off = render_prompt(qwen.tokenizer, msgs, enable_thinking=False)
    on = render_prompt(qwen.tokenizer, msgs, enable_thinking=True)
    assert off.text.endswith("<think>\n\n</think>\n\n") and off.thinking_via is None
    assert "<think>" not in on.text and on.thinking_via == "template"
    glm = workbench.load("tiny:glm4", quiet=True)
    assert render_prompt(glm.tokenizer, msgs, enable_thinking=False).text.endswith("<think></think>\n")


def test_models_without_a_switch_get_a_system_instruction():
    llama = workbench.load("tiny:llama", quiet=True)
    msgs = ChatRequest.from_prompt("hi").messages
    on = render_prompt(llama.tokenizer, msgs, enable_thinking=True)
    assert THINK_INSTRUCTION in on.text and on.thinking_via == "instruction"
    assert THINK_INSTRUCTION not in render_prompt(llama.tokenizer, msgs, enable_thinking=False).text
    with_system = ChatRequest(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    ).messages
    text = render_prompt(llama.tokenizer, with_system, enable_thinking=True).text
    assert "Be brief.\n\n" + THINK_INSTRUCTION in text


@pytest.fixture
def opens_think_block():
    """A tiny model whose template opens the think block itself, as DeepSeek-R1's does."""
    session = workbench.load("tiny:llama", quiet=True)
    session.tokenizer.chat_template += "{%- if add_generation_prompt %}{{- '<think>\n' }}{%- endif %}"
    return session


def test_reply_starts_in_reasoning_when_the_template_opened_the_block(opens_think_block):
    events, text, reasoning = collect(opens_think_block.engine, max_tokens=16, temperature=0)
    stats = events[-1].stats
    # A random model never closes the block: the whole reply is reasoning.
    assert reasoning and not text
    assert stats.reasoning_tokens == stats.completion_tokens == 16


def test_return_reasoning_false_hides_it_but_still_counts_it(opens_think_block):
    events, text, reasoning = collect(opens_think_block.engine, max_tokens=16, temperature=0, return_reasoning=False)
    assert reasoning == "" and not any(isinstance(e, ReasoningDelta) for e in events)
    assert events[-1].stats.reasoning_tokens == 16


def test_session_chat_collects_text_reasoning_and_stats(tiny):
    result = tiny.chat("hi", max_tokens=5, temperature=0)
    assert result.stats.completion_tokens <= 5
    assert str(result) == result.text
    assert isinstance(result.reasoning, str)


# --- batches ------------------------------------------------------------------------------

BATCH_PROMPTS = ["hi", "what is the capital of France? tell me now", "你好", "one two three four five six seven"]


def run_batch(engine, prompts, cancel=None, **fields):
    fields.setdefault("temperature", 0)
    fields.setdefault("max_tokens", 10)
    plans = [engine.plan(ChatRequest.from_prompt(p, **fields)) for p in prompts]
    texts, dones = [""] * len(prompts), [[] for _ in prompts]
    for index, event in engine.generate(plans, cancel):
        if isinstance(event, TextDelta):
            texts[index] += event.text
        elif isinstance(event, Done):
            dones[index].append(event.stats)
    return texts, dones


def test_left_padded_batch_gives_each_row_its_own_logits(tiny):
    """Positions and masks per row: a padded batch must compute what each prompt alone does."""
    engine = tiny.engine
    prompts = [engine.plan(ChatRequest.from_prompt(p)).prompt.ids for p in BATCH_PROMPTS]
    ids, mask = left_pad(prompts, engine.pad_id)
    assert not mask.all()
    batched = engine._forward(ids, DynamicCache(config=tiny.model.config), mask, positions_of(mask))
    for row, prompt in enumerate(prompts):
        alone = engine._forward(torch.tensor([prompt]), DynamicCache(config=tiny.model.config))
        torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-4, rtol=1e-4)


def test_every_request_in_a_batch_gets_its_reply_and_one_done(tiny):
    texts, dones = run_batch(tiny.engine, BATCH_PROMPTS, max_tokens=7, ignore_eos=True)
    assert all(len(d) == 1 and d[0].completion_tokens == 7 for d in dones)
    assert [d[0].prompt_tokens for d in dones] == [
        len(tiny.engine.plan(ChatRequest.from_prompt(p)).prompt.ids) for p in BATCH_PROMPTS
    ]


def test_a_cancelled_row_leaves_the_batch_and_the_others_finish(tiny):
    steps = {"n": 0}

    def cancel(index):
        steps["n"] += 1
        return index == 1 and steps["n"] > 8

    texts, dones = run_batch(tiny.engine, BATCH_PROMPTS, cancel, max_tokens=12, ignore_eos=True)
    assert dones[1] == []
    assert all(len(dones[i]) == 1 and dones[i][0].completion_tokens == 12 for i in (0, 2, 3))


def test_mixed_lengths_and_early_finishes_in_one_batch(tiny):
    engine = tiny.engine
    plans = [
        engine.plan(ChatRequest.from_prompt("hi", temperature=0, max_tokens=3, ignore_eos=True)),
        engine.plan(
            ChatRequest.from_prompt("a longer prompt than the first one", temperature=0, max_tokens=9, ignore_eos=True)
        ),
    ]
    done = {i: e.stats for i, e in engine.generate(plans) if isinstance(e, Done)}
    assert done[0].completion_tokens == 3 and done[1].completion_tokens == 9
    alone = collect(
        engine,
        messages=[{"role": "user", "content": "a longer prompt than the first one"}],
        temperature=0,
        max_tokens=9,
        ignore_eos=True,
    )
    assert alone[0][-1].stats.completion_tokens == 9


def test_requests_join_a_running_batch_and_each_gets_its_own_reply(tiny):
    engine = tiny.engine
    first = engine.plan(ChatRequest.from_prompt("hi", temperature=0, max_tokens=12, ignore_eos=True))
    late = [
        engine.plan(ChatRequest.from_prompt(p, temperature=0, max_tokens=5, ignore_eos=True))
        for p in ("a much longer prompt than hi", "你好")
    ]
    asked = []

    def admit(room):
        asked.append(room)
        return late if len(asked) == 4 else []  # join after three steps

    done = {i: e.stats for i, e in engine.generate([first], admit=admit, max_rows=3) if isinstance(e, Done)}
    assert sorted(done) == [0, 1, 2]
    assert done[0].completion_tokens == 12 and done[1].completion_tokens == done[2].completion_tokens == 5
    assert asked[0] == 2  # room left under max_rows=3 with one request running


def test_joined_rows_compute_what_they_would_alone(tiny):
    """A row that joins mid-batch is left-padded into the running cache: its logits must not move."""
    engine = tiny.engine
    late_plan = engine.plan(
        ChatRequest.from_prompt("a much longer prompt than hi", temperature=0, max_tokens=6, ignore_eos=True)
    )
    alone = collect(
        engine,
        messages=[{"role": "user", "content": "a much longer prompt than hi"}],
        temperature=0,
        max_tokens=6,
        ignore_eos=True,
    )

    joined_text, admitted = [], []

    def admit(room):
        admitted.append(1)
        return [late_plan] if len(admitted) == 2 else []

    first = engine.plan(ChatRequest.from_prompt("hi", temperature=0, max_tokens=10, ignore_eos=True))
    for index, event in engine.generate([first], admit=admit):
        if index == 1 and isinstance(event, TextDelta):
            joined_text.append(event.text)
    assert "".join(joined_text) == alone[1]


def test_compiled_static_cache_decode_answers_exactly_as_the_eager_path(tmp_path, caplog):
    # One compilation (seconds for the tiny model), at load: greedy replies must not change, the
    # decode steps must go through the compiled graph, and a batch keeps the eager path.
    # A served lone request (continuous batching: `admit`) takes the compiled path too, and
    # hands over to the eager batch when another request joins it, both replies unchanged.
    caplog.set_level("WARNING", logger="workbench.engine.engine")
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  source: tiny:llama\n  compile: true\n")
    compiled = workbench.load(str(config), quiet=True)
    eager = workbench.load("tiny:llama", quiet=True)
    assert compiled.engine.compiled and not eager.engine.compiled
    steps = []
    inner = compiled.engine._compiled_step
    compiled.engine._compiled_step = lambda **kw: steps.append(type(kw["past_key_values"]).__name__) or inner(**kw)
    for prompt in ("hello there", "a longer prompt than the first, to use another length"):
        expected = eager.chat(prompt, max_tokens=10, temperature=0, ignore_eos=True).text
        assert compiled.chat(prompt, max_tokens=10, temperature=0, ignore_eos=True).text == expected
    assert steps == ["StaticCache"] * 18  # 9 decode steps per reply, none for the prefills
    plans = [compiled.engine.plan(ChatRequest.from_prompt(p, max_tokens=4, temperature=0)) for p in ("a", "b c")]
    list(compiled.engine.generate(plans))
    assert len(steps) == 18  # two requests together decode eagerly on a dynamic cache
    said = [r.getMessage() for r in caplog.records]
    assert sum("preparing the decode step for 256-token caches" in m for m in said) == 1, said  # at load
    assert not any("compiling the decode step" in m for m in said)  # so no request waited for it

    fields = {"temperature": 0, "max_tokens": 10, "ignore_eos": True}
    expected = [eager.chat(p, **fields).text for p in ("hello there", "a late request")]
    first, late = (
        compiled.engine.plan(ChatRequest.from_prompt(p, **fields)) for p in ("hello there", "a late request")
    )
    asked = []

    def admit(room):
        asked.append(room)
        return [late] if len(asked) == 4 else []  # joins after three compiled steps

    texts = ["", ""]
    for index, event in compiled.engine.generate([first], admit=admit):
        if isinstance(event, TextDelta):
            texts[index] += event.text
    assert texts == expected
    assert steps == ["StaticCache"] * (18 + 3)  # then the pair decodes eagerly

    # A hook added after compiling: ablate_heads zeroes o_proj's input by a pre-hook, which the
    # graph (compiled without dynamo's guards on modules) would never run. The engine sees the
    # hook at the request's start and decodes that request eagerly, then compiled once it is gone.
    heads = {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
    plain = compiled.chat("hello there", **fields).text
    with ablate_heads(eager, heads):
        ablated = eager.chat("hello there", **fields).text
    before = len(steps)
    with ablate_heads(compiled, heads):
        assert compiled.chat("hello there", **fields).text == ablated != plain
    assert len(steps) == before
    assert compiled.chat("hello there", **fields).text == plain  # and leaves with the hook
    assert len(steps) == before + 9
    assert sum("changed since its decode step was compiled" in r.getMessage() for r in caplog.records) == 1


class _Favouring(torch.nn.Linear):
    """An lm_head that always prefers token 7: the same tensors as nn.Linear, another class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y + 100.0 * (torch.arange(y.shape[-1]) == 7)


def test_a_compiled_step_serves_only_the_model_it_was_compiled_for(tmp_path):
    # The graph is compiled without dynamo's module guards, so nothing in torch tells two models of
    # one class apart: each engine keeps its own graphs, and checks its model per request.
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  source: tiny:llama\n  compile: true\n")
    fields = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}
    first, second = workbench.load(str(config), quiet=True), workbench.load(str(config), quiet=True)
    reference = workbench.load("tiny:llama", quiet=True)
    plain = first.chat("hello there", **fields).text  # compiles the first engine's graph
    reference.model.lm_head.__class__ = _Favouring
    favoured = reference.chat("hello there", **fields).text
    assert favoured != plain

    second.model.lm_head.__class__ = _Favouring
    second.engine.compile_decode()  # a graph of its own, not the first engine's
    steps = []
    inner = second.engine._compiled_step
    second.engine._compiled_step = lambda **kw: steps.append(1) or inner(**kw)
    assert second.chat("hello there", **fields).text == favoured and len(steps) == 5

    first.model.lm_head.__class__ = _Favouring  # swapped after compiling: that request decodes eagerly
    assert first.chat("hello there", **fields).text == favoured


def test_a_running_request_answers_the_same_when_another_joins_it(tiny):
    """A request that decodes alone for a few steps, then gets company, keeps its reply: the
    batch's mask must cover the tokens it decoded alone, or joining misaligns its cache."""
    engine = tiny.engine
    fields = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}
    first = engine.plan(ChatRequest.from_prompt("hi", **fields))
    alone = run_batch(engine, ["hi"], **fields)[0][0]
    for late_prompt in ("a much longer prompt than hi, long enough to pad the first row", "x"):
        late = engine.plan(ChatRequest.from_prompt(late_prompt, **fields))
        asked = []

        def admit(room, late=late, asked=asked):
            asked.append(room)
            return [late] if len(asked) == 4 else []  # joins after three steps alone

        texts = ["", ""]
        for index, event in engine.generate([first], admit=admit):
            if isinstance(event, TextDelta):
                texts[index] += event.text
        assert texts[0] == alone, f"the first reply changed when {late_prompt!r} joined"
        assert texts[1] == run_batch(engine, [late_prompt], **fields)[0][0]


@pytest.mark.parametrize(
    "quantize",
    [
        "scheme: int8_weight_only\n    rules: [{pattern: lm_head, scheme: int8_weight_only}]",
        "scheme: int4_weight_only\n    group_size: 32",
    ],
    ids=["int8+lm_head", "int4"],
)
def test_compiled_decode_of_a_quantized_model_answers_as_its_eager_path(tmp_path, quantize):
    """The fast paths change numerics against fp32, not against themselves: the same
    quantized config, eager and compiled (one compilation each), gives the same greedy reply,
    and a reply batched with another gives it too."""
    texts = {}
    for compile_ in ("false", "true"):
        config = tmp_path / f"{compile_}.yaml"
        config.write_text(
            f"model:\n  source: tiny:llama\n  compile: {compile_}\ncompression:\n  - step: quantize\n    {quantize}\n"
        )
        session = workbench.load(str(config), quiet=True)
        assert session.engine.compiled == (compile_ == "true")
        texts[compile_] = session.chat("hello there", max_tokens=10, temperature=0, ignore_eos=True).text
    assert texts["true"] == texts["false"]
    batched, _ = run_batch(
        session.engine, ["hello there", "a longer prompt than the first"], max_tokens=10, ignore_eos=True
    )
    assert batched[0] == texts["false"]


@pytest.mark.parametrize("config", ["configs/int4.yaml", "configs/int8.yaml"])
def test_compiled_decode_of_the_embedded_model_keeps_the_eager_greedy_tokens(
    embedded, embedded_cache, monkeypatch, config
):
    """The fast CPU paths (int4 or int8 blocks, int8 lm_head, compiled step) on the real model.
    The int8 lm_head's logits are bf16 (steps of 0.125 near 16), and the compiled graph fuses
    the casts differently, so two candidates that tie in one path may not tie in the other:
    the replies must be equal token for token, or part at a step where eager's two best
    tokens are that close (a tie at the kernel's resolution), and never anywhere else."""
    from workbench.engine import TokenLogprob

    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(embedded_cache))
    session = workbench.load(config, quiet=True)
    requests = [
        ChatRequest.from_prompt(p, max_tokens=24, temperature=0, ignore_eos=True, logprobs=2)
        for p in ("Name three colours of the rainbow.", "Write one sentence about the sea.")
    ]

    def replies():
        return [[e for e in session.engine.stream(r) if isinstance(e, TokenLogprob)] for r in requests]

    eager = replies()
    session.engine.compile_decode()
    compiled = replies()
    assert session.engine._compiled_lengths, "the compiled step never ran"
    for ours, theirs in zip(eager, compiled):
        assert len(ours) == len(theirs) == 24
        parted = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a.token_id != b.token_id), None)
        if parted is not None:
            (first, lp1), (second, lp2) = ours[parted].top[:2]
            assert theirs[parted].token_id in (first, second) and lp1 - lp2 < 0.5, (
                f"the compiled reply left the eager one at step {parted} where eager was not near a tie "
                f"({lp1:.3f} vs {lp2:.3f})"
            )
