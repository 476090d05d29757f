"""Decode attention over the engine's KV cache as one Triton kernel (two past `KEYS_PER_SPLIT` keys).

The torch step is three kernels a layer (scores GEMM, masked softmax, values GEMM) over the keys of
the step's kv bucket, masked ones included. Here one program per (row, kv head, split of the keys)
takes that head's query heads together (GQA: each key and value read once for the group) through
an online softmax over the row's own visible keys only; a long context is split across programs,
their partial sums merged by a second, small kernel.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .runtime import DTYPES, interpreting, triton_available

enabled = False      # model.engine.kv_cache.DecodeAttention's switch; on once measured on a GPU
BLOCK_L = 64         # keys a loop iteration takes
KEYS_PER_SPLIT = 512
MAX_SPLITS = 16


def attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, layer: int, positions: Tensor, kv_len: int,
           visible: Tensor) -> Tensor:
    """q (B, Hq, hd): row b's heads over keys 0..positions[b] (< kv_len) of slot b, layer `layer`, of
    caches (layers, slots, Hkv, max_len, hd); `visible` (B, kv_len) marks them. -> (B, Hq, hd)."""
    if enabled and (q.is_cuda or interpreting()):
        return decode_attention(q, k_cache, v_cache, layer, positions, kv_len)
    return attend_torch(q, k_cache, v_cache, layer, kv_len, visible)


def attend_torch(q: Tensor, k_cache: Tensor, v_cache: Tensor, layer: int, kv_len: int, visible: Tensor) -> Tensor:
    b, hq, hd = q.shape
    keys = k_cache[layer, :b, :, :kv_len]                                  # (B, Hkv, L, hd)
    values = v_cache[layer, :b, :, :kv_len]
    hkv = keys.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, hd)                                 # group query heads per kv head
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * hd ** -0.5
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(values.dtype)
    return torch.matmul(probs, values).reshape(b, hq, hd)


def runs_kernel(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    return ((q.is_cuda or interpreting()) and triton_available() and q.dtype == k_cache.dtype == v_cache.dtype
            and q.dtype in DTYPES and k_cache.stride(-1) == 1
            and k_cache.stride() == v_cache.stride())


@torch.library.custom_op("idefics3::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, layer: int, positions: Tensor,
                     kv_len: int) -> Tensor:
    if not runs_kernel(q, k_cache, v_cache):
        visible = torch.arange(kv_len, device=q.device)[None, :] <= positions[:, None]
        return attend_torch(q, k_cache, v_cache, layer, kv_len, visible)
    return launch(q.contiguous(), k_cache[layer], v_cache[layer], positions, kv_len)


@decode_attention.register_fake
def _(q: Tensor, k_cache: Tensor, v_cache: Tensor, layer: int, positions: Tensor, kv_len: int) -> Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def split_count(kv_len: int) -> int:
    return max(1, min(MAX_SPLITS, -(-kv_len // KEYS_PER_SPLIT)))


def pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def launch(q: Tensor, keys: Tensor, values: Tensor, positions: Tensor, kv_len: int,
           splits: int | None = None) -> Tensor:
    """keys/values: one layer's (slots, Hkv, max_len, hd) caches."""
    b, hq, hd = q.shape
    hkv = keys.shape[1]
    splits = splits or split_count(kv_len)
    chunk = -(-kv_len // (splits * BLOCK_L)) * BLOCK_L
    out = torch.empty_like(q)
    direct = splits == 1
    parts = out if direct else q.new_empty(b, splits, hq, hd, dtype=torch.float32)
    stats = out if direct else q.new_empty(b, splits, hq, 2, dtype=torch.float32)
    shapes = dict(GROUP=hq // hkv, HEAD_DIM=hd, G_PAD=pow2_at_least_16(hq // hkv), D_PAD=pow2_at_least_16(hd),
                  BLOCK_L=BLOCK_L, UPCAST=interpreting() or q.dtype == torch.float32)
    kernels()[0][(b, hkv, splits)](
        q, keys, values, positions, out, parts, stats, kv_len, chunk, hd ** -0.5,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), splits,
        DIRECT=direct, **shapes)
    if not direct:
        kernels()[1][(b, hq)](parts, stats, out, splits, hd, SPLITS_PAD=max(2, 1 << (splits - 1).bit_length()),
                              D_PAD=shapes["D_PAD"])
    return out


@functools.cache
def kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, part_ptr, stat_ptr, kv_len, chunk, scale,
                     stride_qb, stride_qh, stride_slot, stride_head, stride_pos, splits,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr,
                     BLOCK_L: tl.constexpr, DIRECT: tl.constexpr, UPCAST: tl.constexpr):
        row, kv_head, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        group = tl.arange(0, G_PAD)
        dims = tl.arange(0, D_PAD)
        heads = kv_head * GROUP + group
        real = (group[:, None] < GROUP) & (dims[None, :] < HEAD_DIM)
        q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=real, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        seen = tl.minimum(tl.load(pos_ptr + row).to(tl.int32) + 1, kv_len)      # the row's visible keys
        start, stop = split * chunk, tl.minimum(split * chunk + chunk, seen)
        cache = row * stride_slot + kv_head * stride_head
        best = tl.full((G_PAD,), float("-inf"), tl.float32)
        total = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D_PAD), tl.float32)
        for first in range(start, stop, BLOCK_L):
            keys_at = first + tl.arange(0, BLOCK_L)
            live = keys_at < stop
            where = cache + keys_at[:, None] * stride_pos + dims[None, :]
            tile_mask = live[:, None] & (dims[None, :] < HEAD_DIM)
            k = tl.load(k_ptr + where, mask=tile_mask, other=0.0)
            v = tl.load(v_ptr + where, mask=tile_mask, other=0.0)
            if UPCAST:
                k, v = k.to(tl.float32), v.to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(live[None, :], s, float("-inf"))
            new_best = tl.maximum(best, tl.max(s, 1))
            fade = tl.exp(best - new_best)
            p = tl.exp(s - new_best[:, None])
            total = total * fade + tl.sum(p, 1)
            if UPCAST:
                acc = acc * fade[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * fade[:, None] + tl.dot(p.to(v.dtype), v)
            best = new_best
        heads_total = tl.num_programs(1) * GROUP
        if DIRECT:      # q and out are contiguous (B, Hq, hd)
            out = out_ptr + (row * heads_total + heads[:, None]) * HEAD_DIM + dims[None, :]
            tl.store(out, (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=real)
        else:           # partial sums (B, splits, Hq, hd) and their (max, sum) (B, splits, Hq, 2)
            at = (row * splits + split) * heads_total + heads
            tl.store(part_ptr + at[:, None] * HEAD_DIM + dims[None, :], acc, mask=real)
            tl.store(stat_ptr + at * 2, best, mask=group < GROUP)
            tl.store(stat_ptr + at * 2 + 1, total, mask=group < GROUP)

    @triton.jit
    def merge_kernel(part_ptr, stat_ptr, out_ptr, splits, head_dim, SPLITS_PAD: tl.constexpr, D_PAD: tl.constexpr):
        row, head, heads_total = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.num_programs(1)
        split, dims = tl.arange(0, SPLITS_PAD), tl.arange(0, D_PAD)
        at = (row * splits + split) * heads_total + head
        best = tl.load(stat_ptr + at * 2, mask=split < splits, other=float("-inf"))
        total = tl.load(stat_ptr + at * 2 + 1, mask=split < splits, other=0.0)
        weight = tl.exp(best - tl.max(best, 0))          # a split past the row's keys: -inf, weight 0
        part = tl.load(part_ptr + at[:, None] * head_dim + dims[None, :],
                       mask=(split[:, None] < splits) & (dims[None, :] < head_dim), other=0.0)
        merged = tl.sum(part * weight[:, None], 0) / tl.sum(total * weight, 0)
        tl.store(out_ptr + (row * heads_total + head) * head_dim + dims, merged.to(out_ptr.dtype.element_ty),
                 mask=dims < head_dim)

    return split_kernel, merge_kernel
