"""Benchmark: our LLMEngine vs transformers' generate on the same random-weight checkpoint.

Same prompts (text + image tiles), same images, the same number of new tokens for every row
(min_new_tokens = max_new_tokens, so eos never ends a row early), greedy, one process. Prints
end-to-end tokens/s and images/s for both and the ratio; on CUDA also our decode tokens/s as a
fraction of the memory-bandwidth limit (decoder weight bytes / step time vs the HBM bandwidth).

    python bench/engine.py                          # CPU: SmolVLM-256M shapes, 128 px tiles, batch 8
    python bench/engine.py --device cuda            # SmolVLM-256M and Idefics3-8B shapes, batch 1/32/256
    python bench/engine.py --questions-per-image 4  # VQA-shaped: 4 questions about each image
No Ray, no hub: the reference model is built by transformers from a config, with random weights,
and ours shares its tensors.
"""
from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import Idefics3Config, Idefics3ForConditionalGeneration  # noqa: E402
from model.engine import LLMEngine, Request, SamplingParams  # noqa: E402
from model.llama import LlamaRotaryEmbedding, rope_inv_freq  # noqa: E402
from model.loading import target_name  # noqa: E402
from bench.decode_variants import VARIANTS, current_variant, decode_variant, uncompiled, variant_name  # noqa: E402
from bench.profiling import profile_decode, profile_prefill, sync  # noqa: E402

# Real dimensions (behaviour spec sections 5.2 / 5.3); token ids as in the released checkpoints.
SHAPES = {
    "smolvlm-256m": dict(
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=512, patch_size=16),
        text=dict(vocab_size=49280, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                  max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                  pad_token_id=2),
        top=dict(scale_factor=4, tie_word_embeddings=True, image_token_id=49190),
        fake=49189, eou=49279, frames=5),
    "idefics3-8b": dict(
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=364, patch_size=14),
        text=dict(vocab_size=128259, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                  rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
                  pad_token_id=128002,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=8192)),
        top=dict(scale_factor=2, tie_word_embeddings=False, image_token_id=128257),
        fake=128256, eou=128258, frames=5),
}
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def reference_model(name: str, tile: int | None, device: str, dtype: torch.dtype, layers: int | None = None):
    """transformers' Idefics3ForConditionalGeneration with random weights, built from the config
    (`layers`: that many decoder layers, for quicker compiles when comparing step variants)."""
    from transformers import Idefics3Config as RefConfig
    from transformers import Idefics3ForConditionalGeneration as Reference

    spec = SHAPES[name]
    vision = dict(spec["vision"], image_size=tile or spec["vision"]["image_size"])
    text = dict(spec["text"], model_type="llama", **({"num_hidden_layers": layers} if layers else {}))
    config = RefConfig(vision_config=vision, text_config=text,
                       pad_token_id=spec["text"]["pad_token_id"], **spec["top"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    torch.manual_seed(0)
    try:
        with torch.device(device):
            model = Reference(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = [spec["text"]["eos_token_id"], spec["eou"]]
    model.generation_config.pad_token_id = spec["text"]["pad_token_id"]
    return model


def our_model(reference) -> Idefics3ForConditionalGeneration:
    """Ours, built from the reference's config.json and sharing its weight tensors (no copy)."""
    with tempfile.TemporaryDirectory() as folder:
        reference.config.save_pretrained(folder)
        config = Idefics3Config.from_pretrained(folder)
    with torch.device("meta"):
        ours = Idefics3ForConditionalGeneration(config)
    state = {target_name(k, False): v for k, v in reference.state_dict().items()}
    missing, unexpected = ours.load_state_dict({k: v for k, v in state.items() if k}, strict=False, assign=True)
    if config.tie_word_embeddings:
        ours.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"weights do not line up: missing {missing[:5]}, unexpected {unexpected[:5]}")
    device = next(reference.parameters()).device
    for module in ours.modules():               # the non-persistent float32 RoPE table
        if isinstance(module, LlamaRotaryEmbedding):
            module.inv_freq = rope_inv_freq(module.config, device=device)
    left = [n for n, t in [*ours.named_parameters(), *ours.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on meta: {left[:5]}")
    ours.generation_config = {"eos_token_id": list(reference.generation_config.eos_token_id),
                              "pad_token_id": reference.generation_config.pad_token_id}
    return ours.eval()


def add_pair_options(ap) -> None:
    """The options of a bench that runs ours beside the reference on SmolVLM-256M shapes."""
    ap.add_argument("--tile", type=int, default=128, help="tile side (SmolVLM's is 512; smaller on CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (fewer: a quick check)")


def fewer_layers(args) -> dict:
    """A row's note of --layers where given: its figures are a quick check's, not the model's."""
    return {"layers": args.layers} if args.layers else {}


def smolvlm_pair(args) -> tuple:
    """(the reference, ours sharing its weights, the dtype) as add_pair_options' `args` ask."""
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    ref = reference_model("smolvlm-256m", args.tile, args.device, dtype, args.layers)
    return ref, our_model(ref), dtype


def make_requests(name: str, tile: int, batch: int, max_frames: int, new_tokens: int,
                  device: str, repetition_penalty: float = 1.0, tiles: int | None = None) -> list[Request]:
    """Prompts of different lengths with 1..max_frames tiles each (`tiles`: that many each): BOS,
    text, image blocks, text."""
    spec = SHAPES[name]
    per_frame = (tile // spec["vision"]["patch_size"]) ** 2 // spec["top"]["scale_factor"] ** 2
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            repetition_penalty=repetition_penalty)
    out = []
    for i in range(batch):
        frames = tiles or 1 + i % max_frames
        text = lambda n: torch.randint(100, 20000, (n,), generator=g).tolist()  # noqa: E731
        ids = [spec["text"]["bos_token_id"]] + text(8 + 5 * (i % 7))
        for _ in range(frames):
            ids += [spec["fake"]] + [spec["top"]["image_token_id"]] * per_frame
        ids += [spec["fake"]] + text(12 + 3 * (i % 5))
        pixels = torch.randn(frames, 3, tile, tile, generator=g).clamp(-1, 1).to(device)
        mask = torch.ones(frames, tile, tile, dtype=torch.bool, device=device)
        out.append(Request(f"r{i}", ids, pixels, mask, params))
    return out


def image_end(ids: list[int], image_token: int) -> int:
    """Where the prompt's last image block ends (after the token that closes it)."""
    return max(i for i, t in enumerate(ids) if t == image_token) + 2


def about_shared_images(requests: list[Request], per_image: int, image_token: int) -> list[Request]:
    """The requests in runs of `per_image` about one image, as VQA datasets come: the run's first
    pixels and prompt up to the end of its image, then each request's own question (the text after
    its own image), keyed `image-<run>`."""
    out = []
    for i, own in enumerate(requests):
        first = requests[i - i % per_image]
        ids = first.prompt_ids[:image_end(first.prompt_ids, image_token)] + own.prompt_ids[image_end(own.prompt_ids, image_token):]
        out.append(replace(own, prompt_ids=ids, pixel_values=first.pixel_values,
                           pixel_attention_mask=first.pixel_attention_mask, image_key=f"image-{i // per_image}"))
    return out


def with_fresh_keys(requests: list[Request], tag: str) -> list[Request]:
    """Image keys unseen by the engine (no run reuses the images or prompts of the one before)."""
    return [r if r.image_key is None else replace(r, image_key=f"{tag}/{r.image_key}") for r in requests]


def padded_batch(requests: list[Request], pad_id: int, device: str) -> dict:
    """The reference's inputs: left-padded ids, (B, F_max, 3, H, W) pixels with all-zero padding frames."""
    length = max(len(r.prompt_ids) for r in requests)
    frames = max(r.pixel_values.shape[0] for r in requests)
    b, (_, c, h, w) = len(requests), requests[0].pixel_values.shape
    ids = torch.full((b, length), pad_id, dtype=torch.int64)
    attn = torch.zeros(b, length, dtype=torch.int64)
    pixels = torch.zeros(b, frames, c, h, w, device=device)
    pmask = torch.zeros(b, frames, h, w, dtype=torch.bool, device=device)
    for i, r in enumerate(requests):
        n, f = len(r.prompt_ids), r.pixel_values.shape[0]
        ids[i, length - n:], attn[i, length - n:] = torch.tensor(r.prompt_ids), 1
        pixels[i, :f], pmask[i, :f] = r.pixel_values, r.pixel_attention_mask
    return dict(input_ids=ids.to(device), attention_mask=attn.to(device), pixel_values=pixels,
                pixel_attention_mask=pmask)


def time_reference(ref, requests, new_tokens: int, device: str, dtype: torch.dtype,
                   repeats: int) -> tuple[float, list[list[int]]]:
    """Best seconds of `repeats` generate calls, and each row's new tokens."""
    inputs = padded_batch(requests, ref.generation_config.pad_token_id, device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  repetition_penalty=requests[0].sampling.repetition_penalty)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            out = ref.generate(**inputs, **kwargs)
            sync(device)
            best = min(best, time.perf_counter() - start)
    prompt = inputs["input_ids"].shape[1]
    assert out.shape[1] == prompt + new_tokens
    return best, out[:, prompt:].tolist()


def time_engine(engine: LLMEngine, requests, new_tokens: int, device: str,
                repeats: int) -> tuple[float, dict, list[list[int]]]:
    """Best seconds of `repeats` runs, that run's engine stats, and each request's new tokens."""
    best, best_stats = float("inf"), {}
    for _ in range(repeats):
        engine.stats = dict.fromkeys(engine.stats, 0)
        run = with_fresh_keys(requests, str(next(RUNS)))
        sync(device)
        start = time.perf_counter()
        results = engine.generate(run)
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, best_stats = elapsed, dict(engine.stats)
    assert all(r.num_generated_tokens == new_tokens for r in results)
    by_id = {r.request_id: list(r.token_ids) for r in results}
    return best, best_stats, [by_id[r.request_id] for r in requests]


RUNS = itertools.count()


def decoder_weight_bytes(model) -> int:
    """Bytes a decode step must read: decoder layers, final norm and the LM head (not the embedding table)."""
    text = model.model.text_model
    params = [p for n, p in text.named_parameters() if not n.startswith("embed_tokens")]
    params.append(model.lm_head.weight)
    return sum(p.numel() * p.element_size() for p in params)


def progress(what: str, since: float) -> float:
    """One line on stderr per phase, so a run cut short by a time limit still shows where time went."""
    now = time.perf_counter()
    print(f"#   {what}: {now - since:.1f} s", file=sys.stderr, flush=True)
    return now


def same_rows(ref_tokens: list[list[int]], our_tokens: list[list[int]]) -> int:
    """Rows whose new tokens are identical in both implementations."""
    return sum(a == b for a, b in zip(ref_tokens, our_tokens))


def _measure_sequential(ref, make_engine, requests, args, dtype) -> tuple[float, float, dict, LLMEngine, int]:
    """GPU: the reference's runs first and its memory freed, then ours (no two caches at once)."""
    t = time.perf_counter()
    if args.warmup:
        time_reference(ref, requests[:1], 2, args.device, dtype, 1)
    ref_s, ref_tokens = time_reference(ref, requests, args.new_tokens, args.device, dtype, args.repeats)
    t = progress(f"reference, warm-up + {args.repeats} runs (best {ref_s:.2f} s)", t)
    torch.cuda.empty_cache()
    engine = make_engine()
    if args.warmup:                              # allocates the cache, compiles, captures the CUDA graphs
        time_engine(engine, requests, args.new_tokens, args.device, 1)
        t = progress("ours, warm-up (cache, compile, CUDA graphs)", t)
    ours_s, stats, our_tokens = time_engine(engine, requests, args.new_tokens, args.device, args.repeats)
    progress(f"ours, {args.repeats} runs (best {ours_s:.2f} s)", t)
    return ref_s, ours_s, stats, engine, same_rows(ref_tokens, our_tokens)


def _measure_interleaved(ref, engine, requests, args, dtype) -> tuple[float, float, dict, LLMEngine, int]:
    """CPU (often shared): alternate the two so a load spike cannot favour one side; best of each."""
    if args.warmup:
        time_reference(ref, requests[:1], 2, args.device, dtype, 1)
        time_engine(engine, requests[:1], args.new_tokens, args.device, 1)
    ref_s, ours_s, stats = float("inf"), float("inf"), {}
    for _ in range(args.repeats):
        seconds, ref_tokens = time_reference(ref, requests, args.new_tokens, args.device, dtype, 1)
        ref_s = min(ref_s, seconds)
        seconds, run_stats, our_tokens = time_engine(engine, requests, args.new_tokens, args.device, 1)
        if seconds < ours_s:
            ours_s, stats = seconds, run_stats
    return ref_s, ours_s, stats, engine, same_rows(ref_tokens, our_tokens)


def bench_one(name: str, batches: list[int], args, dtype: torch.dtype) -> list[dict]:
    spec = SHAPES[name]
    tile = args.tile or spec["vision"]["image_size"]
    start = time.perf_counter()
    ref = reference_model(name, tile, args.device, dtype, args.layers)
    ours = our_model(ref)
    progress(f"{name}: random-weight models built", start)
    weight_bytes = decoder_weight_bytes(ours)
    bandwidth = (args.hbm_bytes_per_s or _hbm_bandwidth()) if args.device == "cuda" else None
    rows = []
    for variant, batch in itertools.product(args.variants, batches):    # a variant's batches share its compile
        requests = make_requests(name, tile, batch, args.frames or spec["frames"], args.new_tokens, args.device,
                                 args.repetition_penalty, args.tiles)
        if args.questions_per_image > 1:
            requests = about_shared_images(requests, args.questions_per_image, spec["top"]["image_token_id"])
        need = max(len(r.prompt_ids) for r in requests) + args.new_tokens + 1   # + an overlapped step's position
        compile_step = False if uncompiled(variant) else args.compile
        make_engine = functools.partial(LLMEngine, ours, max_batch_size=batch, max_prefill_tokens=args.prefill_tokens,
                                        kv_cache_tokens=max(batch, 2) * (-(-need // 256) * 256),   # a compiled
                                        compile=compile_step)                   # step's two rows at batch 1
        with decode_variant(variant):
            row = bench_batch(name, batch, requests, make_engine, need, args, dtype, ref, weight_bytes, bandwidth)
        rows.append(row)
    del ref, ours
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def bench_batch(name: str, batch: int, requests: list[Request], make_engine, need: int, args, dtype: torch.dtype,
                ref, weight_bytes: int, bandwidth: float | None) -> dict:
    """One row: the reference and our engine on the same requests, printed (and appended to --out)."""
    if args.device == "cuda":
        ref_s, ours_s, stats, engine, same = _measure_sequential(ref, make_engine, requests, args, dtype)
    else:
        ref_s, ours_s, stats, engine, same = _measure_interleaved(ref, make_engine(), requests, args, dtype)
    tokens, images = batch * args.new_tokens, len(requests)
    row = dict(model=name, device=args.device, batch=batch, tile=requests[0].pixel_values.shape[-1],
               new_tokens=args.new_tokens, questions_per_image=args.questions_per_image,
               images_encoded=stats["images_encoded"], prefix_tokens_reused=stats["prefix_tokens_reused"],
               prompt_tokens=sum(len(r.prompt_ids) for r in requests),
               frames=sum(r.pixel_values.shape[0] for r in requests),
               same_tokens=f"{same}/{batch}", ref_s=round(ref_s, 3), ours_s=round(ours_s, 3),
               ref_tok_s=round(tokens / ref_s, 1), ours_tok_s=round(tokens / ours_s, 1),
               ref_img_s=round(images / ref_s, 2), ours_img_s=round(images / ours_s, 2),
               speedup=round(ref_s / ours_s, 2), ours_prefill_s=round(stats["prefill_s"], 3),
               ours_decode_s=round(stats["decode_s"], 3))
    row["compiled"] = engine.runner.compile         # False: the compile failed and the step ran eagerly
    row.update(fewer_layers(args))
    if args.variants != ["base"]:
        row["variant"] = current_variant()
    if stats["decode_steps"]:
        step = stats["decode_s"] / stats["decode_steps"]
        row["ours_decode_tok_s"] = round(stats["decode_tokens"] / stats["decode_s"], 1)
        row["ours_step_ms"] = round(step * 1e3, 3)
        if bandwidth:
            row["bandwidth_fraction"] = round(weight_bytes / step / bandwidth, 3)
    print(json.dumps(row), flush=True)      # before the profile: a step cut short by a time limit keeps it
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    if args.profile:
        profile_decode(engine, batch, need - 1, args.device,    # the run's last kv bucket: no new compile
                       weight_bytes=weight_bytes, bandwidth=bandwidth)
        profile_prefill(engine, requests, args.device)
    del engine
    gc.collect()
    return row


def _hbm_bandwidth() -> float:
    name = torch.cuda.get_device_name()
    for key, value in HBM_BYTES_PER_S.items():
        if key in name:
            return value
    raise SystemExit(f"unknown HBM bandwidth for {name!r}: pass --hbm-bytes-per-s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", nargs="+", default=None, choices=sorted(SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=None)
    p.add_argument("--tile", type=int, default=None, help="tile size in px (CPU default 128)")
    p.add_argument("--frames", type=int, default=None, help="max tiles per image (request i has 1 + i %% frames)")
    p.add_argument("--tiles", type=int, default=None, help="every request this many tiles (long prompts)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prefill-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--hbm-bytes-per-s", type=float, default=None)
    p.add_argument("--out", default=None, help="append the JSON rows to this file")
    p.add_argument("--profile", action="store_true", help="also print the top kernels of our decode step")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="our decode step through torch.compile (default: the engine's, on for CUDA)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (fewer: quicker compiles)")
    p.add_argument("--variants", nargs="+", default=["base"], type=variant_name,
                   help=f"decode-step variants to run ours with, a row each; '+' combines them "
                        f"(bench/decode_variants.py: {', '.join(sorted(VARIANTS))})")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="both implementations' (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="every row's, both implementations")
    p.add_argument("--questions-per-image", type=int, default=1,
                   help="requests in runs of this many questions about one image (a VQA dataset's shape): our engine "
                        "encodes each image once and shares its prompt prefix; the reference runs every row whole")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models or (["smolvlm-256m"] if cpu else ["smolvlm-256m", "idefics3-8b"])
    batches = args.batches or ([8] if cpu else [1, 32, 256])
    if cpu and args.tile is None:
        args.tile, args.frames = 128, args.frames or 3
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float32 if cpu else torch.bfloat16
    print(f"# {args.device} {torch.cuda.get_device_name() if not cpu else ''} torch {torch.__version__} "
          f"threads {torch.get_num_threads()}", flush=True)
    for name in models:
        bench_one(name, batches, args, dtype)


if __name__ == "__main__":
    main()
