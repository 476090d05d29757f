"""Generation engine: static KV cache of slots, continuous batching, per-request sampling."""
from .engine import LLMEngine, default_stop_ids
from .kv_cache import KVCache
from .loop import EngineLoop
from .types import NonFiniteLogitsError, Request, Result, SamplingParams

__all__ = ["LLMEngine", "EngineLoop", "Request", "Result", "SamplingParams", "NonFiniteLogitsError", "KVCache",
           "default_stop_ids"]
