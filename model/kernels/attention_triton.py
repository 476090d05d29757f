"""The decode-attention kernels of model.kernels.attention (this module imports triton; that one
imports it only when a kernel runs)."""
import triton
import triton.language as tl


@triton.jit
def rotated(ptr, at, dims, cos, sin, mask, HALF: tl.constexpr):
    """x * cos + rotate_half(x) * sin in float32 (rounded once by the caller, as the compiled step)."""
    x = tl.load(ptr + at + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    partner = tl.load(ptr + at + tl.where(dims < HALF, dims + HALF, dims - HALF)[None, :], mask=mask,
                      other=0.0).to(tl.float32)
    return x * cos[None, :] + tl.where(dims < HALF, -partner, partner) * sin[None, :]


@triton.jit
def split_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pos_ptr, out_ptr, part_ptr, stat_ptr,
                 kv_len, chunk, scale, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                 stride_slot, stride_head, stride_pos, splits,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr,
                 BLOCK_L: tl.constexpr, DIRECT: tl.constexpr, UPCAST: tl.constexpr):
    row, kv_head, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    dtype = kc_ptr.dtype.element_ty
    group, dims = tl.arange(0, G_PAD), tl.arange(0, D_PAD)
    heads = kv_head * GROUP + group
    in_dims = (dims < HEAD_DIM)[None, :]
    real = (group[:, None] < GROUP) & in_dims
    cos = tl.load(cos_ptr + row * HEAD_DIM + dims, mask=dims < HEAD_DIM, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + row * HEAD_DIM + dims, mask=dims < HEAD_DIM, other=0.0).to(tl.float32)
    q = rotated(q_ptr, (row * stride_qb + heads * stride_qh)[:, None], dims, cos, sin, real, HEAD_DIM // 2)
    q = q.to(dtype)
    # the row's new key and value (1, D_PAD): attended from registers, written to the cache below
    k_new = rotated(k_ptr, row * stride_kb + kv_head * stride_kh, dims, cos, sin, in_dims, HEAD_DIM // 2).to(dtype)
    v_new = tl.load(v_ptr + row * stride_vb + kv_head * stride_vh + dims[None, :], mask=in_dims, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    position = tl.load(pos_ptr + row).to(tl.int32)
    start, stop = split * chunk, tl.minimum(split * chunk + chunk, kv_len)
    cache = row * stride_slot + kv_head * stride_head
    best = tl.full((G_PAD,), float("-inf"), tl.float32)
    total = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D_PAD), tl.float32)
    cached = tl.minimum(stop, position)       # keys before the row's new one: from the cache
    for first in range(start, cached, BLOCK_L):
        keys_at = first + tl.arange(0, BLOCK_L)
        live = keys_at < cached
        where = cache + keys_at[:, None] * stride_pos + dims[None, :]
        k = tl.load(kc_ptr + where, mask=live[:, None] & in_dims, other=0.0)
        v = tl.load(vc_ptr + where, mask=live[:, None] & in_dims, other=0.0)
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
    owns = (position >= start) & (position < stop)       # the split whose keys hold the new position
    # past the step's keys (a free slot's row) nobody attends to it; split 0 still writes it
    writes = owns | ((split == 0) & (position >= kv_len))
    new_at = cache + position * stride_pos + dims[None, :]
    written = dims[None, :] < tl.where(writes, HEAD_DIM, 0)      # (a scalar & a tile: int in the interpreter)
    tl.store(kc_ptr + new_at, k_new, mask=written)
    tl.store(vc_ptr + new_at, v_new, mask=written)
    if owns:
        s = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), 1) * scale
        new_best = tl.maximum(best, s)
        fade = tl.exp(best - new_best)
        p = tl.exp(s - new_best)
        total = total * fade + p
        if not UPCAST:      # as the cached keys' dot: probabilities in the values' dtype
            p = p.to(dtype).to(tl.float32)
        acc = acc * fade[:, None] + p[:, None] * v_new.to(tl.float32)
        best = new_best
    heads_total = tl.num_programs(1) * GROUP
    if DIRECT:      # out is contiguous (B, Hq, hd)
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
