"""The main job: optimize two models and show what was rewritten and the memory it saves.

    python demos/quickstart.py [--batch 8]

1. 4 x (Linear(1024,1024) -> Softplus), batch 256: the issue's MLP.
2. torchvision's stock mobilenet_v2 (ReLU6 and BatchNorm, nothing swapped), batch 8 at
   224x224, untrained weights (no download).
Each model is then checked by graph_rewrite.verify: outputs, gradients, and the
activation memory (bytes autograd still holds when forward ends, plus the outputs,
each storage once, parameters, buffers and inputs excluded).
"""
from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn as nn

import graph_rewrite


def mlp() -> nn.Module:
    return nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(1024, 1024), nn.Softplus())])


def relu_to_softplus(module: nn.Module) -> nn.Module:
    """Replace every nn.ReLU in ``module`` by nn.Softplus, in place (smooth activations)."""
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.Softplus())
        else:
            relu_to_softplus(child)
    return module


def show(title: str, model: nn.Module, x: torch.Tensor, rows: int = 8) -> None:
    lean = graph_rewrite.optimize(model)
    print(f"\n=== {title}")
    report = str(lean.rewrite_report).splitlines()
    if len(report) > rows + 3:  # a long table: its head, then how many more
        report = report[: rows + 3] + [f"... ({len(report) - rows - 3} more rows: print(lean.rewrite_report))"]
    print("\n".join(report))
    print(graph_rewrite.verify(model, lean, x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="mobilenet_v2 batch size (default 8)")
    args = parser.parse_args()
    torch.manual_seed(0)
    show("4 x (Linear(1024, 1024) -> Softplus), batch 256", mlp(), torch.randn(256, 1024))
    try:
        import torchvision
    except ImportError:
        warnings.warn("torchvision is not installed: skipping mobilenet_v2 (pip install 'graph_rewrite[vision]')")
        return
    show(f"stock torchvision mobilenet_v2, batch {args.batch} at 224x224 (train mode)",
         torchvision.models.mobilenet_v2(weights=None), torch.randn(args.batch, 3, 224, 224))


if __name__ == "__main__":
    main()
