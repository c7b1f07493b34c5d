#!/usr/bin/env bash
# One run on a CUDA machine, from the checkout (nothing installed): the cpu and gpu test lanes
# once per kernel path, then the benchmark beside FlashMLA and FlashInfer; ends with a summary:
# one line per test lane, the peers' state and the benchmark table.
#
#   bash scripts/gpu_check.sh [benchmark options, e.g. --quick or --sweep extra]
#
# Environment:
#   GPU_CHECK_TESTS=0          skip the test lanes
#   GPU_CHECK_KERNELS          kernel paths of the test lanes (default "portable sm90"); each
#                              lane runs with MLA_CUPY_KERNEL set to one of them
#   GPU_CHECK_HOST_PROFILE=0   skip scripts/host_profile.py --breakdown (host µs per call and per
#                              step of a call; on by default)
#   GPU_CHECK_AB="DIR ..."     after the benchmark, scripts/ab_kernels.py once per folder of kernel
#                              sources, with the benchmark's options (A/B runs of kernel versions
#                              in the same machine session as the main table)
#   GPU_CHECK_SANITIZE=1       also scripts/sanitize.sh (several minutes)
#   GPU_CHECK_LONG_RUN=N       also scripts/long_run.py --calls N
#   GPU_CHECK_EDGE=1           also scripts/edge_inputs.py (edge inputs beside FlashMLA)
#   GPU_CHECK_BENCH_ARGS       benchmark options (default "--kernels auto,portable"), before
#                              the command line's own
#   MLA_CUPY_OUT_DIR           logs go there (gpu_tests_<kernel>.log, bench.txt, bench.jsonl,
#                              host_profile.txt, flashinfer_setup.log); a temporary folder
#                              otherwise
# Peers: .peers/flashmla is used as it is; when .peers/flashinfer holds flashinfer_setup.sh
# (scripts/get_peers.sh puts it there), FlashInfer's kernels are built in the background from the
# first second (build/flashinfer_peer, reused while the machine lives) and put on the Python path
# for the benchmark. Compiled mla_cupy kernels are cached in build/kernel_cache unless
# MLA_CUPY_CACHE_DIR says otherwise. Only reads the GPU's state: clocks, power limits and modes
# are left as they are.
# Exit status: non-zero if a portable test lane or the benchmark failed (everything always runs;
# the other lanes are reported, not counted).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
t_start=$SECONDS
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export MLA_CUPY_CACHE_DIR=${MLA_CUPY_CACHE_DIR:-$PWD/build/kernel_cache}
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX shares the GPU with CuPy in the tests
out_dir=${MLA_CUPY_OUT_DIR:-}
logs=${out_dir:-$(mktemp -d)}
mkdir -p "$logs" "$MLA_CUPY_CACHE_DIR"
bench_log="$logs/bench.txt"

section() { printf '\n===== %s (t=%ss) =====\n' "$*" "$((SECONDS - t_start))"; }

# (a) FlashInfer: start its build now, collect the exports before the benchmark.
fi_pid=""
fi_exports="$logs/flashinfer_exports.sh"
fi_log="$logs/flashinfer_setup.log"
fi_state="not prepared (no .peers/flashinfer/flashinfer_setup.sh; see scripts/get_peers.sh)"
if [[ -f .peers/flashinfer/flashinfer_setup.sh ]]; then
  export FI_ROOT=${FI_ROOT:-$PWD/build/flashinfer_peer}
  : > "$fi_exports"
  bash .peers/flashinfer/flashinfer_setup.sh .peers/flashinfer > "$fi_exports" 2> "$fi_log" &
  fi_pid=$!
  fi_state="building in the background"
fi

section "GPU"
nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,temperature.gpu,power.draw,clocks.sm,clocks.max.sm \
  --format=csv || echo "nvidia-smi failed (exit $?)"
python3 -c "import mla_cupy; mla_cupy.show_config()" || echo "show_config failed (exit $?)"

# (b) test lanes, one per kernel path.
lane_lines=()
tests_rc=0
if [[ ${GPU_CHECK_TESTS:-1} != 0 ]]; then
  for kernel in ${GPU_CHECK_KERNELS:-portable sm90}; do
    section "tests (MLA_CUPY_KERNEL=$kernel): pytest -m 'gpu or cpu'"
    log="$logs/gpu_tests_$kernel.log"
    start=$SECONDS
    MLA_CUPY_KERNEL=$kernel python3 -m pytest -m "gpu or cpu" -q --require-gpu --durations=5 \
      -p no:cacheprovider 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran' "$log" | tail -n 1)
    lane_lines+=("tests MLA_CUPY_KERNEL=$kernel (exit $rc, $((SECONDS - start)) s): ${summary:-no pytest summary line; see $log}")
    if [[ $rc -ne 0 && $kernel == portable ]]; then
      tests_rc=$rc
    fi
  done
else
  lane_lines+=("tests skipped (GPU_CHECK_TESTS=0)")
fi

# FlashInfer's build: wait for it (it has its own time limit) and take its exports.
if [[ -n $fi_pid ]]; then
  section "FlashInfer peer: waiting for its build"
  wait "$fi_pid"
  fi_rc=$?
  jit_log="$FI_ROOT/jit.log"
  if [[ $fi_rc -eq 0 ]] && grep -q '^export ' "$fi_exports"; then
    eval "$(grep '^export ' "$fi_exports")"
    fi_state="setup exit 0; $(grep -E 'FI JIT fa3|FI import FAILED' "$jit_log" 2>/dev/null | head -n 1 | cut -c1-100)"
    [[ -f $FI_ROOT/ws/.built ]] && fi_state="ready ($fi_state)"
  else
    fi_state="setup failed (exit $fi_rc); see $fi_log"
  fi
  echo "$fi_state"
  [[ -f $jit_log ]] && cp "$jit_log" "$logs/flashinfer_jit.log" 2>/dev/null
fi

# (c) benchmark.
read -r -a env_args <<< "${GPU_CHECK_BENCH_ARGS---kernels auto,portable}"
bench_args=("${env_args[@]}" "$@")
if [[ -n $out_dir ]]; then
  bench_args+=(--json "$out_dir/bench.jsonl")
fi
section "benchmark: python -m mla_cupy.bench ${bench_args[*]}"
start=$SECONDS
python3 -m mla_cupy.bench "${bench_args[@]}" 2>&1 | tee "$bench_log"
bench_rc=${PIPESTATUS[0]}
bench_s=$((SECONDS - start))

# Kernel versions side by side, then the optional long checks.
for dir in ${GPU_CHECK_AB-}; do
  section "A/B: python scripts/ab_kernels.py $dir ${bench_args[*]}"
  ab_log="$logs/ab_$(basename "$dir").txt"
  python3 scripts/ab_kernels.py "$dir" "${bench_args[@]}" 2>&1 | tee "$ab_log"
done
extra_lines=()
if [[ ${GPU_CHECK_SANITIZE:-0} != 0 ]]; then
  section "compute-sanitizer: bash scripts/sanitize.sh"
  bash scripts/sanitize.sh 2>&1 | tee "$logs/sanitize.txt"
  sanitize_rc=${PIPESTATUS[0]}
  # The summary's tool lines: "<tool>check: N errors (...)"; those with errors are named.
  tools=$(grep -cE '^[a-z]+check: ' "$logs/sanitize.txt")
  clean=$(grep -cE '^[a-z]+check: 0 errors' "$logs/sanitize.txt")
  dirty=$(grep -E '^[a-z]+check: ' "$logs/sanitize.txt" | grep -vE '^[a-z]+check: 0 errors' | sed 's/ *(.*//' | paste -sd, - | sed 's/,/, /g')
  extra_lines+=("sanitize.sh (exit $sanitize_rc): $clean of $tools tools clean${dirty:+; not clean: $dirty}")
fi
if [[ -n ${GPU_CHECK_LONG_RUN:-} ]]; then
  section "long run: python scripts/long_run.py --calls $GPU_CHECK_LONG_RUN"
  python3 scripts/long_run.py --calls "$GPU_CHECK_LONG_RUN" 2>&1 | tee "$logs/long_run.txt"
  extra_lines+=("long_run.py (exit ${PIPESTATUS[0]}): $(tail -n 1 "$logs/long_run.txt")")
fi
if [[ ${GPU_CHECK_EDGE:-0} != 0 ]]; then
  section "edge inputs: python scripts/edge_inputs.py"
  python3 scripts/edge_inputs.py 2>&1 | tee "$logs/edge_inputs.txt"
  extra_lines+=("edge_inputs.py (exit ${PIPESTATUS[0]}): $(tail -n 1 "$logs/edge_inputs.txt")")
fi

# Host cost per call (a few seconds).
host_log="$logs/host_profile.txt"
if [[ ${GPU_CHECK_HOST_PROFILE:-1} != 0 ]]; then
  section "host profile: python scripts/host_profile.py --breakdown"
  python3 scripts/host_profile.py --breakdown 2>&1 | tee "$host_log"
else
  : > "$host_log"
fi

# (d) summary, last.
section "summary"
for line in "${lane_lines[@]}"; do
  echo "$line"
done
echo "FlashInfer peer: $fi_state"
for line in ${extra_lines[@]+"${extra_lines[@]}"}; do
  echo "$line"
done
sed -n '/^call /,/^$/p' "$host_log"
echo "benchmark (exit $bench_rc, ${bench_s} s)${out_dir:+; JSON lines in $out_dir/bench.jsonl}:"
# The GPU, date and peer lines of the benchmark's header, then its table (from the "config"
# header line to the first blank line); all of its output if it printed no table.
if grep -q '^config ' "$bench_log"; then
  grep -E '^  (gpu|date|FlashMLA peer|FlashInfer peer|kernels) ' "$bench_log"
  sed -n '/^config /,/^$/p' "$bench_log"
else
  grep -v '^{' "$bench_log"
fi
for dir in ${GPU_CHECK_AB-}; do
  ab_log="$logs/ab_$(basename "$dir").txt"
  echo "A/B, kernel sources of $dir:"
  sed -n '/^config /,/^$/p' "$ab_log"
done
echo "total $((SECONDS - t_start)) s"

[[ $tests_rc -eq 0 && $bench_rc -eq 0 ]]
