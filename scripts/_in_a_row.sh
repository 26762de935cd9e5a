# Shared by scripts/stress_distributed.sh and scripts/ci_under_load.sh (sourced, not run): a count
# of passes in a row that survives the end of a sitting. streak.txt holds the commit with the
# arguments, then the last run that passed; the same command on the same clean commit goes on from
# there, and a failure, another commit or other arguments start again at run 1.

# streak_resume FILE ARGS...: set $streak_key, and $streak_passed to the runs already passed in a row.
streak_resume() {
  local file="$1"; shift
  streak_key="$(git rev-parse HEAD 2>/dev/null || echo no-git) $*"
  git diff --quiet HEAD 2>/dev/null || streak_key="uncommitted changes"
  streak_passed=0
  if [[ $streak_key != "uncommitted changes" && -f $file && $(head -n 1 "$file") == "$streak_key" ]]; then
    streak_passed=$(sed -n 2p "$file")
  fi
}

# streak_record FILE RUN: RUN passed (0: a run failed, the count starts again).
streak_record() { printf '%s\n%s\n' "$streak_key" "$2" >"$1"; }

# start_busy PYTHON N: N CPU-bound processes until this shell exits. They stay in this shell's session,
# beside the command under test: with autogroup scheduling (Linux's default on desktops, on here)
# the CPU is shared between sessions first, and busy processes in another session would take far
# less from the command than their number suggests (docs/RELIABILITY.md, "Under load").
start_busy() {
  local python="$1" n="$2" i
  busy_pids=()
  for ((i = 0; i < n; i++)); do "$python" -c 'while True: pass' & busy_pids+=($!); done
  trap 'kill "${busy_pids[@]}" 2>/dev/null || true' EXIT
}
