"""Typed bad-input errors: every row-level failure of `processing/` is an `InputError`."""
from __future__ import annotations


class InputError(ValueError):
    """Base of every bad-input error; the message says what was wrong with the input."""


class ImageDecodeError(InputError):
    """The bytes are not a decodable image (empty, truncated, unknown format, corrupt)."""


class NotAnImageError(ImageDecodeError):
    """The bytes are something else: an HTML page, a video, a PDF, an archive, text."""


class UnsupportedImageFormatError(ImageDecodeError):
    """An image format that is not decoded: HEIC without its Pillow plugin, SVG, PostScript / EPS."""


class ImageTooLargeError(InputError):
    """The image header announces more pixels (or a longer side) than the configured limit."""


class PromptError(InputError):
    """The text cannot be combined with the images (placeholder mismatch, `<image>` typed by a user, ...)."""


class ChatTemplateError(ValueError):
    """A template called raise_exception(...), could not render the conversation, or would cost too much."""
