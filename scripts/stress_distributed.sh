#!/usr/bin/env bash
# The torchrun tests again and again under artificial CPU load, to catch shutdown races that a
# quiet machine hides (issue 14): stops at the first failure and keeps its log.
#
#   scripts/stress_distributed.sh [RUNS] [BUSY] [PYTEST -k EXPRESSION]
#   scripts/stress_distributed.sh 30 4 sigterm    # the SIGTERM test, 30 times, beside 4 busy processes
#
# Logs: outputs/stress_distributed/run-N.log (under $OUT when it is set). Thirty runs outlast a
# sitting, so the count survives one: the same command on the same commit (a clean tree) goes on
# from the last run that passed, as recorded in streak.txt; a failure, another commit or other
# arguments start again at run 1. Each line gives the 1-minute load average at the run's end.
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
streak="$logs/streak.txt"
key="$(git rev-parse HEAD 2>/dev/null || echo no-git) busy=$busy k=$select"
git diff --quiet HEAD 2>/dev/null || key="uncommitted changes"
passed=0
if [[ $key != "uncommitted changes" && -f $streak && $(head -n 1 "$streak") == "$key" ]]; then
    passed=$(sed -n 2p "$streak")
    echo "stress_distributed: $passed runs already passed in a row at this commit; going on from run $((passed + 1))"
fi
start=$(date +%s)
for run in $(seq $((passed + 1)) "$runs"); do
    if ! "$python" -m pytest "${args[@]}" >"$logs/run-$run.log" 2>&1; then
        printf '%s\n0\n' "$key" >"$streak"
        echo "stress_distributed: run $run of $runs FAILED after $(( $(date +%s) - start )) s (load: $busy busy processes); see $logs/run-$run.log" >&2
        exit 1
    fi
    printf '%s\n%s\n' "$key" "$run" >"$streak"
    echo "run $run/$runs passed ($(tail -n 1 "$logs/run-$run.log")) at $(( $(date +%s) - start )) s, load $(cut -d' ' -f1 /proc/loadavg)"
done
echo "stress_distributed: $runs of $runs passed in a row beside $busy busy processes"
