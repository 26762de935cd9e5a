#!/usr/bin/env bash
# ASK-Atk against the baseline kNN attacks (PGD-CE transfer, DkNN attack, Adv-kNN, feature
# adversaries, minimum-norm) on an undefended CIFAR-10 model: train it, attack every victim at
# eps 8/255 (ASK-Atk and PGD-CE also at 2/255 and 4/255) with the kNN on the penultimate block (as
# the authors tap VGG16's block 4 of 5) and on the last one, then ask-report.
#
#   scripts/reproduce_attacks.sh cpu     # smallcnn width 32, the CPU schedule, ~45 min on 2 CPU cores
#   scripts/reproduce_attacks.sh paper   # the authors' VGG16 and schedule (experiment=defenses_cifar10_vgg16,
#                                        # defense=none), the kNN on block4, a GPU
#
# CIFAR10_ROOT, OUT and extra arguments as in scripts/reproduce_defenses.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_reproduce_common.sh
scale="${1:-cpu}"; shift || true
case "$scale" in
  cpu)   train=(experiment=cifar10_smallcnn); layers='[block2],[block3]'; points=1000 ;;
  paper) train=(experiment=defenses_cifar10_vgg16 defense=none); layers='[block4]'; points=5000 ;;
  *) echo "usage: $0 cpu|paper [overrides...]" >&2; exit 2 ;;
esac
root="$(cifar10_root)"
out="${OUT:-outputs/reproduce/attacks-$scale}"
bin="${ASK_BIN:-.venv/bin}"
common=("${train[@]}" dataset.root="$root" progress=false)

"$bin/ask-train" "${common[@]}" hydra.run.dir="$out/train" "$@"
evaluate_and_report "$bin" "$out" 8/255 2/255,4/255 -- \
  "${common[@]}" model.checkpoint="$out/train/best.pt" "knn.layers=$layers" eval.n_points="$points" "$@"
