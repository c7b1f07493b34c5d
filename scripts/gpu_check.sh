#!/usr/bin/env bash
# One run on a CUDA machine, from the checkout (nothing installed): the cpu and gpu test lanes,
# then the benchmark; ends with the test summary line and the benchmark table.
#
#   bash scripts/gpu_check.sh [benchmark options, e.g. --quick]
#
# With MLA_CUPY_OUT_DIR set, the test log goes to $MLA_CUPY_OUT_DIR/gpu_tests.log and the
# benchmark's JSON lines to $MLA_CUPY_OUT_DIR/bench.jsonl. Compiled kernels are cached in
# build/kernel_cache unless MLA_CUPY_CACHE_DIR says otherwise. Only reads the GPU's state: clocks, power limits and modes are left as they are.
# Exit status: non-zero if the tests or the benchmark failed (both always run).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export MLA_CUPY_CACHE_DIR=${MLA_CUPY_CACHE_DIR:-$PWD/build/kernel_cache}
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX shares the GPU with CuPy in the tests
out_dir=${MLA_CUPY_OUT_DIR:-}
logs=${out_dir:-$(mktemp -d)}
mkdir -p "$logs" "$MLA_CUPY_CACHE_DIR"
test_log="$logs/gpu_tests.log"
bench_log="$logs/bench.txt"
bench_args=("$@")
if [[ -n $out_dir ]]; then
  bench_args+=(--json "$out_dir/bench.jsonl")
fi

section() { printf '\n===== %s =====\n' "$*"; }

section "GPU"
nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,temperature.gpu,power.draw,clocks.sm,clocks.max.sm \
  --format=csv || echo "nvidia-smi failed (exit $?)"
python3 -c "import mla_cupy; mla_cupy.show_config()" || echo "show_config failed (exit $?)"

section "tests: pytest -m 'gpu or cpu'"
start=$SECONDS
python3 -m pytest -m "gpu or cpu" -q --require-gpu --durations=10 -p no:cacheprovider 2>&1 |
  tee "$test_log"
test_rc=${PIPESTATUS[0]}
test_s=$((SECONDS - start))

section "benchmark: python -m mla_cupy.bench ${bench_args[*]}"
start=$SECONDS
python3 -m mla_cupy.bench "${bench_args[@]}" 2>&1 | tee "$bench_log"
bench_rc=${PIPESTATUS[0]}
bench_s=$((SECONDS - start))

section "summary"
summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran' "$test_log" | tail -n 1)
echo "tests (exit $test_rc, ${test_s} s): ${summary:-no pytest summary line; see $test_log}"
echo "benchmark (exit $bench_rc, ${bench_s} s)${out_dir:+; JSON lines in $out_dir/bench.jsonl}:"
# The GPU and date lines of the benchmark's header, then its table (from the "config" header
# line to the first blank line); all of its output if it printed no table.
if grep -q '^config ' "$bench_log"; then
  grep -E '^  (gpu|date) ' "$bench_log"
  sed -n '/^config /,/^$/p' "$bench_log"
else
  grep -v '^{' "$bench_log"
fi

[[ $test_rc -eq 0 && $bench_rc -eq 0 ]]
