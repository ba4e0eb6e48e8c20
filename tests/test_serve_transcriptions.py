"""POST /v1/audio/transcriptions through the openai SDK and raw multipart forms, on a tiny
model whose session hears through the shipped Whisper tiny.en. Whisper's exact words differ
between CPUs (CTranslate2 picks int8 kernels by CPU), so transcripts are held to a WER bound."""

from __future__ import annotations

import io

import httpx
import numpy as np
import openai
import pytest
import soundfile
from speech_clips import spoken_wav, word_error_rate

import workbench
from workbench.serve.live import LiveServer

MODEL = "tiny-served"
SENTENCE = "Please turn off the lights in the kitchen before you go to bed."
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server():
    with LiveServer(workbench.load("tiny:llama", quiet=True), model_name=MODEL, max_body_bytes=2 * 1024 * 1024) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY")


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory) -> bytes:
    return spoken_wav(SENTENCE, tmp_path_factory.mktemp("speech") / "sentence.wav").read_bytes()


def wer(heard: str) -> float:
    return word_error_rate(SENTENCE, heard)


def post(server, files=None, **fields) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/audio/transcriptions", data=fields, files=files, timeout=120)


def test_the_openai_sdk_transcribes_a_wav(client, speech_wav):
    reply = client.audio.transcriptions.create(model="whisper-1", file=("sentence.wav", speech_wav, "audio/wav"))
    assert wer(reply.text) <= 0.5, reply.text


def test_verbose_json_has_language_duration_and_segments(client, speech_wav):
    reply = client.audio.transcriptions.create(
        model="tiny.en", file=("sentence.wav", speech_wav), response_format="verbose_json", language="en"
    )
    assert reply.language == "en" and 2 < reply.duration < 8
    assert reply.segments and reply.segments[0].start >= 0 and reply.segments[-1].end <= reply.duration + 0.5
    assert "".join(s.text for s in reply.segments).strip() == reply.text
    segment = reply.segments[0].model_dump()
    assert set(segment) >= {"id", "seek", "start", "end", "text", "tokens", "avg_logprob", "no_speech_prob"}
    assert segment["tokens"] and all(isinstance(t, int) for t in segment["tokens"])


def test_prompt_and_temperature_are_taken(server, speech_wav):
    reply = post(
        server,
        files={"file": ("a.wav", speech_wav)},
        model=MODEL,
        prompt="Kitchen lights, bedtime.",
        temperature="0",
        response_format="verbose_json",
    )
    assert reply.status_code == 200, reply.text
    assert wer(reply.json()["text"]) <= 0.5 and {s["temperature"] for s in reply.json()["segments"]} == {0.0}


@pytest.mark.parametrize("fmt", ["text", "srt", "vtt"])
def test_text_and_subtitle_formats(server, speech_wav, fmt):
    reply = post(server, files={"file": ("a.wav", speech_wav)}, model=MODEL, response_format=fmt)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    body = reply.text
    if fmt == "text":
        assert wer(body) <= 0.5
    elif fmt == "srt":
        assert body.startswith("1\n00:00:00,000 --> ")
    else:
        assert body.startswith("WEBVTT\n\n00:00:00.000 --> ")


def test_a_flac_without_a_suffix_is_read_by_its_header(server, speech_wav):
    samples, rate = soundfile.read(io.BytesIO(speech_wav))
    flac = io.BytesIO()
    soundfile.write(flac, samples, rate, format="FLAC")
    reply = post(server, files={"file": ("recording", flac.getvalue())}, model=MODEL)
    assert reply.status_code == 200 and wer(reply.json()["text"]) <= 0.5


def silence(seconds: float, format: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(int(16000 * seconds), dtype=np.float32), 16000, format=format)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("files", "fields", "status", "code", "param"),
    [
        (None, {"model": MODEL}, 400, "invalid_value", "file"),
        ({"file": ("a.wav", b"")}, {"model": MODEL}, 400, "invalid_audio", "file"),
        ({"file": ("a.wav", b"RIFF0000WAVEjunk" * 40)}, {"model": MODEL}, 400, "invalid_audio", "file"),
        ({"file": ("a.wav", silence(1))}, {}, 400, "invalid_value", "model"),
        ({"file": ("a.wav", silence(1))}, {"model": "gpt-4o-transcribe"}, 404, "model_not_found", "model"),
        (
            {"file": ("a.wav", silence(1))},
            {"model": MODEL, "response_format": "docx"},
            400,
            "invalid_value",
            "response_format",
        ),
        ({"file": ("a.wav", silence(1))}, {"model": MODEL, "language": "english"}, 400, "invalid_value", "language"),
        ({"file": ("a.wav", silence(1))}, {"model": MODEL, "language": "it"}, 400, "invalid_value", "language"),
        ({"file": ("a.wav", silence(1))}, {"model": MODEL, "temperature": "hot"}, 400, "invalid_value", "temperature"),
        ({"file": ("a.flac", silence(130, "FLAC"))}, {"model": MODEL}, 400, "invalid_audio", "file"),
        ({"file": ("a.wav", b"\0" * (3 * 1024 * 1024))}, {"model": MODEL}, 413, "body_too_large", None),
        (
            {"file": ("a.wav", silence(1))},
            {"model": MODEL, "timestamp_granularities[]": ["segment", "word"]},
            400,
            "unsupported_parameter",
            "timestamp_granularities",
        ),
        ({"file": ("a.wav", silence(1))}, {"model": MODEL, "stream": "true"}, 400, "unsupported_parameter", "stream"),
        ({"file": ("a.wav", silence(1))}, {"model": MODEL, "prompt": "x" * 100_000}, 400, "invalid_value", None),
        (
            {"file": ("a.wav", silence(1)), "other": ("b.wav", silence(1))},
            {"model": MODEL},
            400,
            "invalid_value",
            None,
        ),
    ],
    ids=[
        "no file",
        "empty file",
        "corrupt wav",
        "no model",
        "unknown model",
        "unknown format",
        "language not a code",
        "English-only model asked for Italian",
        "temperature not a number",
        "over the length limit",
        "over the size limit",
        "word timestamps",
        "stream",
        "a field over its limit",
        "two files",
    ],
)
def test_bad_uploads_get_openai_errors(server, files, fields, status, code, param):
    reply = post(server, files=files, **fields)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code and error["param"] == param, error
    assert post(server, files={"file": ("a.wav", silence(1))}, model=MODEL).status_code == 200  # still serving


def test_a_json_body_is_refused_with_the_form_named(server):
    reply = httpx.post(server.base_url + "/v1/audio/transcriptions", json={"model": MODEL, "file": "x"})
    assert reply.status_code == 400 and "multipart/form-data" in reply.json()["error"]["message"]


def test_a_chunked_body_over_the_limit_is_cut_off_while_it_streams(server):
    boundary = "wb-boundary"

    def body():  # no Content-Length: httpx sends a generator chunked
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{MODEL}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        ).encode()
        for _ in range(33):  # just over the 2 MiB limit: little is left unsent when the server stops reading
            yield b"\0" * (64 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    reply = httpx.post(
        server.base_url + "/v1/audio/transcriptions",
        content=body(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        timeout=60,
    )
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "body_too_large"


def test_a_broken_multipart_body_is_a_400(server):
    reply = httpx.post(
        server.base_url + "/v1/audio/transcriptions",
        content=b"not a form",
        headers={"content-type": "multipart/form-data"},  # no boundary
    )
    assert reply.status_code == 400 and "boundary" in reply.json()["error"]["message"]


def test_the_openapi_document_declares_the_form_and_replies(server):
    operation = httpx.get(server.base_url + "/openapi.json").json()["paths"]["/v1/audio/transcriptions"]["post"]
    form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["file", "model"] and form["properties"]["file"]["format"] == "binary"
    assert set(operation["responses"]["200"]["content"]) == {"application/json", "text/plain"}
    assert {"400", "404", "413"} <= set(operation["responses"])


def test_a_session_that_does_not_hear_says_so(tmp_path):
    config = tmp_path / "deaf.yaml"
    config.write_text("model:\n  source: tiny:llama\nmedia:\n  speech: none\n")
    with LiveServer(workbench.load(str(config), quiet=True), model_name=MODEL) as live:
        reply = post(live, files={"file": ("a.wav", silence(1))}, model=MODEL)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert (
        error["code"] == "unsupported_content" and "media.speech" in error["message"] and "tiny.en" in error["message"]
    )


def test_transcriptions_are_counted_on_metrics(speech_wav):
    """A fresh server, so the counts are this test's: one transcript, one refusal."""
    with LiveServer(workbench.load("tiny:llama", quiet=True), model_name=MODEL) as live:
        assert post(live, files={"file": ("a.wav", speech_wav)}, model=MODEL).status_code == 200
        assert post(live, files={"file": ("a.wav", speech_wav)}, model=MODEL, language="english").status_code == 400
        text = httpx.get(live.base_url + "/metrics").text
    seconds = len(soundfile.read(io.BytesIO(speech_wav))[0]) / soundfile.info(io.BytesIO(speech_wav)).samplerate

    def value(name: str) -> float:
        line = next(li for li in text.splitlines() if li.startswith(name + " ") or li.startswith(name + "{"))
        return float(line.rsplit(" ", 1)[1])

    assert value('workbench_transcriptions_total{status="200"}') == 1
    assert value('workbench_transcriptions_total{status="400"}') == 1
    assert value("workbench_transcribed_audio_seconds_total") == pytest.approx(seconds, abs=0.05)
    assert value("workbench_transcription_seconds_count") == 1 and value("workbench_transcription_seconds_sum") > 0
    assert 'workbench_requests_total{status="200"}' not in text  # not counted as chat completions
