"""The few-rows projection kernel of model.kernels.skinny (this module imports triton; that one
imports it only when a kernel runs), with the prologue and epilogue of model.kernels.fused."""
import triton
import triton.language as tl


@triton.jit
def input_tile(x_ptr, norm_ptr, up_ptr, rows, ks, rstd, M, K, stride_x, stride_up,
               EVEN_K: tl.constexpr, NORM: tl.constexpr, ACT: tl.constexpr):
    in_k = (ks < K) | EVEN_K             # no K mask where BLOCK_K divides K: unmasked, vector loads
    mask = (rows[:, None] < M) & in_k[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=mask, other=0.0)
    if NORM:        # each step rounded where the reference's RMSNorm rounds (before the weight)
        x = (x.to(tl.float32) * rstd[:, None]).to(x.dtype)
        norm = tl.load(norm_ptr + ks, mask=in_k, other=0.0)
        x = (norm.to(tl.float32)[None, :] * x.to(tl.float32)).to(x.dtype)
    if ACT:         # silu(gate) * up, rounded after each as two torch ops are
        gate = x.to(tl.float32)
        x = (gate * tl.sigmoid(gate)).to(x.dtype)
        up = tl.load(up_ptr + rows[:, None] * stride_up + ks[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) * up.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def inverse_rms(x_ptr, rows, M, K, stride_x, eps, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN_K: tl.constexpr):
    squares = tl.zeros((ROWS,), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):      # x's few rows: a second read, from L2
        ks = start + tl.arange(0, BLOCK_K)
        in_k = (ks < K) | EVEN_K
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :],
                    mask=(rows[:, None] < M) & in_k[None, :], other=0.0).to(tl.float32)
        squares += tl.sum(x * x, axis=1)
    return tl.rsqrt(squares / K + eps)


@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def skinny_kernel(x_ptr, w_ptr, out_ptr, bias_ptr, norm_ptr, up_ptr, res_ptr, M, N, K,
                  stride_x, stride_w, stride_up, stride_res, eps,
                  ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
                  NORM: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr):
    rows = tl.arange(0, ROWS)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rstd = tl.zeros((ROWS,), dtype=tl.float32)
    if NORM:
        rstd = inverse_rms(x_ptr, rows, M, K, stride_x, eps, ROWS, BLOCK_K, EVEN_K)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        x = input_tile(x_ptr, norm_ptr, up_ptr, rows, ks, rstd, M, K, stride_x, stride_up, EVEN_K, NORM, ACT)
        w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :],
                    mask=(cols[:, None] < N) & ((ks < K) | EVEN_K)[None, :], other=0.0)
        if UPCAST:      # float32 in full precision (not tf32); the interpreter's bf16 dot is wrong
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    in_out = (rows[:, None] < M) & (cols[None, :] < N)
    if RESIDUAL:    # the projection rounded, then added: as `residual + linear(x)` in torch
        residual = tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=in_out, other=0.0)
        acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32) + residual.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=in_out)


@triton.jit
def prologue_kernel(x_ptr, norm_ptr, up_ptr, out_ptr, M, K, stride_x, stride_up, eps,
                    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                    NORM: tl.constexpr, ACT: tl.constexpr):
    """The prologue alone, written out (M, K): for more rows than skinny_kernel holds, before cuBLAS."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rstd = tl.zeros((ROWS,), dtype=tl.float32)
    if NORM:
        rstd = inverse_rms(x_ptr, rows, M, K, stride_x, eps, ROWS, BLOCK_K, EVEN_K)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        x = input_tile(x_ptr, norm_ptr, up_ptr, rows, ks, rstd, M, K, stride_x, stride_up, EVEN_K, NORM, ACT)
        tl.store(out_ptr + rows[:, None] * K + ks[None, :], x, mask=(rows[:, None] < M) & (ks < K)[None, :])
