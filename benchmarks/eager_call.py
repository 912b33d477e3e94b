"""Eager per-call cost of the lean ops: forward + backward on a 1000-element float32 tensor.

Median over many interleaved blocks, against the native op in the same process::

    python benchmarks/eager_call.py            # prints µs per call, lean and native
    python benchmarks/eager_call.py 60 cuda    # 60 blocks on the GPU (synchronized per block)
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

import graph_rewrite.ops  # noqa: F401

lean = torch.ops.graph_rewrite


def _block(fn: Callable, x: torch.Tensor, g: torch.Tensor, n: int) -> float:
    # On CUDA the block is bracketed by synchronizations, so queued kernels count too.
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        y = fn(x)
        torch.autograd.grad(y, x, g)
    sync()
    return (time.perf_counter() - t0) / n * 1e6


def measure(blocks: int = 60, per_block: int = 200, device: str = "cpu") -> Dict[str, float]:
    torch.set_num_threads(1)
    x = torch.randn(1000, device=device, requires_grad=True)
    g = torch.randn(1000, device=device)
    fns = {
        "softplus lean": lambda t: lean.softplus(t, 1.0, 20.0),
        "softplus native": lambda t: F.softplus(t, 1.0, 20.0),
        "logsigmoid lean": lean.logsigmoid,
        "logsigmoid native": F.logsigmoid,
        "sigmoid lean": lean.sigmoid,
        "sigmoid native": torch.sigmoid,
    }
    times = {k: [] for k in fns}
    for fn in fns.values():
        _block(fn, x, g, per_block)  # warm up
    for _ in range(blocks):
        for k, fn in fns.items():
            times[k].append(_block(fn, x, g, per_block))
    return {k: statistics.median(v) for k, v in times.items()}


if __name__ == "__main__":
    blocks = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    device = sys.argv[2] if len(sys.argv) > 2 else "cpu"
    print(f"device {device}: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, torch {torch.__version__}")
    for k, v in measure(blocks, device=device).items():
        print(f"{k:20s} {v:7.1f} µs")
