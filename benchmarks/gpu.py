"""The CUDA figures in one command; on a machine without CUDA, what runs on CPU.

    python benchmarks/gpu.py                      # full run; writes benchmarks/GPU.md
    python benchmarks/gpu.py --out /tmp/GPU.md    # another file
    python benchmarks/gpu.py --quick              # tiny sizes, under a minute on CPU (CI runs it)
    python benchmarks/gpu.py --budget 420         # stop starting new work after 420 s

No install needed: the checkout this file is in is imported (its path is in the header).
Sections, in the order they run, each written to the file as soon as it is done (a run
that is killed leaves the finished sections and a note saying what did not run):

1. the fused Triton backward: exactness on the device against the composite, and its
   bandwidth at 16M elements as a share of ``copy_`` bandwidth (CUDA events);
2. ``graph_rewrite.verify`` on seven models: quickstart MLP, resnet50 with Softplus,
   stock efficientnet_b0, a tiny HF Mamba, a LLaMA-style MLP, an HF LLaMA and a diffusers
   UNet2DModel: peak CUDA memory over forward+backward, memory held after forward,
   activation bytes, before and after;
3. float16 and bfloat16 autocast: ``verify`` passes, and the same memory figures;
4. step time lean/native (median, with the spread of the per-step ratios) at sizes
   that keep the GPU busy.

Whatever ``graph_rewrite.optimize(model)`` rewrites at run time is what is measured.
Every CUDA cell on a machine without CUDA says "not measured (no CUDA device)".
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # measure this checkout, installed or not
sys.path.insert(1, HERE)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import graph_rewrite  # noqa: E402
from graph_rewrite.ops import activations, triton_kernels  # noqa: E402
from graph_rewrite.verification import GRAD_TOLERANCES  # noqa: E402
from models import LlamaMLP, _swap_relu_for_softplus  # noqa: E402  (benchmarks/models.py)

MiB = 2**20
NO_CUDA = "not measured (no CUDA device)"


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


# ============================================================================ the report file
class Report:
    """The markdown file, rewritten after every section so a killed run keeps what finished."""

    def __init__(self, path: str, header: str, planned: Sequence[str]) -> None:
        self.path, self.header = path, header
        self.sections: List[str] = []
        self.pending = list(planned)
        self.skipped: List[str] = []
        self.done = False
        self.write()

    def add(self, name: str, text: str) -> None:
        self.sections.append(text)
        if name in self.pending:
            self.pending.remove(name)
        self.write()

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(f"{what}: {why}")
        log(f"skipped {what}: {why}")

    def write(self) -> None:
        parts = [self.header, *self.sections]
        tail = ["## What was not measured", ""]
        tail += [f"- {s}" for s in self.skipped] or ["- nothing skipped"]
        if not self.done:
            tail += ["", f"**Run incomplete** (still to run when this was written: {', '.join(self.pending) or 'closing'})."]
        parts.append("\n".join(tail))
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n\n".join(parts) + "\n")
        os.replace(tmp, self.path)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def mib(b: Optional[float]) -> str:
    return NO_CUDA if b is None else f"{b / MiB:.1f}"


def saving(pair: Optional[Tuple[int, int]]) -> str:
    if pair is None:
        return NO_CUDA
    before, after = pair
    return f"{(before - after) / MiB:.1f} ({100 * (before - after) / before:.1f}%)" if before else "—"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def _load() -> str:
    # CPU timings on a shared machine are only as good as its load: say what it was.
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg()) + f" (1/5/15 min, {os.cpu_count()} cores)"
    except OSError:
        return "unknown"


def header(args: argparse.Namespace, device: str) -> str:
    cuda = device == "cuda"
    try:
        import triton

        triton_v = triton.__version__
    except Exception as e:  # the fused kernel then never runs
        triton_v = f"not importable ({type(e).__name__})"
    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:
        tv = "not installed"
    dirty = _git("status", "--porcelain", "--", "graph_rewrite", "benchmarks/gpu.py")
    commit = (_git("rev-parse", "HEAD") or "unknown (not a git checkout)") + (" + uncommitted changes" if dirty else "")
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    gpu = (f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
           if cuda else NO_CUDA.replace("not measured ", "none ").strip())
    rows = [
        ["device", gpu if cuda else "CPU only: no CUDA device (torch.cuda.is_available() is False)"],
        ["CPU", f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores"],
        ["torch", torch.__version__],
        ["CUDA (torch build)", torch.version.cuda or "none (CPU build)"],
        ["cuDNN", str(torch.backends.cudnn.version()) if cuda else "—"],
        ["triton", triton_v],
        ["torchvision", tv],
        ["graph_rewrite", f"{graph_rewrite.__file__}"],
        ["git commit", commit],
        ["date", when],
        ["command", "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])],
        ["mode", "quick (tiny sizes: smoke test, figures not meaningful)" if args.quick else "full"],
        ["float32 matmul precision", torch.get_float32_matmul_precision()],
        ["load average at start", _load()],
    ]
    title = "# GPU figures (benchmarks/gpu.py)" if cuda else "# GPU figures (benchmarks/gpu.py): CPU-only run, every CUDA figure not measured"
    return f"{title}\n\n" + md_table(["", ""], rows)


# ============================================================================ models
class LogitsOnly(nn.Module):
    """A HF causal LM returning only its logits (verify compares float outputs)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits


class SampleOnly(nn.Module):
    """A diffusers UNet returning only its ``sample`` (verify compares float outputs)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep).sample


class Autocast(nn.Module):
    """Runs the wrapped model under ``torch.autocast(device_type, dtype)``."""

    def __init__(self, inner: nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.device_type, self.dtype = inner, device_type, dtype

    def forward(self, *a: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.inner(*a)


# Sizes: (memory/verify run, step-time run) per mode. "gpu" sizes keep an H100 busy in
# the step-time run; "cpu" sizes are what a 2-core machine finishes in minutes.
SIZES = {
    "mlp": {"quick": (64, 64), "cpu": (256, 256), "gpu": (256, 8192)},
    "resnet50_softplus": {"quick": ((2, 64), (2, 64)), "cpu": ((8, 224), (8, 224)), "gpu": ((32, 224), (64, 224))},
    "efficientnet_b0": {"quick": ((2, 64), (2, 64)), "cpu": ((8, 224), (8, 224)), "gpu": ((32, 224), (128, 224))},
    "mamba_tiny": {"quick": ((2, 32), None), "cpu": ((8, 128), None), "gpu": ((8, 256), None)},
    # HF LlamaForCausalLM: (batch, sequence, hidden, intermediate, layers).
    "hf_llama": {"quick": ((1, 32, 64, 172, 2), None), "cpu": ((1, 256, 256, 688, 2), None),
                 "gpu": ((1, 1024, 1024, 2816, 4), (4, 1024, 1024, 2816, 4))},
    "llama_mlp": {"quick": ((64, 256, 688), (64, 256, 688)), "cpu": ((512, 1024, 2816), (512, 1024, 2816)),
                  "gpu": ((4096, 1024, 2816), (16384, 2048, 5632))},
    # diffusers UNet2DModel: (batch, pixels, block channels); two levels (the second with attention)
    # for the small sizes, four for the GPU (DDPM's 64-pixel layout: attention at 16 pixels).
    "unet2d": {"quick": ((2, 32, (32, 64)), (2, 32, (32, 64))), "cpu": ((2, 64, (64, 128)), (2, 64, (64, 128))),
               "gpu": ((16, 64, (128, 256, 256, 512)), (64, 64, (128, 256, 256, 512)))},
}


def build(key: str, size: Any, device: str) -> Tuple[nn.Module, Tuple[torch.Tensor, ...], str]:
    """(model in train mode on ``device``, inputs, description); random weights, nothing downloaded."""
    torch.manual_seed(0)
    if key == "mlp":
        model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(1024, 1024), nn.Softplus())])
        inputs, desc = (torch.randn(size, 1024),), f"4 x (Linear(1024,1024) -> Softplus), batch {size}"
    elif key in ("resnet50_softplus", "efficientnet_b0"):
        import torchvision

        batch, res = size
        if key == "resnet50_softplus":
            model, desc = _swap_relu_for_softplus(torchvision.models.resnet50(weights=None)), "resnet50, every nn.ReLU -> nn.Softplus"
        else:
            model, desc = torchvision.models.efficientnet_b0(weights=None), "efficientnet_b0 as torchvision builds it"
        inputs, desc = (torch.randn(batch, 3, res, res),), f"{desc}, batch {batch} at {res}x{res}"
    elif key == "mamba_tiny":
        from transformers import MambaConfig, MambaForCausalLM

        batch, seq = size
        config = MambaConfig(vocab_size=1000, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2,
                             conv_kernel=4, use_cache=False)
        model = LogitsOnly(MambaForCausalLM(config))
        inputs = (torch.randint(0, 1000, (batch, seq)),)
        desc = f"HF MambaForCausalLM, random weights (hidden 64, state 8, 2 layers, vocab 1000), {batch} x {seq} tokens"
    elif key == "hf_llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        batch, seq, hidden, inter, layers = size
        config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                             max_position_embeddings=max(2048, seq), use_cache=False, attn_implementation="sdpa")
        model = LogitsOnly(LlamaForCausalLM(config))
        inputs = (torch.randint(0, 32000, (batch, seq)),)
        desc = (f"HF LlamaForCausalLM, random weights (hidden {hidden}, intermediate {inter}, {layers} layers, "
                f"vocab 32000, SDPA), {batch} x {seq} tokens")
    elif key == "unet2d":
        import diffusers

        batch, px, channels = size
        levels = {2: (("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D")),
                  4: (("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                      ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))}[len(channels)]
        model = SampleOnly(diffusers.UNet2DModel(
            sample_size=px, in_channels=3, out_channels=3, layers_per_block=1 if len(channels) == 2 else 2,
            block_out_channels=channels, norm_num_groups=8 if len(channels) == 2 else 32,
            down_block_types=levels[0], up_block_types=levels[1]))
        inputs = (torch.randn(batch, 3, px, px), torch.randint(0, 1000, (batch,)))
        desc = (f"diffusers UNet2DModel, random weights (channels {'/'.join(map(str, channels))}), "
                f"batch {batch} at {px}x{px}")
    elif key == "llama_mlp":
        tokens, hidden, inter = size
        model = LlamaMLP(hidden, inter)
        inputs, desc = (torch.randn(tokens, hidden),), f"LLaMA-style MLP down(silu(gate(x)) * up(x)), {hidden} -> {inter}, {tokens} tokens"
    else:
        raise KeyError(key)
    return model.to(device).train(), tuple(t.to(device) for t in inputs), desc


def optimize_quiet(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return graph_rewrite.optimize(model)


def rewritten(lean: nn.Module) -> str:
    report = getattr(lean, "rewrite_report", None)
    counts = report.counts() if report is not None else {}
    text = ", ".join(f"{n} {op.split('.')[-1]}" for op, n in sorted(counts.items())) or "nothing"
    if report is not None and report.uncovered:  # say why, e.g. HF Mamba's mixers are not traced
        reasons = sorted({u.reason for u in report.uncovered})
        text += f" ({len(report.uncovered)} module(s) not traced: {'; '.join(reasons)[:120]})"
    return text


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ============================================================================ 1. fused backward
def _ulp_stats(got: torch.Tensor, want: torch.Tensor) -> Tuple[float, float]:
    """(max distance in ulps of the dtype, share of identical bits), NaNs counted as equal."""
    fi = torch.finfo(got.dtype)
    a, b = got.double(), want.double()
    mag = torch.maximum(a.abs(), b.abs()).clamp_min(fi.smallest_normal)
    d = (a - b).abs() / (torch.exp2(torch.floor(torch.log2(mag))) * fi.eps)
    same = (a == b) | (a.isnan() & b.isnan())
    d = torch.where(same, torch.zeros_like(d), d)
    return float(d.max()), float(same.double().mean())


def _composite(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run ``fn`` with the fused kernel switched off: the composite the ops fall back to."""
    real = triton_kernels.applies
    triton_kernels.applies = lambda *a, **k: False
    try:
        with torch.no_grad():
            return fn()
    finally:
        triton_kernels.applies = real


def section_kernel(rep: Report, device: str, quick: bool) -> None:
    cuda = device == "cuda"
    fused = cuda and triton_kernels.available()
    lines = ["## 1. Fused backward kernel (graph_rewrite/ops/triton_kernels.py)", ""]
    # --- exactness on the device
    rows = []
    ext = torch.tensor([-1e4, -745.0, -100.0, -30.0, -20.5, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1e-8, 0.2736, 0.5, 1.0,
                        5.0, 19.99, 20.0, 20.01, 30.0, 100.0, 1e4, float("inf"), float("-inf"), float("nan")],
                       dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for label, beta, thr in (("softplus b=1 t=20", 1.0, 20.0), ("softplus b=3 t=1", 3.0, 1.0), ("logsigmoid", None, None)):
            if not fused:
                rows.append([label, str(dtype).replace("torch.", ""), NO_CUDA if not cuda else "triton missing", "—"])
                continue
            x = torch.cat([ext, torch.linspace(-120, 120, 20001, dtype=torch.float64),
                           torch.randn(1 << 18, generator=gen, dtype=torch.float64) * 10]).to(dtype).to(device)
            g = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
            if beta is None:
                y = F.logsigmoid(x)
                want = _composite(lambda: activations.logsigmoid_grad(g, y))
                got = triton_kernels.logsigmoid_backward(g, y)
            else:
                y = F.softplus(x, beta, thr)
                mask = activations._softplus_linear_branch(x, beta, thr) if activations.softplus_needs_branch_mask(dtype, thr) else None
                want = _composite(lambda: activations.softplus_grad(g, y, beta, thr, mask))
                got = triton_kernels.softplus_backward(g, y, beta, mask)
            mx, same = _ulp_stats(got, want)
            rows.append([label, str(dtype).replace("torch.", ""), f"{mx:.2f}", f"{100 * same:.3f}%"])
    lines += ["Exactness on the device: the kernel against the composite (the ops' fallback, same device), "
              f"{ext.numel()} extremes + 20001 points on [-120, 120] + 262144 random, random incoming gradients.",
              "", md_table(["op", "dtype", "max distance (ulp)", "bit-identical"], rows), ""]
    # --- bandwidth
    n = (1 << 18) if quick else 16 * (1 << 20)
    reps = 3 if quick else 20

    def timed(fn: Callable[[], Any]) -> float:
        """Median seconds per call after two warm-up calls (CUDA events on a GPU)."""
        for _ in range(2):
            fn()
        ts = []
        for _ in range(reps):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(n, generator=gen) * 8).to(dtype).to(device)
        g = torch.randn(n, generator=gen).to(dtype).to(device)
        y, ly = F.softplus(x), F.logsigmoid(x)
        dst = torch.empty_like(x)
        el = x.element_size()
        t_copy = timed(lambda: dst.copy_(x))
        bw_copy = 2 * n * el / t_copy
        cases: List[Tuple[str, Optional[Callable[[], Any]]]] = [
            ("native aten.softplus_backward (reads x, g)", lambda: torch.ops.aten.softplus_backward(g, x, 1.0, 20.0)),
            ("composite softplus backward (4 passes)", lambda: _composite(lambda: activations.softplus_grad(g, y, 1.0, 20.0, None))),
            ("fused softplus backward", (lambda: triton_kernels.softplus_backward(g, y, 1.0)) if fused else None),
            ("composite logsigmoid backward", lambda: _composite(lambda: activations.logsigmoid_grad(g, ly))),
            ("fused logsigmoid backward", (lambda: triton_kernels.logsigmoid_backward(g, ly)) if fused else None),
        ]
        if fused:
            # Launch configurations besides the default (triton_kernels.BLOCK, NUM_WARPS), to pick from.
            for block, warps in ((1024, 4), (4096, 8), (4096, 16)):
                cases.append((f"fused softplus backward, BLOCK {block}, {warps} warps",
                              lambda b=block, w=warps: triton_kernels.softplus_backward(g, y, 1.0, block=b, num_warps=w)))
                cases.append((f"fused logsigmoid backward, BLOCK {block}, {warps} warps",
                              lambda b=block, w=warps: triton_kernels.logsigmoid_backward(g, ly, block=b, num_warps=w)))
        if fused:
            xr = x.clone().requires_grad_()
            yr = torch.ops.graph_rewrite.softplus(xr, 1.0, 20.0)
            cases.append(("lean op backward through autograd (fused)", lambda: torch.autograd.grad(yr, xr, g, retain_graph=True)))
        dt = str(dtype).replace("torch.", "")
        rows.append([dt, "copy_ (reads 1, writes 1)", f"{t_copy * 1e6:.1f}", f"{bw_copy / 1e9:.1f}", "100%"])
        for label, fn in cases:
            if fn is None:
                rows.append([dt, label, NO_CUDA if not cuda else "triton missing", "—", "—"])
                continue
            t = timed(fn)
            bw = 3 * n * el / t  # the ideal traffic: read two tensors, write one
            rows.append([dt, label, f"{t * 1e6:.1f}", f"{bw / 1e9:.1f}", f"{100 * bw / bw_copy:.0f}%"])
        del x, g, y, ly, dst
        _free(device)
    where = "CUDA events" if cuda else "CPU wall clock (perf_counter)"
    lines += [f"Bandwidth at {n} elements ({n / 2**20:g}M), median of {reps} ({where}). A backward's ideal traffic is "
              "3 tensors (read y or x and g, write the result); its bandwidth is that over the time, and the last "
              "column is that as a share of `copy_`'s bandwidth (goal: fused ≥ 80% on H100, float32, 16M).",
              "", md_table(["dtype", "what", "µs", "GB/s", "% of copy bandwidth"], rows)]
    if not cuda:
        rep.skip("fused kernel exactness and bandwidth on CUDA", "no CUDA device (the interpreter tests in "
                 "tests/triton_interpreter_cases.py check the same kernel on CPU)")
    rep.add("kernel", "\n".join(lines))


# ============================================================================ 2./3. verify
def _verify_row(key: str, size: Any, device: str, wrap: Optional[torch.dtype]) -> List[Any]:
    model, inputs, desc = build(key, size, device)
    lean = optimize_quiet(model)
    a, b = model, lean
    if wrap is not None:
        a, b = Autocast(model, device, wrap), Autocast(lean, device, wrap)
    # Under autocast the gradients are computed at the autocast dtype's precision, so
    # they are compared at that dtype's tolerance (verify's own table), not float32's.
    grad_tol = GRAD_TOLERANCES[wrap] if wrap is not None else None
    report = graph_rewrite.verify(a, b, *inputs, grad_tol=grad_tol)
    failed = ", ".join(c.name for c in report.failed) if not report.ok else ""
    grads = [c for c in report.checks if "gradient" in c.name and c.worst_error is not None]
    worst = max(grads, key=lambda c: c.worst_error / c.tolerance, default=None)
    worst_text = f"{worst.worst_error:.2g} (tol {worst.tolerance:.2g}, {worst.where})" if worst else "—"
    act = report.activation_bytes
    row = [key, desc, rewritten(lean), ("PASSED" if report.ok else f"FAILED ({failed})"), worst_text,
           mib(act[0]), mib(act[1]), saving(act),
           *(mib(p) for p in (report.peak_cuda_bytes or (None, None))), saving(report.peak_cuda_bytes),
           *(mib(p) for p in (report.cuda_bytes_after_forward or (None, None))), saving(report.cuda_bytes_after_forward)]
    del model, lean, a, b, inputs, report
    _free(device)
    return row


VERIFY_HEADER = ["model", "what", "rewritten", "verify", "worst gradient error", "activation MiB before", "after", "saving MiB",
                 "CUDA peak fwd+bwd MiB before", "after", "saving MiB", "CUDA held after forward MiB before", "after", "saving MiB"]


def _model_available(key: str) -> Optional[str]:
    """None, or why the model cannot be built here."""
    try:
        if key in ("resnet50_softplus", "efficientnet_b0"):
            import torchvision  # noqa: F401
        if key in ("mamba_tiny", "hf_llama"):
            import transformers  # noqa: F401
        if key == "unet2d":
            import diffusers  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed"
    return None


def section_verify(rep: Report, device: str, mode: str, deadline: float, keys: Sequence[str]) -> None:
    rows = []
    for key in keys:
        why = _model_available(key)
        if why is None and time.monotonic() > deadline:
            why = "time budget (--budget) spent"
        if why:
            rep.skip(f"verify {key}", why)
            rows.append([key, f"skipped: {why}"] + [""] * (len(VERIFY_HEADER) - 2))
            continue
        log(f"verify {key} ...")
        try:
            rows.append(_verify_row(key, SIZES[key][mode][0], device, None))
        except Exception as e:
            rep.skip(f"verify {key}", f"raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            rows.append([key, f"error: {type(e).__name__}"] + [""] * (len(VERIFY_HEADER) - 2))
            traceback.print_exc()
    text = ["## 2. verify: memory before and after, float32", "",
            "`graph_rewrite.verify(model, graph_rewrite.optimize(model), *inputs)` in train mode, random weights. "
            "*Activation* is what autograd keeps for backward plus the outputs (parameters, inputs excluded); "
            "*CUDA peak* is `max_memory_allocated` over one forward+backward above what was allocated before it; "
            "*held after forward* is what forward left allocated; *worst gradient error* is verify's, as a fraction "
            "of the largest gradient. " + ("" if device == "cuda" else f"CUDA columns: {NO_CUDA}."),
            "", md_table(VERIFY_HEADER, rows)]
    rep.add("verify", "\n".join(text))


def section_autocast(rep: Report, device: str, mode: str, deadline: float, keys: Sequence[str]) -> None:
    rows = []
    dtypes = (torch.float16, torch.bfloat16)
    for dtype in dtypes:
        for key in keys:
            label = f"{key} ({str(dtype).replace('torch.', '')} autocast)"
            why = _model_available(key)
            if why is None and time.monotonic() > deadline:
                why = "time budget (--budget) spent"
            if why:
                rep.skip(f"autocast {label}", why)
                rows.append([label, f"skipped: {why}"] + [""] * (len(VERIFY_HEADER) - 2))
                continue
            log(f"autocast {label} ...")
            try:
                row = _verify_row(key, SIZES[key][mode][0], device, dtype)
                rows.append([label] + row[1:])
            except Exception as e:
                rep.skip(f"autocast {label}", f"raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                rows.append([label, f"error: {type(e).__name__}"] + [""] * (len(VERIFY_HEADER) - 2))
                traceback.print_exc()
    text = ["## 3. Autocast: float16 and bfloat16", "",
            f"Both models run under `torch.autocast('{device}', dtype)`. `verify` compares outputs at their dtype's "
            "tolerance and gradients at the autocast dtype's (`graph_rewrite.verification.GRAD_TOLERANCES`: "
            "float16 2e-2, bfloat16 1e-1 of the largest gradient), since both models compute them at that precision. " + ("" if device == "cuda" else
            f"This run used CPU autocast; CUDA columns: {NO_CUDA}."),
            "", md_table(VERIFY_HEADER, rows)]
    rep.add("autocast", "\n".join(text))


# ============================================================================ 4. step time
def _loss(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    return sum(t.float().sum() for t in out)


def step_times(model: nn.Module, lean: nn.Module, inputs: Sequence[torch.Tensor], device: str, iters: int) -> Dict[str, Any]:
    """Interleaved forward+backward steps (order alternating); per-step seconds of each."""
    cuda = device == "cuda"

    def step(m: nn.Module) -> float:
        for p in m.parameters():
            p.grad = None
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            _loss(m(*inputs)).backward()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b) / 1e3
        t0 = time.perf_counter()
        _loss(m(*inputs)).backward()
        return time.perf_counter() - t0

    for _ in range(2):
        step(model), step(lean)
    nat, lea = [], []
    for i in range(iters):
        if i % 2:
            lea.append(step(lean)), nat.append(step(model))
        else:
            nat.append(step(model)), lea.append(step(lean))
    return {"native": nat, "lean": lea}


def section_time(rep: Report, device: str, mode: str, deadline: float, keys: Sequence[str], iters: int) -> None:
    rows = []
    for key in keys:
        size = SIZES[key][mode][1]
        why = _model_available(key) or (None if size is not None else
                                         "not timed: a tiny model whose step is launch-bound, not a busy GPU")
        if why is None and time.monotonic() > deadline:
            why = "time budget (--budget) spent"
        if why:
            rep.skip(f"step time {key}", why)
            rows.append([key, f"skipped: {why}", "", "", "", "", ""])
            continue
        log(f"step time {key} ...")
        try:
            model, inputs, desc = build(key, size, device)
            lean = optimize_quiet(model)
            if key in AUTOCAST_STEP and device == "cuda":  # trained that way: time it that way
                dtype = AUTOCAST_STEP[key]
                model, lean = Autocast(model, device, dtype), Autocast(lean, device, dtype)
                desc += f", {str(dtype).replace('torch.', '')} autocast"
            t = step_times(model, lean, inputs, device, iters)
            nat, lea = statistics.median(t["native"]), statistics.median(t["lean"])
            ratios = sorted(b / a for a, b in zip(t["native"], t["lean"]))
            q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [ratios[0], 0, ratios[-1]]
            rows.append([key, desc, rewritten(lean), f"{nat * 1e3:.2f}", f"{lea * 1e3:.2f}", f"{lea / nat:.3f}",
                         f"{q[0]:.3f} – {q[-1]:.3f} (min {ratios[0]:.3f}, max {ratios[-1]:.3f})"])
            del model, lean, inputs
            _free(device)
        except Exception as e:
            rep.skip(f"step time {key}", f"raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            rows.append([key, f"error: {type(e).__name__}", "", "", "", "", ""])
            traceback.print_exc()
    where = ("CUDA events around each step" if device == "cuda" else
             "CPU wall clock (no CUDA device); on a shared machine (see the load average in the header) the quartiles "
             "show how far a single CPU ratio can be trusted")
    text = ["## 4. Step time, lean / native", "",
            f"One forward + backward (sum of the outputs), {iters} steps each after 2 warm-up steps, native and lean "
            f"interleaved in alternating order; {where}. Goals on GPU: ≤ 1.03 on hf_llama (bfloat16 autocast), "
            "unet2d and efficientnet_b0, with their peak CUDA memory (section 2) down by at least their activation "
            "bytes' share.",
            "", md_table(["model", "what", "rewritten", "native ms (median)", "lean ms (median)", "lean / native",
                          "per-step ratio, quartiles"], rows)]
    rep.add("time", "\n".join(text))


# ============================================================================ main
MODELS = ["mlp", "llama_mlp", "resnet50_softplus", "efficientnet_b0", "mamba_tiny", "hf_llama", "unet2d"]
AUTOCAST_STEP = {"hf_llama": torch.bfloat16}  # step time under CUDA autocast for these


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "GPU.md"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after which no new model is started (default: 420 full, 60 quick)")
    ap.add_argument("--cpu", action="store_true", help="ignore CUDA even if present")
    ap.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    args = ap.parse_args(argv)
    start = time.monotonic()
    deadline = start + (args.budget if args.budget is not None else (60 if args.quick else 420))
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    mode = "quick" if args.quick else ("gpu" if device == "cuda" else "cpu")
    rep = Report(args.out, header(args, device), ["kernel", "verify", "autocast", "time"])
    if device == "cpu":
        rep.skip("every CUDA figure (peak memory, held after forward, kernel on the device, CUDA autocast, GPU step time)",
                 NO_CUDA)
    log(f"benchmarks/gpu.py: device {device}, mode {mode}, writing {args.out}")
    # --quick leaves out the torchvision models: building, tracing and verifying resnet50
    # alone takes 25 s on a loaded 2-core machine, and CI needs every code path, not sizes.
    chosen = args.models.split(",") if args.models else (
        ["mlp", "llama_mlp", "mamba_tiny", "hf_llama", "unet2d"] if args.quick else MODELS)
    unknown = set(chosen) - set(MODELS)
    if unknown:
        ap.error(f"unknown models {sorted(unknown)}; known: {MODELS}")
    if args.quick and not args.models:
        rep.skip("resnet50_softplus and efficientnet_b0", "--quick (a full run measures them)")
    pick = lambda keys: [k for k in keys if k in chosen]  # noqa: E731
    section_kernel(rep, device, args.quick)
    section_verify(rep, device, mode, deadline, pick(MODELS))
    autocast_keys = ["mlp", "llama_mlp"] if device == "cuda" else ["mlp"]
    if device == "cuda":
        autocast_keys += ["resnet50_softplus", "efficientnet_b0", "hf_llama", "unet2d"]
    section_autocast(rep, device, mode, deadline, pick(autocast_keys))
    # The goal's models first on a GPU; on CPU the cheap ones first (resnet50 steps take seconds).
    time_keys = (["hf_llama", "efficientnet_b0", "unet2d", "resnet50_softplus", "llama_mlp", "mlp", "mamba_tiny"]
                 if device == "cuda" else ["mlp", "llama_mlp", "unet2d", "resnet50_softplus", "efficientnet_b0", "mamba_tiny"])
    section_time(rep, device, mode, deadline, pick(time_keys), iters=3 if args.quick else (20 if device == "cuda" else 5))
    rep.done = True
    rep.sections.append(f"Wall time of this run: {time.monotonic() - start:.0f} s; load average at the end: {_load()}.")
    rep.write()
    log(f"wrote {args.out} in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
