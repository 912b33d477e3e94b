"""One tensor per activation: held bytes removed and step time, native vs optimize().

    python benchmarks/one_tensor.py                      # full: prints, writes benchmarks/ONE_TENSOR.md
    python benchmarks/one_tensor.py --quick --out /tmp/o.md   # smoke run (small inputs, few steps)

*Held bytes*: what autograd keeps after one forward in train mode
(``graph_rewrite.memory.saved_bytes``: every storage saved for backward, counted once;
parameters, buffers and the input left out; outputs not counted). *Estimated* bytes per
rule kind come from ``graph_rewrite.report.estimated_savings`` (shapes only), beside the
measured drop. *Step time*: forward + ``sum().backward()``, native and lean interleaved,
median and spread (min–max) of the per-pair ratios.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import graph_rewrite  # noqa: E402
from graph_rewrite.memory import saved_bytes  # noqa: E402
from graph_rewrite.report import estimated_savings  # noqa: E402
from models import LlamaMLP  # noqa: E402  (benchmarks/models.py)
from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)

MiB = 2 ** 20


# name -> (factory, input shape, the target share removed, the measured headroom "all" it was set against)
MODELS = {
    "efficientnet_b0": (torchvision.models.efficientnet_b0, (2, 3, 64, 64), 0.50, "55%"),
    "mobilenet_v2": (torchvision.models.mobilenet_v2, (2, 3, 64, 64), 0.30, "31%"),
    "mobilenet_v3_large": (torchvision.models.mobilenet_v3_large, (2, 3, 64, 64), 0.25, "27%"),
    "convnext_tiny": (torchvision.models.convnext_tiny, (2, 3, 64, 64), 0.30, "32%"),
    "vit_b_16": (torchvision.models.vit_b_16, (2, 3, 224, 224), 0.25, "25%"),
    "llama_mlp": (LlamaMLP, (2, 128, 512), 0.50, "25% (Unsloth: 50%)"),
    "resnet50": (torchvision.models.resnet50, (2, 3, 64, 64), 0.0, "0"),
}
QUICK_SHAPES = {"vit_b_16": (1, 3, 224, 224)}


def held(model: nn.Module, x: torch.Tensor) -> int:
    torch.manual_seed(0)
    n, _ = saved_bytes(lambda: model(x), exclude=[*model.parameters(), *model.buffers(), x])
    return n


def memory_row(name: str, quick: bool) -> dict:
    factory, shape, target, headroom = MODELS[name]
    if quick:
        shape = QUICK_SHAPES.get(name, shape)
    torch.manual_seed(0)
    model = factory().train()
    x = torch.randn(shape)
    lean = graph_rewrite.optimize(model)
    native_b, lean_b = held(model, x), held(lean, x)
    est = estimated_savings(lean, x)
    return {
        "name": name, "shape": "x".join(map(str, shape)), "native": native_b, "lean": lean_b,
        "removed": 1 - lean_b / native_b, "target": target, "headroom": headroom,
        "estimated": est, "kinds": lean.rewrite_report.counts_by_kind(),
        "left": len(lean.rewrite_report.left_alone),
    }


def intermediates_row() -> dict:
    """The LLaMA MLP's share of its four intermediates (g, silu(g), u, product) removed."""
    torch.manual_seed(0)
    model, x = LlamaMLP(), torch.randn(MODELS["llama_mlp"][1])
    one = 2 * 128 * 1376 * 4
    return {"native": held(model, x) / one, "lean": held(graph_rewrite.optimize(model), x) / one}


def compiled_row() -> dict:
    """Held bytes of torch.compile(native) and torch.compile(optimize(native)), LLaMA MLP."""
    torch.manual_seed(0)
    model, x = LlamaMLP(), torch.randn(MODELS["llama_mlp"][1])
    out = {}
    for label, m in (("compiled native", model), ("compiled lean", graph_rewrite.optimize(model))):
        c = torch.compile(m)
        c(x).sum().backward()  # compiles outside the hooks
        out[label] = held(c, x)
    return out


def step_times(name: str, shape, pairs: int) -> dict:
    torch.manual_seed(0)
    model = MODELS[name][0]().train()
    x = torch.randn(shape)
    lean = graph_rewrite.optimize(model)

    def step(m) -> float:
        for p in model.parameters():
            p.grad = None
        t = time.perf_counter()
        m(x).sum().backward()
        return time.perf_counter() - t

    step(model), step(lean)  # warm-up
    native_t, lean_t, ratios = [], [], []
    for i in range(pairs):
        order = (model, lean) if i % 2 == 0 else (lean, model)
        t = {id(m): step(m) for m in order}
        native_t.append(t[id(model)])
        lean_t.append(t[id(lean)])
        ratios.append(t[id(lean)] / t[id(model)])
    return {"name": name, "shape": "x".join(map(str, shape)), "pairs": pairs,
            "native_ms": 1e3 * statistics.median(native_t), "lean_ms": 1e3 * statistics.median(lean_t),
            "ratio": statistics.median(ratios), "lo": min(ratios), "hi": max(ratios),
            "ratio_of_medians": statistics.median(lean_t) / statistics.median(native_t)}


def _git() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "graph_rewrite"],
                               capture_output=True, text=True).stdout.strip()
        return head + (" (graph_rewrite/ modified)" if dirty else " (graph_rewrite/ clean)")
    except OSError:
        return "unknown"


def _cpu_busy() -> tuple:
    with open("/proc/stat") as f:
        v = [int(t) for t in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="vit_b_16 at batch 1, few timed steps")
    ap.add_argument("--out", default=str(Path(__file__).with_name("ONE_TENSOR.md")))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the timings (default 1: the 2 cores are shared with other jobs)")
    args = ap.parse_args()
    start, (tot0, idle0) = time.time(), _cpu_busy()
    load0 = os.getloadavg()[0]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    rows = []
    for name in MODELS:
        rows.append(memory_row(name, args.quick))
        r = rows[-1]
        print(f"{name:20s} {r['shape']:14s} native {r['native']/MiB:8.2f} MiB  lean {r['lean']/MiB:8.2f} MiB  "
              f"removed {100*r['removed']:5.1f}%  estimated {r['estimated']}  rules {r['kinds']}", flush=True)
    mlp = next(r for r in rows if r["name"] == "llama_mlp")
    inter = intermediates_row()
    print(f"llama_mlp intermediates held: native {inter['native']:.2f}, lean {inter['lean']:.2f}", flush=True)
    comp = compiled_row()
    print("llama_mlp compiled:", {k: f"{v/MiB:.2f} MiB" for k, v in comp.items()}, flush=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    times = [step_times("efficientnet_b0", (2, 3, 64, 64), 4 if args.quick else 21),
             step_times("efficientnet_b0", (2, 3, 128, 128), 2 if args.quick else 11),
             step_times("efficientnet_b0", (2, 3, 224, 224), 2 if args.quick else 7),
             step_times("vit_b_16", (1, 3, 224, 224), 2 if args.quick else 7)]
    torch.set_num_threads(threads)
    for t in times:
        print(f"step {t['name']} {t['shape']}: native {t['native_ms']:.1f} ms, lean {t['lean_ms']:.1f} ms, "
              f"lean/native median {t['ratio']:.3f} (range {t['lo']:.3f}-{t['hi']:.3f}, {t['pairs']} pairs)", flush=True)

    tot1, idle1 = _cpu_busy()
    busy = 1 - (idle1 - idle0) / max(1, tot1 - tot0)
    wall = time.time() - start
    lines = [
        "# One tensor per activation: measured",
        "",
        f"Produced by `python benchmarks/one_tensor.py{' --quick' if args.quick else ''}` on {date}, "
        f"git {_git()}; every number below is from this one run (wall time {wall/60:.1f} min).",
        f"CPU only: {cpu_name()}, {os.cpu_count()} logical cores, torch "
        f"{torch.__version__}, torchvision {torchvision.__version__}, python {platform.python_version()}. "
        f"The machine is shared with other engineers' jobs: load average {load0:.2f} at start, "
        f"{100*busy:.0f}% of all CPU time busy during the run (this run included), so timings are noisy.",
        "",
        "## Held bytes removed",
        "",
        "Bytes autograd keeps after one forward (train mode, float32, CPU): `graph_rewrite.memory.saved_bytes`, "
        "each storage once, parameters, buffers and the input excluded, outputs not counted. *measured*: "
        "native − lean; *estimated by kind*: `graph_rewrite.report.estimated_savings` (from shapes). "
        "*target*: the share set as the goal; *headroom*: the lossless ideal measured when it was set (2026-11-26).",
        "",
        "| model | input | native MiB | lean MiB | removed | target | headroom (all) | estimated by kind (MiB) | rules fired | left alone |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        est = ", ".join(f"{k} {v/MiB:.2f}" for k, v in r["estimated"].items()) or "—"
        kinds = ", ".join(f"{k} {v}" for k, v in r["kinds"].items()) or "none"
        target = f"≥ {100*r['target']:.0f}%" if r["target"] else "never keeps more"
        met = r["removed"] >= r["target"] if r["target"] else r["lean"] <= r["native"]
        lines.append(f"| {r['name']} | {r['shape']} | {r['native']/MiB:.2f} | {r['lean']/MiB:.2f} | "
                     f"**{100*r['removed']:.1f}%** | {target} ({'met' if met else 'not met'}) | {r['headroom']} | "
                     f"{est} | {kinds} | {r['left']} |")
    lines += [
        "",
        f"LLaMA-style MLP (dim 512, hidden 1376, 2 x 128 tokens): native keeps {inter['native']:.2f} and lean "
        f"{inter['lean']:.2f} of its four intermediates (gate(x), silu, up(x), product): "
        f"{100*(1 - inter['lean']/inter['native']):.0f}% of them removed.",
        "",
        "torch.compile (inductor, default mode) of the same MLP, held bytes counted the same way after a "
        f"first compiling call: compiled native {comp['compiled native']/MiB:.2f} MiB, compiled lean "
        f"{comp['compiled lean']/MiB:.2f} MiB (eager native {mlp['native']/MiB:.2f}, eager lean "
        f"{mlp['lean']/MiB:.2f}).",
        "",
        "## Step time, lean / native",
        "",
        "One training step (forward, `sum().backward()`, gradients set to None), one warm-up each, then "
        "native and lean alternately (the order flips every pair). *median ratio*: median of the per-pair "
        f"ratios; *range*: their min–max. torch threads: {args.threads}.",
        "",
        "| model | input | pairs | native ms (median) | lean ms (median) | lean / native, median ratio | range | ratio of medians |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in times:
        lines.append(f"| {t['name']} | {t['shape']} | {t['pairs']} | {t['native_ms']:.1f} | {t['lean_ms']:.1f} | "
                     f"**{t['ratio']:.3f}** | {t['lo']:.3f}–{t['hi']:.3f} | {t['ratio_of_medians']:.3f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(f"\nwrote {args.out} ({wall/60:.1f} min)")


if __name__ == "__main__":
    main()
