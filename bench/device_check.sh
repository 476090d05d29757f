#!/bin/bash
# The prepared GPU check for a device session (15 device-minutes; one call, then give the machine back):
#   rm -rf tmp/gpu_deps && mkdir -p tmp/gpu_deps && cp -r .venv/lib/python3.11/site-packages/{_pytest,pytest,pluggy,\
#     iniconfig,py.py,pytest_timeout.py,pygments,packaging} tmp/gpu_deps/      # the device image has no pytest
#   run(command="bash bench/device_check.sh", carry=["tmp/gpu_deps"], timeout_s=560)
# Order = priority: the CUDA tests, the 8B decode (bandwidth target), the batch-32 ratio, streamed
# blocks vs one at a time and rows about one image (bench/stream.py), the 8B batch-32 ratio, and
# batch 32 as 8 images x 4 questions (VQA-shaped).
# Each step has its own time limit so that a slow one cannot starve the rest; rows land in $OUT.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/tmp/gpu_deps:$PWD
OUT=${OUT:-/tmp/device_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 150 python -m pytest -q -x -p no:cacheprovider tests/model/test_cuda.py tests/model/test_engine.py \
  tests/model/test_engine_loop.py tests/model/test_fusion.py tests/model/test_prefix_cache.py tests/processing/test_pixels.py \
  -k "cuda or fused or fusion" 2>&1 | tail -4
bench() { timeout "$1" python bench/engine.py --device cuda --new-tokens 64 --out "$OUT/engine.jsonl" "${@:2}" 2>&1 \
  | grep -v -i warn | tail -30; }
bench 160 --models idefics3-8b --batches 1 --repeats 2 --profile
bench 150 --models smolvlm-256m --batches 32 --repeats 2 --profile
timeout 70 python bench/stream.py --device cuda --blocks 8 --batch 16 --slots 64 --repeats 1 --questions-per-image 4 2>&1 | tail -1
bench 60 --models idefics3-8b --batches 32 --repeats 1
bench 60 --models smolvlm-256m --batches 32 --repeats 1 --questions-per-image 4
