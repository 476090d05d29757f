"""A progressive JPEG repeating its scans (a 'scan bomb': decode time grows with scans x pixels, not with
the file's size) is refused before decoding; ordinary baseline and progressive JPEGs decode."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from processing.decode import decode_image
from processing.errors import ImageDecodeError


def _jpeg(progressive: bool) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 90)).save(buffer, "JPEG", progressive=progressive, quality=80)
    return buffer.getvalue()


def _with_repeated_scan(data: bytes, repeats: int) -> bytes:
    """The JPEG with its last scan (SOS segment and entropy-coded data) repeated before the end marker."""
    last_scan = data.rindex(b"\xff\xda")
    assert data.endswith(b"\xff\xd9")
    return data[:-2] + data[last_scan:-2] * repeats + b"\xff\xd9"


@pytest.mark.parametrize("progressive", [False, True])
def test_ordinary_jpegs_decode(progressive):
    data = _jpeg(progressive)
    assert 1 <= data.count(b"\xff\xda") <= 12
    assert decode_image(data).size == (64, 48)


def test_a_jpeg_with_a_few_hundred_scans_still_decodes():
    assert decode_image(_with_repeated_scan(_jpeg(True), 300)).size == (64, 48)


def test_a_progressive_jpeg_scan_bomb_is_refused_saying_why():
    bomb = _with_repeated_scan(_jpeg(True), 1010)        # the limit is 1000 scans
    assert len(bomb) < 200_000
    with pytest.raises(ImageDecodeError, match=r"JPEG with 10\d\d scans .*limit of 1000.*scan bomb"):
        decode_image(bomb)
