#!/usr/bin/env bash
# Device check of bench/efficiency.py on scenario (a)'s models: the real WRN-28-10 classifier (random weights:
# RobustBench's cannot be downloaded here) and the full-size purifier of configs/cifar10.yaml (26 conditioning
# layers, Tables 13-14), with CIFAR-10's 32x32x3 inputs.
#
# - With CUDA: the batch sizes of configs/cifar10.yaml (attacks 250, purifier 640 per GPU = 5120 over 8 workers,
#   activations 100, CARSO gradient over an eval chunk of 500 points x 8 samples; a unit that does not fit in the
#   GPU's memory is retried at half the batch, and the JSON says so), about 2 s per unit. Minutes at most.
# - Without: the same code on the CPU at toy size (one call per unit, batches of 1-2, 2 CARSO samples instead
#   of 8, a 512x512 product), to show the path works; it says first that no GPU was found.
#
# Prints one JSON object (bench/efficiency.py's) on stdout. Run from anywhere: bash bench/gpu_check.sh
# The interpreter: ${PYTHON:-.venv/bin/python}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

if [ "$("$PY" -c 'import torch; print(torch.cuda.is_available())')" = "True" ]; then
    echo "GPU found: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')" >&2
    exec timeout 540 "$PY" bench/efficiency.py --config configs/cifar10.yaml --device cuda --seconds 2
else
    echo "no GPU found (torch.cuda.is_available() is False): running the same path on the CPU at toy size"
    exec "$PY" bench/efficiency.py --config configs/cifar10.yaml --device cpu --quick --gemm-n 512 \
        --batch attack=1,purifier=2,carso=1,activations=1 --set eval.samples=2
fi
