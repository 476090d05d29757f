"""Images and text -> model inputs. Names are resolved lazily so that importing one part (say the
tokenizer in a decode-only worker) does not import torch, Pillow or Jinja2 for the others."""
from __future__ import annotations

from lazy_exports import lazy_exports

_EXPORTS = {
    "Idefics3ImageProcessor": "image_processor",
    "Idefics3ImageProcessorPil": "image_processor",
    "Idefics3Processor": "processor",
    "Tokenizer": "tokenizer",
    "BatchEncoding": "tokenizer",
    "InputError": "errors",
    "ImageDecodeError": "errors",
    "ImageTooLargeError": "errors",
    "NotAnImageError": "errors",
    "UnsupportedImageFormatError": "errors",
    "PromptError": "errors",
    "RowEncoder": "fast_path",
    "Conversation": "conversation",
    "read_conversation": "conversation",
    "EncodedRow": "fast_path",
    "frames_to_pixel_values": "pixels",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
