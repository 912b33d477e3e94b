"""ResNet-50 with every ReLU replaced by Softplus: activation memory against batch size, and a PNG plot.

    python demos/resnet50_softplus.py                       # batches 8,16,32,64 at 112x112
    python demos/resnet50_softplus.py --size 224            # the usual ImageNet size (4x the memory and time)
    python demos/resnet50_softplus.py --batches 2,4 --size 64 --png /tmp/m.png

Untrained weights (no download), train mode. For each batch size, one forward of the
original and of the optimized model under ``graph_rewrite.memory.saved_bytes``: the bytes
autograd keeps for backward plus the output, each storage once, parameters, buffers and
the input excluded (what ``verify`` reports as activation memory, without paying for a
backward at every size). ``verify`` itself runs once, at the smallest batch, to show the
optimized model computes the same outputs, BatchNorm updates and gradients.

The default image size is 112, not 224, so that the default run finishes in a few minutes
on 2 CPU cores; activation memory scales with the pixel count, so at 224 every figure is
about 4x (the ratio is the same). Softplus keeps its input natively; the lean op keeps its
output, which the next convolution keeps anyway, so each of 48 softplus calls stops
holding one tensor. The 49th feeds the average pool, which keeps nothing: it stays native.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn

import graph_rewrite
from graph_rewrite.memory import saved_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from quickstart import relu_to_softplus  # noqa: E402
from tiny_png import line_chart  # noqa: E402

MiB = 2.0**20


def resnet50_softplus() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return relu_to_softplus(torchvision.models.resnet50(weights=None)).train()


def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    exclude = [*model.parameters(), *model.buffers(), x]
    n, out = saved_bytes(lambda: model(x), exclude=exclude, include_outputs=True)
    del out
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="8,16,32,64", help="comma-separated batch sizes (default 8,16,32,64)")
    ap.add_argument("--size", type=int, default=112, help="image size (default 112; 224 is ImageNet's)")
    ap.add_argument("--png", default=os.path.join("demos", "resnet50_softplus_memory.png"),
                    help="where to write the plot (default demos/resnet50_softplus_memory.png)")
    ap.add_argument("--no-verify", action="store_true", help="skip the verify run at the smallest batch")
    args = ap.parse_args(argv)
    batches = sorted(int(b) for b in args.batches.split(",") if b.strip())

    model = resnet50_softplus()
    lean = graph_rewrite.optimize(model)
    counts = lean.rewrite_report.counts()
    print(f"ResNet-50, ReLU -> Softplus, train mode, {args.size}x{args.size} images: "
          f"{sum(counts.values())} node(s) rewritten {counts}")

    if not args.no_verify:
        b = batches[0]
        x = torch.randn(b, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        report = graph_rewrite.verify(model, lean, x)
        print(f"verify at batch {b}: {'PASSED' if report.ok else 'FAILED'} "
              f"({', '.join(f'{c.name} {c.worst_error:.3g}' for c in report.checks if c.worst_error is not None)}; "
              f"{time.perf_counter() - t0:.1f} s)")
        if not report.ok:
            print(report)
            return 1

    rows = []
    for b in batches:
        x = torch.randn(b, 3, args.size, args.size, generator=torch.Generator().manual_seed(b))
        t0 = time.perf_counter()
        before = activation_bytes(model, x)
        after = activation_bytes(lean, x)
        rows.append((b, before, after, time.perf_counter() - t0))

    from tabulate import tabulate

    print(tabulate(
        [(b, f"{x / MiB:.1f}", f"{y / MiB:.1f}", f"{(x - y) / MiB:.1f}", f"{100 * (x - y) / x:.1f}%", f"{t:.1f}")
         for b, x, y, t in rows],
        headers=("batch", "native MiB", "lean MiB", "saved MiB", "saved", "seconds"), disable_numparse=True))
    line_chart(
        args.png, [b for b, *_ in rows],
        {"native softplus": ([x / MiB for _, x, _, _ in rows], (200, 40, 40)),
         "graph_rewrite (lean op)": ([y / MiB for _, _, y, _ in rows], (30, 80, 200))},
        title=f"RESNET-50 WITH SOFTPLUS FOR RELU, {args.size}X{args.size} IMAGES, TRAIN MODE",
        x_label="BATCH SIZE", y_label="ACTIVATION MEMORY, MIB (SAVED FOR BACKWARD + OUTPUT)")
    print(f"plot: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
