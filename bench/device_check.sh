#!/bin/bash
# The prepared GPU checks for a device session (15 device-minutes, machine starts included, ~95 s each):
#   run(command="BATCHES=1 VARIANTS='base fused+attention fused+attention+eager skinny+attention skinny' bash \
#       bench/device_check.sh variants", timeout_s=300)   # the kernels' whole decode step against the torch one,
#   8 layers of the 8B (each row is printed when done: the later variants may not finish; the skinny kernel
#   autotunes 12 configs per projection shape and fusion, ~1 s each, in the first variant that meets them;
#   +eager: the same kernels without torch.compile, inside CUDA graphs: if as fast, a replica could skip
#   the ~100 s compile)
#   then at once (the machine stays warm ~30 s), with the fastest of them (its batch-1 step), e.g.
#   run(command="BATCHES=1 VARIANTS=fused+attention bash bench/device_check.sh b8b", timeout_s=350)  # the target
#   (BATCHES=1: a batch of 32 is another row bucket, another ~100 s of the skinny kernel's autotuning)
#   run(command="TESTS=kernels bash bench/device_check.sh tests", timeout_s=150)  # the kernels' CUDA tests
#   and, with what is left: kernels (280: each kernel against cuBLAS / the torch step, shape by shape,
#   with and without the layers' fusions, where a variant loses), sampler (60). give_back. A variant that wins: switch its kernels on for the
#   engine (each module's `enabled` default: a tensor-parallel worker sees only the default).
# Steps (seconds each at most): kernels (260: bench/skinny.py, the projections at rows 1, 2 and 32, each
# launch config swept at 2 rows; the kernel compiles once per row bucket, ~12 configs, then autotunes per
# shape; bench/attention.py, rows 2 and 32, 256-4096 keys), b8b (330: Idefics3-8B at batch 1, the bandwidth target, and 32, profiled,
# one process), b32_256m (180: the 5x target, profiled), tests (300: the CUDA tests), stream (180: streamed
# blocks, rows about one image), qpi4 (180: batch 32 as 8 images x 4 questions), variants (280: the 8B's
# shapes with 8 layers, batch 1 and 32 or BATCHES, side by side, each its own compile: base; unpadded, the LM head
# as run 6 ran it; eager_pointwise, the prefill's norms, RoPE and activation as run 6 ran them; see
# bench/decode_variants.py), b256 (360: both models at batch 256, never measured compiled; two
# compiles), sampler (120: the sampler alone at the 8B's vocabulary, 32 and 256 rows, eager vs
# compiled; ~25 s in run 6; now also the nucleus by bisection, top_p, against the sort, top_p_sort,
# and the compiled greedy draw; stop 40: the repetition penalty and vLLM's presence / frequency penalties,
# kinds repetition and counted, their CUDA path's first run), samples (150: 32 prompts x 8 sampled answers vs transformers'
# num_return_sequences, bf16, 512-px tiles), score (120: 128 texts scored against 32 images vs
# transformers' forward pass), beams (150: 32 prompts x 4 beams vs transformers' beam search, bf16, 512-px
# tiles: the host's per-search bookkeeping, ~90 us a search a step on this project's CPU box, against
# the GPU's step). A process compiles the decode step once per model: 100-110 s on a
# fresh machine (run 5), 25-40 s at 8 layers, the tiny test models ~20 s each. Not `autotune` at 32
# layers: its compile alone outran b8b's 270 s (run 6). The prefill's pointwise kernels compile at
# the first prefill (~16 s on this project's 2-core CPU box, cold).
# The device image has python, torch (CUDA), transformers, tokenizers, pytest; not Ray (no step needs it).
# Each step's whole log lands in $OUT, the JSON rows of bench/engine.py in $OUT/engine.jsonl, and stdout
# shows the rows and the logs' ends. TESTS="<pytest -k expression>" narrows the tests step.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCH_LOGS=recompiles   # a recompile mid-run is a ~45-85 s stall
OUT=${OUT:-/tmp/device_out}; mkdir -p "$OUT"
ENGINE=(python3 bench/engine.py --device cuda --new-tokens 64 --out "$OUT/engine.jsonl")
step() {  # step SECONDS NAME COMMAND...: the command's whole output in $OUT/NAME.log, its end here
  local limit=$1 name=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - start)) s"
  grep -v -i "warn\|^ *$\|^---\|^ \{20\}" "$OUT/$name.log" | grep "^{\|^#\|Recompiling\|passed\|failed\|FAILED\|Error\|error" | tail -"${TAIL:-14}"
}
header() {
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader
  python3 - <<'EOF'
import torch, transformers
x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
a.record(); [y.copy_(x) for _ in range(10)]; b.record(); torch.cuda.synchronize()
print("torch", torch.__version__, "transformers", transformers.__version__,
      f"copy bandwidth (read + write) {2 * 10 * x.numel() / (a.elapsed_time(b) / 1e3) / 1e12:.2f} TB/s")
EOF
}
run_step() {
  case "$1" in
  b8b) step 330 b8b "${ENGINE[@]}" --models idefics3-8b --batches ${BATCHES:-1 32} --repeats 2 --profile --variants ${VARIANTS:-base} ;;
  b32_256m) step 180 b32_256m "${ENGINE[@]}" --models smolvlm-256m --batches 32 --repeats 2 --profile ;;
  tests) TAIL=30 step 300 tests python3 -m pytest -p no:cacheprovider -o addopts=-ra --timeout 150 \
    tests/model/test_cuda.py tests/model/test_engine.py tests/model/test_engine_loop.py tests/model/test_fusion.py \
    tests/model/test_prefix_cache.py tests/model/test_beam_search.py tests/model/test_choices.py tests/model/test_scoring.py tests/model/test_top_logprobs.py tests/model/test_lm_head.py tests/model/test_pointwise.py tests/model/test_kernels.py tests/processing/test_pixels.py tests/processing/test_image_torch_recipe.py \
    -k "${TESTS:-cuda or fused or fusion}" ;;
  stream) step 180 stream python3 bench/stream.py --device cuda --blocks 8 --batch 16 --slots 64 --repeats 1 \
    --questions-per-image 4 ;;
  qpi4) step 180 qpi4 "${ENGINE[@]}" --models smolvlm-256m --batches 32 --repeats 1 --questions-per-image 4 ;;
  kernels) TAIL=40 step 260 kernels bash -c "python3 bench/attention.py --splits 1 2 4 8 --out $OUT/attention.jsonl;
    python3 bench/skinny.py --rows 2 --sweep --fused --out $OUT/skinny.jsonl; python3 bench/skinny.py --rows 1 32 --out $OUT/skinny.jsonl" ;;
  sampler) step 120 sampler python3 bench/sampler.py --device cuda --rows 32 256 --vocab 128259 ;;
  samples) step 150 samples python3 bench/samples.py --device cuda --dtype bfloat16 --tile 512 --batch 32 --samples 8 \
    --new-tokens 64 --repeats 2 ;;
  score) step 120 score python3 bench/score.py --device cuda --dtype bfloat16 --tile 512 --images 32 --texts 4 --repeats 2 ;;
  beams) step 150 beams python3 bench/beams.py --device cuda --dtype bfloat16 --tile 512 --batch 32 --beams 4 \
    --new-tokens 64 --repeats 2 ;;
  b256) step 360 b256 "${ENGINE[@]}" --models smolvlm-256m idefics3-8b --batches 256 --repeats 1 ;;
  variants) step 280 variants "${ENGINE[@]}" --models idefics3-8b --layers 8 --batches ${BATCHES:-1 32} --repeats 2 --profile \
    --variants ${VARIANTS:-base unpadded eager_pointwise} ;;
  *) echo "unknown step $1" ;;
  esac
}
header
for name in "${@:-b8b b32_256m tests stream qpi4}"; do
  for one in $name; do run_step "$one"; done
done
