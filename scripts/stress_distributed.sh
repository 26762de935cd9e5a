#!/usr/bin/env bash
# The torchrun tests again and again under artificial CPU load, to catch shutdown races that a
# quiet machine hides (issue 14): stops at the first failure and keeps its log.
#
#   scripts/stress_distributed.sh [RUNS] [BUSY] [PYTEST -k EXPRESSION]
#   scripts/stress_distributed.sh 30 4 sigterm    # the SIGTERM test, 30 times, beside 4 busy processes
#
# Logs: outputs/stress_distributed/run-N.log (under $OUT when it is set).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-30}
busy=${2:-4}
select=${3:-}
python=${ASK_PYTHON:-.venv/bin/python}
logs=${OUT:-outputs}/stress_distributed
mkdir -p "$logs"

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT
for _ in $(seq "$busy"); do "$python" -c 'while True: pass' & pids+=($!); done

args=(tests/test_distributed.py -q -p no:cacheprovider)
[[ -n $select ]] && args+=(-k "$select")
start=$(date +%s)
for run in $(seq "$runs"); do
    if ! "$python" -m pytest "${args[@]}" >"$logs/run-$run.log" 2>&1; then
        echo "stress_distributed: run $run of $runs FAILED after $(( $(date +%s) - start )) s (load: $busy busy processes); see $logs/run-$run.log" >&2
        exit 1
    fi
    echo "run $run/$runs passed ($(tail -n 1 "$logs/run-$run.log")) at $(( $(date +%s) - start )) s"
done
echo "stress_distributed: $runs of $runs passed beside $busy busy processes in $(( $(date +%s) - start )) s"
