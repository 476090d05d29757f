"""Generation engine: static KV cache of slots, continuous batching, per-request sampling.

Names are resolved lazily, so that the torch-free parts (model.engine.automaton, .json_schema:
a driver checks a job's constraints with them) import without torch.
"""
from __future__ import annotations

from lazy_exports import lazy_exports

_EXPORTS = {
    "LLMEngine": "engine",
    "default_stop_ids": "engine",
    "KVCache": "kv_cache",
    "EngineLoop": "loop",
    "NonFiniteLogitsError": "types",
    "Request": "types",
    "Result": "types",
    "SamplingParams": "types",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
