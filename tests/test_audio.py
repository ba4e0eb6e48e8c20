"""Audio in every shape a user sends becomes 16 kHz mono float32, or a RequestError that says why."""

import base64
import io

import numpy as np
import pytest
import soundfile

from workbench.engine.request import InputAudio
from workbench.errors import RequestError
from workbench.modalities.audio import (
    SAMPLE_RATE,
    AudioInputError,
    audio_from_part,
    load_audio,
)


def sine(freq=440.0, seconds=1.0, rate=44_100, amplitude=0.5):
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(samples):
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return spectrum.argmax() * SAMPLE_RATE / len(samples)


def encoded(samples, rate, fmt, subtype=None):
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def encoded_av(samples, rate, container, codec):
    """What browsers record (WebM/Opus, M4A/AAC), made with PyAV since libsndfile cannot write them."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=48_000)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        resampler = av.AudioResampler(
            format=stream.codec_context.format.name, layout=stream.codec_context.layout.name, rate=48_000
        )
        for piece in resampler.resample(frame):
            for packet in stream.encode(piece):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("fmt", "subtype"), [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")]
)
def test_file_formats_decode_to_16k_mono_with_the_pitch_kept(fmt, subtype):
    samples = load_audio(encoded(sine(seconds=2.0), 44_100, fmt, subtype), format=fmt.lower(), max_seconds=10)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - 2 * SAMPLE_RATE) < 0.06 * SAMPLE_RATE  # MP3/Vorbis pad a few frames
    assert abs(peak_hz(samples) - 440) < 3


@pytest.mark.parametrize(("container", "codec", "fmt"), [("webm", "libopus", "webm"), ("mp4", "aac", "m4a")])
def test_browser_recordings_decode_through_pyav(container, codec, fmt):
    blob = encoded_av(sine(seconds=1.5), 44_100, container, codec)
    for hint in (fmt, None, "wav"):  # the label a page sends may be missing or wrong; the bytes decide
        samples = load_audio(blob, format=hint, max_seconds=10)
        assert abs(len(samples) - 1.5 * SAMPLE_RATE) < 0.1 * SAMPLE_RATE
        assert abs(peak_hz(samples) - 440) < 5


@pytest.mark.parametrize("rate", [8_000, 22_050, 48_000])
def test_arrays_are_resampled_keeping_length_and_frequency(rate):
    samples = load_audio(sine(freq=1000, seconds=1.0, rate=rate), sample_rate=rate, max_seconds=5)
    assert abs(len(samples) - SAMPLE_RATE) <= 1
    assert abs(peak_hz(samples) - 1000) < 2


def test_stereo_is_averaged_whichever_way_round():
    left, right = sine(seconds=0.5, rate=SAMPLE_RATE), np.full(SAMPLE_RATE // 2, 0.25, np.float32)
    expected = (left + right) / 2
    np.testing.assert_allclose(
        load_audio(np.stack([left, right], axis=1), sample_rate=SAMPLE_RATE, max_seconds=5), expected, atol=1e-7
    )
    np.testing.assert_allclose(
        load_audio(np.stack([left, right]), sample_rate=SAMPLE_RATE, max_seconds=5), expected, atol=1e-7
    )
    from_file = load_audio(encoded(np.stack([left, right], axis=1), SAMPLE_RATE, "WAV", "FLOAT"), max_seconds=5)
    np.testing.assert_allclose(from_file, expected, atol=1e-6)


def test_int16_arrays_and_paths(tmp_path):
    pcm = (sine(rate=SAMPLE_RATE) * 32767).astype(np.int16)
    np.testing.assert_allclose(
        load_audio(pcm, sample_rate=SAMPLE_RATE, max_seconds=5), sine(rate=SAMPLE_RATE), atol=1e-4
    )
    path = tmp_path / "clip.flac"
    soundfile.write(path, sine(rate=SAMPLE_RATE), SAMPLE_RATE)
    assert len(load_audio(path, max_seconds=5)) == SAMPLE_RATE
    assert len(load_audio(str(path), max_seconds=5)) == SAMPLE_RATE


WAV = encoded(sine(seconds=1.0), 44_100, "WAV", "PCM_16")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: load_audio(b"this is not audio at all " * 40, format="wav", max_seconds=5),
            "could not decode the audio labelled 'wav'",
        ),
        (lambda: load_audio(WAV[:30], max_seconds=5), "could not decode the audio"),
        (lambda: load_audio(b"\x00" * 4000, max_seconds=5), "could not decode the audio"),
        (lambda: load_audio(WAV, format="tiff", max_seconds=5), "unsupported audio format 'tiff'"),
        (lambda: load_audio(b"", format="wav", max_seconds=5), "empty"),
        (lambda: load_audio(encoded(np.zeros(0, np.float32), 16_000, "WAV"), max_seconds=5), "empty"),
        (lambda: load_audio(np.zeros(0, np.float32), sample_rate=16_000, max_seconds=5), "empty"),
        (lambda: load_audio(WAV, max_seconds=0.5), r"the audio is 1\.0 s long; the limit is 0\.5 s"),
        (
            lambda: load_audio(sine(seconds=3, rate=8000), sample_rate=8000, max_seconds=2),
            r"3\.0 s long; the limit is 2 s",
        ),
        (
            lambda: load_audio(np.array([0.1, np.nan, 0.2], np.float32), sample_rate=16_000, max_seconds=5),
            "NaN or infinite",
        ),
        (
            lambda: load_audio(
                encoded(np.array([0.1, np.inf] * 100, np.float32), 16_000, "WAV", "FLOAT"), max_seconds=5
            ),
            "NaN or infinite",
        ),
        (lambda: load_audio(sine(), max_seconds=5), "needs its sample_rate"),
        (lambda: load_audio("no/such/clip.wav", max_seconds=5), "no audio file at 'no/such/clip.wav'"),
        (lambda: load_audio(base64.b64encode(WAV).decode(), max_seconds=5), r"a str is a path"),
        (lambda: audio_from_part({"data": "%%%not base64", "format": "wav"}, 5), "not valid base64"),
        (lambda: audio_from_part({"data": "", "format": "wav"}, 5), "needs 'data'"),
        (lambda: audio_from_part({"format": "wav"}, 5), "needs 'data'"),
    ],
    ids=[
        "corrupt",
        "truncated header",
        "zeros",
        "unsupported format",
        "0 bytes",
        "wav without samples",
        "empty array",
        "too long",
        "too long array",
        "nan",
        "inf in a float wav",
        "array without rate",
        "missing path",
        "base64 as a path",
        "bad base64",
        "empty base64",
        "no data",
    ],
)
def test_bad_audio_is_a_request_error_saying_why(call, message):
    with pytest.raises(AudioInputError, match=message) as caught:
        call()
    assert isinstance(caught.value, RequestError)  # the server answers 400, not 500
    assert "BytesIO" not in str(caught.value)


def test_too_long_is_refused_before_decoding_everything():
    """An hour of audio is refused from the header: no hour of samples is decoded."""
    hour = encoded(np.zeros(3600 * 8000, np.int16), 8000, "WAV", "PCM_16")
    with pytest.raises(AudioInputError, match=r"3600\.0 s long; the limit is 30 s"):
        load_audio(hour, max_seconds=30)


def test_input_audio_parts_in_each_shape():
    data = base64.b64encode(WAV).decode()
    wrapped = "\n".join(data[i : i + 76] for i in range(0, len(data), 76))  # MIME line breaks are tolerated
    for part in (
        {"data": data, "format": "wav"},
        InputAudio(data=data, format="wav"),
        {"type": "input_audio", "input_audio": {"data": wrapped, "format": "WAV"}},
        {"data": data, "format": "audio/x-wav"},
    ):
        samples = audio_from_part(part, 5)
        assert abs(len(samples) - SAMPLE_RATE) <= 1
