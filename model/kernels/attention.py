"""Decode attention over the engine's KV cache as one Triton kernel a layer (two past `KEYS_PER_SPLIT`
keys), RoPE and the new token's cache write included.

The compiled torch step is five or six kernels a layer (q's and k's RoPE, the K and V cache writes,
scores GEMM, masked softmax, values GEMM) over the keys of the step's kv bucket, masked ones included.
Here one program per (row, kv head, split of the keys) rotates the row's q and new k, takes that kv
head's query heads together (GQA: each key and value read once for the group) through an online
softmax over the row's own cached keys and its new key (from registers), and the program whose keys
hold the new position writes the new K and V into the cache; a long context is split across
programs, their partial sums merged by a second, small kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .runtime import interpreting, kernel_can_run, switched_on

# model.engine.kv_cache.DecodeAttention's switch: off (unless IDEFICS3_KERNELS lists it) until a GPU
# measures it faster.
enabled = switched_on("attention")
BLOCK_L = 64         # keys a loop iteration takes
KEYS_PER_SPLIT = 512
MAX_SPLITS = 16


def attend_torch(q: Tensor, k_cache: Tensor, v_cache: Tensor, layer: int, kv_len: int, visible: Tensor) -> Tensor:
    """q (B, Hq, hd): row b's heads over the keys `visible` (B, kv_len) marks in slot b, layer `layer`,
    of caches (layers, slots, Hkv, max_len, hd). -> (B, Hq, hd)."""
    b, hq, hd = q.shape
    # On CPU in float32 whatever the caches hold: torch has no fast bfloat16 batched matmul there at
    # these shapes (a layer of SmolVLM-256M at batch 8: 251 us in bfloat16, 179 us upcast), and no
    # rounding of scores or probabilities. On a GPU the upcast copies would multiply the cache reads.
    work = torch.float32 if q.device.type == "cpu" else q.dtype
    keys = k_cache[layer, :b, :, :kv_len].to(work)                         # (B, Hkv, L, hd)
    values = v_cache[layer, :b, :, :kv_len].to(work)
    hkv = keys.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, hd).to(work)                        # group query heads per kv head
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * hd ** -0.5
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(work)
    return torch.matmul(probs, values).to(q.dtype).reshape(b, hq, hd)


def rope_write_attend_torch(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor,
                            v_cache: Tensor, layer: int, positions: Tensor, kv_len: int) -> Tensor:
    """What the kernel does, in torch: q (B, Hq, hd), k/v (B, Hkv, hd) of each row's new token, cos/sin
    (B, hd); RoPE, k and v written at the rows' positions of slots 0..B-1, attention. -> (B, Hq, hd)."""
    from ..llama import apply_rope      # llama imports this package

    rows = torch.arange(q.shape[0], device=q.device)
    layers = torch.full_like(rows, layer)
    k_cache[layers, rows, :, positions] = apply_rope(k, cos[:, None], sin[:, None])
    v_cache[layers, rows, :, positions] = v
    visible = torch.arange(kv_len, device=q.device)[None, :] <= positions[:, None]
    return attend_torch(apply_rope(q, cos[:, None], sin[:, None]), k_cache, v_cache, layer, kv_len, visible)


def runs_kernel(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    return (kernel_can_run(q) and q.dtype == k_cache.dtype == v_cache.dtype and k_cache.stride(-1) == 1
            and k_cache.stride() == v_cache.stride())


def _inner_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("idefics3::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                     layer: int, positions: Tensor, kv_len: int) -> Tensor:
    """rope_write_attend_torch, by the kernel where it runs. It writes into the caches themselves (no
    copy of them under torch.compile: tests/model/kernels_interpreted.py checks the graph)."""
    if not runs_kernel(q, k_cache, v_cache):
        return rope_write_attend_torch(q, k, v, cos, sin, k_cache, v_cache, layer, positions, kv_len)
    q, k, v = (_inner_contiguous(t) for t in (q, k, v))
    return launch(q, k, v, cos.contiguous(), sin.contiguous(), k_cache[layer], v_cache[layer], positions, kv_len)


@decode_attention.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, layer, positions, kv_len) -> Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def split_count(kv_len: int) -> int:
    return max(1, min(MAX_SPLITS, -(-kv_len // KEYS_PER_SPLIT)))


def pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def launch(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor,
           positions: Tensor, kv_len: int, splits: int | None = None) -> Tensor:
    """keys/values: one layer's (slots, Hkv, max_len, hd) caches; q, k, v inner-contiguous, cos/sin contiguous."""
    from .attention_triton import merge_kernel, split_kernel      # imports triton: only once a kernel runs

    b, hq, hd = q.shape
    hkv = keys.shape[1]
    splits = splits or split_count(kv_len)
    chunk = -(-kv_len // (splits * BLOCK_L)) * BLOCK_L
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    direct = splits == 1
    parts = out if direct else q.new_empty(b, splits, hq, hd, dtype=torch.float32)
    stats = out if direct else q.new_empty(b, splits, hq, 2, dtype=torch.float32)
    shapes = dict(GROUP=hq // hkv, HEAD_DIM=hd, G_PAD=pow2_at_least_16(hq // hkv), D_PAD=pow2_at_least_16(hd),
                  BLOCK_L=BLOCK_L, UPCAST=interpreting() or q.dtype == torch.float32)
    split_kernel[(b, hkv, splits)](
        q, k, v, cos, sin, keys, values, positions, out, parts, stats, kv_len, chunk, hd ** -0.5,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2), splits, DIRECT=direct, **shapes)
    if not direct:
        merge_kernel[(b, hq)](parts, stats, out, splits, hd, SPLITS_PAD=max(2, 1 << (splits - 1).bit_length()),
                              D_PAD=shapes["D_PAD"])
    return out
