"""Where our engine's time goes, for bench/engine.py --profile: a decode step (its CUDA graph's
kernels, the graph's wall time, the step's ops by input shapes) and a prefill (its ops)."""
from __future__ import annotations

import sys
from dataclasses import replace

import torch

from model.engine import LLMEngine, Request
from model.engine.runner import kv_bucket


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def profiler(device: str, **options):
    """torch.profiler over the host, and the GPU's kernels on CUDA."""
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else []),
                   **options)


def kernel_events(events, device: str) -> list:
    """The GPU's kernels on CUDA (an op's row also carries its kernels' device time: summing both
    counts it twice), every op on CPU."""
    from torch.autograd import DeviceType
    return [e for e in events if device != "cuda" or e.device_type == DeviceType.CUDA]


GEMM_NAMES = ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitk", "linear", "aten::mm", "aten::addmm", "aten::bmm",
              "triton_tem")    # inductor's GEMM templates (max-autotune)


def profile_decode(engine: LLMEngine, batch: int, kv_len: int, device: str, steps: int = 20,
                   top: int = 15, weight_bytes: int | None = None, bandwidth: float | None = None) -> None:
    """Where a decode step's time goes: `steps` replays of the step the run used (same batch and kv
    buckets, CUDA graph included) under torch.profiler; the top kernels by device time on stderr,
    and the GEMMs' share (with the weights' bytes: the bandwidth they read them at, which bounds
    what the rest of the step may take for a target fraction of the limit).
    The replays rewrite the K/V of the finished run's last position: the results are already out."""
    runner = engine.runner
    rows, kv = runner.decode_rows(batch), kv_bucket(kv_len, runner.cache.max_len)
    runner.decode(rows, kv)
    with profiler(device) as prof:
        for _ in range(steps):
            runner.decode(rows, kv)
        sync(device)
    events = prof.key_averages()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    kernels = kernel_events(events, device)
    total_us = sum(getattr(e, key) for e in kernels)
    print(f"# profile: decode rows {rows}, kv {kv}: {total_us / steps / 1e3:.3f} ms and "
          f"{sum(e.count for e in kernels) / steps:.0f} {'kernels' if device == 'cuda' else 'ops'} per step",
          file=sys.stderr)
    gemms = [e for e in kernels if any(n in e.key.lower() for n in GEMM_NAMES)]
    gemm_s = sum(getattr(e, key) for e in gemms) / steps / 1e6
    line = (f"# profile: GEMMs {gemm_s * 1e3:.3f} ms in {sum(e.count for e in gemms) / steps:.0f} kernels, "
            f"the rest {(total_us / steps / 1e6 - gemm_s) * 1e3:.3f} ms")
    if weight_bytes and bandwidth and gemm_s:
        line += f"; the GEMMs read the weights at {weight_bytes / gemm_s / bandwidth:.0%} of the bandwidth limit"
    print(line, file=sys.stderr)
    print(events.table(sort_by=key, row_limit=top), file=sys.stderr, flush=True)
    if device == "cuda":
        print(f"# profile: a replay's wall time {replay_ms(runner, rows, kv, steps):.3f} ms (its kernels' "
              f"sum above: the rest is the gaps between them)", file=sys.stderr)
    profile_by_op(runner, rows, kv, device, top)


def replay_ms(runner, rows: int, kv: int, steps: int) -> float:
    """Mean wall time of the decode step's CUDA graph replayed back to back, events around the loop."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        runner.decode(rows, kv)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def profile_by_op(runner, rows: int, kv: int, device: str, top: int) -> None:
    """One step run outside its CUDA graph, by op and input shapes: which projection or attention
    product each GEMM kernel of the graph belongs to (a replay's kernels have no op above them)."""
    with torch.inference_mode(), profiler(device, record_shapes=True) as prof:
        runner._decode_step(rows, kv)
        sync(device)
    key = "device_time_total" if device == "cuda" else "cpu_time_total"
    ops = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    ops.sort(key=lambda e: getattr(e, key), reverse=True)
    print("# profile, one step by op and shapes (outside the graph):", file=sys.stderr)
    for e in ops[:top]:
        print(f"#   {e.key:<28} {e.count:>4} x  {getattr(e, key) / max(e.count, 1):9.1f} us  {e.input_shapes}",
              file=sys.stderr)


def profile_prefill(engine: LLMEngine, requests: list[Request], device: str, top: int = 15) -> None:
    """Where a prefill's time goes: the requests run again for one new token each (vision tower,
    connector, packed prefill, one sample; no image or prefix reused), ops by device time on stderr."""
    one = [replace(r, request_id=f"prefill/{r.request_id}", image_key=None,
                   sampling=replace(r.sampling, max_new_tokens=1, min_new_tokens=1)) for r in requests]
    engine.prefixes.clear()
    sync(device)
    with profiler(device) as prof:
        engine.generate(one)
        sync(device)
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    ops = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in kernel_events(ops, device))
    print(f"# profile, prefill of {len(one)} requests ({sum(len(r.prompt_ids) for r in one)} tokens): "
          f"{total / 1e3:.1f} ms of {'kernels' if device == 'cuda' else 'ops'}", file=sys.stderr)
    for e in ops[:top]:
        print(f"#   {e.key[:60]:<60} {e.count:>5} x {getattr(e, key) / 1e3:8.2f} ms", file=sys.stderr)
