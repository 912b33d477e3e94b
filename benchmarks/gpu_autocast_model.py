"""CUDA autocast, part 2: where native and optimized resnet50-with-softplus part ways under float16 autocast.

    python benchmarks/gpu_autocast_model.py     # from the repository root, on a GPU (DEV=cpu: on CPU)

Forward hooks record every module output of both models; the first that differ are printed,
then verify. On an H100 (2026-11-26 14:15 UTC, torch 2.11.0+cu130): from layer1.2 on, about one
float16 ulp; native against itself is exact. Cause: FX traced `out += identity` out of place (fixed at
49b3284; benchmarks/GPU.md). Rerun on a GPU to see it gone.
"""
import os, sys, warnings
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch, torch.nn as nn, torchvision
import graph_rewrite
from models import _swap_relu_for_softplus
from gpu import Autocast
warnings.simplefilter("ignore")
dev = os.environ.get("DEV", "cuda")
torch.manual_seed(0)
inner = _swap_relu_for_softplus(torchvision.models.resnet50(weights=None)).to(dev).train()
x = torch.randn(8, 3, 224 if dev == "cuda" else 64, 224 if dev == "cuda" else 64, device=dev)
m = Autocast(inner, dev, torch.float16)
lean_rt = graph_rewrite.optimize(m)                       # root untraced: runtime front end
lean_fx = Autocast(graph_rewrite.optimize(inner), dev, torch.float16)  # FX front end inside autocast
print("fronts:", type(lean_rt.inner).__name__, type(lean_fx.inner).__name__, flush=True)

def hook(mod, fn):
    try:
        return mod.register_forward_hook(fn)
    except RuntimeError:  # rewritten into an op: the graph no longer calls the module, nothing to record
        return None

def record(model):
    outs = []
    hooks = [hook(mod, lambda mod, i, o, n=n: outs.append((n, type(mod).__name__, i[0].dtype if isinstance(i[0], torch.Tensor) else None, o.detach().clone() if isinstance(o, torch.Tensor) else None)) or None)
             for n, mod in model.named_modules() if n and "." in n and n.count(".") <= 3]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    xx = x.clone().requires_grad_()
    y = model(xx)
    model.load_state_dict(sd)
    for h in hooks:
        if h is not None: h.remove()
    return y, outs

for name, lean in (("runtime", lean_rt), ("fx", lean_fx)):
    y0, a = record(m)
    y1, b = record(lean)
    print(f"\n{name}: output dtypes {y0.dtype} {y1.dtype}, max |diff| {(y0.float() - y1.float()).abs().max().item():.3g}")
    from collections import defaultdict
    seen = defaultdict(int); bmap = {}
    for n1, t1, i1, o1 in b:
        bmap[(n1, seen[n1])] = (i1, o1); seen[n1] += 1
    seen = defaultdict(int); shown = 0; matched = 0
    for n0, t0, i0, o0 in a:
        k = (n0, seen[n0]); seen[n0] += 1
        if k not in bmap or o0 is None or bmap[k][1] is None: continue
        matched += 1
        i1, o1 = bmap[k]
        d = (o0.float() - o1.float()).abs().max().item() if o0.shape == o1.shape else float("nan")
        if d != 0 or o0.dtype != o1.dtype or i0 != i1:
            print(f"  {n0:28s} #{k[1]} {t0:12s} in {i0} / {i1}  out {o0.dtype} / {o1.dtype}  max|diff| {d:.3g}")
            shown += 1
            if shown >= 12: break
    print(f"  ({len(a)} vs {len(b)} hooked calls, {matched} matched before the stop; {shown} differing shown)")
    rep = graph_rewrite.verify(m, lean, x)
    print("  verify:", rep.ok, [(c.name, c.ok, c.worst_error) for c in rep.checks], flush=True)
