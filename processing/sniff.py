"""What bytes are that Pillow does not open, from their first bytes: an image cut short, an image
format not decoded here, or something else stored as an image. At dataset scale the last is common:
a crawler's saved HTML error page, a video or a PDF under an image column."""
from __future__ import annotations

from typing import Literal, NamedTuple

Kind = Literal["image", "unsupported", "other"]

# Image formats (signature, name, Pillow's format id): bytes that start like one that Pillow reads
# and still fail are cut short or corrupt.
_IMAGES = ((b"\x89PNG\r\n\x1a\n", "PNG", "PNG"), (b"\xff\xd8\xff", "JPEG", "JPEG"), (b"GIF87a", "GIF", "GIF"),
           (b"GIF89a", "GIF", "GIF"), (b"II*\x00", "TIFF", "TIFF"), (b"MM\x00*", "TIFF", "TIFF"),
           (b"qoif", "QOI", "QOI"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000", "JPEG2000"),
           (b"\xff\x4f\xff\x51", "JPEG 2000", "JPEG2000"))
_OTHERS = ((b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive"), (b"\x1f\x8b", "gzip data"),
           (b"7z\xbc\xaf\x27\x1c", "a 7z archive"), (b"Rar!", "a RAR archive"),
           (b"\x1aE\xdf\xa3", "a Matroska/WebM video"), (b"OggS", "Ogg media"), (b"ID3", "MP3 audio"))
POSTSCRIPT = "PostScript (EPS), which is not decoded: Pillow would run Ghostscript, a PostScript interpreter, over it"
_POSTSCRIPT = (b"%!PS", b"\xc5\xd0\xd3\xc6")
_ICNS = "an Apple icon (ICNS), which is not decoded: the sizes of the images inside are not in its header"
_RIFF = {b"WEBP": ("image", "WebP", "WEBP"), b"AVI ": ("other", "an AVI video"), b"WAVE": ("other", "WAV audio")}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}


class Sniffed(NamedTuple):
    kind: Kind
    what: str
    pillow_format: str | None = None     # an image's: whether this Pillow reads it


def sniff(data: bytes) -> Sniffed | None:
    """What the bytes look like, or None where their start says nothing."""
    return _by_signature(data) or _by_box(data) or _by_text(data)


def _by_signature(data: bytes) -> Sniffed | None:
    if data.startswith(_POSTSCRIPT):
        return Sniffed("unsupported", POSTSCRIPT)
    if data.startswith(b"icns"):
        return Sniffed("unsupported", _ICNS)
    for signature, what, pillow_format in _IMAGES:
        if data.startswith(signature):
            return Sniffed("image", what, pillow_format)
    for signature, what in _OTHERS:
        if data.startswith(signature):
            return Sniffed("other", what)
    if data.startswith(b"RIFF") and data[8:12] in _RIFF:
        return Sniffed(*_RIFF[data[8:12]])
    return None


def _by_box(data: bytes) -> Sniffed | None:
    """ISO media files (MP4, QuickTime, HEIF, AVIF) start with an `ftyp` box naming their brand."""
    if data[4:8] != b"ftyp":
        return None
    brand = data[8:12]
    if brand in _HEIF_BRANDS:
        return Sniffed("image", "HEIC/HEIF", "HEIF")
    if brand in (b"avif", b"avis"):
        return Sniffed("image", "AVIF", "AVIF")
    return Sniffed("other", f"an MP4/QuickTime video (ISO media, brand {brand.decode('latin-1')!r})")


def _by_text(data: bytes) -> Sniffed | None:
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head[:256]:
        return Sniffed("other", "an HTML page (a failed download or an error page saved as the image?)")
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return Sniffed("unsupported", "an SVG image, a vector format that is not decoded")
    if head.startswith(b"<?xml"):
        return Sniffed("other", "an XML document")
    if head and all(32 <= c < 127 or c in b"\t\r\n" for c in head[:256]):
        return Sniffed("other", "text")
    return None
