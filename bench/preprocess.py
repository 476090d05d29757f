"""Image preprocessing throughput per core: ours vs transformers, on the same 1024x768 JPEGs.

    OMP_NUM_THREADS=1 .venv/bin/python bench/preprocess.py [--images 16] [--rounds 5]
    OMP_NUM_THREADS=1 .venv/bin/python bench/preprocess.py --only Pil,pil --malloc-cache
    OMP_NUM_THREADS=1 /tmp/tvenv/bin/python bench/preprocess.py   # adds transformers' torch class

Default Idefics3 settings (L=1456, m=364: 13 frames of 3x364x364 per image). Every variant starts from
the JPEG bytes and ends with `pixel_values` + `pixel_attention_mask` as torch tensors; the outputs are
checked equal to the reference before timing (Pillow recipe: exact; torch recipe: exact where
torchvision is installed). Rounds are interleaved so background load hits every variant alike; the
best round is reported (and the median). One thread everywhere: images/s is per core.

Page faults matter: every variant allocates tens of MB per image, and whether glibc hands back fresh
(faulting, kernel-zeroed) pages or reuses freed ones depends on what ran before in the process (its
mmap/trim thresholds adapt to the largest freed block). The `faults/img` column shows it;
`--malloc-cache` pins glibc's thresholds so freed memory is reused by every variant (compute only,
no page-fault cost; the environment variables MALLOC_MMAP_THRESHOLD_=33554432 and
MALLOC_TRIM_THRESHOLD_=1073741824 do the same). `--only` times a subset of the variants (all are
still checked and warmed up).

The fast path is what the pipeline's CPU workers do: bytes -> uint8 frames + rows/cols (then the
frames travel, and `frames_to_pixel_values` expands them on the GPU; its CPU cost is shown separately).
"""
from __future__ import annotations

import argparse
import ctypes
import io
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(1)

from processing.decode import decode_image  # noqa: E402
from processing.image_processor import Idefics3ImageProcessor, Idefics3ImageProcessorPil  # noqa: E402
from processing.pixels import frames_to_pixel_values  # noqa: E402


def make_jpegs(count: int, width: int = 1024, height: int = 768) -> list[bytes]:
    """Photo-like JPEGs: smooth random colour fields plus noise, quality 90."""
    out = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        coarse = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(smooth + rng.integers(-10, 11, smooth.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def variants() -> dict:
    ours_pil, ours_torch = Idefics3ImageProcessorPil(), Idefics3ImageProcessor()
    v = {
        "ours Idefics3ImageProcessorPil": lambda b: ours_pil(decode_image(b), return_tensors="pt"),
        "ours Idefics3ImageProcessor (torch)": lambda b: ours_torch(decode_image(b), return_tensors="pt"),
        "ours fast path pil (bytes -> uint8 frames)": lambda b: ours_pil.image_to_frames(decode_image(b)),
        "ours fast path torch (bytes -> uint8 frames)": lambda b: ours_torch.image_to_frames(decode_image(b)),
    }
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil as RefPil
    ref_pil = RefPil()
    v["transformers Idefics3ImageProcessorPil"] = lambda b: ref_pil(Image.open(io.BytesIO(b)), return_tensors="pt")
    try:
        from transformers.models.idefics3.image_processing_idefics3 import Idefics3ImageProcessor as RefTorch
        ref_torch = RefTorch()
        v["transformers Idefics3ImageProcessor (torch)"] = \
            lambda b: ref_torch(Image.open(io.BytesIO(b)), return_tensors="pt")
    except Exception as e:  # torchvision missing or not loadable with this torch build
        print(f"(transformers' torch class unavailable here: {type(e).__name__}: {str(e)[:100]})")
    return v


def check_outputs(v: dict, jpegs: list[bytes]) -> None:
    pairs = [("ours Idefics3ImageProcessorPil", "transformers Idefics3ImageProcessorPil", "pil"),
             ("ours Idefics3ImageProcessor (torch)", "transformers Idefics3ImageProcessor (torch)", "torch")]
    for ours, ref, recipe in pairs:
        if ref not in v:
            continue
        for b in jpegs[:3]:
            a, r = v[ours](b), v[ref](b)
            for key in ("pixel_values", "pixel_attention_mask"):
                assert a[key].dtype == r[key].dtype and torch.equal(a[key], r[key]), f"{ours} {key} != {ref}"
            frames, _, _ = v[f"ours fast path {recipe} (bytes -> uint8 frames)"](b)
            assert torch.equal(frames_to_pixel_values(torch.from_numpy(frames), recipe), a["pixel_values"][0])
        print(f"output check: {ours} == {ref} (bit-exact), fast path == processor")


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_rounds(v: dict, jpegs: list[bytes], rounds: int, clock, faults: dict | None = None
                ) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in v}
    for _ in range(rounds):
        for name, fn in v.items():
            start, start_faults = clock(), minor_faults()
            for b in jpegs:
                fn(b)
            times[name].append((clock() - start) / len(jpegs))
            if faults is not None:
                faults[name] = faults.get(name, 0) + (minor_faults() - start_faults) / (len(jpegs) * rounds)
    return times


def pin_malloc_thresholds() -> None:
    """glibc: serve blocks up to 32 MiB from the heap and never trim it, so freed memory is reused."""
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if not (libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)):
        raise RuntimeError("mallopt failed")


def time_expand(jpegs: list[bytes], recipe: str) -> float:
    frames = torch.from_numpy(Idefics3ImageProcessorPil().image_to_frames(decode_image(jpegs[0]))[0])
    frames_to_pixel_values(frames, recipe)
    start = time.perf_counter()
    for _ in range(len(jpegs)):
        frames_to_pixel_values(frames, recipe)
    return (time.perf_counter() - start) / len(jpegs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", help="comma-separated substrings: run only the variants whose name has one")
    parser.add_argument("--malloc-cache", action="store_true", help="pin glibc's malloc thresholds (see above)")
    args = parser.parse_args()
    if args.malloc_cache:
        pin_malloc_thresholds()
    jpegs = make_jpegs(args.images)
    v = variants()
    for b in jpegs[:2]:  # warm up caches and lazy imports
        for fn in v.values():
            fn(b)
    check_outputs(v, jpegs)
    ref = "transformers Idefics3ImageProcessorPil"
    if args.only:
        v = {name: fn for name, fn in v.items() if name == ref or any(k in name for k in args.only.split(","))}
    # CPU time of this (single-threaded) process is the per-core cost, and is less disturbed than wall
    # time when other processes share the cores; wall time is shown beside it.
    faults: dict[str, float] = {}
    cpu = time_rounds(v, jpegs, args.rounds, time.process_time, faults)
    wall = time_rounds(v, jpegs, args.rounds, time.perf_counter)
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
          f"{args.images} JPEGs 1024x768 (mean {sum(map(len, jpegs)) / len(jpegs) / 1024:.0f} KiB), "
          f"{args.rounds} interleaved rounds per clock, load average {os.getloadavg()[0]:.1f}"
          f"{', malloc thresholds pinned' if args.malloc_cache else ''}")
    print(f"{'variant':46s} {'img/CPU-s best':>14s} {'median':>7s} {'vs tf Pil':>9s} {'(median)':>8s} "
          f"{'img/s wall best':>15s} {'vs tf Pil':>9s} {'faults/img':>10s}")
    for name in v:
        c, w, m = 1 / min(cpu[name]), 1 / min(wall[name]), 1 / statistics.median(cpu[name])
        print(f"{name:46s} {c:14.1f} {m:7.1f} {c * min(cpu[ref]):8.2f}x "
              f"{m * statistics.median(cpu[ref]):7.2f}x {w:15.1f} {w * min(wall[ref]):8.2f}x {faults[name]:10.0f}")
    frames, rows, cols = Idefics3ImageProcessorPil().image_to_frames(decode_image(jpegs[0]))
    float_bytes = frames.size * 4
    print(f"\nbytes per image: uint8 frames {frames.nbytes} ({frames.shape}, rows={rows}, cols={cols}) vs "
          f"float32 pixel_values {float_bytes} -> {float_bytes - frames.nbytes} saved ({float_bytes / frames.nbytes:.0f}x)")
    for recipe in ("pil", "torch"):
        print(f"frames_to_pixel_values({recipe!r}) on CPU: {time_expand(jpegs, recipe) * 1e3:.2f} ms/image")


if __name__ == "__main__":
    main()
