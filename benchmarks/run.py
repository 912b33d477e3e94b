"""One benchmark command for graph_rewrite.

    python benchmarks/run.py            # full run (about 10 minutes on 2 CPU cores, cold caches)
    python benchmarks/run.py --quick    # smoke run (under 2 minutes)
    python benchmarks/run.py --out PATH # where the markdown goes (default benchmarks/RESULTS.md)

Measures, in one run, and writes a markdown file (then prints it):
1. activation memory (saved for backward + outputs) of native, lean, torch.compile of
   both, and the analytic floor, on six models;
2. forward+backward step time, native vs lean (vs the prototype registration);
3. per-call overhead of the op registrations of benchmarks/registration.py, and
   whether each works under torch.compile(fullgraph=True) and torch.export;
4. backward bandwidth on a 16M-element float32 tensor against copy bandwidth;
5. the same on CUDA where a GPU is present (peak memory, bandwidth);
6. the issue's goals, met or not.
See benchmarks/README.md for the method.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import graph_rewrite  # noqa: E402
from graph_rewrite.memory import saved_bytes, storage_key  # noqa: E402

import registration as reg  # noqa: E402
from floor import floor_bytes  # noqa: E402
from models import CASES, Case, loss_of  # noqa: E402

MiB = 2**20
NO_GPU = "not measured (no GPU)"


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


# ============================================================================ machine
def machine_info() -> Dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = reg._cpu_flags()
    simd = ", ".join(f for f in ("avx512f", "avx2", "fma", "neon", "asimd") if f in flags) or "?"
    info = {
        "CPU": f"{cpu} ({simd})",
        "cores": f"{os.cpu_count()} logical cores visible; torch threads {torch.get_num_threads()} (default)",
        "memory": _meminfo(),
        "torch": torch.__version__,
        "torchvision": _torchvision_version(),
        "python": platform.python_version(),
        "OS": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "graph_rewrite": f"{graph_rewrite.__version__}, git {_git_state()}",
        "inductor cache": _inductor_cache(),
        "GPU": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (torch.cuda.is_available() is False)",
    }
    return info


def _cpu_jiffies() -> Tuple[float, float]:
    """(busy, steal) seconds of all CPUs since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
        return (user + nice + system + irq + softirq) / hz, steal / hz
    except (OSError, ValueError):
        return float("nan"), float("nan")


class CpuShare:
    """How much of the machine other processes used while the benchmark ran (timings are only as good as this)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.busy0, self.steal0 = _cpu_jiffies()
        self.own0 = self._own()
        try:
            self.load0 = open("/proc/loadavg").read().split()[0]
        except OSError:
            self.load0 = "?"

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def summary(self) -> str:
        wall = time.perf_counter() - self.t0
        busy, steal = _cpu_jiffies()
        cap = wall * (os.cpu_count() or 1)
        others = max(0.0, (busy - self.busy0) - (self._own() - self.own0))
        return (f"load average at start {self.load0}; during the run other processes used "
                f"{100 * others / cap:.0f}% of the machine's CPU time, steal {100 * (steal - self.steal0) / cap:.0f}%")


def _git_state() -> str:
    import subprocess

    try:
        root = os.path.dirname(HERE)
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "graph_rewrite"], capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head}" + (" (graph_rewrite/ has uncommitted changes)" if dirty else " (graph_rewrite/ clean)")
    except Exception:
        return "?"


def _meminfo() -> str:
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        return f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        return "?"


def _inductor_cache() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        d = cache_dir()
    except Exception:
        d = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "?")
    cold = not os.path.isdir(d) or not os.listdir(d)
    return f"{d} ({'empty at start: compile times are cold' if cold else 'warm at start: compile times benefit from earlier runs'})"


def _torchvision_version() -> str:
    try:
        import torchvision

        return torchvision.__version__
    except ImportError:
        return "not installed"


# ============================================================================ helpers
def activation_bytes(fn: Callable[[], Any], exclude: Sequence[torch.Tensor]) -> int:
    n, out = saved_bytes(fn, exclude=exclude, include_outputs=True)
    del out
    return n


def excluded(model: nn.Module, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    return [*model.parameters(), *model.buffers(), *inputs]


def optimize_quiet(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return graph_rewrite.optimize(model)


def retarget(lean: nn.Module, fn: Callable) -> nn.Module:
    """A new GraphModule, sharing ``lean``'s submodules and parameters, whose softplus nodes call ``fn``."""
    graph = copy.deepcopy(lean.graph)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.graph_rewrite.softplus, torch.ops.graph_rewrite.softplus.default):
            node.target = fn
    gm = torch.fx.GraphModule(lean, graph)  # its own class: lean's forward is untouched
    gm.train(lean.training)
    return gm


def fmt_mib(b: Optional[float], digits: int = 1) -> str:
    if b is None:
        return "—"
    if isinstance(b, str):
        return b
    return f"{b / MiB:.{digits}f}"


def digits_for(values: Sequence[Any]) -> int:
    nums = [v for v in values if isinstance(v, (int, float))]
    return 3 if nums and max(nums) < 16 * MiB else 1


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


# ============================================================================ 1. memory
def measure_memory(case: Case, quick: bool, compile_it: bool, skip_reason: str) -> Dict[str, Any]:
    torch.manual_seed(0)
    model, inputs, desc = case.build(quick)
    model.train()
    lean = optimize_quiet(model)
    ex = excluded(model, inputs)
    r: Dict[str, Any] = {"desc": desc, "counts": lean.rewrite_report.counts(), "tracing": lean.rewrite_report.tracing}
    t0 = time.perf_counter()
    r["native"] = activation_bytes(lambda: model(*inputs), ex)
    r["lean"] = activation_bytes(lambda: lean(*inputs), ex)
    fb = floor_bytes(lambda: model(*inputs), ex)
    for k in ("floor", "walk_all", "hooks", "unattributed", "walk_only", "missing", "activation_nodes"):
        r[k] = fb[k]
    log(f"  eager memory + floor: {time.perf_counter() - t0:.1f}s")
    for name, m in (("c_native", model), ("c_lean", lean)):
        if not compile_it:
            r[name] = skip_reason
            continue
        torch._dynamo.reset()
        t0 = time.perf_counter()
        try:
            cm = torch.compile(m)
            out = cm(*inputs)  # compile outside the hooks; the measured call reuses the graph
            del out
            r[name + "_compile_s"] = time.perf_counter() - t0
            from torch._dynamo.utils import counters

            graphs_before = counters["stats"]["unique_graphs"]
            r[name] = activation_bytes(lambda: cm(*inputs), ex)
            if counters["stats"]["unique_graphs"] != graphs_before:  # the hooks must not force a new graph
                r[name] = f"{fmt_mib(r[name])} (recompiled under the hooks)"
        except Exception as e:  # pragma: no cover - reported, not hidden
            r[name] = f"failed: {reg._first_line(e)}"
        log(f"  {name}: {time.perf_counter() - t0:.1f}s")
        torch._dynamo.reset()
    if case.key == "mlp":
        # The figures: saved for backward only (no outputs), the MLP's input counted.
        params = list(model.parameters())
        so = {"native": model, "lean": lean}
        if compile_it:
            so.update({"c_native": torch.compile(model), "c_lean": torch.compile(lean)})
        r["issue_view"] = {}
        for k, m in so.items():
            m(*inputs)  # compiles the torch.compile ones outside the hooks
            n, out = saved_bytes(lambda: m(*inputs), exclude=params, include_outputs=False)
            del out
            r["issue_view"][k] = n
        torch._dynamo.reset()
        if compile_it:
            r["profiler_check"] = profiler_check(model, lean, inputs)
    return r


def profiler_check(model: nn.Module, lean: nn.Module, inputs) -> Dict[str, Any]:
    """An independent count for the MLP: bytes allocated during forward and still alive after it.

    Read from the profiler's memory timeline (torch.profiler._memory_profiler, a private
    API): every allocation and free on the CPU allocator, inductor's buffers included.
    """
    out: Dict[str, Any] = {}
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action, MemoryProfile
    except Exception as e:
        return {"error": reg._first_line(e)}
    for name, m in (("native", model), ("lean", lean), ("c_native", torch.compile(model)), ("c_lean", torch.compile(lean))):
        try:
            m(*inputs)
            m(*inputs)
            gc.collect()
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
                held = m(*inputs)
            net = 0
            for _, action, _, size in MemoryProfile(p.profiler.kineto_results).timeline:
                if action == Action.CREATE:
                    net += size
                elif action == Action.DESTROY:
                    net -= size
            out[name] = net
            del held
        except Exception as e:
            out[name] = f"failed: {reg._first_line(e)}"
    torch._dynamo.reset()
    return out


# ============================================================================ 2. time
def measure_time(case: Case, quick: bool, protos: Dict[str, Callable]) -> Dict[str, Any]:
    torch.manual_seed(0)
    model, inputs, desc = case.build(quick)
    model.train()
    lean = optimize_quiet(model)
    fns: Dict[str, nn.Module] = {"native": model, "lean": lean}
    for name, fn in protos.items():
        fns[name] = retarget(lean, fn)
    n = max(2, case.time_n // 3) if quick else case.time_n

    def step(m):
        model.zero_grad(set_to_none=True)
        loss_of(m(*inputs)).backward()

    for m in fns.values():  # warm up: first-call allocations, oneDNN primitives
        step(m)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    keys = list(fns)
    for i in range(n):
        order = keys[i % len(keys):] + keys[: i % len(keys)]  # rotate, so no variant always runs first
        for k in order:
            gc.collect()
            t0 = time.perf_counter()
            step(fns[k])
            times[k].append(time.perf_counter() - t0)
    res = {k: statistics.median(v) for k, v in times.items()}
    res["min"] = {k: min(v) for k, v in times.items()}
    res["n"] = n
    res["desc"] = desc
    return res


# ============================================================================ 3. per-call overhead
def measure_overhead(quick: bool, variants: Dict[str, Callable]) -> Dict[str, Dict[str, Any]]:
    x = torch.randn(1000, requires_grad=True)
    g = torch.randn(1000)
    calls, reps = (200, 5) if quick else (500, 11)
    jobs = {}
    for k, fn in variants.items():
        jobs[(k, "fwd")] = (lambda fn=fn: fn(x, 1.0, 20.0))
        jobs[(k, "fwdbwd")] = (lambda fn=fn: torch.autograd.grad(fn(x, 1.0, 20.0), x, g))
    for f in jobs.values():
        for _ in range(100):
            f()
    samples: Dict[Tuple[str, str], List[float]] = {j: [] for j in jobs}
    keys = list(jobs)
    for i in range(reps):  # interleaved: drift hits every variant alike
        for j in keys[i % len(keys):] + keys[: i % len(keys)]:
            f = jobs[j]
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            samples[j].append((time.perf_counter() - t0) / calls)
    out: Dict[str, Dict[str, Any]] = {}
    for k in variants:
        out[k] = {"fwd_us": statistics.median(samples[(k, "fwd")]) * 1e6, "fwdbwd_us": statistics.median(samples[(k, "fwdbwd")]) * 1e6}
    return out


def mlp_with(fn: Callable) -> nn.Module:
    class Act(nn.Module):
        def forward(self, t):
            return fn(t, 1.0, 20.0)

    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(1024, 1024), Act())])


def registration_checks(variants: Dict[str, Callable], quick: bool) -> Dict[str, Dict[str, Any]]:
    """Bitwise equality with the library op, compile(fullgraph) and export support, and MLP activation bytes."""
    out: Dict[str, Dict[str, Any]] = {}
    x = torch.randn(256, 1024)
    for k, fn in variants.items():
        t0 = time.perf_counter()
        r: Dict[str, Any] = {}
        r["equal"] = "—" if k == "native" else ("yes" if reg.check_equal(fn) else "NO")
        r["compile"] = reg.works_under_compile(fn)
        r["export"] = reg.works_under_export(fn)
        r["script"] = reg.works_under_script(k)
        m = mlp_with(fn)
        ex = [*m.parameters(), x]
        r["mlp_eager"] = activation_bytes(lambda: m(x), ex)
        if quick:
            r["mlp_compiled"] = "not measured (--quick)"
        else:
            torch._dynamo.reset()
            try:
                cm = torch.compile(m, fullgraph=True)
                cm(x)
                r["mlp_compiled"] = activation_bytes(lambda: cm(x), ex)
            except Exception as e:
                r["mlp_compiled"] = f"failed: {reg._first_line(e)}"
            torch._dynamo.reset()
        out[k] = r
        log(f"  checks {k}: {time.perf_counter() - t0:.1f}s")
    return out


# ============================================================================ 4. bandwidth
def measure_bandwidth(device: str, variants: Dict[str, Callable], quick: bool) -> Dict[str, Any]:
    n = 16 * 2**20
    reps = 5 if quick else 15
    cuda = device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn: Callable[[], Any]) -> Tuple[float, float]:
        """(fastest, median) seconds over ``reps`` calls after two warm-up calls."""
        for _ in range(2):
            fn()
        sync()
        ts = []
        for _ in range(reps):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        return min(ts), statistics.median(ts)

    gen = torch.Generator(device="cpu").manual_seed(0)
    src = (torch.randn(n, generator=gen) * 8).to(device)
    dst = torch.empty_like(src)
    g = torch.randn(n, generator=gen).to(device)
    el = src.element_size()
    res: Dict[str, Any] = {"numel": n}
    t, tm = timed(lambda: dst.copy_(src))
    res["copy_"] = {"s": t, "median_s": tm, "bytes": 2 * n * el}
    t, tm = timed(lambda: src.clone())
    res["clone"] = {"s": t, "median_s": tm, "bytes": 2 * n * el}
    ref_grad = None
    for k, fn in variants.items():
        if k in ("graph_rewrite_ovl", "library", "hybrid", "custom_op_fast"):
            continue  # same backward code as another row: "graph_rewrite" / "function"
        x = src.clone().requires_grad_()
        y = fn(x, 1.0, 20.0)
        t, tm = timed(lambda: torch.autograd.grad(y, x, g, retain_graph=True))
        (gx,) = torch.autograd.grad(y, x, g, retain_graph=True)
        if k == "graph_rewrite":
            ref_grad = gx
        res[k] = {"s": t, "median_s": tm, "bytes": 3 * n * el, "grad": gx}
        del y, x
    for k, op in (("compiled native", F.softplus), ("compiled graph_rewrite", torch.ops.graph_rewrite.softplus)):
        # torch.compile traces the backward formula into the joint graph: inductor fuses it into one kernel.
        torch._dynamo.reset()
        try:
            cf = torch.compile(lambda t, op=op: op(t, 1.0, 20.0), fullgraph=True)
            x = src.clone().requires_grad_()
            y = cf(x)
            t, tm = timed(lambda: torch.autograd.grad(y, x, g, retain_graph=True))
            (gx,) = torch.autograd.grad(y, x, g, retain_graph=True)
            res[k] = {"s": t, "median_s": tm, "bytes": 3 * n * el, "grad": gx}
            del y, x
        except Exception as e:
            res[k] = f"failed: {reg._first_line(e)}"
        torch._dynamo.reset()
    for k, v in res.items():
        if isinstance(v, dict) and "grad" in v:
            gx = v.pop("grad")
            if ref_grad is not None and "native" not in k:
                v["equal_to_library"] = bool(torch.equal(gx, ref_grad))
                if not v["equal_to_library"]:
                    v["max_rel_diff"] = float(((gx - ref_grad).abs() / ref_grad.abs().clamp_min(1e-30)).max())
    return res


HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def bandwidth_hugepages(args) -> Any:
    """The CPU bandwidth table again, in a child process whose glibc malloc asks for transparent
    huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``): a 64 MiB result then costs a few
    page faults instead of 16k, so the table shows the kernels rather than first-touch faults
    (closer to what a caching allocator, as on CUDA, gives). Returns the table or a reason."""
    import json
    import subprocess
    import tempfile

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "not measured (needs Linux with glibc)"
    try:
        thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()
    except OSError:
        thp = "?"
    if "[never]" in thp:
        return "not measured (transparent huge pages are disabled on this machine)"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bw.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--_bandwidth-json", path]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--no-cpp"] if args.no_cpp else []
        env = dict(os.environ)
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), HUGEPAGE_TUNABLE]))
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0 or not os.path.exists(path):
            tail = (r.stderr.strip().splitlines() or ["?"])[-1][:160]
            return f"not measured (child process failed: {tail})"
        with open(path) as f:
            res = json.load(f)
    res["_thp"] = thp
    return res


def _bandwidth_child(path: str, quick: bool, no_cpp: bool) -> None:
    import json

    variants = reg.variants(with_cpp=not no_cpp)
    res = measure_bandwidth("cpu", variants, quick)
    with open(path, "w") as f:
        json.dump(res, f)


# ============================================================================ 5. CUDA
def cuda_peak_memory(cases: Sequence[Case], quick: bool) -> Dict[str, Dict[str, Any]]:
    """Peak CUDA memory of one forward+backward, native and lean (activations, grads and workspace above the model)."""
    out: Dict[str, Dict[str, Any]] = {}
    for case in cases:
        torch.manual_seed(0)
        model, inputs, _ = case.build(quick)
        model = model.cuda().train()
        inputs = tuple(t.cuda() for t in inputs)
        lean = optimize_quiet(model)
        r = {}
        for name, m in (("native", model), ("lean", lean)):
            model.zero_grad(set_to_none=True)
            loss_of(m(*inputs)).backward()  # warm up (cuDNN workspaces, allocator)
            model.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            loss_of(m(*inputs)).backward()
            torch.cuda.synchronize()
            r[name] = torch.cuda.max_memory_allocated() - base
            model.zero_grad(set_to_none=True)
        out[case.key] = r
        del model, lean, inputs
        gc.collect()
        torch.cuda.empty_cache()
    return out


# ============================================================================ report
def render(args, info, mem, times, overhead, checks, bw, bw_thp, bw_cuda, cuda_mem, wall, cpp_note) -> str:
    L: List[str] = []
    mode = ("quick (--quick: smaller images, fewer repetitions, compile only for the MLP)" if args.quick
            else "full" + (" with --compile-all" if args.compile_all else ""))
    L.append("# graph_rewrite benchmarks")
    L.append("")
    L.append(f"Produced by `python benchmarks/run.py{' --quick' if args.quick else ''}` ({mode}); "
             f"every number below is from this one run. Wall time of the run: {wall / 60:.1f} min.")
    L.append("")
    L.append(md_table(["", ""], [[k, v] for k, v in info.items()]))
    L.append("")

    # ---- memory
    L.append("## 1. Activation memory (MiB)")
    L.append("")
    L.append("Bytes alive after forward because backward needs them, plus the outputs; each storage once; "
             "parameters, buffers and inputs excluded. *native*: the model as built; *lean*: "
             "`graph_rewrite.optimize(model)`; *compiled*: `torch.compile(model)` (inductor, default mode), "
             "measured after a warm-up call with the same `saved_tensors_hooks` count (AOTAutograd saves its "
             "tensors through `ctx.save_for_backward` of its `CompiledFunction`, which the hooks see); "
             "*floor*: the analytic floor (see README: every activation with an output-only derivative keeps "
             "its output, every other op keeps what PyTorch's derivative formulas keep). CPU, float32, train mode.")
    L.append("")
    rows = []
    for key, r in mem.items():
        d = digits_for([r[k] for k in ("native", "lean", "floor")])
        lean_minus = r["lean"] - r["floor"]
        rows.append([
            f"{key}", fmt_mib(r["native"], d), fmt_mib(r["lean"], d), fmt_mib(r["c_native"], d), fmt_mib(r["c_lean"], d),
            fmt_mib(r["floor"], d), fmt_mib(lean_minus, d), "yes" if r["lean"] == r["floor"] else "no",
            f"{100 * (1 - r['lean'] / r['native']):.0f}%" if r["native"] else "—",
        ])
    L.append(md_table(["model", "native", "lean", "compiled native", "compiled lean", "floor", "lean − floor", "lean = floor", "lean saves"], rows))
    L.append("")
    L.append("Models and what was rewritten:")
    L.append("")
    for key, r in mem.items():
        counts = ", ".join(f"{v} x {k}" for k, v in r["counts"].items()) or "nothing"
        comp = []
        for name in ("c_native", "c_lean"):
            if isinstance(r.get(name + "_compile_s"), float):
                comp.append(f"{name.replace('c_', 'compile ')} {r[name + '_compile_s']:.0f}s")
        L.append(f"- **{key}**: {r['desc']}. Rewritten: {counts} (tracing: {r['tracing']}). "
                 f"Floor check: the graph walk attributes {r['walk_all']:,} of the {r['native']:,} bytes the hooks count "
                 f"({'all' if r['walk_all'] == r['native'] and not r['unattributed'] else 'NOT ALL'}; {r['unattributed']:,} unattributed)"
                 + (f", and finds {r['walk_only']:,} bytes no hook saw (0-dim wrapped Python numbers, not counted)" if r["walk_only"] else "")
                 + f"; {r['activation_nodes']} activation node(s), {r['missing']} without a recorded output."
                 + (f" First compiled call (compile time included): {', '.join(comp)}." if comp else ""))
    L.append("")
    if "mlp" in mem and "issue_view" in mem["mlp"]:
        iv = mem["mlp"]["issue_view"]
        L.append("The issue's MLP figures (\"torch.compile of the native model still keeps 8.0 MiB; compiled with the "
                 "output-saving op it keeps 5.0 MiB\") count what is saved for backward with the input included and the "
                 "outputs not. Measured that way in this run: "
                 + ", ".join(f"{k.replace('c_', 'compiled ')} {fmt_mib(v)} MiB" for k, v in iv.items())
                 + ". (The table above counts outputs and leaves inputs out: native keeps its last pre-activation, "
                 "not its output, so there the output adds to native and the input drops from both.)")
        L.append("")
    if "mlp" in mem and "profiler_check" in mem["mlp"]:
        pc = mem["mlp"]["profiler_check"]
        L.append("Independent check of the compiled numbers (MLP): bytes allocated during one forward and still alive after it, "
                 "read from the profiler's memory timeline (every CPU-allocator event, inductor's buffers included; "
                 "no hooks): " + ", ".join(f"{k.replace('c_', 'compiled ')} {fmt_mib(v) if isinstance(v, int) else v} MiB" for k, v in pc.items())
                 + ". It agrees with the hook count above where both are whole MiB.")
        L.append("")

    # ---- time
    L.append("## 2. Forward+backward step time (CPU)")
    L.append("")
    protos = times.get("_protos", [])
    L.append("One training step (`loss = sum(outputs); loss.backward()`, gradients set to None before each), "
             "after one warm-up step per variant; the variants run interleaved in rotating order; median of N "
             "(and, as a check on noise, the ratio of the fastest steps). "
             + ("Prototype columns: the lean model with its softplus nodes retargeted to that registration of "
                "benchmarks/registration.py (same saved tensors, same values bit for bit; in-place or fused backward): "
                + ", ".join(f"`{p}`" for p in protos) + "." if protos else ""))
    L.append("")
    rows = []
    for key, t in times.items():
        if key.startswith("_"):
            continue
        row = [key, t["n"], f"{t['native'] * 1e3:.0f}", f"{t['lean'] * 1e3:.0f}", f"**{t['lean'] / t['native']:.3f}**",
               f"{t['min']['lean'] / t['min']['native']:.3f}"]
        for p in protos:
            row += [f"{t[p] * 1e3:.0f}", f"{t[p] / t['native']:.3f}"] if p in t else ["— (no softplus)", "—"]
        rows.append(row)
    header = ["model", "N", "native ms", "lean ms", "lean / native", "lean / native, fastest steps"]
    for p in protos:
        header += [f"{p} ms", f"{p} / native"]
    L.append(md_table(header, rows))
    L.append("")
    untimed = [k for k in mem if k not in times]
    if untimed:
        L.append(f"Not timed in this run: {', '.join(untimed)} ("
                 + ("--quick" if args.quick else "?")
                 + ").")
        L.append("")

    # ---- overhead
    L.append("## 3. Per-call overhead, 1000-element float32 tensor (CPU)")
    L.append("")
    L.append("Median time per call over interleaved blocks of calls; `x.requires_grad=True`, so forward records "
             "the graph. fwd+bwd = `torch.autograd.grad(op(x), x, g)`. *bitwise*: forward and gradient equal to "
             "the library op's bit for bit (float32/64/bfloat16, thresholds 20 and 1, beta 1, 3, -0.5, ±inf, nan). "
             "*compile*: `torch.compile(fullgraph=True)` forward+backward runs and matches eager. *export*: "
             "`torch.export.export`: whether the op stays one node. *jit.script*: a scripted call runs forward+backward. *MLP eager/compiled*: activation MiB of the "
             "issue's MLP with this op as its activation (eager, and `torch.compile(fullgraph=True)`).")
    L.append("")
    nat = overhead["native"]
    rows = []
    for k, o in overhead.items():
        c = checks.get(k, {})
        rows.append([
            f"`{k}`", reg.DESCRIPTIONS.get(k, k), f"{o['fwd_us']:.1f}", f"{o['fwd_us'] / nat['fwd_us']:.2f}",
            f"{o['fwdbwd_us']:.1f}", f"**{o['fwdbwd_us'] / nat['fwdbwd_us']:.2f}**", c.get("equal", "—"),
            c.get("compile", "—"), c.get("export", "—"), c.get("script", "—"), fmt_mib(c.get("mlp_eager")), fmt_mib(c.get("mlp_compiled")),
        ])
    L.append(md_table(["variant", "registration", "fwd µs", "fwd / native", "fwd+bwd µs", "fwd+bwd / native", "bitwise", "compile", "export", "jit.script", "MLP eager", "MLP compiled"], rows))
    L.append("")
    if cpp_note:
        L.append(cpp_note)
        L.append("")

    # ---- bandwidth
    L.append("## 4. Backward bandwidth, 16M-element float32 tensor")
    L.append("")
    L.append("`torch.autograd.grad(y, x, g, retain_graph=True)` on a saved graph; fastest and median of "
             f"{'5' if args.quick else '15'} repetitions (GB/s and percentages from the fastest, which page-fault and "
             "compaction stalls of a shared machine disturb least). "
             "Bytes moved by an ideal backward: read the incoming gradient, read the one saved tensor "
             "(input for native, output for lean), write the result: 3 x 64 MiB. GB/s = those bytes / time "
             "(10^9 bytes). References: `dst.copy_(src)` into a preallocated tensor, and `src.clone()`, which "
             "allocates its result as every backward does (2 x 64 MiB each).")
    L.append("")
    L.append(render_bw(bw, "CPU, default allocator (glibc malloc: every 64 MiB result is a fresh mmap, faulted in 4 KiB pages)"))
    L.append("")
    if isinstance(bw_thp, dict):
        L.append(render_bw(bw_thp, f"CPU, same measurement in a child process with `GLIBC_TUNABLES={HUGEPAGE_TUNABLE}` "
                                   f"(malloc asks for transparent huge pages, THP setting `{bw_thp.get('_thp')}`): "
                                   "allocation is nearly free, so this shows the kernels"))
    else:
        L.append(f"CPU with huge pages: {bw_thp}.")
    L.append("")
    if bw_cuda is not None:
        L.append(render_bw(bw_cuda, "CUDA"))
    else:
        L.append(f"CUDA: {NO_GPU}.")
    L.append("")

    # ---- CUDA
    L.append("## 5. CUDA")
    L.append("")
    if cuda_mem is None:
        L.append(md_table(["model", "peak CUDA memory native", "peak CUDA memory lean", "fused backward % of copy bandwidth"],
                          [[k, NO_GPU, NO_GPU, NO_GPU] for k in mem]))
    else:
        rows = [[k, fmt_mib(v["native"]), fmt_mib(v["lean"]), "see section 4"] for k, v in cuda_mem.items()]
        L.append(md_table(["model", "peak CUDA memory native (MiB)", "peak CUDA memory lean (MiB)", "fused backward % of copy bandwidth"], rows))
    L.append("")

    # ---- goals
    L.append("## 6. Goals of the issue")
    L.append("")
    L.extend(goals(mem, times, overhead, checks, bw_cuda))
    L.append("")
    return "\n".join(L)


def render_bw(bw: Dict[str, Any], where: str) -> str:
    copy_bw = bw["copy_"]["bytes"] / bw["copy_"]["s"] / 1e9
    clone_bw = bw["clone"]["bytes"] / bw["clone"]["s"] / 1e9
    rows = []
    for k, v in bw.items():
        if k.startswith("_"):
            continue
        if isinstance(v, str):
            rows.append([f"`{k}`", v, "", "", "", "", ""])
            continue
        if not isinstance(v, dict):
            continue
        gbs = v["bytes"] / v["s"] / 1e9
        rows.append([f"`{k}`", f"{v['s'] * 1e3:.2f}", f"{v['median_s'] * 1e3:.2f}", f"{gbs:.1f}", f"{100 * gbs / copy_bw:.0f}%", f"{100 * gbs / clone_bw:.0f}%",
                     {True: "yes", False: f"no (max rel. diff {v.get('max_rel_diff', 0):.1e})"}.get(v.get("equal_to_library"), "—")])
    return f"{where}:\n\n" + md_table(["what", "ms, fastest", "ms, median", "GB/s (fastest)", "% of copy_", "% of clone", "grad bitwise = library"], rows)


def goals(mem, times, overhead, checks, bw_cuda) -> List[str]:
    out = []
    rows = []
    not_floor = [k for k, r in mem.items() if r["lean"] != r["floor"]]
    rows.append(["activation bytes equal the floor on every model (eager)",
                 "**met**" if not not_floor else f"**not met** ({', '.join(not_floor)})",
                 "; ".join(f"{k}: lean {fmt_mib(r['lean'], digits_for([r['lean']]))} = floor {fmt_mib(r['floor'], digits_for([r['floor']]))}" for k, r in mem.items())])
    for key in ("resnet50", "mlp"):
        if key in times:
            t = times[key]
            ratio = t["lean"] / t["native"]
            fastest = t["min"]["lean"] / t["min"]["native"]
            extra = "".join(f"; `{p}` prototype {t[p] / t['native']:.3f}" for p in times.get("_protos", []) if p in t)
            if ratio <= 1.05 and fastest <= 1.05:
                status = "**met**"
            elif ratio <= 1.05 or fastest <= 1.05:
                status = "**borderline** (within this machine's noise)"
            else:
                status = "**not met**"
            rows.append([f"step time lean/native ≤ 1.05 on CPU ({key})", status,
                         f"median {ratio:.3f}, fastest steps {fastest:.3f} (N={t['n']}){extra}"])
    nat = overhead["native"]["fwdbwd_us"]
    lib = overhead["graph_rewrite"]["fwdbwd_us"] / nat
    ok = [k for k, o in overhead.items() if k != "native" and o["fwdbwd_us"] / nat <= 2.0
          and checks.get(k, {}).get("compile") == "yes" and str(checks.get(k, {}).get("export", "")).startswith("yes")]
    rows.append(["eager overhead ≤ 2x native for fwd+bwd at 1k elements",
                 "**met**" if lib <= 2 else "**not met** by the library op",
                 f"library op (`graph_rewrite`) {lib:.2f}x; registrations within 2x that also work under compile and export: "
                 + (", ".join(f"`{k}` {overhead[k]['fwdbwd_us'] / nat:.2f}x" for k in ok) or "none")])
    if bw_cuda is None:
        rows.append(["CUDA fused backward ≥ 80% of copy bandwidth", "not measurable here", NO_GPU])
    else:
        copy_bw = bw_cuda["copy_"]["bytes"] / bw_cuda["copy_"]["s"]
        best = max((v["bytes"] / v["s"] / copy_bw, k) for k, v in bw_cuda.items() if isinstance(v, dict) and k not in ("copy_", "clone", "native"))
        rows.append(["CUDA fused backward ≥ 80% of copy bandwidth", "**met**" if best[0] >= 0.8 else "**not met**", f"best: `{best[1]}` {100 * best[0]:.0f}%"])
    out.append(md_table(["goal", "status", "evidence"], rows))
    return out


# ============================================================================ main
def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fast smoke run (smaller images, fewer repetitions, compile only the MLP)")
    p.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"), help="markdown file to write (default benchmarks/RESULTS.md)")
    p.add_argument("--models", default=None, help="comma-separated subset of: " + ", ".join(c.key for c in CASES))
    p.add_argument("--no-cpp", action="store_true", help="skip the C++ registration prototype (no compiler needed)")
    p.add_argument("--compile-all", action="store_true", help="also torch.compile swin_v2_t (very slow on few cores)")
    p.add_argument("--_bandwidth-json", dest="bandwidth_json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bandwidth_json:  # internal: the huge-page bandwidth child
        _bandwidth_child(args.bandwidth_json, args.quick, args.no_cpp)
        return

    t_start = time.perf_counter()
    share = CpuShare()
    torch.manual_seed(0)
    info = machine_info()
    cases = [c for c in CASES if args.models is None or c.key in args.models.split(",")]

    # --- registrations first: the C++ build is cached in benchmarks/build/
    cpp_note = ""
    variants = reg.variants(with_cpp=False)
    if not args.no_cpp:
        log("building/loading the C++ prototype ...")
        fn = reg.load_cpp()
        if fn is not None:
            variants["cpp"] = fn
            cpp_note = (f"`cpp` was built with torch.utils.cpp_extension ({reg._cpp_state.get('build_s', 0):.0f}s this run; "
                        "cached in benchmarks/build/ afterwards). Its backward is one vectorized pass "
                        "(TensorIterator + at::vec, the Sleef expm1 ATen itself uses) for float32/64 without a "
                        "branch record, the composite formula otherwise.")
        else:
            cpp_note = f"`cpp` not measured: the extension did not build ({reg.cpp_error()})."
    else:
        cpp_note = "`cpp` not measured (--no-cpp)."
    protos = {k: variants[k] for k in ("hybrid", "cpp") if k in variants}

    # --- 1. memory
    mem: Dict[str, Any] = {}
    for case in cases:
        log(f"[memory] {case.key}")
        if args.quick:
            compile_it, why = case.key == "mlp", "not measured (--quick)"
        elif case.key == "swin_v2_t" and not args.compile_all:
            compile_it, why = False, "not measured by default (inductor needs several minutes per variant on 2 cores; --compile-all)"
        else:
            compile_it, why = True, ""
        mem[case.key] = measure_memory(case, args.quick, compile_it, why)
        gc.collect()

    # --- 2. time
    times: Dict[str, Any] = {"_protos": list(protos)}
    for case in cases:
        if args.quick and case.key in ("efficientnet_b0", "swin_v2_t"):
            continue
        log(f"[time] {case.key}")
        # The prototypes only retarget softplus: models without one would time lean twice.
        has_softplus = case.key not in ("efficientnet_b0", "swin_v2_t")
        times[case.key] = measure_time(case, args.quick, protos if has_softplus else {})
        gc.collect()

    # --- 3. overhead + checks
    log("[overhead]")
    overhead = measure_overhead(args.quick, variants)
    log("[registration checks]")
    checks = registration_checks(variants, args.quick)

    # --- 4. bandwidth
    log("[bandwidth]")
    bw = measure_bandwidth("cpu", variants, args.quick)
    log("[bandwidth, huge pages]")
    bw_thp = bandwidth_hugepages(args)
    bw_cuda = cuda_mem = None
    if torch.cuda.is_available():
        log("[cuda]")
        bw_cuda = measure_bandwidth("cuda", variants, args.quick)
        cuda_mem = cuda_peak_memory(cases, args.quick)

    wall = time.perf_counter() - t_start
    info["other load"] = share.summary()
    text = render(args, info, mem, times, overhead, checks, bw, bw_thp, bw_cuda, cuda_mem, wall, cpp_note)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    log(f"wrote {args.out} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
