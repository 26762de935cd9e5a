# Shared by scripts/reproduce_*.sh (sourced, not run): where CIFAR-10 is, and the evaluation
# protocol both comparisons use, so the two cannot drift apart.

# cifar10_root: print the CIFAR-10 ImageFolder tree ($CIFAR10_ROOT or the shared copy), or exit 2.
cifar10_root() {
  local root="${CIFAR10_ROOT:-../shared/data/cifar10-jpeg}"
  [ -d "$root/train" ] || { echo "$0: no CIFAR-10 tree at '$root'; set CIFAR10_ROOT=/path/to/cifar10-jpeg" >&2; exit 2; }
  echo "$root"
}

# evaluate_and_report BIN OUT EPS CURVE -- ASK_ATTACK_ARGS...
# Every attack on dnn, knn and dknn at EPS, then the eps curve of ASK-Atk and PGD-CE at CURVE
# (comma-separated), then ask-report over both sweeps into OUT.
evaluate_and_report() {
  local bin="$1" out="$2" eps="$3" curve="$4"; shift 5
  local fixed=('eval.victims=[dnn,knn,dknn]' hydra.callbacks.report.enabled=false)
  # The caller's arguments come last, so a user's own overrides win.
  "$bin/ask-attack" -m "${fixed[@]}" attack.eps="$eps" hydra.sweep.dir="$out/attack/all" "$@"
  "$bin/ask-attack" -m "${fixed[@]}" attack.eps="$curve" 'attack=[ask,pgd]' hydra.sweep.dir="$out/attack/eps" "$@"
  "$bin/ask-report" "$out/attack" --out "$out"
  echo "report: $out/report.md"
}
