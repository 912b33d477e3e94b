"""The sigmoid seed (shared/seeds/001): a backward that forgets the chain rule, caught by verify.

    python demos/seed_sigmoid.py

MXNet's documentation once showed a sigmoid as an autograd Function whose backward
returned ``y * (1 - y)``: the derivative of sigmoid, but not multiplied by the incoming
gradient ``dy``. Its forward is right, so the outputs look fine; every gradient that
flows through it is wrong.

1. A model with nn.Sigmoid, and a hand-"optimized" copy whose sigmoids are that
   Function (it saves only y, like the lean op): ``graph_rewrite.verify`` fails it on
   gradients and prints where.
2. ``graph_rewrite.optimize`` of the same model: verify passes.
3. The seed's own example: x = [1, 2, 3], y = sigmoid(x), z = y * y; the right
   x.grad is [0.28746966, 0.18495613, 0.08606823].
"""
from __future__ import annotations

import copy
import sys

import torch
import torch.nn as nn

import graph_rewrite


class MXNetDocSigmoid(torch.autograd.Function):
    """The documentation's sigmoid, translated: saves y, backward returns y * (1 - y) without dy."""

    @staticmethod
    def forward(ctx, x):
        y = 1 / (1 + torch.exp(-x))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        y, = ctx.saved_tensors
        return y * (1 - y)  # the bug: should be dy * y * (1 - y)


class DocSigmoid(nn.Module):
    def forward(self, x):
        return MXNetDocSigmoid.apply(x)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Sigmoid(), nn.Linear(32, 32), nn.Sigmoid(), nn.Linear(32, 4))


def hand_optimized(m: nn.Module) -> nn.Module:
    """A copy with every nn.Sigmoid replaced by the documentation's Function (parameter names unchanged)."""
    m = copy.deepcopy(m)
    for name, child in m.named_children():
        if isinstance(child, nn.Sigmoid):
            setattr(m, name, DocSigmoid())
    return m


def main() -> int:
    net = model()
    x = torch.randn(16, 8)

    print("=== 1. nn.Sigmoid replaced by the documentation's Function (backward without dy)")
    bad = verify_and_print(net, hand_optimized(net), x)

    print("\n=== 2. graph_rewrite.optimize(model)")
    lean = graph_rewrite.optimize(net)
    print(lean.rewrite_report)
    good = verify_and_print(net, lean, x)

    print("\n=== 3. the seed's example: x = [1, 2, 3], y = sigmoid(x), z = y * y, z.sum().backward()")
    expected = torch.tensor([0.28746966, 0.18495613, 0.08606823])
    results = {}
    for label, f in (("native torch.sigmoid", torch.sigmoid),
                     ("graph_rewrite lean op", torch.ops.graph_rewrite.sigmoid),
                     ("documentation's Function", MXNetDocSigmoid.apply)):
        xs = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
        y = f(xs)
        z = y * y
        z.sum().backward()
        results[label] = xs.grad
        match = "matches" if torch.allclose(xs.grad, expected, rtol=1e-6, atol=1e-7) else "WRONG"
        print(f"{label:<26} x.grad = {_fmt(xs.grad)}  {match}")
    print(f"{'expected (the seed)':<26} x.grad = [0.28746966, 0.18495613, 0.08606823]")
    xs = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    y = torch.ops.graph_rewrite.sigmoid(xs)
    (y * y).sum().backward()
    print(f"{'lean op in float64':<26} x.grad = {_fmt(xs.grad)}  (exact to 8 places: 2y^2(1-y); "
          "the seed's and the float32 figures agree with it to float32 rounding, ~3e-7)")
    ok = (not bad) and good and torch.allclose(results["graph_rewrite lean op"], expected, rtol=1e-6, atol=1e-7)
    print("\nverify caught the missing dy; the lean op passes" if ok else "\nUNEXPECTED RESULT")
    return 0 if ok else 1


def _fmt(t: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.8f}" for v in t.tolist()) + "]"


def verify_and_print(original: nn.Module, optimized: nn.Module, x: torch.Tensor) -> bool:
    report = graph_rewrite.verify(original, optimized, x)
    print(report)
    return report.ok


if __name__ == "__main__":
    sys.exit(main())
