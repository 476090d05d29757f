"""Idefics3 in plain PyTorch: configs, SigLIP vision tower, connector, Llama decoder, HF-layout loading.

Names are resolved lazily: a CPU-stage worker that only reads a checkpoint's files (model.config,
model.files) does not import torch (~180 MB and seconds per process).
"""
from __future__ import annotations

from lazy_exports import lazy_exports

_EXPORTS = {
    "Idefics3Config": "config",
    "Idefics3VisionConfig": "config",
    "LlamaConfig": "config",
    "Idefics3VisionTransformer": "vision",
    "Idefics3Model": "idefics3",
    "Idefics3ForConditionalGeneration": "idefics3",
    "Idefics3CausalLMOutput": "idefics3",
    "LlamaModel": "llama",
    "AttentionBackend": "llama",
    "CausalAttention": "llama",
    "CheckpointError": "files",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
