"""Where the lean op's eager per-call time goes, on CPU, at 1k elements.

    python benchmarks/overhead.py                 # writes benchmarks/OVERHEAD.md (about a minute)
    python benchmarks/overhead.py --out /tmp/o.md

First what users call (softplus, logsigmoid, sigmoid: the C++ Autograd kernels where the install
built them) against native. Then the Python kernel as a ladder: each row times one thing per call
(median over interleaved blocks, so machine drift hits all rows alike); differences between rows
attribute its cost to its parts:
the dispatcher round trip into the Python ``Autograd`` kernel, ``autograd.Function.apply``,
the Python forward body, the engine calling a Python backward, and the backward formula.
A cProfile of the same calls follows. Nothing here changes the op.
"""
from __future__ import annotations

import argparse
import cProfile
import datetime as _dt
import io
import os
import pstats
import statistics
import sys
import time
from typing import Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import graph_rewrite  # noqa: E402,F401
from graph_rewrite.ops import activations, cpp  # noqa: E402
from graph_rewrite.ops.activations import python_kernel  # noqa: E402
from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)

N = 1000


class _Trivial(torch.autograd.Function):
    """The cheapest Python autograd.Function around F.softplus: the machinery's own cost."""

    @staticmethod
    def forward(ctx, x):
        return F.softplus(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _SavesOutput(torch.autograd.Function):
    """As _Trivial, but saving the output and unpacking it in backward."""

    @staticmethod
    def forward(ctx, x):
        y = F.softplus(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g


class _SavesOutputComposite(torch.autograd.Function):
    """As _SavesOutput, with the lean op's backward formula (activations.softplus_grad)."""

    @staticmethod
    def forward(ctx, x):
        y = F.softplus(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return activations.softplus_grad(g, y, 1.0, 20.0, None)


# The ladder: each row adds one thing to the row before; the increments attribute the cost.
LADDER = [
    ("native: autograd.grad(F.softplus(x), x, g)", "—"),
    ("Python autograd.Function around F.softplus, backward returns g", "autograd.Function machinery (apply, Python backward call)"),
    ("… saving the output (save_for_backward, saved_tensors)", "saving and unpacking the output"),
    ("… backward = the lean formula softplus_grad (4 aten calls)", "the composite backward formula instead of nothing"),
    ("_Softplus.apply (the op's Function, called directly)", "the op's forward body (_forward, branch-mask test, ctx attributes)"),
    ("torch.ops.graph_rewrite._softplus_python (the op with its Python kernel)", "dispatcher round trip into the Python Autograd kernel"),
]
# What users call: with the C++ kernels built (graph_rewrite/ops/cpp.py), these are the C++ Autograd kernels.
CALLS = [("softplus", F.softplus, torch.ops.graph_rewrite.softplus),
         ("logsigmoid", F.logsigmoid, torch.ops.graph_rewrite.logsigmoid),
         ("sigmoid", torch.sigmoid, torch.ops.graph_rewrite.sigmoid)]


def rows() -> Dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    x = torch.randn(N, requires_grad=True)
    xd = x.detach()
    g = torch.randn(N)
    y = F.softplus(xd)
    op = torch.ops.graph_rewrite.softplus
    grad = torch.autograd.grad
    fns = [
        lambda: grad(F.softplus(x), x, g),
        lambda: grad(_Trivial.apply(x), x, g),
        lambda: grad(_SavesOutput.apply(x), x, g),
        lambda: grad(_SavesOutputComposite.apply(x), x, g),
        lambda: grad(activations._Softplus.apply(x, 1.0, 20.0), x, g),
        lambda: grad(python_kernel(op)(x, 1.0, 20.0), x, g),
    ]
    out = {name: fn for (name, _), fn in zip(LADDER, fns)}
    for name, native, lean in CALLS:
        out[f"call: {name} native"] = lambda native=native: grad(native(x), x, g)
        out[f"call: {name} lean"] = lambda lean=lean: grad(lean(x), x, g)
    out.update({
        "alone: native aten.softplus_backward kernel": lambda: torch.ops.aten.softplus_backward(g, xd, 1.0, 20.0),
        "alone: softplus_grad composite, no grad": lambda: _nograd(activations.softplus_grad, g, y),
        "alone: native F.softplus forward, no grad": lambda: F.softplus(xd),
        "alone: lean op forward, no grad (dispatcher, C++ or Python kernel, native kernel)": lambda: op(xd, 1.0, 20.0),
    })
    return out


def _nograd(fn, g, y):
    with torch.no_grad():
        return fn(g, y, 1.0, 20.0, None)


def measure(fns: Dict[str, Callable[[], object]], calls: int, blocks: int) -> Dict[str, float]:
    """Median µs per call over ``blocks`` interleaved blocks of ``calls`` calls each."""
    for fn in fns.values():
        for _ in range(200):
            fn()
    per: Dict[str, List[float]] = {k: [] for k in fns}
    keys = list(fns)
    for b in range(blocks):
        for k in keys[b % len(keys):] + keys[: b % len(keys)]:  # rotate the order each block
            fn = fns[k]
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            per[k].append((time.perf_counter() - t0) / calls * 1e6)
    return {k: statistics.median(v) for k, v in per.items()}


def profile(fn: Callable[[], object], calls: int) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(12)
    lines = [ln for ln in s.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    return "\n".join(lines[start:start + 13])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "OVERHEAD.md"))
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--blocks", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: no thread-pool wake-ups in the figures)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fns = rows()
    t = measure(fns, args.calls, args.blocks)
    k = list(fns)
    nat_fb, lean_fb = t[k[0]], t[k[len(LADDER) - 1]]
    alone = [name for name in k if name.startswith("alone: ")]
    ladder = [(LADDER[i][1], t[k[i]] - t[k[i - 1]]) for i in range(1, len(LADDER))]
    ladder.append(("total: lean − native", lean_fb - nat_fb))
    prof = profile(fns["call: softplus lean"], 10000)
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    L = ["# Per-call overhead of the lean op on CPU (benchmarks/overhead.py)", "",
         f"CPU ({cpu_name()}, {os.cpu_count()} logical cores, torch threads "
         f"{torch.get_num_threads()}, load average {load:.1f} at the end: the machine is shared), torch {torch.__version__}, "
         f"{when}, {N}-element float32 tensor; median µs per call over {args.blocks} interleaved blocks of {args.calls} calls.",
         "No GPU was used.", "",
         f"C++ kernels: {cpp.status()}.", "",
         "What users call, forward + backward (`torch.autograd.grad(f(x), x, g)`):", "",
         "| op | native µs | lean µs | lean / native |", "|---|---|---|---|"]
    L += [f"| {name} | {t[f'call: {name} native']:.1f} | {t[f'call: {name} lean']:.1f} | "
          f"**{t[f'call: {name} lean'] / t[f'call: {name} native']:.2f}×** |" for name, _, _ in CALLS]
    L += ["", "The Python kernel, one row per step of a ladder from native to the op (what runs without the C++"
          " kernels, and under the runtime front end):", "",
          "| forward + backward of | µs per call | × native |", "|---|---|---|"]
    L += [f"| {name} | {t[name]:.1f} | {t[name] / nat_fb:.2f} |" for name, _ in LADDER]
    L += ["", "What each step adds (differences of consecutive rows; this shared machine's noise is a few µs):", "",
          "| step adds | µs per call | share of the gap |", "|---|---|---|"]
    L += [f"| {name} | {v:.1f} | {100 * v / (lean_fb - nat_fb):.0f}% |" for name, v in ladder]
    L += ["", "Single calls, for scale:", "", "| call | µs |", "|---|---|"]
    L += [f"| {name[len('alone: '):]} | {t[name]:.1f} |" for name in alone]
    L += ["", "cProfile of 10,000 lean softplus forward+backward calls (Python-level time only: C++ work inside a"
          " Python call counts to that call; profiling inflates the Python share):", "", "```", prof, "```"]
    with open(args.out, "w") as f:
        f.write("\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    sys.exit(main())
