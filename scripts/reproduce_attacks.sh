#!/usr/bin/env bash
# ASK-Atk against the baseline kNN attacks (PGD-CE transfer, DkNN attack, Adv-kNN, feature
# adversaries, minimum-norm) on an undefended CIFAR-10 model: train it, attack every victim at
# eps 2/255, 4/255 and 8/255 on the kNN layer the authors tap (the penultimate block) and on the
# last block, then ask-report.
#
#   scripts/reproduce_attacks.sh cpu     # smallcnn width 32, the CPU schedule, ~45 min on 2 CPU cores
#   scripts/reproduce_attacks.sh paper   # VGG16 in the authors' settings (block4), a GPU
#
# CIFAR10_ROOT, OUT and extra arguments as in scripts/reproduce_defenses.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scale="${1:-cpu}"; shift || true
case "$scale" in
  cpu)   train=(experiment=cifar10_smallcnn); layers='[block2],[block3]'; points=1000 ;;
  paper) train=(experiment=defenses_cifar10_vgg16 defense=none); layers='[block4]'; points=5000 ;;
  *) echo "usage: $0 cpu|paper [overrides...]" >&2; exit 2 ;;
esac
root="${CIFAR10_ROOT:-../shared/data/cifar10-jpeg}"
[ -d "$root/train" ] || { echo "$0: no CIFAR-10 tree at '$root'; set CIFAR10_ROOT=/path/to/cifar10-jpeg" >&2; exit 2; }
out="${OUT:-outputs/reproduce/attacks-$scale}"
bin="${ASK_BIN:-.venv/bin}"
common=("${train[@]}" dataset.root="$root" progress=false)

"$bin/ask-train" "${common[@]}" hydra.run.dir="$out/train" "$@"
"$bin/ask-attack" -m "${common[@]}" model.checkpoint="$out/train/best.pt" "knn.layers=$layers" \
  attack.eps=2/255,4/255,8/255 eval.n_points="$points" 'eval.victims=[dnn,knn,dknn]' \
  hydra.sweep.dir="$out/attack" hydra.callbacks.report.enabled=false "$@"

"$bin/ask-report" "$out/attack" --out "$out"
echo "report: $out/report.md"
