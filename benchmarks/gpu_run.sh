#!/usr/bin/env bash
# Every CUDA figure of issue 14 in one command, on a machine with one NVIDIA GPU:
#
#     bash benchmarks/gpu_run.sh [OUT_DIR]      # OUT_DIR defaults to $OUT, else benchmarks/
#
# Needs torch, torchvision, triton, pytest (tabulate for graph_rewrite); no network, no
# install (the checkout is put on PYTHONPATH). transformers is optional: without it the
# Mamba rows say "skipped: transformers is not installed". About 6 minutes on one H100
# (estimate, not measured): the kernel tests first (at most 90 s), then gpu.py, which
# starts no new model after 300 s and writes OUT_DIR/GPU.md after every section.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
py="${PYTHON:-python}"  # PYTHON=/path/to/python to pick another interpreter
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu_tests.txt"
# The kernel on the device against the composite, and the interpreter cases.
timeout 90 "$py" -m pytest -q -p no:warnings -p no:cacheprovider tests/test_triton_kernels.py 2>&1 \
    | tail -20 | tee -a "$out/gpu_tests.txt"
timeout 420 "$py" benchmarks/gpu.py --out "$out/GPU.md" --budget 300
echo "wrote $out/GPU.md and $out/gpu_tests.txt"
