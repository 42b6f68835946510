#!/usr/bin/env bash
# One prepared run on a lent NVIDIA GPU (issue 19), sized for a 15-minute device lease:
#   1. the GPU's identity and state (nvidia-smi);
#   2. the op-level tests on the GPU (tests/ops incl. the Pallas kernels compiled by Triton,
#      tests/layers, tests/test_gpu_precision.py: the TF32 tier), at most TEST_S seconds;
#   3. `effseq bench --plan gpu` (python -m effseq.benchmarks.gpu): first the rows the goals
#      name at T = 16k and 8k (BENCH_MIN minutes at most), then every row at 1k..16k with
#      what is left of ALL_MIN; results are written after each measurement.
# Everything lands in $OUT (the device tool's folder; results/device otherwise): gpu.txt,
# tests.txt, junit.xml, bench/{gpu.json,gpu.md,log.txt}, all/{gpu.json,gpu.md}. It uses the machine's own python3 and
# packages (jax with CUDA, flax, optax, chex there); the op-level tests and the benchmark need
# nothing else. For the whole `make test-gpu` there, carry wheels of what the image lacks
# (ml-collections, grain, tensorboardX, jupytext, nbclient, ...) in .whl/ (see the device
# README) and this script installs them first.
#
#   run: bash benchmarks/gpu/device_check.sh            (from the checkout root)
set -u
OUT=${OUT:-results/device}
TEST_S=${TEST_S:-270}
BENCH_MIN=${BENCH_MIN:-3}
ALL_MIN=${ALL_MIN:-2}
GOAL_ROWS=attention/cudnn,attention/xla-dpa,gla/chunked,gla/pallas,mamba2/chunked,mamba2/pallas
GOAL_ROWS=$GOAL_ROWS,gdn/chunked,gdn/pallas,mamba/chunked,mamba/pallas
PY=${PY:-python3}
mkdir -p "$OUT/bench" "$OUT/all"
GOAL_LENGTHS=${GOAL_LENGTHS:-16384,8192}
ALL_LENGTHS=${ALL_LENGTHS:-1024,4096,16384}
EXTRA=${EXTRA:-}  # more bench options; a CPU dry run: JAX_PLATFORMS=cpu EXTRA=--tiny ...
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
    --format=csv
  "$PY" -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())"
  git log --oneline -1 2>/dev/null
} >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

timeout "$TEST_S" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" \
  -m "not slow and not parity" --junitxml="$OUT/junit.xml" \
  tests/ops tests/layers tests/test_gpu_precision.py >"$OUT/tests.txt" 2>&1
echo "tests: exit $? (124 = cut at ${TEST_S} s)" | tee -a "$OUT/tests.txt"
tail -n 25 "$OUT/tests.txt"

timeout $((BENCH_MIN * 60 + 120)) "$PY" -m effseq.benchmarks.gpu --max-minutes "$BENCH_MIN" \
  --rows "$GOAL_ROWS" --lengths "$GOAL_LENGTHS" --out "$OUT/bench" $EXTRA >"$OUT/bench/log.txt" 2>&1
echo "bench (goal rows): exit $?"
timeout $((ALL_MIN * 60 + 120)) "$PY" -m effseq.benchmarks.gpu --max-minutes "$ALL_MIN" \
  --lengths "$ALL_LENGTHS" --out "$OUT/all" $EXTRA >>"$OUT/bench/log.txt" 2>&1
echo "bench (all rows): exit $?"
cat "$OUT/bench/gpu.md" 2>/dev/null || tail -n 30 "$OUT/bench/log.txt"
