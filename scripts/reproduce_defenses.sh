#!/usr/bin/env bash
# ASK-Def (ours and the authors' step) vs AT vs TRADES (and an undefended model), trained under one schedule and budget, then
# every attack on every victim on the test set at eps 8/255, ASK-Atk and PGD-CE also at 2/255 and
# 4/255 (digits: 0.1, then 0.025 and 0.05), then ask-report.
#
#   scripts/reproduce_defenses.sh digits     # the embedded digits, no download, minutes on a CPU
#   scripts/reproduce_defenses.sh cpu        # CIFAR-10 subset, smallcnn width 16, ~2 h on 2 CPU cores
#   scripts/reproduce_defenses.sh paper      # the authors' settings (experiment=defenses_cifar10_vgg16:
#                                            # their VGG16, 200 epochs, lr x0.1 after 100), a GPU
#   scripts/reproduce_defenses.sh paper-1h   # the same network with 30 epochs (x0.1 after 15), ~1 h per defence
#
# CIFAR10_ROOT: the CIFAR-10 ImageFolder tree (<root>/train/<class>/*.jpg, <root>/test/...).
# OUT: where everything goes (default outputs/reproduce/defenses-<scale>); rerunning resumes
# the training runs from their last complete epoch. Extra arguments go to both ask-train and ask-attack.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_reproduce_common.sh
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
  root="$(cifar10_root)"
  common+=(dataset.root="$root")
fi
out="${OUT:-outputs/reproduce/defenses-$scale}"
bin="${ASK_BIN:-.venv/bin}"
# The defences compared, one training job each (conf/defense/<name>.yaml); edit this list to add one.
defenses=(none at ask_def ask_def_authors trades)

"$bin/ask-train" -m "${common[@]}" "defense=$(IFS=,; echo "${defenses[*]}")" \
  hydra.sweep.dir="$out/train" hydra.callbacks.report.enabled=false "$@"

checkpoints=()
for job in "${!defenses[@]}"; do checkpoints+=("$out/train/$job/best.pt"); done
evaluate_and_report "$bin" "$out" "$eps" "$curve" -- \
  "${common[@]}" "model.checkpoint=$(IFS=,; echo "${checkpoints[*]}")" eval.n_points="$points" "$@"
