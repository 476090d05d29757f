"""Runs the model on the engine's KV cache: image features, packed prefill, decode (graphed on CUDA)."""
from __future__ import annotations

import itertools

import warnings

import torch
from torch import Tensor, nn

from ..compiling import compiled
from .kv_cache import DecodeAttention, KVCache, PackedPrefillAttention


def decode_logits(model: nn.Module, k_cache: Tensor, v_cache: Tensor, tokens: Tensor, positions: Tensor,
                  kv_len: int) -> Tensor:
    """One decode step for rows 0..B-1 of the cache: (B,) last tokens at (B,) positions -> (B, V) float32."""
    attention = DecodeAttention(k_cache, v_cache, positions, kv_len)
    hidden = model.model.text_model(input_ids=tokens[:, None], position_ids=positions[:, None],
                                    attention=attention)
    return model.lm_head(hidden[:, 0]).float()


_COMPILED = None


def compiled_decode():
    """decode_logits through torch.compile, shared by every runner: it fuses the many small kernels
    of a decode step (norms, RoPE, softmax, SiLU) that otherwise dominate small batches. Shapes
    that vary (batch bucket, kv_len, cache size) are symbolic: one compile serves them all."""
    global _COMPILED
    if _COMPILED is None:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _COMPILED = _without_duck_sizing(compiled(decode_logits, fullgraph=True, dynamic=True))
    return _COMPILED


def _without_duck_sizing(step):
    """Each size its own symbol. With duck sizing, sizes equal at the first compile are assumed equal
    for good: a first step whose rows equal the cache's slots (a full cache), its layers or a head
    count compiled the whole step again (~85 s on an H200) once the rows changed."""
    try:
        from torch.fx.experimental import _config as fx_config
        fx_config.use_duck_shape
    except (ImportError, AttributeError):         # a torch without the switch keeps duck sizing
        return step

    def call(*args):
        with fx_config.patch(use_duck_shape=False):
            return step(*args)
    return call


def pow2_bucket(n: int, floor: int, cap: int) -> int:
    """Smallest power of two >= n (at least `floor`), capped: the static shapes a step is padded to."""
    b = floor
    while b < n:
        b *= 2
    return min(b, cap)


def kv_bucket(n: int, cap: int) -> int:
    """Keys a decode step attends over: powers of two up to 512, then multiples of 512 (every
    masked key is still read, so long contexts get finer steps)."""
    return pow2_bucket(n, 64, cap) if n <= 512 else min(-(-n // 512) * 512, cap)


class ModelRunner:
    def __init__(self, model: nn.Module, cache: KVCache, *, use_cuda_graphs: bool, compile: bool = False,
                 max_image_frames: int = 64, batched_prefill: bool | None = None) -> None:
        self.model, self.cache = model, cache
        self.text = model.model.text_model
        self.image_token_id = model.config.image_token_id
        self.max_image_frames = max_image_frames
        slots, device = cache.num_slots, cache.k.device
        self.tokens = torch.zeros(slots, dtype=torch.int64, device=device)     # each slot's last token
        self.positions = torch.zeros(slots, dtype=torch.int64, device=device)  # each slot's cached length
        self.slot_ids = torch.arange(slots, device=device)      # a decode step's rows index: no kernel a step
        self.use_cuda_graphs = use_cuda_graphs and device.type == "cuda"
        self.compile = compile
        # Fixed at the start, not cleared with `compile` if compiling fails on one tensor-parallel rank:
        # every rank must run the same rows.
        self.min_decode_rows = self.min_rows(compile)
        # One attention call per group of padded prompts, not per prompt: fewer launches (GPU) vs
        # less work (CPU); see PackedPrefillAttention.
        self.batched_prefill = device.type == "cuda" if batched_prefill is None else batched_prefill
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool = None

    @staticmethod
    def min_rows(compile: bool) -> int:
        """Rows a decode step runs at least: compiled, two (see decode_rows). A one-slot cache keeps
        a spare row where it has room, or its steps compile for one row, and again when rows change."""
        return 2 if compile else 1

    # ---- images -------------------------------------------------------------------------------
    def image_features(self, pixel_values: list[Tensor | None], masks: list[Tensor | None]) -> list[Tensor | None]:
        """Features (n_frames, S, Dt) per request; the vision tower runs batched across requests
        (one batch per tile size)."""
        device = self.cache.k.device
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, pv in enumerate(pixel_values):
            if pv is not None:
                by_size.setdefault(tuple(pv.shape[-2:]), []).append(i)
        out: list[Tensor | None] = [None] * len(pixel_values)
        for owners in by_size.values():
            frames = [pixel_values[i].to(device) for i in owners]
            frame_masks = [torch.ones(f.shape[0], *f.shape[-2:], dtype=torch.bool, device=device)
                           if masks[i] is None else masks[i].to(device=device, dtype=torch.bool)
                           for i, f in zip(owners, frames)]
            features = self._encode_frames(torch.cat(frames), torch.cat(frame_masks))
            for i, chunk in zip(owners, features.split([f.shape[0] for f in frames])):
                out[i] = chunk
        return out

    def _encode_frames(self, pv: Tensor, pm: Tensor) -> Tensor:
        step = self.max_image_frames
        return torch.cat([self.model.model.get_image_features(pv[i:i + step], pm[i:i + step])
                          for i in range(0, pv.shape[0], step)])

    # ---- prefill ------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], features: list[Tensor | None], slots: list[int],
                prefixes: list[int] | None = None, scored: list[int] | None = None) -> tuple[Tensor, list]:
        """Packs the prompts into one row, fills their slots; returns last-position logits (n, V) float32
        and, for each prompt i with scored[i] > 0, the log p of its last scored[i] tokens (each given
        those before it; a float32 tensor, else None); those tokens must be run, not in its prefix.
        prefixes[i] > 0: the first prefixes[i] positions of prompt i are already in its slot; only
        the rest is run (features[i] is None when its image tokens are all among the cached)."""
        device = self.cache.k.device
        prefixes = prefixes or [0] * len(prompts)
        prompts = [p[start:] for p, start in zip(prompts, prefixes)]
        lengths = [len(p) for p in prompts]
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=device)[None]
        positions = torch.cat([torch.arange(p, p + n, device=device) for p, n in zip(prefixes, lengths)])[None]
        embeds = self.text.embed_tokens(ids)
        feats = [f for f in features if f is not None]
        if feats:
            flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])       # tile sizes may differ
            embeds = self.model.model.merge_image_features(ids, embeds, flat)
        hidden = self.text(inputs_embeds=embeds, position_ids=positions,
                           attention=PackedPrefillAttention(self.cache, slots, lengths,
                                                            batched=self.batched_prefill, prefixes=prefixes))
        ends = list(itertools.accumulate(lengths))          # on the host: no sync to find a scored prompt's end
        scored_logprobs = [None if not n else self._scored_logprobs(hidden[0], ids[0], end - 1, n)
                           for end, n in zip(ends, scored or [0] * len(prompts))]
        last = torch.tensor(ends, device=device) - 1
        return self.model.lm_head(hidden[0, last]).float(), scored_logprobs

    def _scored_logprobs(self, hidden: Tensor, ids: Tensor, last: int, n: int, chunk: int = 256) -> Tensor:
        """log p of the n tokens ending at position `last`, each from the logits before it, a chunk of
        positions at a time (a long text's logits over a large vocabulary would take gigabytes)."""
        out = []
        for start in range(last - n, last, chunk):
            before = torch.arange(start, min(start + chunk, last), device=hidden.device)
            log_p = self.model.lm_head(hidden[before]).float().log_softmax(-1)
            out.append(log_p.gather(1, ids[before + 1, None])[:, 0])
        return torch.cat(out)

    # ---- decode ----------------------------------------------------------------------------
    def _decode_step(self, batch: int, kv_len: int) -> Tensor:
        args = (self.model, self.cache.k, self.cache.v, self.tokens[:batch], self.positions[:batch], kv_len)
        if self.compile:
            try:
                return compiled_decode()(*args)
            except Exception as e:   # a compiler failure (no triton, old GPU) must not stop generation
                warnings.warn(f"torch.compile of the decode step failed, running it eagerly: {e!r}")
                self.compile = False
        return decode_logits(*args)

    def decode_rows(self, n: int) -> int:
        """Rows a decode step of n sequences runs: a power of two, at most the slots; compiled, at least
        two, since torch.compile specialises a size of one (a second compile of the whole step, ~85 s
        on an H200, when a replica's last rows drain). A spare row costs ~nothing."""
        return pow2_bucket(n, self.min_decode_rows, self.cache.num_slots)

    @torch.inference_mode()
    def decode(self, batch: int, kv_len: int) -> Tensor:
        """Logits (batch, V) float32 for slots 0..batch-1 given self.tokens / self.positions."""
        if not self.use_cuda_graphs:
            return self._decode_step(batch, kv_len)
        key = (batch, kv_len)
        if key not in self.graphs:
            self.graphs[key] = self._capture(batch, kv_len)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits

    def _capture(self, batch: int, kv_len: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        # Warm up on a side stream (lazy inits, workspace allocations), then capture into a shared pool.
        # The warm-up writes the same K/V the real step will write at the same positions: harmless.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._decode_step(batch, kv_len)
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the engine may run in a thread of its own (EngineLoop) while other threads
        # move new requests' pixels to the device; "global" would fail their CUDA calls, or this capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self._decode_step(batch, kv_len)
        return graph, logits
