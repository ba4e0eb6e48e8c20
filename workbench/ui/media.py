"""Uploaded or recorded files to the engine's OpenAI-shaped content parts.

Every file is read and checked here, before the request is built, so a broken upload
gets a message naming the file and what is wrong with it, rather than an exception from
deep inside a decoder. Whether the model can take images or audio at all is the engine's
call (it raises UnsupportedInputError for a text-only model), so the chat works unchanged
once multimodal models arrive.
"""

from __future__ import annotations

import base64
import mimetypes
import struct
import wave
from pathlib import Path

from PIL import Image, UnidentifiedImageError

# Container signatures of the audio formats browsers record and people upload. WAV is
# parsed fully (the stdlib can); the others are recognised by their header only.
_AUDIO_MAGIC = {
    "mp3": (b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"),
    "ogg": (b"OggS",),
    "flac": (b"fLaC",),
    "webm": (b"\x1a\x45\xdf\xa3",),
}


class MediaError(ValueError):
    """A file the chat cannot read; the message names it and says what to do."""


def kind_of(path: str | Path) -> str:
    """'image' or 'audio', from the file name; anything else is refused with the reason."""
    mime, _ = mimetypes.guess_type(str(path))
    if mime and mime.split("/")[0] in ("image", "audio"):
        return mime.split("/")[0]
    if Path(path).suffix.lower() in (".webm", ".m4a", ".opus"):
        return "audio"
    raise MediaError(
        f"{Path(path).name} is neither an image nor an audio file: attach images (PNG, JPEG, WebP, ...) "
        "or audio (WAV, MP3, OGG, FLAC, WebM)"
    )


def image_part(path: str | Path) -> dict:
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.verify()  # reads the whole file: truncated or corrupt data fails here
            fmt = image.format
    except UnidentifiedImageError:
        raise MediaError(
            f"could not read the image {path.name}: its contents are not an image format this chat reads, "
            "or it is damaged. Attach a PNG, JPEG, WebP or GIF file."
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"could not read the image {path.name}: damaged or cut short ({exc}).") from None
    mime = Image.MIME.get(fmt or "", "image/png")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def audio_format(path: Path) -> str:
    """The audio container of `path`, checked from its bytes, or MediaError."""
    head = path.read_bytes()[:16]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        try:
            with wave.open(str(path)) as w:
                frames = w.getnframes()
                w.readframes(frames)
        except (wave.Error, EOFError, RuntimeError, struct.error) as exc:
            raise MediaError(
                f"could not read the audio file {path.name}: broken WAV data ({exc or type(exc).__name__})"
            ) from None
        if frames == 0:
            raise MediaError(f"the audio file {path.name} is empty (no samples); record or attach it again")
        return "wav"
    for fmt, signatures in _AUDIO_MAGIC.items():
        if head.startswith(signatures):
            return fmt
    if head[4:8] == b"ftyp":
        return "m4a"
    raise MediaError(
        f"could not read the audio file {path.name}: its contents are not WAV, MP3, OGG, FLAC, WebM or M4A audio"
    )


def audio_part(path: str | Path) -> dict:
    path = Path(path)
    fmt = audio_format(path)
    return {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(path.read_bytes()).decode("ascii"), "format": fmt},
    }


def file_part(path: str | Path) -> dict:
    """One attached file as a content part; MediaError when it cannot be used."""
    if not Path(path).is_file():
        raise MediaError(f"the attached file {Path(path).name} is gone (uploads expire); attach it again")
    try:
        return image_part(path) if kind_of(path) == "image" else audio_part(path)
    except MediaError:
        raise
    except Exception as exc:  # noqa: BLE001 - a decoder's surprise is still the file's fault
        raise MediaError(f"could not read {Path(path).name}: {exc or type(exc).__name__}") from None


def content(text: str, files: list[str]) -> str | list[dict]:
    """A user message's content: plain text, or parts when files are attached."""
    if not files:
        return text
    parts = [file_part(f) for f in files]
    if text:
        parts.append({"type": "text", "text": text})
    return parts
