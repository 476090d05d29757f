#!/bin/bash
# The prepared GPU checks for a device session (15 device-minutes, a machine start included): two calls,
# each under ten minutes, the machine given back between them if they are not run at once:
#   run(command="bash bench/device_check.sh 1", timeout_s=480)   # the targets, their profiles, the CUDA tests
#   run(command="bash bench/device_check.sh 2", timeout_s=280, carry=["tmp/inductor_cache"])
# (before call 2: `mkdir -p tmp && tar xzf <files_at>/inductor.tgz -C tmp`, so its compiles are cache hits).
# The device image has python, torch (CUDA), transformers, tokenizers, pytest; not Ray (no test here needs it).
# Each step has its own time limit so that a slow one cannot starve the rest; its whole log lands in $OUT,
# the JSON rows of bench/engine.py in $OUT/engine.jsonl, and stdout shows the rows and the logs' ends.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$PWD/tmp/inductor_cache
OUT=${OUT:-/tmp/device_out}; mkdir -p "$OUT" "$TORCHINDUCTOR_CACHE_DIR"
step() {  # step SECONDS NAME COMMAND...: the command's whole output in $OUT/NAME.log, its end here
  local limit=$1 name=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - start)) s"
  grep -v -i "warn\|^ *$\|^---\|^ \{20\}" "$OUT/$name.log" | grep "^{\|^#\|passed\|failed\|FAILED\|Error\|error" | tail -"${TAIL:-14}"
}
ENGINE=(python3 bench/engine.py --device cuda --new-tokens 64 --out "$OUT/engine.jsonl")   # timeout runs no shell function
case "${1:-1}" in
1)
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
  step 150 b1_8b "${ENGINE[@]}" --models idefics3-8b --batches 1 --repeats 3 --profile
  step 120 b32_256m "${ENGINE[@]}" --models smolvlm-256m --batches 32 --repeats 2 --profile
  TAIL=30 step 150 tests python3 -m pytest -p no:cacheprovider -o addopts=-ra --timeout 90 tests/model/test_cuda.py \
    tests/model/test_engine.py tests/model/test_engine_loop.py tests/model/test_fusion.py tests/model/test_prefix_cache.py \
    tests/processing/test_pixels.py tests/processing/test_image_torch_recipe.py -k "cuda or fused or fusion"
  ;;
2)
  step 80 stream python3 bench/stream.py --device cuda --blocks 8 --batch 16 --slots 64 --repeats 1 --questions-per-image 4
  step 80 b32_8b "${ENGINE[@]}" --models idefics3-8b --batches 32 --repeats 1
  step 60 qpi4 "${ENGINE[@]}" --models smolvlm-256m --batches 32 --repeats 1 --questions-per-image 4
  ;;
esac
tar czf "$OUT/inductor.tgz" -C tmp inductor_cache 2>/dev/null && ls -l "$OUT/inductor.tgz"
