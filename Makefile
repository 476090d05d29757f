# Two entry points: `make demo` and `make test`. Each creates its own environment on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Python may write the bytecode of what it imports, whatever the environment says (PYTHONDONTWRITEBYTECODE=1
# on some machines): the install leaves most of it to the first import (below).
WRITES_BYTECODE := env -u PYTHONDONTWRITEBYTECODE

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Without a GPU, take the CPU build of torch (a plain `torch` would pull a multi-GB CUDA build).
	# With a GPU, leave torch to the range in pyproject.toml. Triton too without a GPU: its interpreter
	# runs model/kernels/' Triton kernels on CPU in the tests (CUDA builds of torch bring their own Triton).
	# --no-compile: pip byte-compiles every file it installs, on one core, half the install's time; what a job's
	# processes import is compiled by importing it once here, the rest as it is first imported.
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install -q --no-compile "torch==2.13.0" "triton==3.9.0"; fi
	$(BIN)/pip install -q --no-compile -e ".[test]"
	$(WRITES_BYTECODE) $(BIN)/python -c "import jobs.caption, jobs.evaluate, pipeline.job, pipeline.generate, \
		pipeline.preprocess, model.idefics3, model.engine, model.loading, ray._private.workers.default_worker"
	touch $(STAMP)

.PHONY: install test demo bench
install: $(STAMP)

test: $(STAMP)
	# a worker a core (tests/conftest.py makes the units: tests/pipeline on one worker, one after another)
	$(WRITES_BYTECODE) $(BIN)/python -m pytest -n auto tests

demo: $(STAMP)
	# a fresh run each time: the job refuses to overwrite an earlier output without --resume
	rm -rf demo/output/captions demo/output/captions.checkpoint demo/output/captions.summary.json \
		demo/output/captions.run.json
	$(WRITES_BYTECODE) $(BIN)/python -m jobs.caption

bench: $(STAMP)
	$(WRITES_BYTECODE) $(BIN)/python bench/preprocess.py
