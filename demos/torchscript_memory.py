"""Bytes kept for backward by TorchScript models before and after graph_rewrite.optimize.

    python demos/torchscript_memory.py

Two models: the 4 x (Linear 512 -> Softplus) MLP at batch 128 (scripted), and
torchvision's resnet18 with every ReLU replaced by Softplus (traced, batch 8 at
64x64, train mode). For each: eager, the FX rewrite of the eager model, the
TorchScript module and its rewrite, on the profiling executor's first call and
after 3 warm-up calls (forward + backward each). Parameters, buffers and the
input are not counted; outputs are not counted either (what autograd keeps).
"""
import warnings

import torch
import torch.nn as nn

import graph_rewrite
from graph_rewrite.memory import saved_bytes

warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
MiB = 2**20


def kept(fn, x, exclude, warmup):
    """Bytes saved for backward by one call of ``fn`` after ``warmup`` forward+backward calls."""
    for _ in range(warmup):
        xx = x.clone().requires_grad_(True)
        fn(xx).sum().backward()
    xx = x.clone().requires_grad_(True)
    n, out = saved_bytes(lambda: fn(xx), exclude=[*exclude, xx])
    out.sum().backward()
    return n


def report(name, model, make_script, x):
    """Print the four figures; ``make_script()`` gives a new ScriptModule (a new executor) each call."""
    exclude = [*model.parameters(), *model.buffers()]  # every module below shares these tensors
    print(f"=== {name}: {graph_rewrite.optimize(make_script()).rewrite_report.counts()}")
    print(f"{'':26}{'1st call':>12}{'after 3 warm-ups':>20}")
    makers = (("eager", lambda: model), ("eager, FX rewrite", lambda: graph_rewrite.optimize(model)),
              ("TorchScript", make_script), ("TorchScript, rewritten", lambda: graph_rewrite.optimize(make_script())))
    for label, make in makers:
        first, warm = kept(make(), x, exclude, 0), kept(make(), x, exclude, 3)
        print(f"{label:26}{first / MiB:>8.2f} MiB{warm / MiB:>16.2f} MiB")


def main():
    torch.manual_seed(0)
    mlp = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(512, 512), nn.Softplus())])
    report("4 x (Linear 512 -> Softplus), batch 128, torch.jit.script", mlp, lambda: torch.jit.script(mlp),
           torch.randn(128, 512))

    import torchvision

    net = torchvision.models.resnet18()
    for parent in list(net.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, child_name, nn.Softplus())
    x = torch.randn(8, 3, 64, 64)
    report("resnet18, ReLU -> Softplus, batch 8 at 64x64, torch.jit.trace", net, lambda: torch.jit.trace(net, x), x)


if __name__ == "__main__":
    main()
