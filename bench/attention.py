"""Benchmark: decode attention over the engine's KV cache, the torch step (compiled, as in the engine's
decode step: RoPE of q and k, the K/V cache writes, scores GEMM, masked softmax, values GEMM) against
model.kernels.attention's kernel (all of it in one), at the 8B's heads (32 query heads, 8 kv heads,
head_dim 128), every layer of a 32-layer cache in turn (on CUDA one captured graph), every row at the
last position (both read the same keys):

    python bench/attention.py --device cuda --rows 2 32 --kv 256 1024 4096
    python bench/attention.py --device cuda --rows 1 2 --kv 256 512 --splits 1 2 4 8   # splits forced

One line per (rows, kv length): microseconds a layer for both and the kernel's splits; JSON rows
with --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.skinny import pass_seconds  # noqa: E402
from model.kernels import attention  # noqa: E402


def measure(rows: int, kv_len: int, args: argparse.Namespace) -> dict:
    shape = (args.layers, rows, args.kv_heads, kv_len + 1, args.head_dim)
    k_cache = torch.randn(shape, dtype=args.dtype, device=args.device)
    v_cache = torch.randn_like(k_cache)
    make = dict(dtype=args.dtype, device=args.device)
    q = torch.randn(rows, args.heads, args.head_dim, **make)
    k, v = (torch.randn(rows, args.kv_heads, args.head_dim, **make) for _ in range(2))
    cos, sin = torch.rand(rows, args.head_dim, **make), torch.rand(rows, args.head_dim, **make)
    positions = torch.full((rows,), kv_len - 1, device=args.device)
    step = torch.compile(attention.rope_write_attend_torch, dynamic=False, fullgraph=True)
    layers = range(args.layers)
    per_layer = lambda calls: pass_seconds(calls, args.device, args.repeats) / args.layers * 1e6   # noqa: E731
    # each layer's slab as a one-layer cache: one compile serves every layer (an int layer would recompile)
    torch_us = per_layer([lambda i=i: step(q, k, v, cos, sin, k_cache[i:i + 1], v_cache[i:i + 1], 0, positions,
                                           kv_len) for i in layers])
    kernel_us = per_layer([lambda i=i: attention.decode_attention(q, k, v, cos, sin, k_cache, v_cache, i, positions,
                                                                  kv_len) for i in layers])
    row = dict(rows=rows, kv_len=kv_len, kernel=attention.runs_kernel(q, k_cache, v_cache),
               splits=attention.split_count(kv_len), torch_us=round(torch_us, 2), kernel_us=round(kernel_us, 2),
               speedup=round(torch_us / kernel_us, 3))
    if args.splits and row["kernel"]:       # the keys split otherwise than KEYS_PER_SPLIT says
        row["splits_us"] = {n: round(per_layer([lambda i=i: attention.launch(q, k, v, cos, sin, k_cache[i], v_cache[i],
                                                                             positions, kv_len, n) for i in layers]), 2)
                            for n in args.splits}
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", nargs="+", type=int, default=[2, 32])
    p.add_argument("--kv", nargs="+", type=int, default=[256, 1024, 4096])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--splits", nargs="+", type=int, help="also time the kernel with the keys split this many ways")
    p.add_argument("--out", type=Path, help="append the JSON rows here")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# {name}  torch {torch.__version__}  {args.dtype}", flush=True)
    with torch.inference_mode():
        for rows in args.rows:
            for kv_len in args.kv:
                row = measure(rows, kv_len, args)
                print(f"# attention rows {rows} kv {kv_len}: torch {row['torch_us']} us a layer, kernel "
                      f"{row['kernel_us']} us (splits {row['splits']}, ran: {row['kernel']}) x{row['speedup']}"
                      + (f"; forced splits {row['splits_us']}" if "splits_us" in row else ""), flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
