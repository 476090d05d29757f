"""Benchmark: the float32 CPU GEMM behind every projection, torch's default (MKL) vs model.linear's
oneDNN path, with and without weights packed for it, at a model's projection shapes.

    python bench/linear.py                      # SmolVLM-256M decoder and vision shapes, 1 thread
    python bench/linear.py --threads 2 --rows 1 8 64 960

Prints GFLOP/s per (rows, shape) for the three and the ratios to MKL, so the choice made in
model/linear.py can be checked on the machine at hand (MKL takes its AVX2 path on AMD processors).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.linear import ONEDNN, PackedWeight, linear  # noqa: E402

# (out_features, in_features) of SmolVLM-256M's projections: fused q/k/v, o, fused gate/up, down,
# LM head; vision fused q/k/v, fc1, fc2.
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49280, 576), (2304, 768), (3072, 768), (768, 3072)]


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(rows: int, shape: tuple[int, int], repeats: int) -> dict[str, float]:
    """GFLOP/s of one projection, timed over enough copies of the weight that no cache holds them."""
    n, k = shape
    copies = max(1, 256_000_000 // (n * k * 4))
    weights = [torch.randn(n, k) for _ in range(copies)]
    packs = [PackedWeight(w) for w in weights]
    x = torch.randn(rows, k)
    flop = 2 * rows * n * k * copies
    with torch.inference_mode():
        timings = {
            "mkl": seconds(lambda: [F.linear(x, w) for w in weights], repeats),
            "onednn": seconds(lambda: [linear(x, w) for w in weights], repeats),
            "packed": seconds(lambda: [linear(x, w, packed=p) for w, p in zip(weights, packs)], repeats),
        }
    return {name: flop / s / 1e9 for name, s in timings.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", type=int, default=[1, 8, 32, 960])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if not ONEDNN:
        raise SystemExit("this torch has no oneDNN: model.linear uses F.linear everywhere")
    torch.set_num_threads(args.threads)
    print(f"# {cpu_name()}  torch {torch.__version__}  threads {args.threads}")
    print("rows  out x in        MKL GFLOP/s  oneDNN  packed   oneDNN/MKL  packed/MKL")
    for rows in args.rows:
        for shape in SHAPES:
            g = measure(rows, shape, args.repeats)
            print(f"{rows:4d}  {shape[0]:5d} x {shape[1]:4d}  {g['mkl']:10.1f}  {g['onednn']:7.1f}  {g['packed']:6.1f}"
                  f"   {g['onednn'] / g['mkl']:9.2f}x  {g['packed'] / g['mkl']:9.2f}x", flush=True)


if __name__ == "__main__":
    main()
