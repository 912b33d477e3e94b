"""The softplus seed (shared/seeds/000): what is held after forward, five ways.

    python demos/seed_softplus.py [--n 5000]

As in the seed: ``p`` is a leaf of ``n`` elements that requires grad, and
``x = p[:, None] @ p[None, :]`` is a non-leaf tensor of n*n elements (25M for n=5000,
100 MB in float32). After ``y = softplus(x)`` and ``del x``, x stays in memory only if
autograd saved it for backward. Softplus' derivative needs only y
(dy * (1 - exp(-y))), so keeping x is a whole tensor held for nothing.

Two measurements per way:

* activation bytes: ``graph_rewrite.memory.saved_bytes(..., include_outputs=True)``
  over the computation of x and y, with p excluded: every storage autograd saved plus
  y, each counted once. x counts only if it was saved. Any device.
* CUDA: ``torch.cuda.memory_allocated()`` after forward and ``del x``, minus before
  (p is allocated before), as the seed measured it. Only with a GPU; on CPU the
  column says "not measured".
"""
from __future__ import annotations

import argparse
import gc
import logging
import sys
import warnings
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

import graph_rewrite  # noqa: F401  (registers torch.ops.graph_rewrite.*)
from graph_rewrite.memory import saved_bytes

MiB = 2.0**20


def native(x: torch.Tensor) -> torch.Tensor:
    return F.softplus(x)


def _scripted(x: torch.Tensor) -> torch.Tensor:
    return F.softplus(x)


with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated; the seed used it
    scripted = torch.jit.script(_scripted)


def lean(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.graph_rewrite.softplus(x, 1.0, 20.0)


def ways(compile: bool = True) -> List[Tuple[str, Optional[Callable[[torch.Tensor], torch.Tensor]], bool]]:
    """(label, function or None to skip, grad enabled)."""
    return [
        ("no grad", native, False),
        ("native F.softplus", native, True),
        ("TorchScript (jit.script of F.softplus)", scripted, True),
        ("torch.compile(F.softplus)", torch.compile(native) if compile else None, True),
        ("graph_rewrite lean op", lean, True),
    ]


def activation_bytes(f, p: torch.Tensor, grad: bool) -> int:
    def forward():
        with torch.set_grad_enabled(grad):
            x = p[:, None] @ p[None, :]  # non-leaf, n*n elements
            return f(x)

    n, y = saved_bytes(forward, exclude=[p], include_outputs=True)
    del y
    return n


def cuda_held(f, p: torch.Tensor, grad: bool) -> int:
    """The seed's measurement: memory_allocated after forward and ``del x``, minus before."""
    gc.collect()
    torch.cuda.synchronize()
    mem0 = torch.cuda.memory_allocated()
    with torch.set_grad_enabled(grad):
        x = p[:, None] @ p[None, :]
        y = f(x)
    torch.cuda.synchronize()
    del x
    gc.collect()
    held = torch.cuda.memory_allocated() - mem0
    del y
    gc.collect()
    assert torch.cuda.memory_allocated() == mem0
    return held


def warm_up(f, p: torch.Tensor, grad: bool) -> Optional[str]:
    """TorchScript's profiling executor optimizes after a few runs, torch.compile compiles on the first:
    run each way three times first, so the figures are for the steady state. Returns an error or None."""
    try:
        for _ in range(3):
            with torch.set_grad_enabled(grad):
                y = f(p[:, None] @ p[None, :])
            if grad:
                y.sum().backward()
            del y
        p.grad = None
        return None
    except Exception as e:  # noqa: BLE001 - e.g. torch.compile without a C++ compiler
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="p's length; x has n*n elements (default 5000)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (its compilation takes ~20 s)")
    args = ap.parse_args(argv)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    p = torch.randn(args.n, device=device, requires_grad=True)
    n_x = args.n * args.n
    print(f"softplus seed: x = p[:, None] @ p[None, :], {n_x:,} elements "
          f"({n_x * 4 / MiB:.2f} MiB in float32), non-leaf; y = softplus(x); device {device}")
    rows = []
    for label, f, grad in ways(compile=not args.no_compile):
        if f is None:
            rows.append((label, "skipped (--no-compile)", "", ""))
            continue
        err = warm_up(f, p, grad)
        if err:
            rows.append((label, "failed: " + err, "", ""))
            continue
        n = activation_bytes(f, p, grad)
        held = f"{cuda_held(f, p, grad) / MiB:.2f} MiB" if cuda else "not measured"
        rows.append((label, f"{n / MiB:.2f} MiB", f"{n / (n_x * 4):.2f} x", held))
    from tabulate import tabulate

    print(tabulate(rows, headers=("way", "activation bytes (saved + y)", "in units of x", "CUDA held after forward"),
                   disable_numparse=True))
    if not cuda:
        print("(CUDA column: no GPU here; the seed measured torch.cuda.memory_allocated on a GPU)")
    by = {r[0]: r[1] for r in rows}
    if by["graph_rewrite lean op"] == by["no grad"]:
        print("lean op: holds y only, like no grad: x is not kept for backward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
