"""A preallocated KV cache of slots, and the attention backends that read and write it.

Layout: k, v = (layers, slots, kv_heads, max_len + 1 spare, head_dim). A request owns one slot for its
whole life; position p of its sequence lives at [:, slot, :, p]. Nothing grows: prefill writes rows
0..L-1 of a slot, each decode step writes one row per slot, and a finished request's slot is
simply handed to the next one (its stale rows are masked by length, then overwritten).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import attention as kernels_attention
from ..kernels.runtime import on_kernel_device


@dataclass(frozen=True)
class CachePlan:
    max_len: int        # positions a slot holds
    slots: int          # sequences scheduled at once
    rows: int           # slots allocated: a spare past `slots` where a step must run more rows


def plan_cache(need_len: int, old_len: int, cap: int, max_slots: int, room: Callable[[int], int],
               min_rows: int = 1) -> CachePlan:
    """The cache for sequences of need_len positions (multiples of 256 where one fits, at most
    `cap`), as many slots as `room(max_len)` sequences fit, at most max_slots. A cache that had to grow
    (a stream of requests must drain first) is likely to grow again: one that had old_len positions
    doubles instead, if that costs no slot. `rows`: at least min_rows where the budget has room for them."""
    max_len = min(-(-need_len // 256) * 256, cap)
    if room(max_len) < 1 <= room(need_len):     # a set budget holds the sequence, if not its rounding
        max_len = need_len
    fits = room(max_len)
    slots = min(max_slots, fits)
    ahead = min(2 * old_len, cap)
    if ahead > max_len:
        fits_ahead = room(ahead)
        if min(max_slots, fits_ahead) == slots:
            max_len, fits = ahead, fits_ahead
    return CachePlan(max_len, slots, max(slots, min(min_rows, fits)))


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        # One spare position past max_len, never read: a decode step then never slices the whole
        # axis, which torch.compile specialises (kv_len == the axis: a second compile of the step).
        shape = (num_layers, num_slots, num_kv_heads, max_len + 1, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots, self.max_len = num_slots, max_len

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Rows 0..length-1 of slot `source`, every layer, into slot `target`."""
        if source != target:
            self.k[:, target, :, :length] = self.k[:, source, :, :length]
            self.v[:, target, :, :length] = self.v[:, source, :, :length]

    def move_rows(self, moves: list[tuple[list[int], list[int], int, int]]) -> None:
        """For each move (targets, sources, start, end): rows start..end-1 of slot sources[i] into slot
        targets[i], every layer; all read before any is written, in one gather (beam search: each
        beam takes its parent's rows)."""
        runs = [(t, s, start, end) for targets, sources, start, end in moves for t, s in zip(targets, sources)
                if t != s and end > start]
        if not runs:
            return
        lengths = torch.tensor([end - start for *_, start, end in runs])
        offsets = torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
        positions = offsets + torch.repeat_interleave(torch.tensor([start for *_, start, _ in runs]), lengths)
        into, source = (torch.repeat_interleave(torch.tensor([run[i] for run in runs]), lengths) for i in (0, 1))
        into, source, positions = (x.to(self.k.device) for x in (into, source, positions))
        self.k[:, into, :, positions] = self.k[:, source, :, positions]
        self.v[:, into, :, positions] = self.v[:, source, :, positions]

    def clear_slot(self, slot: int) -> None:
        self.k[:, slot].zero_()
        self.v[:, slot].zero_()

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8


def _expand_kv(x: Tensor, groups: int) -> Tensor:
    """GQA: kv head j serves query heads j*g .. j*g+g-1."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


class PackedPrefillAttention:
    """Prefill of several prompts packed end to end in one row (1, T): no padding in the projections.

    All segments' post-RoPE K/V go to their slots in one indexed write per layer; each segment
    attends causally within itself only: one attention call per segment, or (`batched`) per group
    of segments gathered into a right-padded batch (`padded_groups`). A causal query never sees the
    padding after its own segment, so both are exact. Batched trades padding and gathers for far
    fewer kernels: the better trade on a GPU, where a prefill of many short prompts on a small
    model is bound by kernel launches; on a CPU the kernels' work dominates, and padding adds to it.

    A segment may continue a prompt whose first `prefixes[i]` positions are already in its slot
    (model.engine.prefix_cache): it holds only the rest, and attends over its slot's rows.
    """

    def __init__(self, cache: KVCache, slots: list[int], lengths: list[int], batched: bool = False,
                 prefixes: list[int] | None = None) -> None:
        self.cache = cache
        prefixes = prefixes or [0] * len(lengths)
        device = cache.k.device
        self.token_slot = torch.repeat_interleave(torch.tensor(slots, device=device),
                                                  torch.tensor(lengths, device=device))
        self.token_pos = torch.cat([torch.arange(p, p + n, device=device) for p, n in zip(prefixes, lengths)])
        self.whole_row = len(lengths) == 1 and prefixes[0] == 0
        starts = [0, *itertools.accumulate(lengths)]
        fresh = [i for i, p in enumerate(prefixes) if p == 0]
        continued = [i for i, p in enumerate(prefixes) if p > 0]

        def pick(values: list[int], group: list[int]) -> list[int]:
            return [values[i] for i in group]

        def groups_of(indices: list[int], sizes: list[int]) -> list[list[int]]:
            return [pick(indices, group) for group in padded_groups(sizes)] if batched else [[i] for i in indices]

        self.batches = [SegmentBatch(pick(starts, g), pick(lengths, g), device)
                        for g in groups_of(fresh, pick(lengths, fresh))]
        self.batches += [PrefixedSegments(cache, pick(starts, g), pick(lengths, g), pick(slots, g), pick(prefixes, g))
                         for g in groups_of(continued, [prefixes[i] + lengths[i] for i in continued])]

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.cache.k[layer_idx, self.token_slot, :, self.token_pos] = k[0].transpose(0, 1)
        self.cache.v[layer_idx, self.token_slot, :, self.token_pos] = v[0].transpose(0, 1)
        groups = q.shape[1] // k.shape[1]
        if self.whole_row:
            return F.scaled_dot_product_attention(q, _expand_kv(k, groups), _expand_kv(v, groups), is_causal=True)
        out = torch.empty_like(q)
        for batch in self.batches:
            batch.attend(layer_idx, q, k, v, groups, out)
        return out


def padded_groups(lengths: list[int], waste: float = 2.0) -> list[list[int]]:
    """Segments (indices into `lengths`) grouped longest first, so that each group padded to its
    longest member holds at most `waste` times its real tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    real = 0
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= waste * (real + lengths[i]):
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups


class SegmentBatch:
    """Some segments of a packed row as a right-padded batch (n, Lmax): where to gather their
    tokens from, and which padded positions are real (pads read the segment's first token)."""

    def __init__(self, starts: list[int], lengths: list[int], device: torch.device) -> None:
        self.width = max(lengths)
        self.single = slice(starts[0], starts[0] + lengths[0]) if len(lengths) == 1 else None
        columns = torch.arange(self.width)
        real = columns[None, :] < torch.tensor(lengths)[:, None]                            # (n, Lmax)
        source = torch.tensor(starts)[:, None] + columns[None, :] * real
        self.source = source.to(device)
        self.real = real.flatten().nonzero()[:, 0].to(device)
        self.targets = source.flatten()[real.flatten()].to(device)

    def gather(self, x: Tensor) -> Tensor:
        """(1, H, T, hd) -> (n, H, Lmax, hd); one segment is a view, not a copy."""
        if self.single is not None:
            return x[:, :, self.single]
        return x[0][:, self.source].transpose(0, 1)

    def scatter(self, attended: Tensor, out: Tensor) -> None:
        """The real rows of (n, H, Lmax, hd) into their places in (1, H, T, hd) `out`."""
        if self.single is not None:
            out[:, :, self.single] = attended
        else:
            out[0][:, self.targets] = attended.transpose(0, 1).flatten(1, 2)[:, self.real]

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, groups: int, out: Tensor) -> None:
        """Causal attention of these segments of (1, H, T, hd) q and (1, H / groups, T, hd) k/v,
        written into `out`'s rows."""
        attended = F.scaled_dot_product_attention(self.gather(q), _expand_kv(self.gather(k), groups),
                                                  _expand_kv(self.gather(v), groups), is_causal=True)
        self.scatter(attended, out)


class PrefixedSegments:
    """Segments that continue prompts whose first positions are already cached in their slots:
    query i of a segment with prefix p sees its slot's rows 0..p+i, read back from the cache."""

    def __init__(self, cache: KVCache, starts: list[int], lengths: list[int], slots: list[int],
                 prefixes: list[int]) -> None:
        device = cache.k.device
        self.cache = cache
        self.segments = segments = SegmentBatch(starts, lengths, device)
        # One slot: a view of its rows; several: gathered.
        self.slots = slice(slots[0], slots[0] + 1) if len(slots) == 1 else torch.tensor(slots, device=device)
        # Keys up to the longest real row; a pad query may see all of them (its output is dropped).
        self.num_keys = max(p + n for p, n in zip(prefixes, lengths))
        columns = torch.arange(segments.width, device=device)
        last_key = torch.tensor(prefixes, device=device)[:, None] + columns[None, :]           # (n, Lmax)
        keys = torch.arange(self.num_keys, device=device)
        self.mask = (keys[None, None, :] <= last_key[:, :, None])[:, None]                     # (n, 1, Lmax, K)

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, groups: int, out: Tensor) -> None:
        """As SegmentBatch.attend, with keys and values read from the slots (k/v are in them by now)."""
        keys = self.cache.k[layer_idx][self.slots, :, :self.num_keys]                          # (n, Hkv, K, hd)
        values = self.cache.v[layer_idx][self.slots, :, :self.num_keys]
        attended = F.scaled_dot_product_attention(self.segments.gather(q), _expand_kv(keys, groups),
                                                  _expand_kv(values, groups), attn_mask=self.mask)
        self.segments.scatter(attended, out)


class DecodeAttention:
    """One new token for each of slots 0..B-1, attending over the first kv_len rows of its slot.

    k_cache / v_cache: (layers, slots, Hkv, max_len, hd); positions (B,) is the device tensor of each
    row's new position (= its cached length); rows of free slots are computed and ignored. Static
    shapes for a given (B, kv_len): CUDA-graph and torch.compile friendly.
    """
    few_rows = True      # model.llama.AttentionBackend: the layers may fuse their elementwise work

    def __init__(self, k_cache: Tensor, v_cache: Tensor, positions: Tensor, kv_len: int) -> None:
        self.k_cache, self.v_cache, self.positions, self.kv_len = k_cache, v_cache, positions, kv_len
        self.rows = torch.arange(positions.shape[0], device=positions.device)
        self.takes_rope = kernels_attention.enabled and on_kernel_device(positions)
        if not self.takes_rope:
            self.visible = torch.arange(kv_len, device=positions.device)[None, :] <= positions[:, None]

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor] | None = None
                 ) -> Tensor:
        b, hq, _, hd = q.shape
        if rope is not None:        # takes_rope: RoPE, the cache writes and attention in one kernel
            cos, sin = (t[:, 0, 0] for t in rope)
            out = kernels_attention.decode_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], cos, sin, self.k_cache,
                                                     self.v_cache, layer_idx, self.positions, self.kv_len)
            return out.reshape(b, hq, 1, hd)
        # Indexed writes into the whole cache, not into its layer view: under torch.compile a write
        # through a view of an input is functionalised into a copy of the whole layer slab (all
        # slots, all positions) per layer; a write into the input itself is done in place.
        layer = torch.full_like(self.rows, layer_idx)
        self.k_cache[layer, self.rows, :, self.positions] = k[:, :, 0]
        self.v_cache[layer, self.rows, :, self.positions] = v[:, :, 0]
        out = kernels_attention.attend_torch(q[:, :, 0], self.k_cache, self.v_cache, layer_idx, self.kv_len,
                                             self.visible)
        return out.reshape(b, hq, 1, hd)


class PaddedCacheAttention:
    """The reference's left-padded batch (generate()): row b's K/V at columns 0..T-1 of slot b.

    key_mask (B, T_max) marks real tokens; a query sees key j iff j <= its column and key_mask[j].
    Fully masked query rows (left pads) give 0, as the reference's SDPA does.
    """

    def __init__(self, cache: KVCache, key_mask: Tensor, start: int) -> None:
        self.cache, self.key_mask, self.start = cache, key_mask, start

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b, _, length, _ = q.shape
        end = self.start + length
        self.cache.k[layer_idx, :b, :, self.start:end] = k
        self.cache.v[layer_idx, :b, :, self.start:end] = v
        groups = q.shape[1] // k.shape[1]
        keys = _expand_kv(self.cache.k[layer_idx, :b, :, :end], groups)
        values = _expand_kv(self.cache.v[layer_idx, :b, :, :end], groups)
        qpos = torch.arange(self.start, end, device=q.device)[:, None]
        causal = torch.arange(end, device=q.device)[None, :] <= qpos                 # (L, end)
        mask = causal[None, None] & self.key_mask[:, None, None, :end].bool()        # (B, 1, L, end)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
