"""Benchmark: a decode step's projections at a few rows, cuBLAS (F.linear) against model.kernels.skinny's
Triton kernel, each weight read from memory (enough copies that no cache holds them), on CUDA as
replays of a captured graph of the calls (no launch gaps but the graph's own):

    python bench/skinny.py --device cuda                    # the 8B's shapes, rows 1 2 4 8 16 32 64
    python bench/skinny.py --device cuda --sweep --rows 2   # every launch config, and their agreement
    python bench/skinny.py --device cuda --fused --rows 2   # with each layer's fusion (model.kernels.fused)

One JSON row per (shape, rows): microseconds a call and the share of the bandwidth limit for both,
the autotuner's pick; with --sweep each config's time and whether all configs' outputs are bitwise
equal (the kernel's sums should not depend on the config: run-to-run identical answers). Then per
row count the 8B's decode-step GEMMs (32 layers and the head) for cuBLAS, the kernel, and the faster
of the two per shape. With --fused, each layer projection also with the elementwise work its layer
gives it (q/k/v and gate/up: the RMSNorm; o: the residual add; down: silu(gate) * up and the add):
the fused kernel against the compiled torch chain (inductor's norm or activation kernel, cuBLAS).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.kernels import fused, skinny  # noqa: E402
from model.kernels.runtime import triton_available  # noqa: E402
from bench.profiling import sync  # noqa: E402

# (out_features, in_features) of Idefics3-8B's decode-step GEMMs: fused q/k/v, o, fused gate/up,
# down, and the LM head padded to 64 rows (model.lm_head).
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "head": (128320, 4096)}
LAYERS = 32
FUSIONS = {"qkv": "norm", "o": "residual", "gate_up": "norm", "down": "act+residual"}    # the head: none


def pass_seconds(calls: list[Callable[[], object]], device: str, repeats: int) -> float:
    """Best wall time of one pass over `calls`: on CUDA a replay of their captured graph."""
    for call in calls:              # warm-up: compiles, autotunes
        call()
    sync(device)
    run = lambda: [call() for call in calls]               # noqa: E731
    if device == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        run = graph.replay
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def weights_for(n: int, k: int, dtype: torch.dtype, device: str, min_bytes: int) -> list[torch.Tensor]:
    size = n * k * torch.finfo(dtype).bits // 8
    return [torch.randn(n, k, dtype=dtype, device=device) / k ** 0.5 for _ in range(max(2, -(-min_bytes // size)))]


def measure(name: str, rows: int, args: argparse.Namespace) -> dict:
    n, k = args.shapes[name]
    weights = weights_for(n, k, args.dtype, args.device, args.min_bytes)
    x = torch.randn(rows, k, dtype=args.dtype, device=args.device)
    per_call = lambda calls: pass_seconds(calls, args.device, args.repeats) / len(weights) * 1e6   # noqa: E731
    aten_us = per_call([lambda w=w: F.linear(x, w) for w in weights])
    kernel_us = per_call([lambda w=w: skinny.skinny_linear(x, w) for w in weights])
    limit_us = n * k * x.element_size() / args.bandwidth * 1e6
    row = dict(shape=name, n=n, k=k, rows=rows, kernel=skinny.runs_skinny(x, weights[0]),
               aten_us=round(aten_us, 2), kernel_us=round(kernel_us, 2), limit_us=round(limit_us, 2),
               aten_bw=round(limit_us / aten_us, 3), kernel_bw=round(limit_us / kernel_us, 3),
               speedup=round(aten_us / kernel_us, 3), picked=picked_config())
    if args.sweep and row["kernel"]:
        row.update(sweep(x, weights, per_call))
    if args.fused and name in FUSIONS:
        row.update(fused_times(FUSIONS[name], x, weights, per_call))
    return row


def fused_times(kind: str, x: torch.Tensor, weights: list[torch.Tensor], per_call: Callable) -> dict:
    """The fused kernel against the compiled torch chain, for the fusion `kind` of the projection."""
    rows, k = x.shape
    norm = torch.rand(k, dtype=x.dtype, device=x.device) + 0.5 if "norm" in kind else None
    up = torch.randn_like(x) if "act" in kind else None
    residual = x.new_empty(rows, weights[0].shape[0]).normal_() if "residual" in kind else None
    chain = torch.compile(fused.fused_linear_torch, dynamic=False, fullgraph=True)
    chain_us = per_call([lambda w=w: chain(x, w, None, norm, 1e-5, up, residual) for w in weights])
    fused_us = per_call([lambda w=w: fused.fused_linear(x, w, None, norm, 1e-5, up, residual) for w in weights])
    return dict(fusion=kind, chain_us=round(chain_us, 2), fused_us=round(fused_us, 2),
                fused_speedup=round(chain_us / fused_us, 3))


def picked_config() -> str | None:
    tuner = skinny.autotuned_kernel() if triton_available() else None
    best = getattr(tuner, "best_config", None)
    return None if best is None else describe(dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages))


def sweep(x: torch.Tensor, weights: list[torch.Tensor], per_call: Callable) -> dict:
    """Each launch config's microseconds, and whether every config's output equals the first's bitwise."""
    times, outputs = {}, []
    for config in skinny.configs():
        out = x.new_empty(x.shape[0], weights[0].shape[0])
        times[describe(config)] = round(per_call([lambda w=w: skinny.launch(x, w, None, out, config)
                                                  for w in weights]), 2)
        skinny.launch(x, weights[0], None, out, config)
        outputs.append(out.clone())
    return dict(sweep_us=times, configs_bitwise_equal=all(torch.equal(o, outputs[0]) for o in outputs))


def describe(config: dict) -> str:
    return "n{BLOCK_N}k{BLOCK_K}w{num_warps}s{num_stages}".format(**config)


def step_estimate(rows: list[dict], layers: int) -> dict:
    """The decode step's GEMMs from the per-shape rows: layers x (all but the head) + the head."""
    count = lambda r: 1 if r["shape"] == "head" else layers                   # noqa: E731
    total = lambda key: sum(count(r) * r[key] for r in rows) / 1e3            # noqa: E731
    best = sum(count(r) * min(r["aten_us"], r["kernel_us"]) for r in rows) / 1e3
    estimate = dict(estimate=f"decode-step GEMMs, {layers} layers + head", rows=rows[0]["rows"],
                    aten_ms=round(total("aten_us"), 3), kernel_ms=round(total("kernel_us"), 3),
                    best_ms=round(best, 3), limit_ms=round(total("limit_us"), 3))
    layers_rows = [r for r in rows if r["shape"] != "head"]             # the head unfused either way
    if layers_rows and all("fused_us" in r for r in layers_rows):
        with_head = lambda key: sum(count(r) * r.get(key, r["kernel_us"]) for r in rows) / 1e3    # noqa: E731
        estimate.update(chain_ms=round(with_head("chain_us"), 3), fused_ms=round(with_head("fused_us"), 3))
    return estimate


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--shape", nargs=3, action="append", metavar=("NAME", "OUT", "IN"),
                   help="a shape of your own instead of the 8B's (repeatable)")
    p.add_argument("--layers", type=int, default=LAYERS)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--bandwidth", type=float, default=4.8e12, help="the limit, bytes/s (H200: 4.8e12)")
    p.add_argument("--min-bytes", type=int, default=512 << 20, help="weight copies per shape: at least this much")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sweep", action="store_true", help="time every launch config too")
    p.add_argument("--fused", action="store_true", help="time each projection with its layer's fusion too")
    p.add_argument("--out", type=Path, help="append the JSON rows here, not to stdout (stdout: one line each)")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    args.shapes = {name: (int(n), int(k)) for name, n, k in args.shape} if args.shape else SHAPES
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# {name}  torch {torch.__version__}  {args.dtype}  limit {args.bandwidth / 1e12:.2f} TB/s", flush=True)
    with torch.inference_mode():
        for rows in args.rows:
            measured = []
            for shape in args.shapes:
                measured.append(measure(shape, rows, args))
                report(measured[-1], args.out)
            report(step_estimate(measured, args.layers), args.out)


def report(row: dict, out: Path | None) -> None:
    if out is None:
        print(json.dumps(row), flush=True)
        return
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(summary(row), flush=True)


def summary(row: dict) -> str:
    if "estimate" in row:
        fusion = (f"; with the layers' elementwise work: torch chain {row['chain_ms']} ms, fused "
                  f"{row['fused_ms']} ms" if "fused_ms" in row else "")
        return (f"# {row['estimate']} at {row['rows']} rows: cuBLAS {row['aten_ms']} ms, kernel "
                f"{row['kernel_ms']} ms, best of each {row['best_ms']} ms, limit {row['limit_ms']} ms{fusion}")
    line = (f"# {row['shape']} {row['n']}x{row['k']} rows {row['rows']}: cuBLAS {row['aten_us']} us "
            f"({row['aten_bw']:.0%}), kernel {row['kernel_us']} us ({row['kernel_bw']:.0%}) x{row['speedup']}"
            f" picked {row['picked']}")
    if "sweep_us" in row:
        ranked = sorted(row["sweep_us"].items(), key=lambda item: item[1])
        line += (f"; sweep best {ranked[0][0]} {ranked[0][1]} us, worst {ranked[-1][0]} {ranked[-1][1]} us,"
                 f" bitwise equal: {row['configs_bitwise_equal']}")
    if "fused_us" in row:
        line += f"; {row['fusion']}: chain {row['chain_us']} us, fused {row['fused_us']} us x{row['fused_speedup']}"
    return line


if __name__ == "__main__":
    main()
