"""Safe decoding: every failure kind is a typed InputError with a message naming the cause."""
from __future__ import annotations

import io
import os
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from processing.decode import decode_image, decode_image_file
from processing.errors import (ImageDecodeError, ImageTooLargeError, InputError, NotAnImageError,
                               UnsupportedImageFormatError)
from tests.processing.image_cases import photo


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_with_header(width: int, height: int) -> bytes:
    """A syntactically valid PNG header announcing width x height, with a tiny (wrong) IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_errors_are_input_errors_and_value_errors():
    assert issubclass(ImageDecodeError, InputError) and issubclass(ImageTooLargeError, InputError)
    assert issubclass(InputError, ValueError)


def test_roundtrip_png_is_exact():
    pixels = photo(37, 23)
    image = decode_image(encode(Image.fromarray(pixels), "PNG"))
    assert image.size == (37, 23) and np.array_equal(np.asarray(image), pixels)


@pytest.mark.parametrize("data,cause", [(b"", "empty"), (b"GIF89a", "GIF data that Pillow cannot open"),
                                        (bytes(range(64)), "not a recognised image format")])
def test_empty_and_unknown(data, cause):
    with pytest.raises(ImageDecodeError, match=cause):
        decode_image(data)


@pytest.mark.parametrize("data,error,cause", [
    (b"\n<!DOCTYPE html>\n<html><body>404 Not Found</body></html>", NotAnImageError, "not an image: an HTML page"),
    (b"%PDF-1.7\n%\xe2\xe3", NotAnImageError, "not an image: a PDF document"),
    (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2", NotAnImageError, "MP4/QuickTime video"),
    (b"\x1aE\xdf\xa3\x9fB\x86\x81\x01", NotAnImageError, "WebM video"),
    (b"PK\x03\x04\x14\x00\x00\x00", NotAnImageError, "a ZIP archive"),
    (b"hello world" * 10, NotAnImageError, "not an image: text"),
    (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', UnsupportedImageFormatError, "SVG"),
    (b"icns\x00\x00\x01\x00ic07\x00\x00\x00\x20", UnsupportedImageFormatError, "Apple icon"),
])
def test_what_is_not_an_image_is_named(data, error, cause):
    """At dataset scale many undecodable rows are something else saved as the image (a crawler's
    error page, a video): the message, and the summary's count by error type, say what."""
    with pytest.raises(error, match=cause):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "TIFF", "WEBP"])
def test_an_image_cut_in_its_header_is_named_by_its_format(fmt):
    data = encode(Image.fromarray(photo(20, 10)), fmt)[:14]
    with pytest.raises(ImageDecodeError, match=f"{fmt if fmt != 'WEBP' else 'WebP'} data|corrupt|cannot decode") as e:
        decode_image(data)
    assert not isinstance(e.value, NotAnImageError)


def test_heic_photos_decode_where_pillow_heif_is_installed(monkeypatch):
    pytest.importorskip("pillow_heif")      # the test extra installs it; decode registers it
    from processing import decode

    data = encode(Image.new("RGB", (40, 30), (200, 30, 10)), "HEIF")
    image = decode_image(data)
    assert image.size == (40, 30) and np.abs(np.asarray(image.convert("RGB"), np.int16) - (200, 30, 10)).max() < 8
    with pytest.raises(ImageTooLargeError, match="40x30"):
        decode_image(data, max_pixels=1000)
    with pytest.raises(ImageDecodeError, match="HEIC/HEIF") as cut:
        decode_image(data[:40])
    assert not isinstance(cut.value, UnsupportedImageFormatError)
    monkeypatch.setattr(decode, "REFUSED_FORMATS", decode.REFUSED_FORMATS | {"HEIF"})   # as without the plugin
    with pytest.raises(UnsupportedImageFormatError, match="HEIC/HEIF image .*pip install pillow-heif"):
        decode_image(data)


def test_postscript_never_reaches_ghostscript(tmp_path, monkeypatch):
    """Pillow renders EPS by running Ghostscript over the file: untrusted bytes must not reach it. A
    `gs` on the PATH that records its calls; Pillow looks for it again (gs_binary reset)."""
    from PIL import EpsImagePlugin

    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "gs"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    eps = encode(Image.new("RGB", (10, 10), "red"), "EPS")
    with pytest.raises(UnsupportedImageFormatError, match="PostScript .*Ghostscript"):
        decode_image(eps)
    with pytest.raises(UnsupportedImageFormatError):      # the DOS EPS binary header too
        decode_image(b"\xc5\xd0\xd3\xc6" + bytes(26) + eps)
    assert not calls.exists()


def test_not_bytes():
    with pytest.raises(ImageDecodeError, match="must be bytes"):
        decode_image("a string")  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated(fmt):
    data = encode(Image.fromarray(photo(200, 150)), fmt)
    with pytest.raises(ImageDecodeError, match=r"cannot decode|corrupt|format"):
        decode_image(data[: len(data) // 2])


def test_corrupt_png_payload():
    data = bytearray(encode(Image.fromarray(photo(64, 64)), "PNG"))
    start = data.index(b"IDAT") + 8
    data[start:start + 200] = bytes(200)   # zeroed compressed stream
    with pytest.raises(ImageDecodeError):
        decode_image(bytes(data))


@pytest.mark.timeout(10)
def test_decompression_bomb_is_refused_from_the_header():
    bomb = png_with_header(100_000, 100_000)   # 10^10 pixels announced in 70 bytes
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="pixels|limit"):
        decode_image(bomb)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - start < 2 and peak < 10_000_000


def test_a_pixel_limit_above_pillows_own_is_the_one_applied(monkeypatch):
    """Pillow refuses more than 178,956,970 pixels by itself: `--max-image-pixels 250000000` was
    capped there, silently (a 1-bit 15000 x 14000 PNG: 26 KB, 26 MB decoded)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)     # put back after the test
    data = encode(Image.new("1", (15000, 14000)), "PNG")
    with pytest.raises(ImageTooLargeError, match="210000000 pixels, more than the limit of 200000000"):
        decode_image(data, max_pixels=200_000_000)
    assert decode_image(data, max_pixels=250_000_000).size == (15000, 14000)
    with pytest.raises(ImageTooLargeError, match="Pillow's decompression-bomb limit"):
        decode_image(png_with_header(40000, 40000), max_pixels=None)      # no limit of ours: Pillow's stays


@pytest.mark.parametrize("bitmap_format", ["png", "bmp"])
def test_icons_decode_within_the_limits_of_the_image_inside(bitmap_format):
    """An ICO file decodes its largest icon while Pillow opens it, at the size of the PNG or bitmap
    inside (its directory says at most 256): a favicon decodes; a 9000 x 9000 PNG inside one is
    refused before anything is decoded (tens of KB of zeros would take 243 MB of pixels)."""
    icon = Image.fromarray(photo(48, 48))
    data = encode(icon, "ICO", sizes=[(48, 48), (16, 16)], bitmap_format=bitmap_format)
    assert decode_image(data).size == (48, 48)
    with pytest.raises(ImageTooLargeError, match="48x48 = 2304 pixels, more than the limit of 2000"):
        decode_image(data, max_pixels=2000)
    if bitmap_format == "png":
        big = png_with_header(9000, 9000)
        bomb = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(big), 22) + big
        with pytest.raises(ImageTooLargeError, match="9000x9000"):
            decode_image(bomb)


def test_pixel_limit_is_configurable():
    data = encode(Image.fromarray(photo(100, 80)), "PNG")
    with pytest.raises(ImageTooLargeError, match="8000 pixels, more than the limit of 7999"):
        decode_image(data, max_pixels=7999)
    assert decode_image(data, max_pixels=8000).size == (100, 80)
    assert decode_image(data, max_pixels=None).size == (100, 80)


def test_absurd_sizes():
    with pytest.raises(ImageTooLargeError, match="longer than the limit"):
        decode_image(png_with_header(70_000, 1), max_pixels=None)
    with pytest.raises(ImageTooLargeError, match="longer than the limit of 50"):
        decode_image(encode(Image.fromarray(photo(60, 2)), "PNG"), max_side=50)
    with pytest.raises(ImageTooLargeError, match="bytes"):
        decode_image(encode(Image.fromarray(photo(60, 20)), "PNG"), max_bytes=100)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (16, 12), colour) for colour in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    image = decode_image(data)
    assert getattr(image, "n_frames", 1) >= 1
    assert image.convert("RGB").getpixel((3, 3)) == (255, 0, 0)


def test_animated_webp_gives_first_frame():
    frames = [Image.new("RGB", (16, 12), colour) for colour in [(10, 200, 30), (200, 10, 30)]]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert decode_image(data).convert("RGB").getpixel((3, 3)) == (10, 200, 30)


def test_exif_orientation_is_applied_like_the_reference_path_loader(tmp_path):
    from transformers.image_utils import load_image
    image = Image.fromarray(photo(40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6   # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rotated.jpg"
    path.write_bytes(encode(image, "JPEG", exif=exif.tobytes()))
    ours = decode_image_file(str(path))
    assert ours.size == (20, 40)
    assert np.array_equal(np.asarray(ours.convert("RGB")), np.asarray(load_image(str(path))))
    assert decode_image(path.read_bytes(), exif_transpose=False).size == (40, 20)


def test_alpha_is_kept_for_the_processor_to_composite():
    rgba = np.dstack([photo(20, 10), np.full((10, 20), 128, np.uint8)])
    assert decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG")).mode == "RGBA"


def test_missing_file():
    with pytest.raises(ImageDecodeError, match="cannot read"):
        decode_image_file("/nonexistent/image.png")
