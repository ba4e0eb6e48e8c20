"""The chat page, launched on a loopback port and driven through gradio_client: what a
browser does, minus the browser (tests/test_ui_browser.py adds that)."""

import json
import re
import struct
import time
import wave
import weakref
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import workbench
from workbench.config import parse_config
from workbench.ui import media
from workbench.ui.app import build_app
from workbench.ui.browser import launch
from workbench.ui.chat import history_to_messages
from workbench.ui.models import CONFIG_DIR, ModelSlots

TURN = {"temperature": 0.0, "top_p": 1.0, "seed": -1, "which": "compressed"}


def open_client(app) -> Client:
    return Client(launch(app), verbose=False)


@pytest.fixture(scope="module")
def page(embedded, embedded_cache):
    """(client, slots) for the embedded model; configs load from this run's model cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WORKBENCH_CACHE_DIR", str(embedded_cache))
    slots = ModelSlots(embedded)
    app = build_app(slots)
    try:
        yield open_client(app), slots
    finally:
        app.close()
        mp.undo()


def text_of(message: dict) -> str:
    """A chat message's text, whichever content shape the client hands back."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(p if isinstance(p, str) else p.get("text", "") for p in content)


def say(client, text, history=(), files=(), **settings):
    message = {"text": text, "files": [handle_file(str(f)) for f in files]}
    return client.predict(
        message, list(history), **{**TURN, "thinking": False, "max_tokens": 32, **settings}, api_name="/chat"
    )


@pytest.mark.embedded
def test_text_turn_streams_an_answer_with_stats(page):
    client, _ = page
    job = client.submit(
        {"text": "What is the capital of France?", "files": []},
        [],
        **TURN,
        thinking=False,
        max_tokens=48,
        api_name="/chat",
    )
    history, box, stats = job.result()
    answers = [text_of(out[0][-1]) for out in job.outputs() if out[0] and out[0][-1]["role"] == "assistant"]
    assert len(set(answers)) > 2, "the answer should arrive in several pieces"
    assert "Paris" in text_of(history[-1])
    assert history[0]["role"] == "user" and box == {"text": "", "files": []}  # the box is cleared
    for part in (
        "first token",
        "tok/s",
        "prompt /",
        "answer /",
        "reasoning tokens",
        "KV cache",
        "MB (dynamic)",
        "weights",
    ):
        assert part in stats
    # A second turn sees the first: the history comes back as context.
    history2, _, _ = say(client, "And of Germany?", history, max_tokens=8)
    assert len(history2) == len(history) + 2


@pytest.mark.embedded
def test_thinking_on_with_the_embedded_model_shows_no_raw_tags(page):
    history, _, stats = say(page[0], "What is 2 + 2?", thinking=True, max_tokens=24)
    assert all("<think>" not in text_of(m) for m in history)
    assert "reasoning tokens" in stats


@pytest.fixture(scope="module")
def thinking_client():
    """A tiny model whose template opens a think block when thinking is on: every reply
    token is reasoning, so the thought message is certain to appear."""
    session = workbench.load("tiny:llama", quiet=True)
    session.tokenizer.chat_template += (
        "{%- if add_generation_prompt and enable_thinking %}{{- '<think>\n' }}{%- endif %}"
    )
    app = build_app(session)
    try:
        yield open_client(app)
    finally:
        app.close()


def test_thinking_streams_into_a_collapsible_thought_with_its_token_count(thinking_client, monkeypatch):
    # The tiny model's 12 tokens take less than one redraw interval: redraw at every token here.
    monkeypatch.setattr("workbench.ui.chat.STREAM_EVERY_S", 0.0)
    job = thinking_client.submit(
        {"text": "hi", "files": []}, [], **TURN, thinking=True, max_tokens=12, api_name="/chat"
    )
    history, _, stats = job.result()
    pending = [
        out[0][1] for out in job.outputs() if len(out[0]) == 3 and out[0][1]["metadata"].get("status") == "pending"
    ]
    assert len(pending) > 2 and len(set(map(text_of, pending))) > 2, "the reasoning should stream into an open thought"
    assert pending[0]["metadata"]["title"] == "Thought…"
    thought, answer = history[-2], history[-1]
    assert thought["metadata"]["title"] == "Thought (12 tokens)" and thought["metadata"]["status"] == "done"
    assert thought["metadata"]["duration"] >= 0 and text_of(thought)
    assert text_of(answer) == "(empty reply)" and not answer["metadata"].get("title")
    assert "12 reasoning tokens" in stats
    history, _, stats = say(thinking_client, "hi", thinking=False, max_tokens=12)
    assert not any((m.get("metadata") or {}).get("title") for m in history)
    assert "0 reasoning tokens" in stats


def _wav(path: Path) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(struct.pack("<160h", *range(160)))
    return path


def _png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 8), "orange").save(path)
    return path


BAD_INPUTS = {
    "empty message": (lambda tmp: ("   ", []), "Type a message"),
    "unreadable image": (lambda tmp: ("what is this?", [tmp / "photo.png"]), "could not read the image photo.png"),
    "corrupt audio": (lambda tmp: ("transcribe", [tmp / "voice.wav"]), "could not read the audio file voice.wav"),
    "not media": (lambda tmp: ("read this", [tmp / "notes.txt"]), "Invalid file type"),  # Gradio's own check
    "too long audio": (
        lambda tmp: ("what did I say?", [_silence(tmp / "long.flac", 130)]),
        "the audio is 130.0 s long; the limit is 120 s",
    ),
}


def _silence(path: Path, seconds: float) -> Path:
    import numpy as np
    import soundfile

    soundfile.write(str(path), np.zeros(int(16000 * seconds), dtype=np.int16), 16000, format="FLAC")
    return path


def test_the_penalty_sliders_reach_the_engine(thinking_client):
    plain, _, _ = say(thinking_client, "hi", max_tokens=24)
    again, _, _ = say(thinking_client, "hi", max_tokens=24, presence_penalty=0.0, repetition_penalty=1.0)
    penalised, _, _ = say(thinking_client, "hi", max_tokens=24, presence_penalty=2.0)
    assert text_of(again[-1]) == text_of(plain[-1])  # the defaults are off
    assert text_of(penalised[-1]) != text_of(plain[-1])  # the tiny model's greedy loop is broken


def test_settings_turn_into_a_valid_request_with_every_sampling_field():
    from workbench.engine import ChatRequest
    from workbench.ui.chat import Settings

    request = Settings(False, 0.7, 0.9, 64, -1, 0.05, 1.1, 0.5, 0.25).request([{"role": "user", "content": "hi"}])
    parsed = ChatRequest.model_validate(request)
    assert (parsed.min_p, parsed.repetition_penalty, parsed.frequency_penalty, parsed.presence_penalty) == (
        0.05,
        1.1,
        0.5,
        0.25,
    )
    assert parsed.seed is None and parsed.max_tokens == 64


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("on", "schema", "expected"),
    [
        (False, json.dumps(PERSON), None),  # the switch off: the box is ignored
        (True, "  ", {"json_object": True}),
        (True, json.dumps(PERSON), {"json_schema": PERSON}),
    ],
)
def test_the_structured_switch_and_schema_box_become_the_engines_format(on, schema, expected):
    from workbench.engine import ChatRequest
    from workbench.ui.chat import Settings, structured_output

    answer_format = structured_output(on, schema)
    assert answer_format == expected
    request = Settings(False, 0.0, 1.0, 16, -1, structured=answer_format).request([{"role": "user", "content": "hi"}])
    parsed = ChatRequest.model_validate(request)
    assert (parsed.structured is None) == (expected is None)


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ('{"type": "object",', "the schema is not valid JSON: Expecting"),
        ("[1, 2]", "the schema holds a JSON list, not an object"),
    ],
)
def test_a_schema_box_that_is_not_a_json_object_is_refused_with_where(schema, message):
    from workbench.ui.chat import structured_output

    with pytest.raises(ValueError, match=message):
        structured_output(True, schema)


@pytest.mark.embedded
def test_the_structured_switch_makes_the_reply_match_the_schema(page):
    import jsonschema

    history, _, stats = say(
        page[0], "Invent a person.", structured=True, schema=json.dumps(PERSON), max_tokens=64, temperature=0.7, seed=3
    )
    jsonschema.validate(json.loads(text_of(history[-1])), PERSON)
    free, _, _ = say(page[0], "Invent a person.", max_tokens=64, temperature=0.7, seed=3)
    with pytest.raises(ValueError):  # the same request unconstrained is prose
        json.loads(text_of(free[-1]))


@pytest.mark.embedded
@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ('{"type": "object",', "the schema is not valid JSON"),
        ('{"type": "frobnicate"}', "cannot be enforced: .*frobnicate"),
    ],
)
def test_a_bad_schema_is_refused_on_the_page_and_the_chat_keeps_working(page, schema, message):
    with pytest.raises(AppError, match=message):
        say(page[0], "Invent a person.", structured=True, schema=schema)
    history, _, _ = say(page[0], "Say hi.", max_tokens=8)
    assert text_of(history[-1])


def test_an_image_for_a_model_that_cannot_see_says_why(thinking_client, tmp_path):
    with pytest.raises(
        AppError, match="the loaded model has no image input: the shipped vision adapter was trained for"
    ):
        say(thinking_client, "describe", files=[_png(tmp_path / "ok.png")])


@pytest.mark.embedded
def test_a_recorded_question_is_transcribed_answered_and_shown(page, tmp_path):
    import jiwer

    from workbench.bench import speech as speech_bench
    from workbench.bench.speech import synthesise

    clip = synthesise("What is the capital of France?", tmp_path / "microphone.wav")
    history, _, stats = say(page[0], "", files=[clip], max_tokens=24)
    heard = re.search(r"heard \(tiny\.en, en, [\d.]+ s of audio in [\d.]+ s\): “(.*)”", stats)
    assert heard, stats
    # Whisper's exact words depend on the CPU's int8 kernels: a WER bound on what was heard,
    # and the answer must be the greedy answer to that transcript typed in (two paths, one machine).
    refs, hyps = speech_bench.normalise("What is the capital of France?"), speech_bench.normalise(heard[1])
    assert jiwer.wer(refs, hyps) <= 0.5, heard[1]
    typed, _, _ = say(page[0], heard[1], max_tokens=24)
    assert text_of(history[-1]) == text_of(typed[-1])


@pytest.mark.embedded
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_a_visible_message_and_the_chat_keeps_working(page, case, tmp_path):
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a picture")
    (tmp_path / "voice.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(range(40)))
    (tmp_path / "notes.txt").write_text("plain text")
    make, message = BAD_INPUTS[case]
    text, files = make(tmp_path)
    with pytest.raises(AppError, match=message):
        say(page[0], text, files=files)
    history, _, _ = say(page[0], "Say hi.", max_tokens=8)
    assert text_of(history[-1])


@pytest.mark.embedded
def test_stop_really_stops_generation(page, count_forwards):
    client, slots = page
    forwards = count_forwards(slots.get_original().model)
    job = client.submit(
        {"text": "Count from 1 to 300, one number per line.", "files": []},
        [],
        **{**TURN, "which": "original"},
        thinking=False,
        max_tokens=400,
        api_name="/chat",
    )
    deadline = time.time() + 60
    while len(forwards) < 6 and time.time() < deadline:
        time.sleep(0.05)
    assert len(forwards) >= 6, "generation did not start"
    job.cancel()  # what the Stop button does: cancels the running event on the server
    for _ in range(20):  # settled: no new forward pass for a whole second
        before = len(forwards)
        time.sleep(1.0)
        if len(forwards) == before:
            break
    stopped_at = len(forwards)
    time.sleep(1.0)
    # Left alone, this greedy reply runs ~120 tokens (it ends by itself at "stop").
    assert len(forwards) == stopped_at < 40
    history, _, _ = say(client, "Say hi.", max_tokens=8)  # and the chat goes on
    assert text_of(history[-1])


@pytest.mark.embedded
def test_a_config_that_fails_to_load_says_why_and_chat_falls_back(page):
    client, _ = page
    status, which = client.predict("compression:\n  - step: squash\n", None, api_name="/apply_config")
    assert "did not load" in status and "unknown compression step 'squash'" in status and which == "original"
    status, _ = client.predict("model: [unclosed\n", None, api_name="/apply_config")
    assert "not valid YAML" in status
    history, _, stats = say(client, "Say hi.", max_tokens=8, which="compressed")
    assert text_of(history[-1]) and stats.startswith("**original**")


def _weights_mb(stats: str) -> float:
    return float(re.search(r"weights ([\d,]+) MB", stats).group(1).replace(",", ""))


@pytest.mark.embedded
def test_compare_answers_with_both_models_side_by_side(page):
    client, slots = page
    with pytest.raises(AppError, match="No compressed model is loaded") if slots.compressed is None else _nothing():
        client.predict("hi", False, 0.0, 1.0, 8, -1, api_name="/compare")
    status, which = client.predict((CONFIG_DIR / "int8.yaml").read_text(), "int8.yaml", api_name="/apply_config")
    assert "`int8.yaml` · quantize" in status and which == "compressed"
    left, left_stats, right, right_stats, layer_plot = client.predict(
        "What is the capital of France?", False, 0.0, 1.0, 24, -1, api_name="/compare"
    )
    for chat, stats in ((left, left_stats), (right, right_stats)):
        assert chat[0]["role"] == "user" and chat[-1]["role"] == "assistant" and text_of(chat[-1])
        assert "first token" in stats and "tok/s" in stats and "KV cache" in stats
    assert left_stats.startswith("**original**") and right_stats.startswith("**compressed (int8.yaml)**")
    assert _weights_mb(right_stats) < 0.6 * _weights_mb(left_stats)
    # after both replies, the per-layer chart of where the two models part on that exchange
    chart = json.loads(layer_plot["plot"])
    lines = [t for t in chart["data"] if t.get("mode") == "lines+markers"]
    assert len(lines) == 2 and lines[0]["x"] == list(range(slots.compressed.session.model.config.num_hidden_layers))
    assert "top-1 agreement" in chart["layout"]["title"]["text"]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_applying_steps_reports_progress_and_what_is_loaded(thinking_client, monkeypatch):
    from workbench.compress import STEPS

    options, quantize = STEPS["quantize"]
    # A step that takes a moment, so polling the job cannot miss the bar between steps.
    monkeypatch.setitem(STEPS, "quantize", (options, lambda *a, **k: (time.sleep(0.5), quantize(*a, **k))[1]))
    steps = (
        "model:\n  source: tiny:llama\ncompression:\n  - step: prune_heads\n    criterion: taylor\n    per_layer: 1\n"
        "    calibration_texts: 2\n    calibration_tokens: 64\n  - step: quantize\n    scheme: fp16\n"
    )
    job = thinking_client.submit(steps, None, api_name="/apply_config")
    progress = []
    while not job.done():
        progress += [(p.desc, p.length) for p in job.status().progress_data or []]
        time.sleep(0.01)
    status, which = job.result()
    assert ("compressing", 2) in progress  # the pipeline's bar, one tick per step, shown by gr.Progress
    assert "**compressed**: `edited steps` · prune_heads, quantize · weights 0." in status and which == "compressed"
    assert "KV 0.2 KiB/token" in status and "KV 0.5 KiB/token" in status  # half the KV groups pruned


def test_a_new_config_replaces_the_old_compressed_copy_before_loading(monkeypatch):
    """Never two compressed copies at once: the old one is unreachable when the next loads."""
    slots = ModelSlots(workbench.load("tiny:llama", quiet=True))
    config = parse_config({"model": {"source": "tiny:llama"}, "compression": [{"step": "quantize", "scheme": "fp16"}]})
    slots.apply(config, "fp16")
    old = weakref.ref(slots.compressed.session.model)
    original = slots.original.session
    gone_when_loading = []
    real_load = workbench.load

    def watching_load(*args, **kwargs):
        gone_when_loading.append(old() is None)
        return real_load(*args, **kwargs)

    monkeypatch.setattr("workbench.ui.models.workbench.load", watching_load)
    slots.apply(config, "fp16 again")
    assert gone_when_loading == [True] and slots.compressed.label == "fp16 again"
    assert slots.original.session is original  # same base model: the original stays
    slots.apply(parse_config({"model": {"source": "tiny:llama"}}), "no steps")
    assert slots.compressed is None and "none: pick a config" in slots.describe()


def test_a_streamed_reply_is_redrawn_at_most_every_interval_and_always_at_the_end(monkeypatch):
    from workbench.ui.chat import throttled

    clock = iter([0.0, 0.01, 0.05, 0.12, 0.13, 0.2, 0.21])
    monkeypatch.setattr("workbench.ui.chat.time.perf_counter", lambda: next(clock))
    updates = [("a", None), ("ab", None), ("abc", None), ("abcd", None), ("abcde", None), ("abcdef", None)]
    assert [text for text, _ in throttled(iter(updates), every_s=0.1)] == ["a", "abcd", "abcdef"]
    done = object()
    clock = iter([0.0, 0.01, 0.02])
    assert [stats for _, stats in throttled(iter([("a", None), ("ab", None), ("ab", done)]), every_s=0.1)] == [
        None,
        done,
    ]


def test_history_drops_thought_bubbles_and_keeps_text_parts():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "thinking...", "metadata": {"title": "Thought"}},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}], "metadata": None},
    ]
    assert history_to_messages(history) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]


def test_history_turns_a_users_files_back_into_content_parts(tmp_path):
    image = _png(tmp_path / "cat.png")
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": str(image)}}]},
        {"role": "user", "content": [{"type": "text", "text": "what is it?"}]},
    ]
    (message,) = history_to_messages(history)
    assert message["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert message["content"][1] == {"type": "text", "text": "what is it?"}


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("empty.wav", None, "is empty"),
        ("cut.wav", b"RIFF\xff\x00\x00\x00WAVEfmt ", "broken WAV data"),
        ("noise.mp3", b"\x00\x01\x02\x03" * 8, "not WAV, MP3"),
        ("half.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "could not read the image half.jpg"),
        ("notes.pdf", b"%PDF-1.4", "neither an image nor an audio file"),
    ],
)
def test_broken_files_are_named_with_what_is_wrong(tmp_path, name, data, message):
    path = tmp_path / name
    if data is None:
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    else:
        path.write_bytes(data)
    with pytest.raises(media.MediaError, match=message):
        media.content("hi", [str(path)])
    assert media.content("hi", []) == "hi"


@pytest.mark.embedded
def test_an_uploaded_picture_is_seen_through_the_adapter(page, tmp_path):
    from workbench.modalities import shapes

    item = next(i for i in shapes.generate(20, seed=5, qtypes=("colour",)) if i.answer in ("red", "blue", "green"))
    item.image.save(tmp_path / "shapes.png")
    history, _, stats = say(page[0], item.question, files=[tmp_path / "shapes.png"], max_tokens=8)
    assert item.answer in text_of(history[-1]).lower()
    assert "saw a 128×128 image through the adapter vision path" in stats
