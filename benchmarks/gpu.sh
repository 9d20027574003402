#!/usr/bin/env bash
# One command for a machine with a GPU (at most 8 minutes): prints the
# device, runs the test suite, then the two serving benchmarks, writing their
# tables into $OUT.
#
#   benchmarks/gpu.sh                       # tables into gpu-results/
#   OUT=/tmp/results benchmarks/gpu.sh      # elsewhere
#   INSTALL=1 benchmarks/gpu.sh             # first: pip install -e ".[test]" (online)
#   QUICK=1 benchmarks/gpu.sh               # a dry run anywhere (CPU too): the
#                                           # benchmarks' --quick modes
#
# Installs nothing unless INSTALL=1 (the GPU machines have no internet; the
# install stage has its own 300 s limit, outside the 8 minutes): the package and
# its test extras must already be importable by $PYTHON (default `python`).
#
# Each stage runs under `timeout`, in seconds, overridable: DEVICE_TIMEOUT=50
# TEST_TIMEOUT=200 SERVING_TIMEOUT=120 CONTINUOUS_TIMEOUT=90 (460 s, 480 with
# each stage's 5 s to die). A failed or timed-out stage is reported and the next
# still runs; the exit status is 1 if any failed. STAGES="device continuous" runs
# a subset of: install device tests serving continuous. TEST_WORKERS=8: pytest-
# xdist workers.
#
# On a GPU, float32 matmuls default to TF32, which the tests' float64 references
# and the benchmarks' 1e-3 checks are not written for: every stage runs with
# JAX_DEFAULT_MATMUL_PRECISION=highest (override it to time TF32). The tests run
# in several processes, so GPU memory is not preallocated there.

set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-gpu-results}
PYTHON=${PYTHON:-python}
STAGES=${STAGES:-install device tests serving continuous}
export JAX_DEFAULT_MATMUL_PRECISION=${JAX_DEFAULT_MATMUL_PRECISION:-highest}
mkdir -p "$OUT"
failed=()
start=$SECONDS

want() { [[ " $STAGES " == *" $1 "* ]]; }

stage() { # stage NAME TIMEOUT COMMAND...: runs COMMAND, its output also in $OUT/NAME.log
	local name=$1 limit=$2
	shift 2
	echo
	echo "== $name (limit ${limit}s): $*"
	local t0=$SECONDS
	timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
	local rc=${PIPESTATUS[0]}
	if [[ $rc -eq 0 ]]; then
		echo "== $name: ok in $((SECONDS - t0)) s"
	else
		[[ $rc -eq 124 || $rc -eq 137 ]] && rc="$rc (timed out)"
		echo "== $name: FAILED, exit status $rc, after $((SECONDS - t0)) s"
		failed+=("$name")
	fi
}

if want install && [[ ${INSTALL:-0} == 1 ]]; then
	stage install 300 "$PYTHON" -m pip install -e ".[test]"
fi

if want device; then
	stage device "${DEVICE_TIMEOUT:-50}" "$PYTHON" -c '
import jax
print(jax.devices())
print("jax", jax.__version__, "backend", jax.default_backend())
if jax.default_backend() == "cpu":
    print("WARNING: no accelerator found: everything below runs on the CPU")
'
fi

quick=()
[[ ${QUICK:-0} == 1 ]] && quick=(--quick)

if want tests; then
	XLA_PYTHON_CLIENT_PREALLOCATE=false stage tests "${TEST_TIMEOUT:-200}" \
		"$PYTHON" -m pytest -x -q -p no:cacheprovider -n "${TEST_WORKERS:-8}"
fi

if want serving; then
	stage serving "${SERVING_TIMEOUT:-120}" "$PYTHON" -m benchmarks.serving \
		${quick[@]+"${quick[@]}"} --out "$OUT/serving.md" --plot "$OUT/serving.png"
fi

if want continuous; then
	stage continuous "${CONTINUOUS_TIMEOUT:-90}" "$PYTHON" -m benchmarks.continuous \
		${quick[@]+"${quick[@]}"} --out "$OUT/continuous.md"
fi

echo
echo "== done in $((SECONDS - start)) s; tables and logs in $OUT/"
ls -l "$OUT"
if [[ ${#failed[@]} -gt 0 ]]; then
	echo "== FAILED: ${failed[*]}"
	exit 1
fi
