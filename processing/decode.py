"""Safe decoding of untrusted image bytes into PIL images.

Every failure is a typed `InputError` whose message says what was wrong:
* `ImageDecodeError`: not bytes, empty, unknown format, truncated or corrupt data; among them
  `NotAnImageError` (an HTML page, a video, a PDF, text: `processing.sniff` tells what from the first
  bytes) and `UnsupportedImageFormatError` (HEIC where pillow-heif is not installed, SVG, Apple icons, and PostScript /
  EPS, which Pillow would hand to Ghostscript: untrusted bytes never reach another program);
* `ImageTooLargeError`: too many bytes, or a header announcing too many pixels or a side longer than
  the limit. The pixel count is checked on the header alone (`Image.open` parses only the header; an
  ICO file, which Pillow decodes while opening it, has the headers of its icons checked before), so a
  decompression bomb never allocates its pixels.
Animated images (GIF, APNG, WebP, multi-page TIFF) give their first frame; EXIF orientation is applied
as the reference's path loader does. Decoding time grows with the pixel count (limited above) and
with the input size, except for a progressive JPEG, where each scan is another pass over every pixel:
a small file can repeat a scan thousands of times, so JPEGs with more than MAX_JPEG_SCANS scans are
refused before decoding. There is no time limit on decoding itself.
"""
from __future__ import annotations

import io
import struct
import warnings

from PIL import Image, ImageOps

from .errors import ImageDecodeError, ImageTooLargeError, NotAnImageError, UnsupportedImageFormatError
from .sniff import sniff

DEFAULT_MAX_PIXELS = 64_000_000       # e.g. 8000 x 8000; the processor shrinks everything to <= 4096 anyway
DEFAULT_MAX_SIDE = 1 << 16            # longer sides are corrupt headers rather than images
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
# Encoders write 1 scan (baseline) or about 10 (progressive); 1000 passes over a 64 MP image already take seconds.
MAX_JPEG_SCANS = 1000
ORIENTATION_TAG = 0x0112
# Formats Pillow registers that are not decoded: EPS is rendered by running Ghostscript over the file
# (PostScript is a programming language; Ghostscript's -dSAFER sandbox has been escaped before).
# ICNS decodes its icons (PNG, JPEG 2000) at sizes its header does not announce.
REFUSED_FORMATS = frozenset({"EPS", "ICNS"})
PLUGINS = {"HEIF": "pillow-heif"}     # formats a pip package adds to Pillow


def register_heif() -> None:
    """HEIC / HEIF (phones' photos) decode where pillow-heif is installed (the `heif` extra)."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return
    register_heif_opener()


register_heif()


def check_size(width: int, height: int, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               max_side: int | None = DEFAULT_MAX_SIDE) -> None:
    """Raise `ImageTooLargeError` / `ImageDecodeError` for sizes the limits refuse."""
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image header gives an empty size {width}x{height}")
    if max_side is not None and max(width, height) > max_side:
        raise ImageTooLargeError(f"image is {width}x{height}: a side is longer than the limit of {max_side} pixels")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(f"image is {width}x{height} = {width * height} pixels, more than the limit "
                                 f"of {max_pixels} (possible decompression bomb)")


def decodable_formats() -> list[str]:
    """Pillow's registered formats (plugins such as pillow-heif's included) but the refused ones."""
    Image.init()
    return [name for name in Image.OPEN if name not in REFUSED_FORMATS]


def follow_pixel_limit(max_pixels: int | None) -> None:
    """Pillow refuses, on its own, images of more than twice its `MAX_IMAGE_PIXELS` (178,956,970):
    a limit set above it (`--max-image-pixels 250000000`) was met by Pillow's instead. Pillow's is
    raised to ours, so that it refuses only past twice ours, after our check (process-wide, as
    Pillow is configured; only ever raised); with no limit of ours, Pillow's stays."""
    if max_pixels is not None and Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _open_header(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        # Our own limit is checked right after; Pillow's global bomb warning adds nothing.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data), formats=decodable_formats())
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(f"image exceeds Pillow's decompression-bomb limit: {e}") from e
        except Image.UnidentifiedImageError as e:
            raise unidentified(data) from e
        except Exception as e:  # malformed headers raise anything from SyntaxError to struct.error
            found = sniff(data)
            what = f"{found.what} " if found and found.kind == "image" else ""
            raise ImageDecodeError(f"corrupt {what}image header ({len(data)} bytes): {type(e).__name__}: {e}") from e


def unidentified(data: bytes) -> ImageDecodeError:
    """The error for bytes Pillow does not open, saying what they are where their start tells."""
    size, start = f"{len(data)} bytes", f"starting {bytes(data[:8])!r}"
    found = sniff(data)
    if found is None:
        return ImageDecodeError(f"not a recognised image format ({size}, {start})")
    if found.kind == "image" and found.pillow_format not in decodable_formats():
        plugin = PLUGINS.get(found.pillow_format)
        how = f"with the {plugin} plugin (pip install {plugin})" if plugin else "where built with its codec"
        return UnsupportedImageFormatError(f"a {found.what} image ({size}): Pillow reads it only {how}")
    if found.kind == "image":
        return ImageDecodeError(f"{found.what} data that Pillow cannot open ({size}): cut short, or a corrupt header")
    if found.kind == "unsupported":
        return UnsupportedImageFormatError(f"{found.what} ({size})")
    return NotAnImageError(f"not an image: {found.what} ({size}, {start})")


def check_icon_sizes(data: bytes, max_pixels: int | None, max_side: int | None) -> None:
    """An ICO file decodes its largest icon while it is opened, at the size of the PNG or bitmap
    inside, not the size its directory gives (at most 256): those sizes are checked first."""
    if not data.startswith(b"\0\0\1\0") or len(data) < 6:
        return
    for i in range(struct.unpack_from("<H", data, 4)[0]):
        if len(data) < 22 + 16 * i:
            return                  # a directory cut short: Pillow refuses it
        offset = struct.unpack_from("<I", data, 18 + 16 * i)[0]
        if data[offset:offset + 8] == b"\x89PNG\r\n\x1a\n" and len(data) >= offset + 24:
            width, height = struct.unpack_from(">II", data, offset + 16)
        elif len(data) >= offset + 12:
            width, height = struct.unpack_from("<ii", data, offset + 4)
            height = abs(height) // 2            # a bitmap icon's height counts its mask too
        else:
            continue
        check_size(max(width, 1), max(height, 1), max_pixels, max_side)


def check_jpeg_scans(data: bytes, image: Image.Image) -> None:
    """Refuse a JPEG 'scan bomb' (a progressive JPEG repeating scans) before its costly decode."""
    if image.format not in ("JPEG", "MPO"):
        return
    # Every scan starts with an SOS marker; inside entropy-coded data an 0xFF byte is written FF 00,
    # so FF DA occurs only as a marker (or by chance inside metadata, far too rarely to matter here).
    scans = data.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise ImageDecodeError(f"JPEG with {scans} scans ({image.width}x{image.height}, {len(data)} bytes): more "
                               f"than the limit of {MAX_JPEG_SCANS}; each scan is a pass over the whole image "
                               "(a progressive-JPEG scan bomb)")


def _load_first_frame(image: Image.Image) -> None:
    try:
        image.seek(0)
        image.load()
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image exceeds Pillow's decompression-bomb limit: {e}") from e
    except MemoryError as e:
        raise ImageTooLargeError(f"not enough memory to decode a {image.width}x{image.height} image") from e
    except Exception as e:  # OSError("image file is truncated"), zlib errors, ValueError, EOFError, ...
        raise ImageDecodeError(f"cannot decode {image.format or 'image'} data "
                               f"({image.width}x{image.height}): {type(e).__name__}: {e}") from e


def decode_image(data: bytes | bytearray | memoryview, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 max_side: int | None = DEFAULT_MAX_SIDE, max_bytes: int | None = DEFAULT_MAX_BYTES,
                 exif_transpose: bool = True) -> Image.Image:
    """Decode untrusted bytes into a loaded PIL image in its own mode (alpha kept, first frame only).

    The image processor then converts it to RGB (compositing any alpha over white).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"image data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError("image data is empty (0 bytes)")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLargeError(f"image data is {len(data)} bytes, more than the limit of {max_bytes}")
    data = bytes(data)
    follow_pixel_limit(max_pixels)
    check_icon_sizes(data, max_pixels, max_side)
    image = _open_header(data)
    check_size(image.width, image.height, max_pixels, max_side)
    check_jpeg_scans(data, image)
    _load_first_frame(image)
    if exif_transpose:
        try:
            if image.getexif().get(ORIENTATION_TAG, 1) not in (0, 1):  # skip the copy when upright
                image = ImageOps.exif_transpose(image)
        except Exception as e:
            raise ImageDecodeError(f"corrupt EXIF orientation data: {type(e).__name__}: {e}") from e
    return image


def decode_image_file(path: str, **limits) -> Image.Image:
    """`decode_image` for a local file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageDecodeError(f"cannot read image file {path!r}: {e}") from e
    return decode_image(data, **limits)
