#!/usr/bin/env bash
# ASK-Def vs AT vs TRADES (and an undefended model), trained under one schedule and budget, then
# every attack on every victim on the test set at eps 8/255, ASK-Atk and PGD-CE also at 2/255 and
# 4/255 (digits: 0.1, then 0.025 and 0.05), then ask-report.
#
#   scripts/reproduce_defenses.sh digits     # the embedded digits, no download, minutes on a CPU
#   scripts/reproduce_defenses.sh cpu        # CIFAR-10 subset, smallcnn width 16, ~2 h on 2 CPU cores
#   scripts/reproduce_defenses.sh paper      # the authors' VGG16 settings, 200 epochs, a GPU
#   scripts/reproduce_defenses.sh paper-1h   # the same with a schedule meant for ~1 h per defence on an H100
#
# CIFAR10_ROOT: the CIFAR-10 ImageFolder tree (<root>/train/<class>/*.jpg, <root>/test/...).
# OUT: where everything goes (default outputs/reproduce/defenses-<scale>); rerunning resumes
# the training runs from their last complete epoch. Extra arguments go to both ask-train and ask-attack.
set -euo pipefail
cd "$(dirname "$0")/.."
scale="${1:-cpu}"; shift || true
case "$scale" in
  digits)   experiment=defenses_digits;           points=540;  eps=0.1;   curve=0.025,0.05 ;;
  cpu)      experiment=defenses_cifar10_smallcnn; points=1000; eps=8/255; curve=2/255,4/255 ;;
  paper)    experiment=defenses_cifar10_vgg16;    points=5000; eps=8/255; curve=2/255,4/255 ;;
  paper-1h) experiment=defenses_cifar10_vgg16_1h; points=5000; eps=8/255; curve=2/255,4/255 ;;
  *) echo "usage: $0 digits|cpu|paper|paper-1h [overrides...]" >&2; exit 2 ;;
esac
common=(experiment="$experiment" progress=false)
if [ "$scale" != digits ]; then
  root="${CIFAR10_ROOT:-../shared/data/cifar10-jpeg}"
  [ -d "$root/train" ] || { echo "$0: no CIFAR-10 tree at '$root'; set CIFAR10_ROOT=/path/to/cifar10-jpeg" >&2; exit 2; }
  common+=(dataset.root="$root")
fi
out="${OUT:-outputs/reproduce/defenses-$scale}"
bin="${ASK_BIN:-.venv/bin}"
defenses=(none at ask_def trades)

"$bin/ask-train" -m "${common[@]}" "defense=$(IFS=,; echo "${defenses[*]}")" \
  hydra.sweep.dir="$out/train" hydra.callbacks.report.enabled=false "$@"

checkpoints=()
for job in "${!defenses[@]}"; do checkpoints+=("$out/train/$job/best.pt"); done
attack=("${common[@]}" "model.checkpoint=$(IFS=,; echo "${checkpoints[*]}")" eval.n_points="$points"
        'eval.victims=[dnn,knn,dknn]' hydra.callbacks.report.enabled=false)
# Every attack at the paper's radius, then the eps curve of ASK-Atk and PGD-CE below it.
"$bin/ask-attack" -m "${attack[@]}" attack.eps="$eps" hydra.sweep.dir="$out/attack/all" "$@"
"$bin/ask-attack" -m "${attack[@]}" attack.eps="$curve" 'attack=[ask,pgd]' hydra.sweep.dir="$out/attack/eps" "$@"

"$bin/ask-report" "$out/attack" --out "$out"
echo "report: $out/report.md"
