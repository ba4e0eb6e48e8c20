"""OpenAI `image_url` content parts -> checked RGB PIL images.

Accepted:
- `data:` URLs (`data:image/png;base64,...`; percent-encoded data also works) holding
  PNG, JPEG, WebP or GIF bytes. The format is sniffed from the bytes, whatever the declared
  mime type says; GIF gives its first frame.
- `http(s)://` URLs only when `allow_remote=True` (config key `media.allow_remote_images`),
  fetched with httpx under a timeout, a streamed size cap and a content-type check.

Refused, each with an `ImageInputError` saying what to send instead: other URL schemes
(file:, ftp:, ...), bad base64, bytes that are no image, truncated files, SVG (a vector
document, not pixels: rendering it would need a browser-grade parser), and raster formats
outside the four OpenAI accepts (BMP, TIFF, ICO, ...: rarely sent by chat clients and a
larger attack surface for little gain). Payloads over `max_bytes` are refused before
their base64 is decoded; images over `max_pixels` are refused from their header, before
any pixel is decoded (decompression bombs).

The result is always mode RGB: EXIF orientation applied, transparency composited over
white, palette / grey / CMYK converted.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.parse
import warnings
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from workbench.errors import MediaInputError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
# What Image.open reports for them: phone cameras write multi-picture JPEGs, which Pillow's
# JPEG decoder opens as "MPO" (the first picture is the photo).
_OPENED_FORMATS = (*ALLOWED_FORMATS, "MPO")
MAX_BYTES = 20 * 1024 * 1024
"""OpenAI's own per-image limit."""
MAX_PIXELS = 40_000_000
"""Width x height; a 40 MP image is already ~120 MB of RGB in memory."""
TIMEOUT_S = 10.0
REMOTE_CONFIG_KEY = "media.allow_remote_images"

_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)$", re.DOTALL | re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
# Formats refused by name (their decoders are never run), told apart by their magic bytes.
_OTHER_FORMATS = (
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
)


class ImageInputError(MediaInputError):
    """An image part cannot be used as sent; the message says why and what to send instead."""

    code = "invalid_image"


def load_image(
    url: str,
    *,
    allow_remote: bool = False,
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
    timeout: float = TIMEOUT_S,
    client: Any = None,
) -> Image.Image:
    """The RGB image behind a `data:` URL (or an http(s) URL when `allow_remote`).

    `client` is an optional `httpx.Client` for remote fetches (tests pass one with a mock
    transport); by default a fresh client with `timeout` is used.
    """
    if not isinstance(url, str) or not url:
        raise ImageInputError(
            "image_url.url must be a non-empty string (a data: URL such as data:image/png;base64,...)"
        )
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _decode_data_url(url, max_bytes)
    elif scheme in ("http", "https"):
        if not allow_remote:
            raise ImageInputError(
                f"remote image URLs are off: send the image inline as a data: URL (data:image/png;base64,...), "
                f"or set {REMOTE_CONFIG_KEY}: true in the config to let the server fetch {scheme}:// URLs"
            )
        data = _fetch(url, max_bytes=max_bytes, timeout=timeout, client=client)
    else:
        shown = f"{scheme}:" if scheme else repr(url[:40])
        raise ImageInputError(
            f"image URL scheme {shown} is not accepted: send a data: URL (data:image/png;base64,...)"
            f" or, where {REMOTE_CONFIG_KEY} is on, an http(s) URL"
        )
    return decode_image(data, max_pixels=max_pixels)


def image_from_part(part: Any, **options: Any) -> Image.Image:
    """The image of an OpenAI `image_url` content part: a dict (`{"type": "image_url",
    "image_url": {"url": ...}}`, the url also accepted as a bare string) or the pydantic
    `ImagePart` of workbench.engine.request. `options` go to `load_image`."""
    if isinstance(part, dict):
        if part.get("type", "image_url") != "image_url":
            raise ImageInputError(f"expected an image_url content part, got type {part.get('type')!r}")
        inner = part.get("image_url")
        url = inner.get("url") if isinstance(inner, dict) else inner
    else:
        inner = getattr(part, "image_url", None)
        url = getattr(inner, "url", inner)
    if not isinstance(url, str):
        raise ImageInputError('an image_url part needs {"image_url": {"url": "data:image/...;base64,..."}}')
    return load_image(url, **options)


def _decode_data_url(url: str, max_bytes: int) -> bytes:
    match = _DATA_URL.match(url)
    if match is None:
        raise ImageInputError("malformed data: URL: expected data:image/png;base64,<base64 bytes>")
    mime = match["mime"].strip().lower()
    params = [p.strip().lower() for p in match["params"].split(";") if p.strip()]
    payload = match["data"]
    if "svg" in mime:
        raise ImageInputError("SVG images are not accepted: rasterise it and send PNG, JPEG, WebP or GIF")
    if mime and not (mime.startswith("image/") or mime == "application/octet-stream"):
        raise ImageInputError(
            f"data: URL declares {mime!r}, not an image: send PNG, JPEG, WebP or GIF as data:image/..."
        )
    if "base64" in params:
        # Size check from the string length, before any copy or decoding (line breaks
        # every 76 characters add under 2 %; more than that is refused as oversized).
        if len(payload) // 4 * 3 > max_bytes * 1.02 + 1024:
            raise ImageInputError(
                f"image payload is about {len(payload) // 4 * 3 / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.1f} MB"
            )
        payload = _WHITESPACE.sub("", payload)
        if len(payload) // 4 * 3 > max_bytes:
            raise ImageInputError(
                f"image payload is about {len(payload) // 4 * 3 / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.1f} MB"
            )
        payload += "=" * (-len(payload) % 4)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageInputError(f"the data: URL's base64 is invalid ({exc})") from exc
    else:
        if len(payload) // 3 > max_bytes:  # '%XX' is the longest spelling of a byte
            raise ImageInputError(f"image payload is over the {max_bytes / 1e6:.1f} MB limit")
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise ImageInputError(f"image payload is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.1f} MB")
    if not data:
        raise ImageInputError("the data: URL holds no bytes")
    return data


def _fetch(url: str, *, max_bytes: int, timeout: float, client: Any) -> bytes:
    import httpx

    own = client is None
    if own:
        client = httpx.Client(timeout=timeout, follow_redirects=True, max_redirects=3)
    try:
        with client.stream("GET", url, timeout=timeout) as response:
            if response.status_code != 200:
                raise ImageInputError(f"fetching {url} gave HTTP {response.status_code}")
            ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if not ctype.startswith("image/") or "svg" in ctype:
                raise ImageInputError(
                    f"{url} is served as {ctype or 'no content type'!r}, not a PNG/JPEG/WebP/GIF image"
                )
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise ImageInputError(f"{url} is {int(declared) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.1f} MB")
            chunks, total = [], 0
            for chunk in response.iter_bytes():
                total += len(chunk)
                if total > max_bytes:
                    raise ImageInputError(f"{url} is over the {max_bytes / 1e6:.1f} MB limit")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise ImageInputError(f"could not fetch {url}: {type(exc).__name__}: {exc}") from exc
    finally:
        if own:
            client.close()


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Checked bytes -> RGB image: format sniffed, size checked from the header, then decoded."""
    head = data[:256].lstrip()
    if head.startswith((b"<?xml", b"<svg", b"<!DOCTYPE svg")) or b"<svg" in data[:1024]:
        raise ImageInputError("SVG images are not accepted: rasterise it and send PNG, JPEG, WebP or GIF")
    with warnings.catch_warnings():
        # PIL warns (and over twice its own limit raises) on huge headers; both become our error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # Only the four accepted decoders ever see the bytes.
            image: Image.Image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except UnidentifiedImageError as exc:
            known = next((name for magic, name in _OTHER_FORMATS if data.startswith(magic)), None)
            if data[4:8] == b"ftyp":
                known = "AVIF/HEIC"
            if known:
                raise ImageInputError(f"{known} images are not accepted: send PNG, JPEG, WebP or GIF") from exc
            raise ImageInputError("the bytes are not a readable image: send PNG, JPEG, WebP or GIF") from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageInputError(f"image refused as a decompression bomb: {exc}") from exc
        except OSError as exc:
            raise ImageInputError(f"the image could not be read: {exc}") from exc
        if image.format not in _OPENED_FORMATS:
            raise ImageInputError(f"{image.format} images are not accepted: send PNG, JPEG, WebP or GIF")
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageInputError(f"the image has an empty size {width}x{height}")
        if width * height > max_pixels:
            raise ImageInputError(
                f"the image is {width}x{height} = {width * height / 1e6:.1f} MP; the limit is {max_pixels / 1e6:.1f} MP"
                " (refused before decoding)"
            )
        try:
            image.seek(0)  # GIF / animated WebP / MPO: the first frame
            image.load()
            image = ImageOps.exif_transpose(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageInputError(f"image refused as a decompression bomb: {exc}") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageInputError(f"the {image.format} image is corrupt or truncated: {exc}") from exc
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as RGB as a person sees it: transparency over white, 16-bit grey scaled."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" or (image.mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # High bit-depth grey: scale to 8 bits rather than clip.
        import numpy as np

        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    return image.convert("RGB")
