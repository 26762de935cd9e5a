#!/usr/bin/env bash
# The project's CI (.ci/run) in fresh clones of HEAD, again and again, beside busy processes: a
# suite that passes only on a quiet machine fails here (issue 14 asks for three in a row beside 4).
# Stops at the first failure and keeps that clone and its log.
#
#   scripts/ci_under_load.sh [RUNS] [BUSY]     # default: 3 runs beside 4 busy processes
#
# Under $OUT (default outputs/ci_under_load): run-N.log, clone-N/ of a failed run, streak.txt (the
# count goes on across sittings at the same commit, scripts/_in_a_row.sh). CI_COMMAND replaces
# `bash .ci/run` (to try the script itself quickly).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
busy=${2:-4}
out=$(realpath -m "${OUT:-outputs/ci_under_load}")
mkdir -p "$out"
python=${ASK_PYTHON:-python3}
commit=$(git rev-parse HEAD)
git diff --quiet HEAD || echo "ci_under_load: uncommitted changes are not tested: the clones check out $commit" >&2

source scripts/_in_a_row.sh
start_busy "$python" "$busy"
streak="$out/streak.txt"
streak_resume "$streak" "busy=$busy"
((streak_passed == 0)) || echo "ci_under_load: $streak_passed runs already passed in a row at this commit; going on from run $((streak_passed + 1))"
for run in $(seq $((streak_passed + 1)) "$runs"); do
    clone="$out/clone-$run"
    rm -rf "$clone"
    git clone -q . "$clone"
    git -C "$clone" checkout -q "$commit"
    start=$(date +%s)
    # A new machine has no cache: the clone's CI builds its own (.ci/run's default).
    if ! (cd "$clone" && env -u ASK_CACHE_DIR bash -c "${CI_COMMAND:-bash .ci/run}") >"$out/run-$run.log" 2>&1; then
        streak_record "$streak" 0
        echo "ci_under_load: run $run of $runs FAILED after $(( $(date +%s) - start )) s beside $busy busy processes; see $out/run-$run.log and $clone" >&2
        exit 1
    fi
    rm -rf "$clone"
    streak_record "$streak" "$run"
    echo "run $run/$runs passed ($(grep -E '[0-9]+ passed' "$out/run-$run.log" | tail -n 1)) in $(( $(date +%s) - start )) s, load $(cut -d' ' -f1 /proc/loadavg)"
done
echo "ci_under_load: $runs of $runs passed in a row at $commit beside $busy busy processes"
