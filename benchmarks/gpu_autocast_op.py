"""CUDA autocast, part 1: the lean softplus op alone against native (values, dtype, residual sum, gradients).

    python benchmarks/gpu_autocast_op.py        # from the repository root, on a GPU (DEV=cpu: on CPU)

On an H100 (2026-11-26 14:17 UTC, torch 2.11.0+cu130) every comparison was equal bit for bit
(output float32, like native). Part 2 is gpu_autocast_model.py; GPU.md says what was found.
"""
import os, sys, warnings, copy
sys.path.insert(0, os.getcwd())
import torch, torch.nn as nn, torch.nn.functional as F
import graph_rewrite
warnings.simplefilter("ignore")
dev = os.environ.get("DEV", "cuda"); lean = torch.ops.graph_rewrite
torch.manual_seed(0)
for rg in (False, True):
    x16 = (torch.randn(256, 256, device=dev) * 4).half().requires_grad_(rg)
    with torch.autocast(dev, dtype=torch.float16):
        a = F.softplus(x16); b = lean.softplus(x16, 1.0, 20.0)
        o = torch.randn(256, 256, device=dev).half()
        o1 = o.clone(); o1 += a
        o2 = o.clone(); o2 += b
    print(f"requires_grad={rg}: dtypes {a.dtype} {b.dtype}; max|a-b| {(a.float()-b.float()).abs().max().item():.3g}; "
          f"b == fp16-rounded a: {torch.equal(b.float(), a.half().float())}; residual max diff {(o1.float()-o2.float()).abs().max().item():.3g}")
    if rg:
        with torch.autocast(dev, dtype=torch.float16):
            ga, = torch.autograd.grad(F.softplus(x16).float().sum(), x16)
            gb, = torch.autograd.grad(lean.softplus(x16, 1.0, 20.0).float().sum(), x16)
        print("   grads dtype", ga.dtype, gb.dtype, "max diff", (ga.float() - gb.float()).abs().max().item())
    with torch.autocast(dev, dtype=torch.float16):
        print("   is_autocast_enabled inside Function?", end=" ")
        class P(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):
                print(torch.is_autocast_enabled(dev), F.softplus(t).dtype, end=" ")
                return t.clone()
            @staticmethod
            def backward(ctx, g): return g
        P.apply(x16); print()
