import base64
import io
import struct
import zlib

import httpx
import pytest
from PIL import Image

from workbench.engine.request import ImagePart
from workbench.errors import RequestError
from workbench.modalities.images import (
    ImageInputError,
    decode_image,
    image_from_part,
    load_image,
)


def encode(image: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def gradient(size=(32, 24)) -> Image.Image:
    image = Image.new("RGB", size)
    image.putdata([(x * 8 % 256, y * 10 % 256, 128) for y in range(size[1]) for x in range(size[0])])
    return image


def test_errors_are_request_errors():
    assert issubclass(ImageInputError, RequestError)


@pytest.mark.parametrize(
    ("fmt", "mime", "lossless"),
    [
        ("PNG", "image/png", True),
        ("JPEG", "image/jpeg", False),
        ("WEBP", "image/webp", True),
        ("GIF", "image/gif", False),
    ],
)
def test_each_format_round_trips_through_a_data_url(fmt, mime, lossless):
    source = gradient()
    save = {"lossless": True} if fmt == "WEBP" else {}
    image = load_image(data_url(encode(source, fmt, **save), mime))
    assert image.mode == "RGB"
    assert image.size == source.size
    if lossless:
        assert image.tobytes() == source.tobytes()
    else:
        # Lossy (JPEG) or palette-quantised (GIF): close, not equal.
        diffs = [abs(a - b) for a, b in zip(image.tobytes(), source.tobytes(), strict=True)]
        assert sum(diffs) / len(diffs) < 16


def test_declared_mime_does_not_matter_only_the_bytes():
    png = encode(gradient(), "PNG")
    assert load_image(data_url(png, "image/jpeg")).size == (32, 24)
    assert load_image(data_url(png, "application/octet-stream")).size == (32, 24)


def test_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    image = load_image(data_url(buf.getvalue(), "image/gif"))
    assert image.mode == "RGB"
    assert image.getpixel((4, 4)) == (255, 0, 0)


def test_multi_picture_jpeg_from_a_phone_gives_its_first_picture():
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (255, 0, 0)).save(
        buf, format="MPO", save_all=True, append_images=[Image.new("RGB", (20, 10), (0, 255, 0))]
    )
    image = load_image(data_url(buf.getvalue(), "image/jpeg"))
    r, g, _ = image.getpixel((10, 5))
    assert image.size == (20, 10) and r > 200 and g < 60


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    image = load_image(data_url(encode(rgba, "PNG")))
    assert image.mode == "RGB"
    assert image.getpixel((1, 1)) == (255, 255, 255)
    assert image.getpixel((0, 0)) == (0, 0, 255)
    half = load_image(data_url(encode(Image.new("RGBA", (2, 2), (0, 0, 0, 128)), "PNG")))
    assert all(120 <= c <= 135 for c in half.getpixel((0, 0)))


@pytest.mark.parametrize("mode", ["L", "P", "LA", "I;16", "1"])
def test_other_modes_become_rgb(mode):
    image = load_image(data_url(encode(Image.new(mode, (5, 3)), "PNG")))
    assert (image.mode, image.size) == ("RGB", (5, 3))


def test_cmyk_jpeg_becomes_rgb():
    image = load_image(data_url(encode(Image.new("CMYK", (6, 6), (0, 255, 255, 0)), "JPEG"), "image/jpeg"))
    assert image.mode == "RGB"
    r, g, b = image.getpixel((3, 3))
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied():
    source = Image.new("RGB", (40, 20), (255, 0, 0))
    source.paste((0, 0, 255), (0, 0, 10, 20))  # blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image = load_image(data_url(encode(source, "JPEG", exif=exif, quality=95), "image/jpeg"))
    assert image.size == (20, 40)
    # After a 90 degree clockwise turn the left stripe is on top.
    top, bottom = image.getpixel((10, 2)), image.getpixel((10, 37))
    assert top[2] > 200 and top[0] < 60
    assert bottom[0] > 200 and bottom[2] < 60


def test_corrupt_bytes_are_refused():
    with pytest.raises(ImageInputError, match="not a readable image"):
        load_image(data_url(b"hello, this is not an image at all"))


def test_truncated_png_is_refused():
    png = encode(gradient((64, 64)), "PNG")
    with pytest.raises(ImageInputError, match="corrupt or truncated|could not be read"):
        load_image(data_url(png[: len(png) // 2]))


def test_bad_base64_is_refused():
    with pytest.raises(ImageInputError, match="base64 is invalid"):
        load_image("data:image/png;base64,!!!not*base64!!!")


def test_malformed_data_url_is_refused():
    with pytest.raises(ImageInputError, match="malformed data: URL"):
        load_image("data:image/png;base64")


@pytest.mark.parametrize(("fmt", "name"), [("BMP", "BMP"), ("TIFF", "TIFF"), ("ICO", "ICO")])
def test_other_raster_formats_are_refused_by_name(fmt, name):
    with pytest.raises(ImageInputError, match=f"{name} images are not accepted"):
        load_image(data_url(encode(gradient((16, 16)), fmt)))


def test_svg_is_refused():
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    with pytest.raises(ImageInputError, match="SVG"):
        load_image(data_url(svg, "image/svg+xml"))
    with pytest.raises(ImageInputError, match="SVG"):
        load_image(data_url(svg, "image/png"))


def test_non_image_mime_is_refused():
    with pytest.raises(ImageInputError, match="not an image"):
        load_image(data_url(encode(gradient(), "PNG"), "text/html"))


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.png", "javascript:alert(1)", "/tmp/a.png"])
def test_other_schemes_are_refused(url):
    with pytest.raises(ImageInputError, match="not accepted"):
        load_image(url)


def test_remote_urls_are_refused_by_default_naming_the_config_key():
    with pytest.raises(ImageInputError, match=r"media\.allow_remote_images"):
        load_image("https://example.com/cat.png")


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height 1-bit pixels, with an all-zero image
    stream that compresses to a few KB: tiny on the wire, huge once decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (width + 7) // 8)
    stream = zlib.compressobj(9)
    body = b"".join(stream.compress(row) for _ in range(height)) + stream.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("side", "match"),
    [
        (8000, "8000x8000 = 64.0 MP; the limit is 40.0 MP"),  # over our limit, under PIL's own
        (30000, "decompression bomb"),  # over PIL's hard limit: refused inside Image.open
    ],
)
def test_decompression_bomb_is_refused_from_its_header(monkeypatch, side, match):
    bomb = _png_declaring(side, side)
    assert len(bomb) < 200_000
    loads = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(self) or real_load(self))
    with pytest.raises(ImageInputError, match=match):
        load_image(data_url(bomb))
    assert loads == []  # no pixel was decoded


def test_pixel_limit_is_ours_to_set():
    png = encode(gradient((100, 100)), "PNG")
    assert load_image(data_url(png), max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageInputError, match="refused before decoding"):
        load_image(data_url(png), max_pixels=9_999)


def test_oversized_payload_is_refused_before_decoding(monkeypatch):
    calls = []
    monkeypatch.setattr(base64, "b64decode", lambda *a, **k: calls.append(a))
    big = "data:image/png;base64," + "A" * 4_000_000  # ~3 MB decoded
    with pytest.raises(ImageInputError, match="limit is 1.0 MB"):
        load_image(big, max_bytes=1_000_000)
    assert calls == []


def test_image_from_part_takes_dicts_and_pydantic_parts():
    url = data_url(encode(gradient(), "PNG"))
    assert image_from_part({"type": "image_url", "image_url": {"url": url}}).size == (32, 24)
    assert image_from_part({"type": "image_url", "image_url": url}).size == (32, 24)
    part = ImagePart.model_validate({"type": "image_url", "image_url": {"url": url, "detail": "low"}})
    assert image_from_part(part).size == (32, 24)
    with pytest.raises(ImageInputError, match="expected an image_url"):
        image_from_part({"type": "text", "text": "hi"})
    with pytest.raises(ImageInputError, match=r"media\.allow_remote_images"):
        image_from_part({"type": "image_url", "image_url": {"url": "http://example.com/x.png"}})


def _client(handler) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))


def test_remote_fetch_when_allowed():
    png = encode(gradient(), "PNG")
    seen = []

    def handler(request):
        seen.append(str(request.url))
        return httpx.Response(200, headers={"content-type": "image/png"}, content=png)

    image = load_image("https://images.example/cat.png", allow_remote=True, client=_client(handler))
    assert image.size == (32, 24)
    assert seen == ["https://images.example/cat.png"]


@pytest.mark.parametrize(
    ("response", "match"),
    [
        (httpx.Response(404), "HTTP 404"),
        (httpx.Response(200, headers={"content-type": "text/html"}, content=b"<html>"), "not a PNG/JPEG"),
        (httpx.Response(200, headers={"content-type": "image/svg+xml"}, content=b"<svg/>"), "not a PNG/JPEG"),
        (httpx.Response(200, headers={"content-type": "image/png"}, content=b"x" * 5000), "limit"),
    ],
)
def test_remote_fetch_checks_status_type_and_size(response, match):
    with pytest.raises(ImageInputError, match=match):
        load_image("https://images.example/x", allow_remote=True, max_bytes=4000, client=_client(lambda r: response))


def test_remote_fetch_network_errors_are_input_errors():
    def handler(request):
        raise httpx.ConnectTimeout("timed out", request=request)

    with pytest.raises(ImageInputError, match="could not fetch"):
        load_image("https://images.example/x", allow_remote=True, client=_client(handler))


def test_decode_image_on_raw_bytes():
    assert decode_image(encode(gradient(), "WEBP")).mode == "RGB"


def test_base64_with_line_breaks_is_accepted():
    encoded = base64.encodebytes(encode(gradient(), "PNG")).decode()  # MIME style, a newline every 76 chars
    assert "\n" in encoded
    assert load_image(f"data:image/png;base64,{encoded}").size == (32, 24)


def test_percent_encoded_data_url():
    import urllib.parse

    url = "data:image/png," + urllib.parse.quote_from_bytes(encode(gradient(), "PNG"))
    assert load_image(url).size == (32, 24)
