"""What the runtime front end costs: per call, and per training step on real models (CPU).

    python benchmarks/runtime_overhead.py            # about 3 minutes on 2 cores
    python benchmarks/runtime_overhead.py --quick    # a smoke run

1. Per call, in µs (median over interleaved blocks): a torch call that passes through
   the mode untouched, and an activation the mode sends to the lean op, against the same
   calls without the mode.
2. One training step (forward, ``sum`` of the logits, backward), lean over native, median
   of N interleaved steps, with the range: Hugging Face Mamba (its eager reference scan)
   and Qwen3-Next (sigmoid gates, softplus, MoE), tiny configs, random weights.
The issue's goal is a step-time ratio of at most 1.05.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import graph_rewrite  # noqa: E402
from graph_rewrite.frontends.runtime import LeanFunctionMode  # noqa: E402
from graph_rewrite.report import RewriteReport  # noqa: E402


def _per_call(fn, block: int, blocks: int) -> float:
    """Median µs per call of ``fn`` over ``blocks`` blocks of ``block`` calls."""
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(block):
            fn()
        times.append((time.perf_counter() - start) / block * 1e6)
    return statistics.median(times)


def per_call(quick: bool):
    x = torch.randn(1000, requires_grad=True)
    a, b = torch.randn(16), torch.randn(16)
    mode = LeanFunctionMode(graph_rewrite.RULES, RewriteReport(), torch.nn.Module())
    block, blocks = (200, 5) if quick else (2000, 21)

    def under_mode(fn):
        def run():
            with mode:
                fn()
        return run

    rows = []
    for label, fn in [("torch.add, 16 elements (passes through)", lambda: torch.add(a, b)),
                      ("F.softplus, 1000 elements, requires grad (rewritten)", lambda: F.softplus(x))]:
        plain, moded, enter = [], [], []
        for _ in range(3):  # interleaved repeats: drift hits both alike
            plain.append(_per_call(fn, block, blocks))
            moded.append(_per_call(under_mode(fn), block, blocks))
            enter.append(_per_call(under_mode(lambda: None), block, blocks))
        p, m, e = statistics.median(plain), statistics.median(moded), statistics.median(enter)
        rows.append((label, p, m - e, m - e - p))
    lean_direct = _per_call(lambda: torch.ops.graph_rewrite.softplus(x, 1.0, 20.0), block, blocks)
    return rows, statistics.median(enter), lean_direct


def _hf(name: str, **cfg):
    import transformers

    transformers.logging.set_verbosity_error()
    config = getattr(transformers, f"{name}Config")(use_cache=False, **cfg)
    return getattr(transformers, f"{name}ForCausalLM")(config).train()


MODELS = {
    "HF Mamba (hidden 256, 4 layers, state 16), batch 2 x 128 tokens":
        (lambda: _hf("Mamba", vocab_size=1000, hidden_size=256, state_size=16, num_hidden_layers=4), (2, 128)),
    "HF Qwen3-Next (hidden 256, 4 layers, 8 experts), batch 2 x 128 tokens":
        (lambda: _hf("Qwen3Next", vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_num_value_heads=4,
                     linear_num_key_heads=2, linear_key_head_dim=32, linear_value_head_dim=32, num_experts=8,
                     num_experts_per_tok=2, moe_intermediate_size=128, shared_expert_intermediate_size=128),
         (2, 128)),
}


def step_time(build, shape, steps: int, ops=None):
    torch.manual_seed(0)
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lean = graph_rewrite.optimize(model, ops=ops)
    ids = torch.randint(0, 1000, shape, generator=torch.Generator().manual_seed(0))

    def step(m):
        for p in model.parameters():
            p.grad = None
        start = time.perf_counter()
        m(ids).logits.sum().backward()
        return time.perf_counter() - start

    step(model), step(lean)  # warm-up
    native, ours = [], []
    for i in range(steps):
        for m, out in ((model, native), (lean, ours)) if i % 2 == 0 else ((lean, ours), (model, native)):
            out.append(step(m))
    ratios = [o / n for o, n in zip(ours, native)]
    return statistics.median(native), statistics.median(ours), statistics.median(ours) / statistics.median(native), \
        min(ratios), max(ratios), lean.rewrite_report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine more threads than free cores stall)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    load = os.getloadavg()[0]
    print(f"# Runtime front end overhead\n\n{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, CPU, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} thread), git {commit}, load average at start {load:.2f}\n")
    rows, enter, lean_direct = per_call(args.quick)
    print("| call | µs without the mode | µs under the mode | added by the mode |\n|---|---|---|---|")
    for label, plain, moded, added in rows:
        print(f"| {label} | {plain:.2f} | {moded:.2f} | {added:+.2f} |")
    print(f"\nEntering and leaving the mode once (per forward): {enter:.2f} µs. "
          f"The lean op called directly: {lean_direct:.2f} µs.\n")
    print("*rules*: `output` is the kind the runtime front end applies (softplus, sigmoid, logsigmoid, "
          "...); `all` adds FX's recompute rules in the submodules FX traces on its own, which trade "
          "backward compute for memory.\n")
    print("| model | rules | N | native ms | lean ms | lean / native (median) | per-step ratio range | rewritten |")
    print("|---|---|---|---|---|---|---|---|")
    steps = 3 if args.quick else args.steps
    for name, (build, shape) in MODELS.items():
        if args.quick:
            shape = (1, 16)
        for label, ops in (("output", ["output"]), ("all", None)):
            try:
                n, o, r, lo, hi, report = step_time(build, shape, steps, ops)
            except ImportError as e:
                print(f"| {name} | {label} | skipped: {e} | | | | | |")
                break
            sites = ", ".join(f"{op.split('.')[-1]} {k}" for op, k in report.counts().items())
            print(f"| {name} | {label} | {steps} | {n * 1e3:.1f} | {o * 1e3:.1f} | **{r:.3f}** | {lo:.3f}–{hi:.3f} "
                  f"| {sites} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
