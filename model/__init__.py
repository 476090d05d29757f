"""Idefics3 in plain PyTorch: configs, SigLIP vision tower, connector, Llama decoder, HF-layout loading."""
from .config import Idefics3Config, Idefics3VisionConfig, LlamaConfig
from .idefics3 import Idefics3CausalLMOutput, Idefics3ForConditionalGeneration, Idefics3Model
from .llama import AttentionBackend, CausalAttention, LlamaModel
from .loading import CheckpointError
from .vision import Idefics3VisionTransformer

__all__ = [
    "Idefics3Config", "Idefics3VisionConfig", "LlamaConfig", "Idefics3VisionTransformer", "Idefics3Model",
    "Idefics3ForConditionalGeneration", "Idefics3CausalLMOutput", "LlamaModel", "AttentionBackend",
    "CausalAttention", "CheckpointError",
]
