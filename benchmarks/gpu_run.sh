#!/usr/bin/env bash
# Every CUDA figure in one command, on a machine with one NVIDIA GPU:
#
#     bash benchmarks/gpu_run.sh [OUT_DIR]      # OUT_DIR defaults to $OUT, else benchmarks/
#
# Needs torch, torchvision, triton, pytest (tabulate for graph_rewrite); no network, no
# install of graph_rewrite (the checkout is put on PYTHONPATH). transformers and diffusers are
# optional: without them the Mamba, LLaMA and UNet2DModel rows say "skipped: ... is not
# installed". The device tool's GPU image has transformers but not diffusers: before the call,
# run `pip download diffusers==0.42.1 --no-deps -d .gpu_wheels` here and name .gpu_wheels in
# the call's carry (git ignores it); every wheel there is installed first, without its
# dependencies, which that image has. About 6 minutes on one H100 (estimate, not measured): the
# kernel and op tests first (at most 150 s), then gpu.py, which starts no new model after 300 s
# and writes OUT_DIR/GPU.md after every section.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
py="${PYTHON:-python}"  # PYTHON=/path/to/python to pick another interpreter
for wheel in .gpu_wheels/*.whl; do
    [ -e "$wheel" ] && "$py" -m pip install -q --no-deps --no-index "$wheel" 2>&1 | tail -1
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu_tests.txt"
# The kernel on the device against the composite, the interpreter cases, and the ops on CUDA
# against native and the 50-digit references (tests/conftest.py adds "cuda" to DEVICES).
timeout 150 "$py" -m pytest -q -p no:warnings -p no:cacheprovider tests/test_triton_kernels.py tests/test_ops.py 2>&1 \
    | tee "$out/gpu_pytest.log" | tail -20 | tee -a "$out/gpu_tests.txt"
timeout 420 "$py" benchmarks/gpu.py --out "$out/GPU.md" --budget "${BUDGET:-300}"
# Per-call cost at 1,000 elements on the device (launch-bound: what the host pays per call).
timeout 60 "$py" benchmarks/eager_call.py 30 cuda 2>&1 | tee "$out/eager_call_cuda.txt"
echo "wrote $out/GPU.md, $out/gpu_tests.txt and $out/eager_call_cuda.txt"
