#!/usr/bin/env bash
# The seeded defence study (issue 12): AT, ASK-Def as the authors run it (ask_def_authors) and our
# ASK-Def variant (ask_def), trained on one budget with several seeds, then every attack on the
# kNN and the network on the same test points, then ask-report: robust kNN accuracy under ASK-Atk
# and under the per-point worst case over all attacks (the `any` rows), mean ± 95 % interval
# across seeds.
#
#   scripts/study_defenses.sh digits     # the embedded digits, no download (about 1.5 h on 2 CPU cores)
#   scripts/study_defenses.sh cpu        # CIFAR-10 smallcnn width 16 (several hours on 2 CPU cores)
#
# The same command resumes: a finished training run (train_summary.json) or evaluation
# (metrics.json) is skipped, an interrupted one continues from its last epoch or batch.
# $OUT/status.txt records which runs in $OUT are finished (those of earlier commands with other
# SEEDS or DEFENSES too). SEEDS and DEFENSES (space-separated) narrow the study; extra arguments
# go to both ask-train and ask-attack (e.g. defense.params.reference_grad=false with OUT set
# elsewhere and DEFENSES naming only the defences that have that setting, to isolate a switch;
# `scripts/study_summary.py OUT --against EARLIER_OUT` then pairs each run with the same defence
# and seed in the earlier study).
#
# CHECKPOINT=last attacks each run's last epoch (last.pt) instead of the one model selection kept
# (best.pt), into $OUT/attack-last (report in $OUT/report-last, runs in $OUT/status-last.txt): how
# much the verdict owes to the selection (`scripts/study_summary.py --attacks attack-last`).
#
# The body sits in one { ... } block, read whole before it runs: bash reads a script as it goes, so
# editing this file during a study of several hours would otherwise change what the running study
# does next.
{
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_reproduce_common.sh
scale="${1:-digits}"; shift || true
case "$scale" in
  digits) common=(experiment=defenses_digits) ; points=540 ;;
  cpu)    common=(experiment=defenses_cifar10_smallcnn "dataset.root=$(cifar10_root)") ; points=1000 ;;
  *) echo "usage: $0 digits|cpu [overrides...]" >&2; exit 2 ;;
esac
common+=(progress=false)
out="${OUT:-outputs/study/defenses-$scale}"
case "${CHECKPOINT:-best}" in
  best) checkpoint=best.pt; attacks=attack; report="$out"; status_file="$out/status.txt" ;;
  last) checkpoint=last.pt; attacks=attack-last; report="$out/report-last"; status_file="$out/status-last.txt" ;;
  *) echo "$0: CHECKPOINT='$CHECKPOINT' is not best or last (the epoch model selection kept, or the final one)" >&2; exit 2 ;;
esac
bin="${ASK_BIN:-.venv/bin}"
read -r -a seeds <<< "${SEEDS:-0 1 2}"
read -r -a defenses <<< "${DEFENSES:-at ask_def_authors ask_def}"
mkdir -p "$out"

status() {  # one line per run, this command's and any an earlier command left in $out: finished or not
  local defense seed name train_state attack_state  # the loops below must not move the caller's
  : > "$status_file.tmp"
  for name in $( { for defense in "${defenses[@]}"; do for seed in "${seeds[@]}"; do echo "$defense-seed$seed"; done; done
                   ls "$out/train" 2>/dev/null | LC_ALL=C sort || true; } | awk '!seen[$0]++' ); do
    train_state=pending; attack_state=pending
    [ -f "$out/train/$name/train_summary.json" ] && train_state=finished
    [ -f "$out/$attacks/$name/metrics.json" ] && attack_state=finished
    echo "$name train=$train_state $attacks=$attack_state" >> "$status_file.tmp"
  done
  mv "$status_file.tmp" "$status_file"
}

for seed in "${seeds[@]}"; do
  for defense in "${defenses[@]}"; do
    name="$defense-seed$seed"
    if [ ! -f "$out/train/$name/train_summary.json" ]; then
      echo "== train $name"
      "$bin/ask-train" "${common[@]}" defense="$defense" seed="$seed" hydra.run.dir="$out/train/$name" "$@"
    fi
    if [ ! -f "$out/$attacks/$name/metrics.json" ]; then
      echo "== attack $name ($checkpoint)"
      "$bin/ask-attack" "${common[@]}" defense="$defense" seed="$seed" 'eval.victims=[dnn,knn]' \
        model.checkpoint="$out/train/$name/$checkpoint" eval.n_points="$points" hydra.run.dir="$out/$attacks/$name" "$@"
    fi
    status
  done
done
status
"$bin/ask-report" "$out/$attacks" --out "$report"
echo "report: $report/report.md; runs: $status_file"
exit
}
