#!/usr/bin/env bash
# One device call on the GPU machine (one H200; PyTorch, JAX, NumPy, pytest,
# pytest-xdist, hypothesis; no Keras, no TensorFlow, no network): installs the
# wheels, then runs, each stage under `timeout` with its own log in $OUT:
#   env             versions, the device, what imports from where
#   bench_jax       benchmarks/bench_gpu_attention.py --backend jax   (issue 27)
#   bench_torch     benchmarks/bench_gpu_attention.py --backend torch
#   cross_entropy   benchmarks/bench_half_cross_entropy.py, N=8192 D=4096 V=131072 (JAX)
#   cross_entropy_torch   the same on PyTorch                        (issue 28)
#   cross_entropy_32768   JAX again at N=32768, the issue's second size
#   tests           the GPU test files on KERAS_BACKEND=torch and =jax, a log
#                   and a timeout per file; the two backends side by side
#                   (after the benchmarks, which run alone on the machine)
# and writes each stage's exit code, seconds and last log line to
# $OUT/summary.txt (rc 124: its timeout; "skipped": the budget was spent).
# The whole run stops starting stages after $GPU_RUN_BUDGET seconds (450).
#
# Here, before the device call (the wheels and the two scripts travel in .whl/,
# which git ignores, so the call must carry it):
#   ../shared/gpu/prepare-wheels.sh                  # writes .whl/*.whl
#   cp ../shared/gpu/prepare-wheels.sh ../shared/gpu/install-wheels.sh .whl/
# The device call (the `run` tool), from the repository root:
#   command: bash .ci/gpu_run.sh      carry: [".whl"]      timeout_s: 540
# Its files come back from $OUT (default here: /tmp/gpu_out): summary.txt,
# bench_jax.log, bench_torch.log, cross_entropy.log, cross_entropy_torch.log,
# tests_<backend>_<file>.log. The benchmarks' caps add up to about the budget,
# so a first call may leave the tests skipped; a second call runs them:
#   command: GPU_RUN_STAGES="install env tests" bash .ci/gpu_run.sh
#
# The code measured and tested is the checkout's own: PYTHONPATH puts the
# repository root before /tmp/site (as `python3 -m pytest` does anyway), so the
# wheels supply Keras, namex and optree, and a source change needs no new wheel.
# Keras' other requirements (absl-py, rich, h5py, ml-dtypes, packaging) are
# expected on the machine; the env stage says if one is missing.
#
# Knobs (environment): GPU_RUN_BUDGET (seconds, 450), GPU_RUN_STAGES (a subset
# of "install env bench_jax bench_torch cross_entropy cross_entropy_torch
# cross_entropy_32768 tests"), GPU_RUN_TEST_FILES,
# GPU_RUN_WORKERS (8), GPU_RUN_BENCH_ARGS (e.g. "--lengths 4096"), GPU_RUN_CE_ARGS,
# PYTHON (python3). A dry run on a CPU, without the install:
#   GPU_RUN_STAGES="env bench_jax bench_torch tests" GPU_RUN_BENCH_ARGS=--small \
#   GPU_RUN_TEST_FILES=tests/test_exactness.py GPU_RUN_WORKERS=2 \
#   PYTHON=.venv/bin/python OUT=/tmp/gpu_out bash .ci/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

OUT="${OUT:-/tmp/gpu_out}"
PYTHON="${PYTHON:-python3}"
BUDGET="${GPU_RUN_BUDGET:-450}"
STAGES="${GPU_RUN_STAGES:-install env bench_jax bench_torch cross_entropy cross_entropy_torch cross_entropy_32768 tests}"
WORKERS="${GPU_RUN_WORKERS:-8}"
BENCH_ARGS="${GPU_RUN_BENCH_ARGS:-}"
CE_ARGS="${GPU_RUN_CE_ARGS:---tokens 8192 --depth 4096 --vocabulary 131072}"
# TensorFlow-only tests in these files (exports, tapes, tf.distribute) skip
# themselves on the JAX and PyTorch backends; no file needs TensorFlow whole.
# The half-precision attention file checks the GPU's fused kernels, which the
# default path takes for float16 and bfloat16, against the float32 contract.
TEST_FILES="${GPU_RUN_TEST_FILES:-tests/test_attention.py tests/test_multi_head_attention.py \
tests/test_attention_half_precision.py tests/test_linear_cross_entropy.py \
tests/test_head.py tests/test_tied_head.py \
tests/test_masking_and_special_values.py tests/test_exactness.py}"
SITE=/tmp/site # where install-wheels.sh installs

mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
START=$(date +%s)
DEADLINE=$((START + BUDGET))

export XLA_PYTHON_CLIENT_PREALLOCATE=false # else each JAX process takes 75% of the GPU
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3

wanted() { [[ " $STAGES " == *" $1 "* ]]; }

# The seconds a stage may take: its cap, or what is left of the budget.
allowed() {
  local cap=$1 left=$((DEADLINE - $(date +%s)))
  ((left < cap)) && cap=$left
  echo "$cap"
}

# run_stage NAME CAP COMMAND...: COMMAND under `timeout`, its output in
# $OUT/NAME.log, one line in the summary. Never stops the script.
run_stage() {
  local name=$1 cap=$2 limit start rc last
  shift 2
  limit=$(allowed "$cap")
  if ((limit < 15)); then
    printf '%-48s skipped (budget spent)\n' "$name" >>"$SUMMARY"
    return 0
  fi
  start=$(date +%s)
  echo "== $name (at most ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  last=$(grep -v '^[[:space:]]*$' "$OUT/$name.log" | tail -n 1 | cut -c1-110)
  printf '%-48s rc=%-4s %4ss  %s\n' "$name" "$rc" "$(($(date +%s) - start))" "$last" >>"$SUMMARY"
  return 0
}

install_wheels() {
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "no .whl/*.whl: run ../shared/gpu/prepare-wheels.sh here and carry .whl" >&2
    return 2
  fi
  if [[ -f .whl/install-wheels.sh ]]; then
    bash .whl/install-wheels.sh
  else # the README's command, should the copied script be missing
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$SITE" .whl/*.whl
  fi
}

show_environment() {
  date -u '+%Y-%m-%d %H:%M:%S UTC'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PYTHON" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("keras", "keras_softmax", "jax", "torch", "numpy", "namex", "optree",
             "absl", "rich", "h5py", "ml_dtypes", "packaging", "pytest", "xdist",
             "hypothesis", "pytest_timeout", "tensorflow"):
    try:
        module = importlib.import_module(name)
        print(f"{name:16} {getattr(module, '__version__', '?'):12} {module.__file__}")
    except Exception as error:
        print(f"{name:16} MISSING ({type(error).__name__}: {error})")
try:
    import jax
    print("jax devices:", jax.devices())
except Exception as error:
    print("jax devices: failed:", error)
try:
    import torch
    print("torch cuda:", torch.cuda.is_available(),
          torch.cuda.get_device_name() if torch.cuda.is_available() else "")
except Exception as error:
    print("torch: failed:", error)
try:  # the large-vocabulary loss's choices on this device (KERAS_BACKEND=torch)
    from keras_softmax._backend import torch as torch_edge
    from keras_softmax.linear_cross_entropy import _chunk
    cuda = torch.device("cuda")
    for dtype in (torch.bfloat16, torch.float16):
        print(f"float32 product of {dtype}:",
              torch_edge._float32_product_of_half(cuda, dtype))
    print("loss chunk rows at V = 131072:",
          _chunk(None, 131072, torch.zeros(8, 8, device=cuda)))
except Exception as error:
    print("loss choices: failed:", type(error).__name__, error)
EOF
}

# The test files on one backend, one after the other, each with its timeout.
run_tests() {
  local backend=$1 file per_test=()
  if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
    per_test=(--timeout=120)
  fi
  for file in $TEST_FILES; do
    if [[ ! -f $file ]]; then
      printf '%-48s skipped (no such file)\n' "tests_${backend}_$(basename "$file" .py)" >>"$SUMMARY"
      continue
    fi
    run_stage "tests_${backend}_$(basename "$file" .py)" 150 \
      env KERAS_BACKEND="$backend" HYPOTHESIS_PROFILE=other-backends \
      "$PYTHON" -m pytest -o addopts="" -n "$WORKERS" -p no:cacheprovider -q \
      "${per_test[@]}" "$file"
  done
}

# `timeout` runs programs, not functions: these two go through `bash -c`.
export -f install_wheels show_environment
export SITE PYTHON
if wanted install; then
  run_stage install 120 bash -c install_wheels
fi
if wanted env; then
  # (No TensorFlow there: Keras imports only with another backend named.)
  run_stage env 60 env KERAS_BACKEND=torch bash -c show_environment
fi
# The benchmarks alone on the machine, one after the other. A benchmark skips
# the cases that would start within 45 s of its timeout, and prints each case
# as it ends, so that a timeout keeps the ones it finished.
if wanted bench_jax; then
  limit=$(allowed 170)
  # shellcheck disable=SC2086 # BENCH_ARGS: words on purpose
  run_stage bench_jax 170 "$PYTHON" -u benchmarks/bench_gpu_attention.py \
    --backend jax --time-budget $((limit - 45)) $BENCH_ARGS
fi
if wanted bench_torch; then
  limit=$(allowed 140)
  # shellcheck disable=SC2086
  run_stage bench_torch 140 "$PYTHON" -u benchmarks/bench_gpu_attention.py \
    --backend torch --time-budget $((limit - 45)) $BENCH_ARGS
fi
if wanted cross_entropy; then
  # shellcheck disable=SC2086
  run_stage cross_entropy 75 env KERAS_BACKEND=jax \
    "$PYTHON" -u benchmarks/bench_half_cross_entropy.py $CE_ARGS
fi
if wanted cross_entropy_torch; then
  # shellcheck disable=SC2086
  run_stage cross_entropy_torch 60 "$PYTHON" -u \
    benchmarks/bench_half_cross_entropy.py --backend torch $CE_ARGS
fi
if wanted cross_entropy_32768; then
  # shellcheck disable=SC2086
  run_stage cross_entropy_32768 60 env KERAS_BACKEND=jax "$PYTHON" -u \
    benchmarks/bench_half_cross_entropy.py $CE_ARGS --tokens 32768
fi
if wanted tests; then
  run_tests torch &
  torch_tests=$!
  run_tests jax &
  jax_tests=$!
  wait "$torch_tests" "$jax_tests"
fi

{
  echo
  echo "total: $(($(date +%s) - START)) s of a ${BUDGET} s budget; logs in $OUT"
} >>"$SUMMARY"
echo
echo "==== summary ($SUMMARY)"
cat "$SUMMARY"
for log in "$OUT/bench_jax.log" "$OUT/bench_torch.log"; do
  if [[ -f $log ]]; then
    echo
    echo "==== $(basename "$log"): the summary table"
    sed -n '/^### Summary/,$p' "$log"
  fi
done
for log in "$OUT"/cross_entropy*.log; do
  if [[ -f $log ]]; then
    echo
    echo "==== $(basename "$log")"
    tail -n 9 "$log"
  fi
done
# Exit 0 only if every stage that ran exited 0.
! grep -q 'rc=[1-9]' "$SUMMARY"
