"""Audio in any shape a user or a browser sends -> 16 kHz mono float32, checked.

Whisper wants 16 kHz mono float32; people send WAV, FLAC, OGG, MP3 files, browsers record
WebM/Opus (Chrome, Firefox) or M4A/AAC (Safari), and notebooks hold numpy arrays. libsndfile
(soundfile) reads the common file formats fast and without ffmpeg; PyAV (ffmpeg, already
installed with faster-whisper) is only the fallback for the containers libsndfile cannot
open. Every way this can go wrong ends in an AudioInputError that says what to change,
raised before any model work starts, so the server can answer 400 instead of 500.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path
from typing import Any

import numpy as np

from workbench.errors import MediaInputError

SAMPLE_RATE = 16_000
"""What Whisper (and so every speech model here) is trained on."""

SOUNDFILE_FORMATS = frozenset({"wav", "flac", "ogg", "oga", "opus", "mp3", "aiff", "aif", "au"})
"""libsndfile reads these itself (Opus only inside Ogg)."""

CONTAINER_FORMATS = frozenset({"webm", "m4a", "mp4", "aac", "mka", "mkv", "3gp", "caf", "wma"})
"""What browsers and phones record that only ffmpeg (PyAV) decodes."""

FORMATS = SOUNDFILE_FORMATS | CONTAINER_FORMATS

_ALIASES = {"wave": "wav", "x-wav": "wav", "mpeg": "mp3", "x-m4a": "m4a", "oga": "ogg", "aif": "aiff"}


class AudioInputError(MediaInputError):
    """Audio that cannot be turned into 16 kHz mono samples; the message says why and what to send."""

    code = "invalid_audio"


def normalise_format(format: str | None) -> str | None:
    """'WAV', '.wav', 'audio/x-wav' -> 'wav'; an unknown name is refused with the list we read."""
    if format is None:
        return None
    name = format.strip().lower().rsplit("/", 1)[-1].lstrip(".")
    name = name.split(";", 1)[0]  # 'webm;codecs=opus' from MediaRecorder
    name = _ALIASES.get(name, name)
    if name not in FORMATS:
        raise AudioInputError(
            f"unsupported audio format {format!r}: send one of {', '.join(sorted(FORMATS - set(_ALIASES)))}"
        )
    return name


def load_audio(
    data: bytes | bytearray | memoryview | str | Path | np.ndarray,
    *,
    format: str | None = None,
    sample_rate: int | None = None,
    max_seconds: float,
) -> np.ndarray:
    """Decoded, checked, 16 kHz mono float32 samples in [-1, 1]-ish.

    `data` is encoded bytes, a file path, or samples (then `sample_rate` is required;
    2-D arrays are (frames, channels) as soundfile returns them). `format` is a hint
    (OpenAI's input_audio 'format'); the bytes' own header wins where they disagree,
    since browsers label WebM as whatever the page asked for. `max_seconds` is checked
    before the whole file is decoded, so an hour of audio is refused without decoding it.
    """
    if max_seconds <= 0:
        raise ValueError("max_seconds must be positive")
    fmt = normalise_format(format)
    if isinstance(data, np.ndarray):
        if sample_rate is None:
            raise AudioInputError("audio given as an array needs its sample_rate")
        samples, rate = _mono(np.asarray(data)), int(sample_rate)
        _check_duration(len(samples), rate, max_seconds)
    else:
        if isinstance(data, (str, Path)):
            path = Path(data)
            try:
                found = path.is_file()
            except OSError:  # a name too long for the file system: most likely base64 passed as a path
                found = False
            if not found:
                shown = str(data) if len(str(data)) <= 80 else str(data)[:77] + "..."
                raise AudioInputError(
                    f"no audio file at {shown!r} (a str is a path: pass encoded audio as bytes, base64 through audio_from_part)"
                )
            if fmt is None and path.suffix:
                try:
                    fmt = normalise_format(path.suffix)
                except AudioInputError:
                    fmt = None  # a strange suffix is no reason to refuse; the header decides
            data = path.read_bytes()
        blob = bytes(data)
        if not blob:
            raise AudioInputError("the audio is empty (0 bytes); record or attach it again")
        samples, rate = _decode(blob, fmt, max_seconds)
    if rate <= 0:
        raise AudioInputError(f"invalid sample rate {rate}")
    if samples.size == 0:
        raise AudioInputError("the audio is empty (no samples); record or attach it again")
    if not np.isfinite(samples).all():
        raise AudioInputError("the audio contains NaN or infinite samples; send finite sample values")
    if rate != SAMPLE_RATE:
        import soxr

        samples = soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(samples, dtype=np.float32)


def audio_from_part(part: Any, max_seconds: float) -> np.ndarray:
    """An OpenAI `input_audio` part -> 16 kHz samples.

    Takes the inner object ({"data": base64, "format": "wav"}, or the request model's
    InputAudio) or the whole content part ({"type": "input_audio", "input_audio": {...}}).
    """
    if isinstance(part, dict) and "input_audio" in part:
        part = part["input_audio"]
    if isinstance(part, dict):
        data, fmt = part.get("data"), part.get("format")
    else:
        data, fmt = getattr(part, "data", None), getattr(part, "format", None)
    if not isinstance(data, str) or not data:
        raise AudioInputError("input_audio needs 'data': the audio file's bytes, base64-encoded")
    blob = decode_base64(data)
    return load_audio(blob, format=fmt, max_seconds=max_seconds)


def decode_base64(data: str) -> bytes:
    """Strict base64 (line breaks tolerated, a data: URL prefix too): a typo must not decode to noise."""
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AudioInputError(
            f"input_audio data is not valid base64 ({exc}); base64-encode the audio file's bytes"
        ) from None


def _check_duration(frames: int, rate: int, max_seconds: float) -> None:
    if rate > 0 and frames / rate > max_seconds:
        raise AudioInputError(
            f"the audio is {frames / rate:.1f} s long; the limit is {max_seconds:g} s: send a shorter clip"
        )


def _mono(samples: np.ndarray) -> np.ndarray:
    if samples.dtype.kind == "i":  # PCM integers as a user might hand them over
        samples = samples.astype(np.float32) / float(np.iinfo(samples.dtype).max)
    elif samples.dtype.kind == "u":
        info = np.iinfo(samples.dtype)
        samples = (samples.astype(np.float32) - (info.max + 1) / 2) / ((info.max + 1) / 2)
    elif samples.dtype.kind != "f":
        raise AudioInputError(f"audio samples must be numbers, not {samples.dtype}")
    samples = samples.astype(np.float32, copy=False)
    if samples.ndim == 2:
        # (frames, channels) as soundfile gives; a (channels, frames) array is recognised by
        # its few rows, since no real audio has fewer frames than channels.
        if samples.shape[0] < samples.shape[1] and samples.shape[0] <= 8:
            samples = samples.T
        samples = samples.mean(axis=1)
    elif samples.ndim != 1:
        raise AudioInputError(f"audio samples must be 1-D (mono) or 2-D (frames, channels), not shape {samples.shape}")
    return samples


def _decode(blob: bytes, fmt: str | None, max_seconds: float) -> tuple[np.ndarray, int]:
    errors = []
    if fmt not in CONTAINER_FORMATS:
        try:
            return _decode_soundfile(blob, max_seconds)
        except AudioInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - libsndfile says "Format not recognised" and the like
            errors.append(f"libsndfile: {_tidy(exc)}")
    try:
        return _decode_pyav(blob, max_seconds)
    except AudioInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - ffmpeg's errors are many; each is "cannot decode" to the user
        errors.append(f"ffmpeg: {_tidy(exc)}")
    hint = f" labelled {fmt!r}" if fmt else ""
    raise AudioInputError(
        f"could not decode the audio{hint}: it is damaged, cut short or not audio "
        f"({'; '.join(errors)}). Send WAV, FLAC, OGG, MP3, WebM or M4A audio."
    )


def _tidy(exc: Exception) -> str:
    """The library's reason without its object reprs and errno noise, which mean nothing to a user."""
    text = re.sub(r"Error opening <[^>]*>: ", "", str(exc))
    text = re.sub(r"^\[Errno -?\d+\] ", "", text)
    return re.sub(r": '<none>'$", "", text).strip() or type(exc).__name__


def _decode_soundfile(blob: bytes, max_seconds: float) -> tuple[np.ndarray, int]:
    import soundfile

    with soundfile.SoundFile(io.BytesIO(blob)) as f:
        # frames is read from the header (estimated for MP3): enough to refuse before decoding
        _check_duration(f.frames, f.samplerate, max_seconds)
        samples = f.read(dtype="float32", always_2d=True)
        rate = f.samplerate
    _check_duration(len(samples), rate, max_seconds)
    return samples.mean(axis=1), rate


def _decode_pyav(blob: bytes, max_seconds: float) -> tuple[np.ndarray, int]:
    import av

    chunks, frames = [], 0
    with av.open(io.BytesIO(blob), mode="r") as container:
        if not container.streams.audio:
            raise AudioInputError("the file holds no audio stream; send an audio recording")
        stream = container.streams.audio[0]
        rate = stream.rate or stream.codec_context.sample_rate
        if stream.duration is not None and stream.time_base is not None and rate:
            _check_duration(int(stream.duration * stream.time_base * rate), rate, max_seconds)
        # float planar at the source rate and layout: downmixing and resampling stay ours
        # (averaged channels, soxr), so every format goes through the same arithmetic.
        resampler = av.AudioResampler(format="fltp", rate=rate)
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                block = out.to_ndarray()  # (channels, samples)
                chunks.append(block.mean(axis=0))
                frames += block.shape[1]
            _check_duration(frames, rate, max_seconds)  # streams without a duration: stop early
        for out in resampler.resample(None):
            block = out.to_ndarray()
            chunks.append(block.mean(axis=0))
            frames += block.shape[1]
    _check_duration(frames, rate, max_seconds)
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return samples.astype(np.float32, copy=False), int(rate)
