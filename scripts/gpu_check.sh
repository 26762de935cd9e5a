#!/usr/bin/env bash
# The prepared GPU check (see scripts/gpu_check.py): on a machine with one CUDA GPU, every GPU path
# of the project in under 8 minutes, one JSON ($OUT/gpu_check.json when $OUT is set).
#
#   scripts/gpu_check.sh [--out FILE] [--work DIR] [--cifar-root DIR] [--keep-going]
#   scripts/gpu_check.sh --dry-run     # any machine: is everything the steps need in place?
#
# Python: $ASK_PYTHON as it is; else the repository's .venv or python3 on the PATH, the first with
# the project's packages. Where none has them, .venv is created (`make .venv/.installed`, which needs
# the network) and its faiss-cpu swapped for faiss-gpu-cu12. This checkout's `ask` is imported
# (PYTHONPATH), whatever the environment has installed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

dry_run=false
for argument in "$@"; do [[ $argument == --dry-run ]] && dry_run=true; done

has_packages() { "$1" -c 'import torch, torchvision, hydra, omegaconf, faiss, numpy, sklearn, pytest' >/dev/null 2>&1; }
faiss_has_gpu() { "$1" -c 'import faiss, sys; sys.exit(0 if hasattr(faiss, "StandardGpuResources") else 1)' >/dev/null 2>&1; }

python=""
if [[ -n ${ASK_PYTHON:-} ]]; then
    python=$ASK_PYTHON  # asked for by name: used as it is, never set up
else
    for candidate in .venv/bin/python "$(command -v python3 || true)"; do
        if [[ -n $candidate && -x $candidate ]] && has_packages "$candidate"; then python=$candidate; break; fi
    done
fi

if ! $dry_run && [[ -z ${ASK_PYTHON:-} ]]; then
    if [[ -z $python ]]; then
        echo "gpu_check: no Python with the project's packages; creating .venv (needs the network)" >&2
        if ! timeout 900 make .venv/.installed >&2; then
            echo "gpu_check: error: could not create .venv; set ASK_PYTHON to a Python with torch (CUDA), faiss-gpu, hydra-core and pytest" >&2
            exit 3
        fi
        python=.venv/bin/python
    fi
    # The repository's own .venv gets faiss's GPU build in place of the CPU one (they share the
    # module name, so they cannot sit side by side); another environment is left as it is.
    if [[ $python == .venv/bin/python ]] && ! faiss_has_gpu "$python"; then
        echo "gpu_check: swapping faiss-cpu for faiss-gpu-cu12 in .venv" >&2
        if ! { timeout 600 "$python" -m pip uninstall --quiet -y faiss-cpu &&
               timeout 600 "$python" -m pip install --quiet 'faiss-gpu-cu12>=1.8'; } >&2; then
            echo "gpu_check: error: could not install faiss-gpu-cu12 into .venv (no network?)" >&2
            exit 3
        fi
    fi
elif [[ -z $python ]]; then
    python=${ASK_PYTHON:-python3}  # the dry run names what it cannot import
fi

exec "$python" scripts/gpu_check.py "$@"
