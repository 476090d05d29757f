"""Images and text -> model inputs. Names are resolved lazily so that importing one part (say the
tokenizer in a decode-only worker) does not import torch, Pillow or Jinja2 for the others."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Idefics3ImageProcessor": "image_processor",
    "Idefics3ImageProcessorPil": "image_processor",
    "Idefics3Processor": "processor",
    "Tokenizer": "tokenizer",
    "BatchEncoding": "tokenizer",
    "InputError": "errors",
    "ImageDecodeError": "errors",
    "ImageTooLargeError": "errors",
    "PromptError": "errors",
    "RowEncoder": "fast_path",
    "EncodedRow": "fast_path",
    "frames_to_pixel_values": "pixels",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'processing' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
