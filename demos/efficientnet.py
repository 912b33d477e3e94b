"""EfficientNet-B0: the graph before and after, and the verification table.

    python demos/efficientnet.py                        # pretrained if the hub cache has the file
    python demos/efficientnet.py --weights PATH         # a local state_dict file
    python demos/efficientnet.py --size 64 --batch 2    # smaller input (faster on CPU)

Weights, without any download: ``--weights PATH`` loads a local state_dict; otherwise
torchvision's default weights are read from the torch hub cache
(``$TORCH_HOME/hub/checkpoints/efficientnet_b0_rwightman-7f5810bc.pth``) when that file
is there; otherwise the model is untrained (random weights) and a note says where the
file would go. The rewrite does not depend on the weights, only the numbers do.

EfficientNet's squeeze-and-excitation blocks end in nn.Sigmoid (16 of them): each becomes
``torch.ops.graph_rewrite.sigmoid``. Native sigmoid already saves only its output, so
this model gains no memory; the demo shows the rewrite and that verify checks it
(outputs, BatchNorm updates, gradients) in train mode.
"""
from __future__ import annotations

import argparse
import sys

import torch

import graph_rewrite
from graph_rewrite.cli import build_model, load_weights


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", metavar="PATH", help="a local state_dict file for efficientnet_b0")
    ap.add_argument("--size", type=int, default=224, help="image size (default 224)")
    ap.add_argument("--batch", type=int, default=2, help="batch size (default 2; train-mode BatchNorm needs 2+)")
    ap.add_argument("--mode", choices=["train", "eval"], default="train")
    args = ap.parse_args(argv)

    if args.weights:
        model = build_model("efficientnet_b0")
        load_weights(model, args.weights)
        print(f"efficientnet_b0 with weights from {args.weights}")
    else:
        try:
            model = build_model("efficientnet_b0", pretrained=True)
            print("efficientnet_b0 with torchvision's pretrained weights, read from the torch hub cache")
        except ValueError as e:
            torch.manual_seed(0)
            model = build_model("efficientnet_b0")
            print("efficientnet_b0, untrained (random weights): no weights file was found, nothing is downloaded.")
            print("note: " + str(e).replace("--pretrained: ", "").replace("\n", "\n      "))
    model.train(args.mode == "train")

    lean = graph_rewrite.optimize(model)
    print(f"\n=== the graph, before and after ({args.mode} mode)")
    print(graph_rewrite.graph_diff(model, lean))

    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    print(f"\n=== verify on {args.batch}x3x{args.size}x{args.size}")
    report = graph_rewrite.verify(model, lean, x)
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
