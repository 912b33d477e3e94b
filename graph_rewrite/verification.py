"""``verify(original, optimized, *inputs)``: does the rewritten model compute the same thing, for less memory?

Both models run forward and backward on clones of the same inputs, with the same
random numbers (dropout masks, stochastic depth), and are compared on:

* **outputs**, leaf by leaf through any nesting of tuples, lists and dicts, with
  dtype-aware ``rtol``/``atol`` (integers and bools exactly);
* **gradients** of the float inputs and of every parameter (by name) of one
  scalar, a seeded random projection of all float outputs, so every output
  element matters. Errors are measured against the gradient scale of the whole
  model, not element by element: two correct float32 runs of a deep net differ
  at rounding level, and some true gradients are 0 (a conv bias before
  BatchNorm), where any relative error is noise;
* **buffer updates** (BatchNorm running statistics in train mode);
* **memory**: bytes saved for backward plus the outputs, each storage once,
  without parameters, buffers and inputs. The check fails if the optimized
  model holds a single byte more than the original (a rewrite that drops
  activation checkpointing, an op that keeps more than native): the count is
  exact, the same model measured twice gives the same figure. On CUDA also the
  peak over forward + backward and what forward leaves allocated, reported but
  not checked (the allocator's rounding and caching move it). TorchScript modules
  are first run 3 times, so the profiling executor's optimized graph is measured;
* optionally **time** (``time_iters``) and a float64 reference (``reference64``).

Afterwards the models (parameters, buffers, ``.grad``, train/eval flags) and
the global RNG state are as they were before.

Example::

    >>> model = nn.Sequential(nn.Linear(64, 64), nn.Softplus(), nn.Linear(64, 1))
    >>> report = verify(model, optimize(model), torch.randn(8, 64))
    >>> report.ok
    True
    >>> print(report)                                   # doctest: +SKIP
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tabulate import tabulate
from torch import Tensor

from .memory import saved_bytes

__all__ = ["verify", "VerificationReport", "Check", "OUTPUT_TOLERANCES", "GRAD_TOLERANCES"]

# (rtol, atol) per dtype for outputs and buffer updates: torch.testing.assert_close's defaults.
OUTPUT_TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.complex64: (1.3e-6, 1e-5),
    torch.complex128: (1e-7, 1e-7),
}

# Largest allowed max|g_opt - g_orig| of one tensor, as a fraction of the largest
# |g_orig| anywhere in the model (inputs and parameters are scaled separately).
# Measured on resnet18 with softplus, train mode: the rounding noise of two correct
# runs is ~1e-6 in float32, ~3e-3 in float16, ~2e-2 in bfloat16, ~2e-15 in float64;
# a backward that drops the incoming gradient is off by O(0.1..1).
GRAD_TOLERANCES: Dict[torch.dtype, float] = {
    torch.float16: 2e-2,
    torch.bfloat16: 1e-1,
    torch.float32: 1e-3,
    torch.float64: 1e-7,
    torch.complex64: 1e-3,
    torch.complex128: 1e-7,
}

# reference64: the optimized model's gradient error against float64 may be this
# many times the original's, plus a floor of a few ulps of the gradient scale.
_REFERENCE_FACTOR = 4.0
_REFERENCE_FLOOR_ULPS = 64

_MiB = 2.0**20

# Calls of a ScriptModule before its memory is measured (the profiling executor optimizes from the 2nd).
_SCRIPT_WARMUP = 3


# --------------------------------------------------------------------------- report
@dataclass(frozen=True)
class Check:
    """One comparison: did it pass, the worst error, where it was, and what was allowed.

    For outputs and buffers ``worst_error`` is ``|Δ|`` at the element furthest over
    its allowance and ``tolerance`` that allowance (``atol + rtol*|ref|``); for
    gradients both are fractions of the largest gradient magnitude in the group.
    ``worst_error`` is ``None`` when the check was skipped (see ``detail``).
    """

    name: str
    ok: bool
    worst_error: Optional[float]
    where: str
    tolerance: Optional[float]
    detail: str = ""


@dataclass
class VerificationReport:
    """What :func:`verify` found. ``print(report)`` gives a table; ``report.to_dict()`` is JSON-ready.

    ``activation_bytes``, ``peak_cuda_bytes``, ``cuda_bytes_after_forward`` and
    ``time_s`` are ``(before, after)`` pairs: the original model, then the
    optimized one. CUDA figures are ``None`` when no CUDA device was used, and
    ``time_s`` when ``time_iters`` was 0.
    """

    checks: List[Check] = field(default_factory=list)
    activation_bytes: Tuple[int, int] = (0, 0)
    peak_cuda_bytes: Optional[Tuple[int, int]] = None
    cuda_bytes_after_forward: Optional[Tuple[int, int]] = None
    time_s: Optional[Tuple[float, float]] = None
    time_iters: int = 0
    devices: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    no_saving_reason: str = ""

    @property
    def ok(self) -> bool:
        """True only if every check passed."""
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> List[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def activation_saving(self) -> int:
        """Bytes saved by the rewrite (negative if it costs memory)."""
        before, after = self.activation_bytes
        return before - after

    @property
    def time_ratio(self) -> Optional[float]:
        """Optimized time over original time (median forward + backward), or None."""
        if self.time_s is None or self.time_s[0] <= 0:
            return None
        return self.time_s[1] / self.time_s[0]

    def to_dict(self) -> Dict[str, Any]:
        """A dict of plain values; ``json.dumps(report.to_dict(), allow_nan=False)`` works."""
        d = _json_ready(asdict(self))
        d.update(ok=self.ok, activation_saving=self.activation_saving, time_ratio=_json_ready(self.time_ratio))
        return d

    def __str__(self) -> str:
        verdict = "PASSED" if self.ok else "FAILED: " + ", ".join(c.name for c in self.failed)
        lines = [f"graph_rewrite.verify: {verdict}"]
        rows = [
            (c.name, "ok" if c.ok else "FAILED", _num(c.worst_error), c.where, _num(c.tolerance), c.detail)
            for c in self.checks
        ]
        lines.append(tabulate(rows, headers=("check", "result", "worst error", "where", "tolerance", "detail")))
        lines.append("")
        lines.append(tabulate(self._figure_rows(), headers=("figure", "original", "optimized", "saving")))
        if self.notes:
            lines.append("")
            lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _figure_rows(self) -> List[Tuple[str, str, str, str]]:
        before, after = self.activation_bytes
        if before == after:
            saving = self.no_saving_reason or "no saving"
        else:
            saving = f"{_mib(before - after)} ({100.0 * (before - after) / before:.1f}%)" if before else _mib(before - after)
        rows = [("activation memory (saved for backward + outputs)", _mib(before), _mib(after), saving)]
        for label, pair in (("CUDA peak, forward + backward", self.peak_cuda_bytes),
                            ("CUDA held after forward", self.cuda_bytes_after_forward)):
            if pair is None:
                rows.append((label, "not measured", "not measured", "(no CUDA device)"))
            else:
                rows.append((label, _mib(pair[0]), _mib(pair[1]), _mib(pair[0] - pair[1])))
        if self.time_s is not None:
            ratio = self.time_ratio
            rows.append((f"time, forward + backward (median of {self.time_iters})",
                         f"{self.time_s[0] * 1e3:.2f} ms", f"{self.time_s[1] * 1e3:.2f} ms",
                         f"{ratio:.2f}x the original's time" if ratio is not None else ""))
        return rows


def _mib(n: int) -> str:
    # MiB as asked, but small models would all read 0.00 MiB: give those in bytes.
    return f"{n / _MiB:.2f} MiB" if abs(n) >= 0.01 * _MiB else f"{n} B"


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3g}"


def _json_ready(obj: Any) -> Any:
    # Strict JSON has no inf/nan; spell them as strings.
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- nested values
def _leaves(obj: Any, path: str, _within: frozenset = frozenset()) -> Iterator[Tuple[str, Any]]:
    """(path, leaf) pairs of a nest of tuples, lists, dicts and plain objects: ``out[0]['boxes']``.

    A plain object (a class without ``__eq__`` of its own, such as a Hugging Face
    ``DynamicCache``) is entered through its attributes: compared as a whole it would
    be equal only to itself, and its tensors are what the model computed.
    """
    if id(obj) in _within:  # a cycle back to an enclosing object
        return
    inner = _within | {id(obj)}
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{path}[{k!r}]", inner)
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        for k, v in zip(obj._fields, obj):
            yield from _leaves(v, f"{path}.{k}", inner)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}[{i}]", inner)
    elif _is_plain_object(obj):
        for k, v in vars(obj).items():
            yield from _leaves(v, f"{path}.{k}", inner)
    else:
        yield path, obj


def _is_plain_object(obj: Any) -> bool:
    """An instance of an ordinary class that compares by identity only (no ``__eq__`` of its own)."""
    return (
        hasattr(obj, "__dict__")
        and type(obj).__eq__ is object.__eq__
        and not isinstance(obj, (Tensor, nn.Module, type))
        and not callable(obj)
    )


def _map_tensors(obj: Any, fn: Callable[[str, Tensor], Any], path: str) -> Any:
    """``obj`` with each tensor ``t`` replaced by ``fn(path, t)``; paths as in :func:`_leaves`."""
    if isinstance(obj, Tensor):
        return fn(path, obj)
    if isinstance(obj, dict):
        items = [(k, _map_tensors(v, fn, f"{path}[{k!r}]")) for k, v in obj.items()]
        try:
            return type(obj)(items)
        except Exception:  # a dict subclass with another constructor
            return dict(items)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map_tensors(v, fn, f"{path}.{k}") for k, v in zip(obj._fields, obj)))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn, f"{path}[{i}]") for i, v in enumerate(obj))
    return obj


def _is_float(t: Any) -> bool:
    return isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())


def _fresh_inputs(inputs: Tuple[Any, ...], to64: bool = False) -> Tuple[Tuple[Any, ...], Dict[str, Tensor]]:
    """Clones of ``inputs`` (the user's tensors are never handed to a model); float clones require grad.

    Returns (the clones, {path: float clone}) with paths like ``inputs[0]``.
    """
    leaves: Dict[str, Tensor] = {}

    def clone(path: str, t: Tensor) -> Tensor:
        c = t.detach().clone()
        if _is_float(c):
            if to64:
                c = c.to(torch.complex128 if c.is_complex() else torch.float64)
            c.requires_grad_(True)
            leaves[path] = c
        return c

    return tuple(_map_tensors(list(inputs), clone, "inputs")), leaves


# --------------------------------------------------------------------------- user state
class _UserState:
    """Parameters, buffers, ``.grad``, train/eval flags of the models, to put back exactly.

    The two models share tensors, so each tensor is cloned once. Changes are found
    by value, not by version counter: BatchNorm kernels update running statistics
    without bumping it. Only changed tensors are copied back, since a copy bumps
    the version and would break a backward the user still holds on a parameter.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        self.slots: List[Tuple[Dict[str, Any], str, Tensor]] = []  # (module's dict, key, tensor)
        self.saved: Dict[int, Tuple[Tensor, Tensor]] = {}  # id -> (tensor, clone)
        self.grads: List[Tuple[Tensor, Optional[Tensor], Optional[Tensor]]] = []  # (param, grad, clone)
        self.flags = [(m, m.training) for model in models for m in model.modules()]
        for model in models:
            for m in model.modules():
                for container in (m._parameters, m._buffers):
                    for k, t in container.items():
                        if t is not None:
                            self._add(container, k, t)

    def _add(self, container: Dict[str, Any], key: str, t: Tensor) -> None:
        self.slots.append((container, key, t))
        if id(t) in self.saved:
            return
        self.saved[id(t)] = (t, t.detach().clone())
        if isinstance(t, nn.Parameter):
            g = t.grad
            self.grads.append((t, g, None if g is None else g.detach().clone()))

    def restore(self) -> None:
        for container, key, t in self.slots:
            container[key] = t  # a forward may have rebound the attribute to a new tensor
        with torch.no_grad():
            for t, saved in self.saved.values():
                if not _same(t, saved):
                    t.copy_(saved)
            for p, g, saved in self.grads:
                p.grad = g
                if g is not None and not _same(g, saved):
                    g.copy_(saved)
        for m, flag in self.flags:
            m.training = flag

    def changed_buffers(self, model: nn.Module) -> Dict[str, Tensor]:
        """Clones of ``model``'s buffers whose value moved since verify began, by name."""
        return {
            name: b.detach().clone()
            for name, b in model.named_buffers()
            if id(b) not in self.saved or not _same(b, self.saved[id(b)][1])
        }

    def initial(self, t: Tensor) -> Tensor:
        """The value ``t`` had before verify (``t`` itself if it was not saved)."""
        return self.saved.get(id(t), (t, t))[1]


def _same(t: Tensor, saved: Tensor) -> bool:
    if t.shape != saved.shape or t.dtype != saved.dtype:
        return False
    if torch.equal(t, saved):
        return True
    # NaN != NaN: a tensor whose NaNs sit where they were is unchanged, not copied over each time.
    return _is_float(t) and bool(torch.isclose(t, saved, rtol=0, atol=0, equal_nan=True).all())


def _cuda_devices(models: Sequence[nn.Module], inputs: Tuple[Any, ...]) -> List[int]:
    found = set()
    for model in models:
        for t in list(model.parameters()) + list(model.buffers()):
            if t.device.type == "cuda":
                found.add(t.device.index or 0)
    for _, t in _leaves(list(inputs), "inputs"):
        if isinstance(t, Tensor) and t.device.type == "cuda":
            found.add(t.device.index or 0)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        found.add(torch.cuda.current_device())  # where a model's own torch.rand(device="cuda") lands
    return sorted(found)


def _seed(seed: int, cuda_devices: Sequence[int]) -> None:
    # Seed exactly the generators fork_rng restores (torch.manual_seed would also
    # queue a seed for CUDA devices not yet initialised, changing the user's future RNG).
    torch.default_generator.manual_seed(seed)
    for i in cuda_devices:
        torch.cuda.default_generators[i].manual_seed(seed)


# --------------------------------------------------------------------------- one run
class _Projection:
    """Random weights R per output leaf, from a private generator: the scalar is sum((out * R).sum())."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.weights: Dict[str, Tensor] = {}
        self.frozen = False

    def scalar(self, leaves: Dict[str, Any]) -> Optional[Tensor]:
        total = None
        for path, t in leaves.items():
            if not _is_float(t):
                continue
            shape = tuple(t.shape) + ((2,) if t.is_complex() else ())
            if path not in self.weights and not self.frozen:
                self.weights[path] = torch.randn(shape, generator=self.gen)
            r = self.weights.get(path)
            if r is None or tuple(r.shape) != shape:
                continue  # a leaf the first run did not have: the outputs check reports it
            acc = torch.float64 if t.dtype in (torch.float64, torch.complex128) else torch.float32
            # Accumulate in float32 at least: a float16 sum of a large output overflows.
            v = torch.view_as_real(t) if t.is_complex() else t
            term = (v.to(acc) * r.to(device=t.device, dtype=acc)).sum()
            total = term if total is None else total + term.to(total.device)
        self.frozen = True
        return total


@dataclass
class _Run:
    outputs: Any
    leaves: Dict[str, Any]
    input_grads: Dict[str, Optional[Tensor]]
    param_grads: Dict[str, Optional[Tensor]]
    activation_bytes: int = 0
    cuda_held: Optional[int] = None
    cuda_peak: Optional[int] = None
    backward_error: Optional[str] = None


def _call(model: nn.Module, inputs: Tuple[Any, ...], which: str) -> Any:
    try:
        return model(*inputs)
    except Exception as e:
        raise ValueError(f"{which} model rejected the inputs: {type(e).__name__}: {e}") from e


def _cuda_allocated(devices: Sequence[int]) -> int:
    return sum(torch.cuda.memory_allocated(i) for i in devices)


def _run(
    model: nn.Module,
    which: str,
    inputs: Tuple[Any, ...],
    projection: _Projection,
    seed: int,
    cuda_devices: Sequence[int],
    measure: bool = True,
    to64: bool = False,
) -> _Run:
    """One forward + backward of ``model`` on fresh clones of ``inputs``, seeded."""
    fed, input_leaves = _fresh_inputs(inputs, to64)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    _seed(seed, cuda_devices)
    for i in cuda_devices:
        torch.cuda.synchronize(i)
        torch.cuda.reset_peak_memory_stats(i)
    base = _cuda_allocated(cuda_devices) if cuda_devices else 0
    if measure:
        exclude = [*model.parameters(), *model.buffers(), *input_leaves.values(),
                   *(t for _, t in _leaves(list(inputs), "") if isinstance(t, Tensor))]
        n_bytes, out = saved_bytes(lambda: _call(model, fed, which), exclude=exclude, include_outputs=True)
    else:
        n_bytes, out = 0, _call(model, fed, which)
    held = _cuda_allocated(cuda_devices) - base if cuda_devices else None
    leaves = dict(_leaves(out, "out"))
    run = _Run(out, leaves, {k: None for k in input_leaves}, {k: None for k in params}, n_bytes, held)
    scalar = projection.scalar(leaves)
    targets = [*input_leaves.values(), *params.values()]
    if scalar is not None and scalar.requires_grad and targets:
        try:
            grads = torch.autograd.grad(scalar, targets, allow_unused=True)
        except Exception as e:
            if which == "original":
                raise ValueError(f"backward of the original model failed: {type(e).__name__}: {e}") from e
            run.backward_error = f"{type(e).__name__}: {e}"
            grads = (None,) * len(targets)
        names = [*input_leaves, *params]
        for name, g in zip(names, grads):
            (run.input_grads if name in input_leaves else run.param_grads)[name] = g
    if cuda_devices:
        for i in cuda_devices:
            torch.cuda.synchronize(i)
        run.cuda_peak = sum(torch.cuda.max_memory_allocated(i) for i in cuda_devices) - base
    return run


def _time(model: nn.Module, inputs: Tuple[Any, ...], projection: _Projection, seed: int,
          cuda_devices: Sequence[int], iters: int) -> float:
    """Median seconds of forward + backward over ``iters`` runs after one warm-up run."""
    fed, input_leaves = _fresh_inputs(inputs)
    targets = [*input_leaves.values(), *(p for p in model.parameters() if p.requires_grad)]
    times = []
    for i in range(iters + 1):
        _seed(seed, cuda_devices)
        for d in cuda_devices:
            torch.cuda.synchronize(d)
        start = time.perf_counter()
        scalar = projection.scalar(dict(_leaves(model(*fed), "out")))
        if scalar is not None and scalar.requires_grad:
            torch.autograd.grad(scalar, targets, allow_unused=True)
        for d in cuda_devices:
            torch.cuda.synchronize(d)
        if i:  # the first run warms caches and allocators
            times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------- comparisons
def _tolerance(dtype: torch.dtype, rtol: Optional[float], atol: Optional[float]) -> Tuple[float, float]:
    default = OUTPUT_TOLERANCES.get(dtype, (0.0, 0.0))
    return (default[0] if rtol is None else rtol, default[1] if atol is None else atol)


def _compare_leaf(a: Any, b: Any, rtol: Optional[float], atol: Optional[float]):
    """(ratio, |Δ| at the worst element, allowance there, description); ratio > 1 fails."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        if isinstance(a, Tensor) != isinstance(b, Tensor):
            return math.inf, math.inf, 0.0, f"{type(a).__name__} vs {type(b).__name__}"
        try:
            same = bool(a == b)
        except Exception:
            same = repr(a) == repr(b)
        return (0.0 if same else math.inf), (0.0 if same else math.inf), 0.0, "" if same else f"{a!r} vs {b!r}"
    if a.shape != b.shape or a.dtype != b.dtype:
        return math.inf, math.inf, 0.0, f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    if a.numel() == 0:
        return 0.0, 0.0, 0.0, ""
    a, b = a.detach(), b.detach().to(a.device)
    if not _is_float(a):
        diff = (a != b)
        n = int(diff.sum())
        return (math.inf if n else 0.0), (float(n) if n else 0.0), 0.0, f"{n} element(s) differ" if n else ""
    r, t = _tolerance(a.dtype, rtol, atol)
    wide = torch.complex128 if a.is_complex() else torch.float64
    a64, b64 = a.to(wide), b.to(wide)
    both_nan = torch.isnan(a64) & torch.isnan(b64) if not a.is_complex() else torch.zeros_like(a, dtype=torch.bool)
    err = torch.where((a64 == b64) | both_nan, torch.zeros((), dtype=torch.float64, device=a.device), (a64 - b64).abs())
    err = torch.nan_to_num(err, nan=math.inf)  # nan in one model only
    allowed = t + r * a64.abs()
    ratio = torch.where(err == 0, torch.zeros_like(err), err / allowed)
    ratio = torch.nan_to_num(ratio, nan=math.inf, posinf=math.inf)
    i = int(ratio.flatten().argmax())
    return float(ratio.flatten()[i]), float(err.flatten()[i]), float(allowed.flatten()[i]), f"rtol={r:g}, atol={t:g} ({str(a.dtype).replace('torch.', '')})"


def _compare_outputs(orig: _Run, opt: _Run, rtol: Optional[float], atol: Optional[float]) -> Check:
    if list(orig.leaves) != list(opt.leaves):
        missing = [p for p in orig.leaves if p not in opt.leaves]
        extra = [p for p in opt.leaves if p not in orig.leaves]
        where = (missing or extra)[0]
        return Check("outputs", False, math.inf, where, 0.0,
                     f"structure differs: missing in optimized {missing[:5]}, extra {extra[:5]}")
    worst = None  # (ratio, |Δ|, allowed, description, path): the leaf furthest over its allowance
    failing = []
    for path, a in orig.leaves.items():
        ratio, err, allowed, desc = _compare_leaf(a, opt.leaves[path], rtol, atol)
        if ratio > 1:
            failing.append(path)
        if worst is None or (ratio, err) > worst[:2]:
            worst = (ratio, err, allowed, desc, path)
    if worst is None:
        return Check("outputs", True, 0.0, "out", 0.0, "the models return no values")
    ratio, err, allowed, desc, where = worst
    if failing:
        detail = (f"{where}: |Δ| {err:.3g} where {allowed:.3g} is allowed ({desc}); "
                  f"{len(failing)}/{len(orig.leaves)} leaves over tolerance")
    else:
        detail = f"{len(orig.leaves)}/{len(orig.leaves)} leaves within tolerance" + (f"; worst {desc}" if desc else "")
    return Check("outputs", not failing, err, where, allowed, detail)


def _grad_errors(ref: Dict[str, Optional[Tensor]], other: Dict[str, Optional[Tensor]]) -> Tuple[Dict[str, float], float]:
    """({name: max|other - ref| / scale}, scale) with scale = the largest finite |ref| over all names.

    A missing gradient (unused tensor) counts as zeros. An inf or NaN in the same place
    in both is agreement (native models do produce them, e.g. FCOS's loss gives NaN
    gradients for its target boxes); one in only one of them is an infinite error.
    """
    scale = 0.0
    for g in ref.values():
        if g is not None and g.numel():
            finite = g.detach().abs()[torch.isfinite(g.detach())]
            if finite.numel():
                scale = max(scale, float(finite.max()))
    scale = scale or 1.0  # all-zero reference: absolute errors
    errors = {}
    for name in ref:
        g, h = ref[name], other.get(name)
        if g is None and h is None:
            errors[name] = 0.0
            continue
        base = g if g is not None else h
        g = torch.zeros_like(base) if g is None else g
        h = torch.zeros_like(base) if h is None else h
        if g.shape != h.shape:
            errors[name] = math.inf
            continue
        if not g.numel():
            errors[name] = 0.0
            continue
        wide = torch.complex128 if g.is_complex() else torch.float64
        g64, h64 = g.detach().to(wide), h.detach().to(device=g.device, dtype=wide)
        if g.is_complex():  # real and imaginary parts each: a NaN in one part hides nothing
            g64, h64 = torch.view_as_real(g64), torch.view_as_real(h64)
        same = (g64 == h64) | (torch.isnan(g64) & torch.isnan(h64))  # equal infs, NaN in both
        d = (g64 - h64).abs()
        d = torch.nan_to_num(torch.where(same, torch.zeros_like(d), d), nan=math.inf)
        errors[name] = float(d.max()) / scale
    return errors, scale


def _grad_dtype(name: str, *grad_dicts: Dict[str, Optional[Tensor]]) -> torch.dtype:
    for grads in grad_dicts:
        g = grads.get(name)
        if g is not None:
            return g.dtype
    return torch.float32


def _tf32_allowed(model: nn.Module) -> bool:
    """Whether ``model``'s CUDA float32 matmuls or convolutions may round their inputs to TF32.

    cuDNN allows it for convolutions (and RNNs) by default, cuBLAS for matmuls only when
    asked. TF32 keeps float16's 10-bit mantissa, so two correct float32 runs whose inputs
    differ in the last bit differ like float16 runs do (resnet50 with softplus on an
    H100: 1.2e-3 of the largest gradient with TF32, 1.9e-6 without; both 0.147 from
    float64 with it; ``benchmarks/GPU.md``). Convolutions are found by module type:
    one called through ``F.conv2d`` keeps float32's (stricter) tolerance.
    """
    if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
        return True
    return bool(torch.backends.cudnn.allow_tf32) and any(
        isinstance(m, (nn.modules.conv._ConvNd, nn.RNNBase)) for m in model.modules())


def _grad_tolerance(name: str, orig: Dict[str, Optional[Tensor]], opt: Dict[str, Optional[Tensor]],
                    tf32: bool = False) -> float:
    dtype = _grad_dtype(name, orig, opt)
    g = orig.get(name) if orig.get(name) is not None else opt.get(name)
    if tf32 and dtype in (torch.float32, torch.complex64) and g is not None and g.is_cuda:
        return GRAD_TOLERANCES[torch.float16]
    return GRAD_TOLERANCES.get(dtype, 1e-3)


def _compare_grads(
    label: str, orig: Dict[str, Optional[Tensor]], opt: Dict[str, Optional[Tensor]], grad_tol: Optional[float],
    tf32: bool = False,
) -> Check:
    errors, scale = _grad_errors(orig, opt)
    tol = {n: grad_tol if grad_tol is not None else _grad_tolerance(n, orig, opt, tf32) for n in errors}
    failing = sorted((n for n in errors if not errors[n] <= tol[n]), key=lambda n: -errors[n])
    where = max(errors, key=lambda n: errors[n] / tol[n])
    worst = errors[where]
    if failing:
        listed = ", ".join(f"{n} ({errors[n]:.2g})" for n in failing[:5])
        detail = (f"{where}: max |Δ| = {worst:.3g} x the largest |grad| ({scale:.3g}); "
                  f"{len(failing)}/{len(errors)} tensors over tolerance: {listed}")
    else:
        detail = f"{len(errors)}/{len(errors)} tensors within tolerance of the largest |grad| ({scale:.3g})"
    if grad_tol is None and tol[where] != GRAD_TOLERANCES.get(_grad_dtype(where, orig, opt), 1e-3):
        detail += ("; CUDA float32 with TF32 allowed for its convolutions or matmuls: float16's tolerance (TF32 rounds to its mantissa); "
                   "reference64=True compares both against float64")
    return Check(label, not failing, worst, where, tol[where], detail)


def _compare_buffers(state: _UserState, orig_model: nn.Module, opt_model: nn.Module,
                     after_orig: Dict[str, Tensor], after_opt: Dict[str, Tensor]) -> Optional[Check]:
    """Buffers a forward updated (BatchNorm running statistics) must end up alike in both models."""
    bufs_orig = dict(orig_model.named_buffers())
    bufs_opt = dict(opt_model.named_buffers())
    changed = [n for n in dict.fromkeys([*after_orig, *after_opt]) if n in bufs_orig and n in bufs_opt]
    if not changed:
        return None
    worst = None  # (ratio, |Δ|, allowed, name)
    failing = []
    for n in changed:
        a = after_orig.get(n, state.initial(bufs_orig[n]))
        b = after_opt.get(n, state.initial(bufs_opt[n]))
        ratio, err, allowed, _ = _compare_leaf(a, b, None, None)
        if ratio > 1:
            failing.append(n)
        if worst is None or (ratio, err) > worst[:2]:
            worst = (ratio, err, allowed, n)
    _, err, allowed, where = worst
    detail = (f"{len(failing)} of {len(changed)} updated buffers differ: {failing[:5]}" if failing
              else f"{len(changed)} buffers updated alike")
    return Check("buffer updates", not failing, err, where, allowed, detail)


def _compare_memory(before: int, after: int) -> Check:
    """Activation bytes: the optimized model may hold no more than the original, not one byte.

    No slack: :func:`graph_rewrite.memory.saved_bytes` counts storages, not
    allocator blocks, and gives the same figure for the same model every time.
    ``worst_error`` is the excess as a fraction of the original's bytes (0 when the
    optimized model holds as much or less); ``detail`` gives both figures in bytes.

    >>> _compare_memory(262144, 2621440).ok
    False
    """
    more = after - before
    change = f"{more} B more" if more > 0 else f"{-more} B less" if more < 0 else "the same"
    detail = f"original holds {before} B, optimized {after} B ({change})"
    excess = 0.0 if more <= 0 else (more / before if before else math.inf)
    return Check("activation memory", more <= 0, excess, "optimized", 0.0, detail)


def _compare_reference(orig: _Run, opt: _Run, ref: _Run) -> Check:
    """The optimized model's gradient error vs float64 must be close to the original's."""
    worst_orig, worst_opt, where, dtype = 0.0, 0.0, "-", torch.float32
    for group in ("input_grads", "param_grads"):
        r = getattr(ref, group)
        if not r:
            continue
        e_orig, _ = _grad_errors(r, getattr(orig, group))
        e_opt, _ = _grad_errors(r, getattr(opt, group))
        worst_orig = max(worst_orig, max(e_orig.values()))
        name = max(e_opt, key=e_opt.get)
        if e_opt[name] >= worst_opt:
            worst_opt, where = e_opt[name], name
            dtype = _grad_dtype(name, getattr(orig, group))
    allowed = _REFERENCE_FACTOR * worst_orig + _REFERENCE_FLOOR_ULPS * torch.finfo(dtype).eps
    ok = worst_opt <= allowed
    detail = (f"vs float64: optimized {worst_opt:.3g}, original {worst_orig:.3g} "
              f"(allowed {_REFERENCE_FACTOR:g}x the original's + {_REFERENCE_FLOOR_ULPS} ulps)")
    return Check("gradients vs float64", ok, worst_opt, where, allowed, detail)


# --------------------------------------------------------------------------- checks on arguments
def _check_arguments(original: Any, optimized: Any) -> None:
    for label, m in (("original", original), ("optimized", optimized)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"verify() takes torch.nn.Module models; the {label} model is a {type(m).__name__}")
    p_orig = dict(original.named_parameters())
    p_opt = dict(optimized.named_parameters())
    only_orig = sorted(set(p_orig) - set(p_opt))
    only_opt = sorted(set(p_opt) - set(p_orig))
    if only_orig or only_opt:
        raise ValueError(
            "the models' parameter names differ, so gradients cannot be matched: "
            f"only in original: {only_orig[:10]}; only in optimized: {only_opt[:10]}"
        )
    shapes = [n for n in p_orig if p_orig[n].shape != p_opt[n].shape]
    if shapes:
        n = shapes[0]
        raise ValueError(f"parameter {n} has shape {list(p_orig[n].shape)} in original, "
                         f"{list(p_opt[n].shape)} in optimized")
    flags_opt = {n: m.training for n, m in optimized.named_modules()}
    modes = [n or "<root>" for n, m in original.named_modules() if n in flags_opt and flags_opt[n] != m.training]
    if modes:
        raise ValueError(f"the models are in different train/eval modes at {modes[:5]}; "
                         "call .train() or .eval() on both")


def _no_saving_reason(optimized: nn.Module) -> str:
    report = getattr(optimized, "rewrite_report", None)
    if report is None:
        return "no saving"
    ops = {r.lean_op for r in report.replaced}
    if not ops:
        return "no saving: nothing was rewritten"
    if ops == {"graph_rewrite.sigmoid"}:
        return "no saving: native sigmoid already saves its output"
    return "no saving"


# --------------------------------------------------------------------------- verify
def verify(
    original: nn.Module,
    optimized: nn.Module,
    *inputs: Any,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    grad_tol: Optional[float] = None,
    seed: int = 0,
    time_iters: int = 0,
    reference64: bool = False,
) -> VerificationReport:
    """Check that ``optimized`` computes what ``original`` does, and measure the memory it saves.

    Args:
        original, optimized: the models, usually ``model`` and ``optimize(model)``;
            their ``named_parameters()`` names must match.
        *inputs: the forward arguments (tensors or nests of them). They are cloned;
            float clones require grad, so input gradients are compared too.
        rtol, atol: output (and buffer update) tolerances for every float leaf;
            default per dtype, :data:`OUTPUT_TOLERANCES`. Ints and bools compare exactly.
        grad_tol: allowed ``max|g_opt - g_orig|`` of any tensor as a fraction of the
            largest ``|g_orig|`` in its group (inputs, parameters); default per
            dtype, :data:`GRAD_TOLERANCES` (1e-3 for float32; float16's 2e-2 for
            CUDA float32 while TF32 is allowed, as cuDNN allows by default).
        seed: seeds the global RNG before each forward (same dropout masks on both
            sides) and the private generator of the output projection.
        time_iters: if > 0, also time forward + backward (median of this many runs).
        reference64: also run a float64 copy of ``original`` and require the
            optimized gradients to be about as close to it as the original's.

    Returns:
        A :class:`VerificationReport`; ``report.ok`` is True only if every check passed,
        "activation memory" among them: the optimized model holds no more bytes than the original.

    Raises:
        TypeError: a model is not an ``nn.Module``.
        ValueError: parameter names differ, a model rejects the inputs, or no output
            depends differentiably on the inputs or parameters.

    Example::

        >>> model = nn.Sequential(nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, 2))
        >>> report = verify(model, optimize(model), torch.randn(4, 16))
        >>> report.ok, report.activation_bytes
        (True, (544, 288))
    """
    _check_arguments(original, optimized)
    report = VerificationReport(time_iters=int(time_iters), no_saving_reason=_no_saving_reason(optimized))
    cuda_devices = _cuda_devices((original, optimized), inputs)
    report.devices = sorted({str(t.device) for m in (original, optimized) for t in [*m.parameters(), *m.buffers()]}
                            | {str(t.device) for _, t in _leaves(list(inputs), "") if isinstance(t, Tensor)})
    projection = _Projection(seed)
    state = _UserState((original, optimized))
    try:
        with torch.random.fork_rng(devices=cuda_devices, device_type="cuda"):
            if cuda_devices:
                # First CUDA calls allocate cuBLAS/cuDNN workspaces that stay allocated;
                # without a warm-up they would count in the original's peak only.
                _run(original, "original", inputs, projection, seed, cuda_devices, measure=False)
                state.restore()
            if any(isinstance(m, torch.jit.ScriptModule) for m in (original, optimized)):
                # TorchScript's profiling executor records the first calls, then runs an optimized
                # graph whose differentiable subgraphs save other tensors: measure that one.
                for model, which in ((original, "original"), (optimized, "optimized")):
                    for _ in range(_SCRIPT_WARMUP):
                        _run(model, which, inputs, projection, seed, cuda_devices, measure=False)
                        state.restore()
            orig = _run(original, "original", inputs, projection, seed, cuda_devices)
            after_orig = state.changed_buffers(original)
            state.restore()  # shared buffers: the optimized run starts where the original did
            opt = _run(optimized, "optimized", inputs, projection, seed, cuda_devices)
            after_opt = state.changed_buffers(optimized)
            state.restore()
            ref = None
            if reference64:
                ref = _run(_float64_copy(original), "float64 reference", inputs, projection, seed,
                           cuda_devices, measure=False, to64=True)
            if time_iters > 0:
                t_orig = _time(original, inputs, projection, seed, cuda_devices, time_iters)
                state.restore()
                t_opt = _time(optimized, inputs, projection, seed, cuda_devices, time_iters)
                report.time_s = (t_orig, t_opt)
    finally:
        state.restore()

    _check_differentiable(orig)
    report.checks.append(_compare_outputs(orig, opt, rtol, atol))
    buffers = _compare_buffers(state, original, optimized, after_orig, after_opt)
    if buffers is not None:
        report.checks.append(buffers)
    if opt.backward_error is not None:
        report.checks.append(Check("backward", False, math.inf, "optimized", 0.0, opt.backward_error))
    report.checks += _gradient_checks(orig, opt, grad_tol, report.notes, tf32=_tf32_allowed(original))
    if ref is not None:
        report.checks.append(_compare_reference(orig, opt, ref))
    report.activation_bytes = (orig.activation_bytes, opt.activation_bytes)
    report.checks.append(_compare_memory(*report.activation_bytes))
    if cuda_devices:
        report.peak_cuda_bytes = (orig.cuda_peak, opt.cuda_peak)
        report.cuda_bytes_after_forward = (orig.cuda_held, opt.cuda_held)
    return report


def _float64_copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model).double()
    except Exception as e:
        raise ValueError(f"reference64 needs copy.deepcopy(original): {type(e).__name__}: {e}") from e


def _check_differentiable(orig: _Run) -> None:
    floats = [t for t in orig.leaves.values() if _is_float(t)]
    if not floats:
        kinds = ", ".join(f"{p}: {getattr(t, 'dtype', type(t).__name__)}" for p, t in orig.leaves.items())
        raise ValueError(
            f"the original model has no floating-point output, so gradients cannot be checked (outputs: {kinds})"
        )
    if not any(t.requires_grad for t in floats):
        raise ValueError(
            "no output of the original model requires grad (no float input and no trainable "
            "parameter reaches it), so gradients cannot be checked"
        )


def _gradient_checks(orig: _Run, opt: _Run, grad_tol: Optional[float], notes: List[str],
                     tf32: bool = False) -> List[Check]:
    checks = []
    for label, group, empty in (
        ("input gradients", "input_grads", "no float input: input gradients not checked"),
        ("parameter gradients", "param_grads", "the model has no trainable parameters: parameter gradients not checked"),
    ):
        grads = getattr(orig, group)
        if not grads:
            notes.append(empty)
            checks.append(Check(label, True, None, "-", None, "skipped: " + empty.split(":")[0]))
            continue
        checks.append(_compare_grads(label, grads, getattr(opt, group), grad_tol, tf32))
    return checks
