"""What a user would pick instead of graph_rewrite, side by side in one run; writes benchmarks/PEERS.md.

    python benchmarks/peers.py                               # every model, with step times (about 15 minutes on 2 cores)
    python benchmarks/peers.py --models vit --pairs 3 --out /tmp/peers.md
    python benchmarks/peers.py --models llama_mlp --no-time --out /tmp/peers.md

Random weights (nothing is downloaded), train mode, float32, CPU, one torch thread, dropout and
stochastic depth 0. For each model, seven ways to train it: native eager; ``torch.compile``
(inductor, default partitioner); ``torch.utils.checkpoint`` around each block (non-reentrant);
selective activation checkpointing around each block with a policy that recomputes the
activation functions; ``graph_rewrite.optimize``; ``torch.compile(graph_rewrite.optimize(m))``;
``torch.compile(m, backend="graph_rewrite", options={"inductor": True})``.

*Held* is the CPU memory allocated during forward and still allocated when forward returns
(outputs included; weights, buffers and the input were allocated before and do not count),
read from the allocator's own records: ``torch.profiler`` with ``profile_memory=True`` logs each
allocation and free with its address; allocations of the forward with no matching free are what
it holds. Unlike a saved-tensor hook, this sees what checkpointing keeps behind its own hooks and
what inductor's generated code allocates. Each run checks it against
``graph_rewrite.memory.saved_bytes`` (outputs included) on native eager and ``optimize`` and
prints both columns.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import functools
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's start/stop lines on stderr

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.utils.checkpoint as ckpt  # noqa: E402
from torch._C._profiler import _EventType  # noqa: E402

import graph_rewrite  # noqa: E402
from families import table  # noqa: E402
from machine import cpu_name  # noqa: E402
from graph_rewrite.memory import saved_bytes  # noqa: E402

MiB = 2 ** 20


# ---------------------------------------------------------------------------------------------- models

@dataclass
class Case:
    model: nn.Module
    x: Optional[torch.Tensor]  # the input, a leaf that requires grad (None: the call makes its own token ids)
    call: Callable[[nn.Module, Optional[torch.Tensor]], torch.Tensor]
    what: str
    blocks: Callable[[nn.Module], List[Tuple[nn.Module, str]]]  # (parent, attribute) of each block to checkpoint
    block_name: str


IMAGE, BATCH = 64, 4  # batch 4, not 2: at 2 the BatchNorm models' float32 gradients are far from float64 ones


def _image() -> torch.Tensor:
    return torch.randn(BATCH, 3, IMAGE, IMAGE, requires_grad=True)


def _children(seq: nn.Module) -> List[Tuple[nn.Module, str]]:
    return [(seq, name) for name, _ in seq.named_children()]




def efficientnet_b0() -> Case:
    import torchvision

    m = torchvision.models.efficientnet_b0(weights=None, dropout=0.0, stochastic_depth_prob=0.0)
    return Case(m, _image(), lambda mod, x: mod(x), f"torchvision efficientnet_b0, {BATCH} x 3 x {IMAGE} x {IMAGE}",
                lambda mod: _children(mod.features), "each `features[i]` (9)")


def mobilenet_v2() -> Case:
    import torchvision

    m = torchvision.models.mobilenet_v2(weights=None, dropout=0.0)
    return Case(m, _image(), lambda mod, x: mod(x), f"torchvision mobilenet_v2, {BATCH} x 3 x {IMAGE} x {IMAGE}",
                lambda mod: _children(mod.features), "each `features[i]` (19)")


def convnext_tiny() -> Case:
    import torchvision

    m = torchvision.models.convnext_tiny(weights=None, stochastic_depth_prob=0.0)

    def blocks(mod):  # features = [stem, stage, downsample, stage, ...]; the stages are Sequentials of CNBlocks
        return [pair for i in (1, 3, 5, 7) for pair in _children(mod.features[i])]
    return Case(m, _image(), lambda mod, x: mod(x), f"torchvision convnext_tiny, {BATCH} x 3 x {IMAGE} x {IMAGE}",
                blocks, "each CNBlock of the 4 stages (18)")


def vit() -> Case:
    from torchvision.models.vision_transformer import VisionTransformer

    m = VisionTransformer(image_size=IMAGE, patch_size=8, num_layers=6, num_heads=6, hidden_dim=384, mlp_dim=1536)
    return Case(m, _image(), lambda mod, x: mod(x),
                f"torchvision VisionTransformer (6 layers, 6 heads, hidden 384, MLP 1536, patch 8), "
                f"{BATCH} x 3 x {IMAGE} x {IMAGE}", lambda mod: _children(mod.encoder.layers), "each encoder layer (6)")


def llama_mlp() -> Case:
    from models import LlamaMLP

    m = nn.Sequential(*[LlamaMLP(256, 688) for _ in range(4)])
    return Case(m, torch.randn(2, 128, 256, requires_grad=True), lambda mod, x: mod(x),
                "4 x LlamaMLP (dim 256, hidden 688, SiLU gate) in sequence, 2 x 128 tokens",
                lambda mod: _children(mod), "each LlamaMLP (4)")


def hf_llama() -> Case:
    from families import _hf

    m, call, what = _hf("LlamaConfig", "LlamaForCausalLM", tokens=64, hidden_size=128, intermediate_size=344,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, use_cache=False)()
    return Case(m, None, lambda mod, x: call(mod), f"HF {what} (vocab 256, default attention)",
                lambda mod: _children(mod.model.layers), "each decoder layer (4)")


MODELS: Dict[str, Callable[[], Case]] = {
    "efficientnet_b0": efficientnet_b0,
    "mobilenet_v2": mobilenet_v2,
    "convnext_tiny": convnext_tiny,
    "vit": vit,
    "llama_mlp": llama_mlp,
    "hf_llama": hf_llama,
}

# ---------------------------------------------------------------------------------------------- the alternatives

# Pointwise activation functions: what "a policy that recomputes activations" recomputes.
_A = torch.ops.aten
ACTIVATIONS = {_A.relu, _A.relu_, _A.hardtanh, _A.hardtanh_, _A.silu, _A.silu_, _A.gelu, _A.gelu_, _A.sigmoid,
               _A.sigmoid_, _A.softplus, _A.hardswish, _A.hardswish_, _A.hardsigmoid, _A.hardsigmoid_, _A.leaky_relu,
               _A.leaky_relu_, _A.elu, _A.elu_, _A.mish, _A.mish_, _A.tanh, _A.tanh_}


def recompute_activations(ctx, func, *args, **kwargs):
    packet = getattr(func, "_overloadpacket", None)
    return ckpt.CheckpointPolicy.PREFER_RECOMPUTE if packet in ACTIVATIONS else ckpt.CheckpointPolicy.PREFER_SAVE


class Checkpointed(nn.Module):
    """One block under ``torch.utils.checkpoint.checkpoint`` (non-reentrant), optionally selective."""

    def __init__(self, block: nn.Module, selective: bool) -> None:
        super().__init__()
        self.block, self.selective = block, selective

    def forward(self, *args, **kwargs):
        extra = {}
        if self.selective:
            # allow_cache_entry_mutation: BatchNorm's `num_batches_tracked.add_(1)` in train mode is an in-place op
            # whose output the policy saves, and the cache's version check refuses it otherwise. Sound here: the
            # model's in-place activations are turned off (`_no_inplace`), and the gradient check tells.
            extra["context_fn"] = functools.partial(ckpt.create_selective_checkpoint_contexts, recompute_activations,
                                                    allow_cache_entry_mutation=True)
        return ckpt.checkpoint(self.block, *args, use_reentrant=False, **extra, **kwargs)


def _no_inplace(model: nn.Module) -> None:
    # An in-place activation overwrites its input, which the policy caches, and the recompute would apply it
    # to its own output: the user turns `inplace` off, as here.
    for mod in model.modules():
        if getattr(mod, "inplace", False) is True:
            mod.inplace = False


def checkpointed(case: Case, model: nn.Module, selective: bool) -> nn.Module:
    if selective:
        _no_inplace(model)
    for parent, name in case.blocks(model):
        setattr(parent, name, Checkpointed(getattr(parent, name), selective))
    return model


def _optimize(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return graph_rewrite.optimize(model)


# (key, column title, build from a private deep copy of the model, compiles)
ALTERNATIVES: List[Tuple[str, str, Callable[[Case, nn.Module], Any], bool]] = [
    ("native", "native eager", lambda case, m: m, False),
    ("compile", "`torch.compile(m)`", lambda case, m: torch.compile(m), True),
    ("checkpoint", "checkpoint per block", lambda case, m: checkpointed(case, m, selective=False), False),
    ("sac", "selective checkpoint per block (recompute activations)",
     lambda case, m: checkpointed(case, m, selective=True), False),
    ("optimize", "`graph_rewrite.optimize(m)`", lambda case, m: _optimize(m), False),
    ("compile_optimize", "`torch.compile(optimize(m))`", lambda case, m: torch.compile(_optimize(m)), True),
    ("backend", "`torch.compile(m, backend=\"graph_rewrite\", options={\"inductor\": True})`",
     lambda case, m: torch.compile(m, backend="graph_rewrite", options={"inductor": True}), True),
]

# ---------------------------------------------------------------------------------------------- measuring


def _allocations(prof) -> List[Tuple[int, int, int]]:
    """(time, address, bytes; negative for a free) of every CPU allocation the profiler recorded, in order."""
    found, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.typed[0] == _EventType.Allocation and e.typed[1].device.type == "cpu":
            found.append((e.start_time_ns, e.typed[1].ptr, e.typed[1].alloc_size))
        stack.extend(e.children)
    return sorted(found)


def held_allocated(fn: Callable[[], Any]) -> Tuple[int, Any]:
    """Bytes allocated on the CPU during ``fn()`` and not freed when it returns, and fn's result."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    live: Dict[int, int] = {}
    for _, ptr, size in _allocations(prof):
        if size > 0:
            live[ptr] = size
        else:
            live.pop(ptr, None)  # a free of something allocated before fn() started does not count
    return sum(live.values()), out


def held_saved(fn: Callable[[], Any], case: Case, model: nn.Module) -> int:
    exclude = [*model.parameters(), *model.buffers(), *([case.x] if case.x is not None else [])]
    return saved_bytes(fn, exclude=exclude, include_outputs=True)[0]


def _clear(model: nn.Module, x: Optional[torch.Tensor]) -> None:
    model.zero_grad(set_to_none=True)
    if x is not None:
        x.grad = None


def _loss(out: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    return (out.float() * probe).sum()


def grads(case: Case, model: nn.Module, fn: Callable, x: Optional[torch.Tensor], probe: torch.Tensor) -> List:
    _clear(model, x)
    _loss(case.call(fn, x), probe).backward()
    found = [None if x is None else x.grad] + [p.grad for p in model.parameters()]
    return [None if g is None else g.detach().clone() for g in found]


def worst_error(got: List, ref: List, skip: frozenset = frozenset()) -> float:
    """max |got - ref| / max |ref| over the input grad and each parameter grad but those at ``skip``; inf if one
    is missing."""
    worst = 0.0
    for i, (g, r) in enumerate(zip(got, ref)):
        if i in skip or (g is None and r is None):
            continue
        if g is None or r is None:
            return float("inf")
        scale = r.double().abs().max().item()
        if scale:
            worst = max(worst, (g.double() - r.double()).abs().max().item() / scale)
    return worst


def step(case: Case, model: nn.Module, fn: Callable, probe: torch.Tensor) -> float:
    t = time.perf_counter()
    _clear(model, case.x)
    _loss(case.call(fn, case.x), probe).backward()
    return time.perf_counter() - t


@dataclass
class Result:
    held: Optional[int] = None  # allocator count
    saved: Optional[int] = None  # saved-tensor-hook count
    ratio: Optional[float] = None
    lo: Optional[float] = None
    hi: Optional[float] = None
    error: Optional[float] = None
    failed: str = ""


def _measure(case: Case, pristine: nn.Module, native: nn.Module, build: Callable, compiles: bool,
             probe: torch.Tensor, ref: List, zero: frozenset, pairs: int, timed: bool) -> Result:
    res = Result()
    torch._dynamo.reset()
    try:
        # native too runs on a copy, timed against the reference native: the pairs then show the timing noise
        model = copy.deepcopy(pristine)
        fn = build(case, model)
        for i in range(2):  # warm-up: compiles here
            t = step(case, model, fn, probe)
            if i == 0 and compiles:
                print(f"    first step (compiling) {t:.0f} s", file=sys.stderr, flush=True)
        res.error = worst_error(grads(case, model, fn, case.x, probe), ref, zero)
        _clear(model, case.x)
        res.held, out = held_allocated(lambda: case.call(fn, case.x))
        del out
        res.saved = held_saved(lambda: case.call(fn, case.x), case, model)
        if timed:
            ratios = []
            for i in range(pairs):  # interleaved with native eager, alternating order
                order = [(native, native, 0), (model, fn, 1)]
                if i % 2:
                    order.reverse()
                t = {k: step(case, m, f, probe) for m, f, k in order}
                ratios.append(t[1] / t[0])
            ratios.sort()
            res.ratio, res.lo, res.hi = statistics.median(ratios), ratios[0], ratios[-1]
    except Exception as e:  # a cell, not a crash: say what failed
        res.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}" if str(e) else type(e).__name__
    finally:
        torch._dynamo.reset()
    return res


ZERO = 1e-7  # a gradient whose float64 max |g| is below this share of the largest one's is zero but for rounding


def measure_model(key: str, pairs: int, timed: bool) -> Tuple[str, str, float, int, Dict[str, Result], float]:
    """(description, checkpointed blocks, float64 noise floor, zero gradients left out, results by alternative,
    seconds)."""
    start = time.perf_counter()
    torch.manual_seed(0)
    case = MODELS[key]()
    case.model.train()
    pristine = copy.deepcopy(case.model)
    native = copy.deepcopy(pristine)
    torch.manual_seed(1)
    probe = torch.randn_like(case.call(native, case.x), dtype=torch.float32)
    ref = grads(case, native, native, case.x, probe)
    # float64: how far native float32 is from exact, the scale against which the others' errors read
    wide = copy.deepcopy(pristine).double()
    x64 = None if case.x is None else case.x.detach().double().requires_grad_()
    exact = grads(case, wide, wide, x64, probe.double())
    del wide, x64
    # Gradients that are zero but for rounding (the bias of a BatchNorm whose output goes into another
    # BatchNorm): relative to their own size, rounding reads as a 100% error. Left out, and counted.
    top = max(g.abs().max().item() for g in exact if g is not None)
    zero = frozenset(i for i, g in enumerate(exact) if g is not None and g.abs().max().item() <= ZERO * top)
    floor = worst_error(ref, exact, zero)
    for _ in range(2):
        step(case, native, native, probe)
    results: Dict[str, Result] = {}
    for alt, _, build, compiles in ALTERNATIVES:
        print(f"  {key}: {alt} ({time.perf_counter() - start:.0f} s) ...", file=sys.stderr, flush=True)
        res = results[alt] = _measure(case, pristine, native, build, compiles, probe, ref, zero, pairs, timed)
    return case.what, case.block_name, floor, len(zero), results, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- the report

def _mib(n: Optional[int]) -> str:
    return "—" if n is None else f"{n / MiB:.2f}"


def _ratio(r: Result) -> str:
    return "—" if r.ratio is None else f"{r.ratio:.2f} ({r.lo:.2f} – {r.hi:.2f})"


def _error(e: Optional[float]) -> str:
    return "—" if e is None else ("0" if e == 0 else f"{e:.1e}")


MEMORY_EQUAL = 0.02  # within 2% of held bytes: equal
TIME_EQUAL = 0.05  # step-time medians within 5%: equal


def _compare(mine: Result, peer: Result, timed: bool) -> str:
    if mine.failed or peer.failed or mine.held is None or peer.held is None:
        return "not compared (a run failed)"
    d = (peer.held - mine.held) / peer.held if peer.held else 0.0
    memory = ("ahead" if d > MEMORY_EQUAL else "behind" if d < -MEMORY_EQUAL else "equal") + \
        f" on memory ({_mib(mine.held)} vs {_mib(peer.held)} MiB held, {mine.held / peer.held:.2f}×)"
    if not timed or mine.ratio is None or peer.ratio is None:
        return memory
    t = (peer.ratio - mine.ratio) / peer.ratio
    speed = ("ahead" if t > TIME_EQUAL else "behind" if t < -TIME_EQUAL else "equal") + \
        f" on step time ({mine.ratio:.2f} vs {peer.ratio:.2f} × native eager)"
    return f"{memory}; {speed}"


# which of ours against which peer, for the verdict lines
VERDICTS = [("optimize", "native"), ("optimize", "checkpoint"), ("optimize", "sac"), ("compile_optimize", "compile"),
            ("backend", "compile"), ("compile_optimize", "optimize")]


def check_counting(results: Dict[str, Result]) -> str:
    """The allocator count against saved_bytes where saved_bytes sees everything (no checkpointing)."""
    parts = []
    for alt in ("native", "optimize", "compile", "compile_optimize", "backend"):
        r = results.get(alt, Result())
        if r.held is not None and r.saved is not None:
            parts.append(f"{alt} {r.held - r.saved:+,} B")
    return ", ".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "PEERS.md"))
    ap.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--no-time", action="store_true", help="skip the step-time pairs")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--alternatives", default=None,
                    help=f"comma-separated subset of {','.join(a[0] for a in ALTERNATIVES)} (for trying things out)")
    args = ap.parse_args(argv)
    if args.alternatives:
        wanted = args.alternatives.split(",")
        ALTERNATIVES[:] = [a for a in ALTERNATIVES if a[0] in wanted]
    torch.set_num_threads(1)  # one thread: a shared 2-core machine stalls with more
    keys = args.models.split(",") if args.models else list(MODELS)
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    timed = not args.no_time
    began = time.perf_counter()
    sections, counting = [], []
    # The compile caches' keys do not cover the graph_rewrite ops' Python backward: compile afresh.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        for key in keys:
            print(f"measuring {key} ...", file=sys.stderr, flush=True)
            try:
                what, blocks, floor, zeros, results, seconds = measure_model(key, args.pairs, timed)
            except ImportError as e:
                sections += [f"## {key}", "", f"skipped: {e.name} is not installed", ""]
                continue
            header = ["alternative", "held after forward (MiB)", "saved-tensor hooks see (MiB)",
                      "worst grad error vs native eager"]
            if timed:
                header.insert(2, "step time / native eager, median (range)")
            rows = []
            for alt, title, _, _ in ALTERNATIVES:
                r = results[alt]
                if r.failed:
                    rows.append([title, f"failed: {r.failed}", "", ""] + ([""] if timed else []))
                    continue
                row = [title, _mib(r.held), _mib(r.saved), _error(r.error)]
                if timed:
                    row.insert(2, _ratio(r))
                rows.append(row)
            verdicts = [f"- `{mine}` against `{peer}`: {_compare(results[mine], results[peer], timed)}"
                        for mine, peer in VERDICTS if mine in results and peer in results]
            counting.append(f"{key}: {check_counting(results)}")
            sections += [f"## {key}", "", f"{what}; checkpointed blocks: {blocks}. Native float32 against float64: "
                         f"worst grad error {_error(floor)} (the float32 noise floor)"
                         f"{f'; {zeros} gradients that are zero but for rounding left out' if zeros else ''}. "
                         f"Measured in {seconds:.0f} s.",
                         "", table(header, rows), "", *verdicts, ""]
    wall = time.perf_counter() - began
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "graph_rewrite"], capture_output=True,
                           text=True).stdout.strip()
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = []
    for name in ("torch", "torchvision", "transformers"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            versions.append(f"{name} not installed")
    text = [
        "# graph_rewrite and what a user would pick instead (benchmarks/peers.py)", "",
        f"{when}; {platform.platform()}, {cpu_name()} CPU, {os.cpu_count()} cores, 1 torch thread; "
        f"{', '.join(versions)}; graph_rewrite at {commit}{' + uncommitted changes' if dirty else ''}. "
        f"Run: {wall / 60:.1f} minutes{f', {args.pairs} timing pairs per alternative' if timed else ''}.", "",
        "Random weights, train mode, float32, CPU, dropout and stochastic depth 0. The compile columns use inductor "
        "with its FX-graph and AOTAutograd caches off (their keys do not cover the graph_rewrite ops' Python "
        "backward) and `torch._dynamo.reset()` before each; each alternative runs on its own deep copy of the same "
        "initial model. Checkpointing is `torch.utils.checkpoint.checkpoint(block, use_reentrant=False)` around each "
        "block of a wrapped copy; the selective one passes `context_fn=functools.partial("
        "create_selective_checkpoint_contexts, policy)` with a policy that answers PREFER_RECOMPUTE for the "
        "pointwise activation functions (relu, hardtanh/relu6, silu, gelu, sigmoid, softplus, hardswish, "
        "hardsigmoid, leaky_relu, elu, mish, tanh, in-place forms included) and PREFER_SAVE for every other op, "
        "and `allow_cache_entry_mutation=True`: BatchNorm's `num_batches_tracked.add_(1)` in train mode is an "
        "in-place op whose output the policy caches, which the cache's version check refuses otherwise (\"Tensor "
        "cached during selective activation checkpoint has been mutated\"); that copy has the modules' `inplace` "
        "turned off, since an in-place activation would overwrite the input it recomputes from.", "",
        "**Held after forward**: CPU bytes allocated during forward and still allocated when it returns, outputs "
        "included; weights, buffers and the input were allocated before and do not count. Counted from the "
        "allocator's records (`torch.profiler.profile(profile_memory=True)`: every allocation and free with its "
        "address; the forward's allocations without a free are what it holds), which see what checkpointing keeps "
        "behind its own saved-tensor hooks and what inductor's generated code allocates (its own copies of weights "
        "included, e.g. channels-last layouts, counted here as held: they live as long as the graph). "
        "*Saved-tensor hooks see*: `graph_rewrite.memory.saved_bytes(..., include_outputs=True)` with weights, "
        "buffers and the input excluded: the storages autograd saves through `saved_tensors_hooks`, the method of "
        "the project's other benchmarks. Checkpointing installs its own hooks, under which an outer hook sees "
        "nothing, so that column undercounts the checkpoint rows; where no checkpointing is involved the two "
        "methods agree (allocator minus hooks, bytes): " + "; ".join(counting) + ".", "",
        "*Step time*: zero grads, forward, a fixed random projection of the output summed, backward; each pair "
        "times native eager and the alternative back to back, alternating which goes first, after 2 warm-up steps "
        "each (compiling happens there); median and range of the per-pair ratios. *Worst grad error*: over the "
        "input's grad (the token ids of the HF model have none) and every parameter's grad, max |g - g_native| / "
        "max |g_native|.", "",
        *sections,
        "## Where graph_rewrite is ahead, equal or behind, and why", "",
        WHY, "",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(text))
    print("\n".join(text))
    print(f"wrote {args.out} in {wall / 60:.1f} minutes", file=sys.stderr)
    return 0


WHY = """\
The verdict lines under each table give the figures; the reasons:

- **Against native eager: ahead on memory** on every model here, with gradients bitwise native's
  (error 0). **Step time equal or behind**: the rules run activations again in backward (and rebuild
  a BatchNorm's output from its statistics), and each rewritten call goes through an autograd
  function (C++ on CPU for the activation, norm and recompute ops; Python for a module run again).
  Fixed costs dominate tiny models: the tiny HF LLaMA runs its RMSNorms again in backward through
  a nested autograd call each, and runs under the runtime front end, which looks at every torch
  call (a wider LLaMA pays less: `benchmarks/FAMILIES.md`); among the CNNs efficientnet_b0 pays
  most: every BatchNorm -> SiLU pair is rebuilt in backward.
- **Against checkpointing per block: behind on memory, ahead on step time.** Checkpointing keeps only
  each block's input and runs every block's forward twice; the rules keep everything backward needs
  but the activations. Where memory must go lowest, checkpoint; the two compose (a checkpointed
  block of an optimized model is checkpointed as written, the rest is rewritten).
- **Against selective checkpointing that recomputes activations: ahead on both.** A policy that
  answers PREFER_SAVE for every other op caches the output of every op in the block, including
  outputs native autograd would not keep (a matmul's output that only feeds an add), so it can hold
  more than native (the allocator column; its cache is invisible to saved-tensor hooks, hence the
  small hook column), and backward replays the block under a dispatch mode. A policy that saves only
  what backward needs is the user's to write, op by op; the rules table is that policy, written once.
- **The compile paths against `torch.compile` alone: ahead or equal on memory, behind on step time.**
  Ahead where a rule removes what inductor's partitioner keeps (an activation a Linear saves, a
  LayerNorm's output before a Linear, the gated MLP's product); equal where the partitioner already
  recomputes the same pointwise chain (BatchNorm -> ReLU6 in mobilenet_v2). Behind on time because the
  lean ops are opaque to inductor: each is an extern call with its own backward that inductor cannot
  fuse with its neighbours. Their gradients differ from native eager by compile's own rounding: the
  same figure as `torch.compile(m)`'s (mobilenet_v2's large one is compile's, on a gradient that is
  small beside its rounding).
- **`torch.compile(optimize(m))` on a model the runtime front end runs** (the HF LLaMA): that front
  end cannot be traced by Dynamo and runs eagerly, a graph break around it: eager `optimize`'s
  memory at eager speed. The `graph_rewrite` backend compiles the model and applies the rules to
  Dynamo's graphs, hand-written RMSNorm included (tagged for the partitioner to recompute): the
  compiled path for such models.
"""

if __name__ == "__main__":
    sys.exit(main())
