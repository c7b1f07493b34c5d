#!/usr/bin/env bash
# compute-sanitizer over every kernel: scripts/sanitize_cases.py (edge-shaped problems through the
# scheduler, each decode family -- portable and sm90 -- and the combine) once without a sanitizer
# (builds the kernels into the cache, checks the results against the reference), then under
# memcheck with leak checking, racecheck, synccheck and initcheck. Ends with a summary, one line
# per tool: "memcheck: 0 errors" and so on.
#
#   bash scripts/sanitize.sh [sanitize_cases.py options, e.g. --kinds portable or --cases page1]
#
# Environment:
#   SANITIZER          the compute-sanitizer executable (default: compute-sanitizer on PATH, else
#                      /usr/local/cuda/bin/compute-sanitizer)
#   SANITIZE_TOOLS     tools to run (default "memcheck racecheck synccheck initcheck")
#   SANITIZE_TIMEOUT   seconds one tool may run before it is stopped and counted as failed
#                      (default 300)
#   SANITIZE_ARGS      more compute-sanitizer options, given to every tool
#   MLA_CUPY_OUT_DIR   logs go there (sanitize_plain.log, sanitize_<tool>.log); a temporary
#                      folder otherwise
# Compiled kernels are cached in build/kernel_cache unless MLA_CUPY_CACHE_DIR says otherwise.
# CUDA API calls that fail are not counted (--report-api-errors no): CuPy makes some on purpose,
# and one of mla_cupy's own raises, which fails its case and the run.
# Exit status: 0 when the plain run passed and every tool ran to its end with 0 errors; 2
# without compute-sanitizer or a usable GPU; 1 otherwise.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
t_start=$SECONDS
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export MLA_CUPY_CACHE_DIR=${MLA_CUPY_CACHE_DIR:-$PWD/build/kernel_cache}
logs=${MLA_CUPY_OUT_DIR:-$(mktemp -d)}
mkdir -p "$logs" "$MLA_CUPY_CACHE_DIR"

section() { printf '\n===== %s (t=%ss) =====\n' "$*" "$((SECONDS - t_start))"; }

# A long log: its first 60 lines and its last 15.
show() {
  local n
  n=$(wc -l < "$1")
  if (( n <= 80 )); then
    cat "$1"
  else
    head -n 60 "$1"
    echo "... ($((n - 75)) lines left out; the whole log is $1) ..."
    tail -n 15 "$1"
  fi
}

sanitizer=${SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
if [[ ! -x $sanitizer ]]; then
  echo "compute-sanitizer not found (looked on PATH and at $sanitizer); set SANITIZER"
  exit 2
fi
section "compute-sanitizer: $sanitizer"
"$sanitizer" --version | tail -n 2

section "plain run: python3 scripts/sanitize_cases.py $*"
start=$SECONDS
python3 scripts/sanitize_cases.py "$@" 2>&1 | tee "$logs/sanitize_plain.log"
plain_rc=${PIPESTATUS[0]}
plain_line="plain run (no sanitizer): exit $plain_rc, $((SECONDS - start)) s: $(grep -E '^sanitize_cases:' "$logs/sanitize_plain.log" | tail -n 1)"
if [[ $plain_rc -eq 2 ]]; then
  echo "$plain_line"
  exit 2
fi

read -r -a extra <<< "${SANITIZE_ARGS:-}"
tool_lines=()
failed=$(( plain_rc != 0 ))
for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck initcheck}; do
  cmd=("$sanitizer" --tool "$tool" --report-api-errors no)
  if [[ $tool == memcheck ]]; then
    # Host backtraces keep the Python frames of each allocation alive, and with them the arrays
    # those frames held: every array would be reported as leaked. Device backtraces only.
    cmd+=(--leak-check full --show-backtrace device)
  fi
  cmd+=("${extra[@]}" python3 scripts/sanitize_cases.py "$@")
  log="$logs/sanitize_$tool.log"
  section "$tool: ${cmd[*]}"
  start=$SECONDS
  timeout -k 20 "${SANITIZE_TIMEOUT:-300}" "${cmd[@]}" > "$log" 2>&1
  rc=$?
  show "$log"
  # memcheck, synccheck, initcheck: "ERROR SUMMARY: N errors"; racecheck: "RACECHECK SUMMARY: N
  # hazards displayed (E errors, W warnings)".
  errors=$(grep -Eo 'ERROR SUMMARY: [0-9]+|\([0-9]+ errors' "$log" | tail -n 1 | grep -Eo '[0-9]+')
  cases=$(grep -E '^sanitize_cases:' "$log" | tail -n 1)
  line="$tool: ${errors:-?} errors ($((SECONDS - start)) s, exit $rc; ${cases:-the cases did not finish})"
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    line="$tool: ${errors:-?} errors (stopped after ${SANITIZE_TIMEOUT:-300} s; ${cases:-the cases did not finish})"
  fi
  if [[ -z $errors || $errors -ne 0 || $rc -ne 0 ]]; then
    failed=1
  fi
  tool_lines+=("$line")
done

section "summary"
echo "$plain_line"
for line in "${tool_lines[@]}"; do
  echo "$line"
done
echo "logs in $logs; total $((SECONDS - t_start)) s"
exit "$failed"
