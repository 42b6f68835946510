# effseq: every target builds .venv from setup.cfg on first use (and again when setup.cfg changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GPU_STAMP := $(VENV)/.installed-gpu
# Progress lines appear as they happen, also through a pipe.
export PYTHONUNBUFFERED := 1

.PHONY: run test test-gpu bench-gpu kernel-report test-slow test-parity lint format bench bench-ops bench-models bench-small bench-packing bench-sequence clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## run: the main job: compare all five mixers on generated ListOps and MQAR (results/compare/)
run: $(STAMP)
	$(BIN)/effseq compare --out results/compare

## bench-ops: the ops benchmark at its goal sizes (results/ops/)
bench-ops: $(STAMP)
	$(BIN)/python -m effseq.benchmarks.ops

## bench-models: the model-level benchmark, quick plan (results/bench/)
bench-models: $(STAMP)
	$(BIN)/effseq bench

## bench-packing: packed vs padded training throughput per mixer (benchmarks/results/packing.*)
bench-packing: $(STAMP)
	$(BIN)/python -m effseq.benchmarks.packing

## bench-sequence: per-device memory and step time vs length for mesh.sequence = 1, 2, 4, 8
## (8 fake CPU devices here; real ones on an accelerator mesh) (benchmarks/results/sequence.*)
bench-sequence: $(STAMP)
	XLA_FLAGS="$${XLA_FLAGS:---xla_force_host_platform_device_count=8}" $(BIN)/python -m effseq.benchmarks.sequence

## bench-small: the default suite's models: step time, GFLOP/s, loop overhead (results/bench/)
bench-small: $(STAMP)
	$(BIN)/effseq bench --plan small

## test: lint, then the fast test suite (what CI runs)
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# jax's CUDA plugin (the `gpu` extra of setup.cfg), for the GPU targets only.
$(GPU_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,gpu]'
	touch $(GPU_STAMP)

## test-gpu: the fast suite on one NVIDIA GPU, in one process (tests that need several devices
## skip); float32 checks at "highest" precision, the default-precision (TF32) tier in
## tests/test_gpu_precision.py, the Pallas kernels compiled by Triton instead of interpreted
test-gpu: $(GPU_STAMP)
	JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false $(BIN)/python -m pytest -q

## bench-gpu: every mixer's op at FLA's shapes vs cuDNN attention (benchmarks/results/<gpu>/)
bench-gpu: $(GPU_STAMP)
	JAX_PLATFORMS=cuda $(BIN)/effseq bench --plan gpu

## kernel-report: every Pallas kernel compiled for sm_90 by the triton package (no GPU needed):
## registers, spills, shared memory against Hopper's 227 KiB (results/kernels/)
kernel-report: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[kernels]'
	$(BIN)/python -m effseq.benchmarks.kernel_report

## test-slow: only the tests marked slow
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

## test-parity: converters against the official PyTorch modules (needs torch and the official
## sources: tests/convert/official.py says how; skips what is missing)
test-parity: $(STAMP)
	$(BIN)/python -m pytest -q -m parity tests/convert

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## bench: the full ops benchmark (t = 1k..16k), writes benchmarks/results/ops.json
bench: $(STAMP)
	$(BIN)/python -m effseq.benchmarks.ops --full

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
