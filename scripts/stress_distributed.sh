#!/usr/bin/env bash
# The torchrun tests again and again under artificial CPU load, to catch shutdown races that a
# quiet machine hides (issue 14): stops at the first failure and keeps its log.
#
#   scripts/stress_distributed.sh [RUNS] [BUSY] [PYTEST -k EXPRESSION]
#   scripts/stress_distributed.sh 30 4 sigterm    # the SIGTERM test, 30 times, beside 4 busy processes
#
# Logs: outputs/stress_distributed/run-N.log (under $OUT when it is set). Thirty runs outlast a
# sitting, so the count survives one (streak.txt, scripts/_in_a_row.sh). Each line gives the
# 1-minute load average at the run's end.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-30}
busy=${2:-4}
select=${3:-}
python=${ASK_PYTHON:-.venv/bin/python}
logs=${OUT:-outputs}/stress_distributed
mkdir -p "$logs"

source scripts/_in_a_row.sh
start_busy "$python" "$busy"

args=(tests/test_distributed.py -q -p no:cacheprovider)
[[ -n $select ]] && args+=(-k "$select")
streak="$logs/streak.txt"
streak_resume "$streak" "busy=$busy" "k=$select"
passed=$streak_passed
((passed == 0)) || echo "stress_distributed: $passed runs already passed in a row at this commit; going on from run $((passed + 1))"
start=$(date +%s)
for run in $(seq $((passed + 1)) "$runs"); do
    if ! "$python" -m pytest "${args[@]}" >"$logs/run-$run.log" 2>&1; then
        streak_record "$streak" 0
        echo "stress_distributed: run $run of $runs FAILED after $(( $(date +%s) - start )) s (load: $busy busy processes); see $logs/run-$run.log" >&2
        exit 1
    fi
    streak_record "$streak" "$run"
    echo "run $run/$runs passed ($(tail -n 1 "$logs/run-$run.log")) at $(( $(date +%s) - start )) s, load $(cut -d' ' -f1 /proc/loadavg)"
done
echo "stress_distributed: $runs of $runs passed in a row beside $busy busy processes"
