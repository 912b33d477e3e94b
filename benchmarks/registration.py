"""Prototype registrations of the output-saving softplus, to compare per-call overhead.

Every variant computes the same values as ``torch.ops.graph_rewrite.softplus``
(forward: the native kernel; backward: ``dy * -expm1(-beta*y)``, plus the branch
record where the dtype needs one, see ``graph_rewrite.ops``). What differs is how
the op is registered, so what each call costs in Python and in the dispatcher:

======================  ===============================================================
``graph_rewrite``       the library's op, ``torch.ops.graph_rewrite.softplus`` (the packet):
                        ``torch.library.Library`` DEF, a CompositeExplicitAutograd kernel,
                        ``register_fake``, and an ``Autograd`` kernel that applies an
                        autograd.Function whose forward calls ``F.softplus`` and whose
                        backward is ``graph_rewrite.ops.activations.softplus_grad``
``graph_rewrite_ovl``   the same op called through its overload ``.default`` (no packet lookup)
``custom_op``           the library's registration until 2026-11-23: ``torch.library.custom_op``
                        + ``register_autograd``, backward ``g * where(linear, 1, -expm1(-b*y))``
``custom_op_fast``      ``torch.library.custom_op`` with the library's backward
``function``            (i) a plain ``torch.autograd.Function``: forward ``F.softplus``, save output
``library``             (ii) as ``graph_rewrite``, but the Autograd kernel's forward redispatches
                        to the op's CompositeExplicitAutograd kernel (one Python round trip more)
``hybrid``              (iii) a Python function: the autograd.Function in eager mode and the
                        ``library`` op while torch.compile/torch.export trace
``cpp``                 (iv) the same op written in C++ (``TORCH_LIBRARY`` + a C++
                        ``torch::autograd::Function``), built with ``torch.utils.cpp_extension``;
                        only when a C++ compiler is present (``--no-cpp`` skips it)
======================  ===============================================================

Every variant but ``custom_op`` uses the library's backward,
:func:`graph_rewrite.ops.activations.softplus_grad`: where no branch record is kept,
``-expm1(-beta*y)`` is already exactly 1 on the linear branch (``exp(-threshold)``
is far below the rounding unit; that is the very condition
``softplus_needs_branch_mask`` tests), so it skips the ``where(beta*y > threshold,
1, ...)``; and when no graph is being built for double backward
(``torch.is_grad_enabled()`` is False inside a plain backward) it works in place on
one temporary. Results are bitwise equal to the library's (checked by
:func:`check_equal`).
"""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import graph_rewrite.ops.activations as gops

_REDUCED = (torch.float16, torch.bfloat16)
NS = "graph_rewrite_bench"


def _opmath(t: Tensor) -> Tensor:
    return t.float() if t.dtype in _REDUCED else t


# ----------------------------------------------------------------------------- backward
fast_backward = gops.softplus_grad


def slow_backward(grad: Tensor, y: Tensor, beta: float, threshold: float, mask: Optional[Tensor]) -> Tensor:
    """The library's softplus backward until 2026-11-23 (differentiable ops, out of place)."""
    linear = mask if mask is not None else _opmath(y) * beta > threshold
    y_op = _opmath(y)
    slope = torch.where(linear, torch.ones_like(y_op), -torch.expm1(-beta * y_op))
    return (_opmath(grad) * slope).to(grad.dtype)


def _save(ctx, x: Tensor, y: Tensor, beta: float, threshold: float) -> None:
    ctx.beta, ctx.threshold = beta, threshold
    if x.dtype.is_floating_point and gops.softplus_needs_branch_mask(x.dtype, threshold):
        ctx.save_for_backward(y, _opmath(x) * beta > threshold)
    else:
        ctx.save_for_backward(y)


def _grad(ctx, grad: Tensor) -> Tensor:
    y, *mask = ctx.saved_tensors
    return fast_backward(grad, y, ctx.beta, ctx.threshold, mask[0] if mask else None)


# ----------------------------------------------------------------------------- custom_op, two backwards
def _custom_op(name: str, backward: Callable) -> None:
    """``graph_rewrite_bench::<name>``, registered with ``torch.library.custom_op`` as the library was."""

    @torch.library.custom_op(f"{NS}::{name}", mutates_args=())
    def op(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
        return F.softplus(x, beta, threshold)

    op.register_fake(lambda x, beta=1.0, threshold=20.0: F.softplus(x, beta, threshold))

    def setup_context(ctx, inputs, output) -> None:
        x, beta, threshold = inputs
        _save(ctx, x, output, beta, threshold)

    def grad_fn(ctx, grad):
        y, *mask = ctx.saved_tensors
        return backward(grad, y, ctx.beta, ctx.threshold, mask[0] if mask else None), None, None

    op.register_autograd(grad_fn, setup_context=setup_context)


_custom_op("softplus_co", slow_backward)  # the previous registration
_custom_op("softplus_fast", fast_backward)  # custom_op with the library's backward


# ----------------------------------------------------------------------------- (i) autograd.Function
class SoftplusFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
        y = F.softplus(x, beta, threshold)
        _save(ctx, x, y, beta, threshold)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _grad(ctx, grad), None, None


def softplus_function(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    return SoftplusFunction.apply(x, beta, threshold)


# ----------------------------------------------------------------------------- (ii) torch.library.Library
_lib = torch.library.Library(NS, "DEF")
_lib.define("softplus_lib(Tensor x, float beta=1.0, float threshold=20.0) -> Tensor")


def _lib_kernel(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    # The dispatcher drops arguments equal to their schema defaults: keep the defaults here.
    return F.softplus(x, beta, threshold)


_lib.impl("softplus_lib", _lib_kernel, "CompositeExplicitAutograd")


@torch.library.register_fake(f"{NS}::softplus_lib", lib=_lib)
def _(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    return F.softplus(x, beta, threshold)


_LIB_OP = torch.ops.graph_rewrite_bench.softplus_lib.default


class _LibFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, beta: float, threshold: float) -> Tensor:
        with torch._C._AutoDispatchBelowAutograd():
            y = _LIB_OP(x, beta, threshold)
        _save(ctx, x, y, beta, threshold)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _grad(ctx, grad), None, None


def _lib_autograd(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    return _LibFunction.apply(x, beta, threshold)


# Without with_keyset the Autograd kernel receives only the op's arguments.
_lib.impl("softplus_lib", _lib_autograd, "Autograd")


def softplus_library(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    return _LIB_OP(x, beta, threshold)


# ----------------------------------------------------------------------------- (iii) hybrid
def softplus_hybrid(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return _LIB_OP(x, beta, threshold)
    return SoftplusFunction.apply(x, beta, threshold)


# ----------------------------------------------------------------------------- (iv) C++
_CPP_SRC = r"""
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/TensorIterator.h>
#include <ATen/native/cpu/Loops.h>
#include <ATen/cpu/vec/vec.h>
#include <cmath>
#include <limits>

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

static bool needs_mask(c10::ScalarType dt, double threshold) {
  if (std::isnan(threshold)) return false;
  double eps;
  switch (dt) {
    case at::kDouble: eps = std::numeric_limits<double>::epsilon(); break;
    case at::kFloat: eps = std::numeric_limits<float>::epsilon(); break;
    case at::kHalf: eps = 0.0009765625; break;
    case at::kBFloat16: eps = 0.0078125; break;
    default: return false;
  }
  return std::exp(-threshold) >= eps / 16;
}

static Tensor opmath(const Tensor& t) {
  auto s = t.scalar_type();
  return (s == at::kHalf || s == at::kBFloat16) ? t.to(at::kFloat) : t;
}

// One pass: out = g * -expm1(-beta * y) (float/double, same dtype), vectorized like ATen's own kernels.
Tensor softplus_grad_fused(const Tensor& g, const Tensor& y, double beta) {
  Tensor out;
  auto iter = at::TensorIteratorConfig()
      .add_output(out).add_const_input(g).add_const_input(y).build();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "softplus_grad_fused", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    const scalar_t nb = static_cast<scalar_t>(-beta);
    const Vec nbv(nb);
    at::native::cpu_kernel_vec(iter,
        [=](scalar_t a, scalar_t b) -> scalar_t { return -(std::expm1(b * nb) * a); },
        [=](Vec a, Vec b) -> Vec { return ((b * nbv).expm1() * a).neg(); });
  });
  return iter.output();
}

static Tensor composite_grad(const Tensor& g, const Tensor& y, double beta, const Tensor* mask) {
  if (at::GradMode::is_enabled()) {  // create_graph: differentiable ops only
    Tensor slope = at::expm1(opmath(y).mul(-beta)).neg();
    if (mask) slope = at::where(*mask, at::ones_like(slope), slope);
    return opmath(g).mul(slope).to(g.scalar_type());
  }
  Tensor t = opmath(y).mul(-beta);
  t.expm1_();
  t.mul_(g);
  t.neg_();
  if (mask) t = at::where(*mask, opmath(g), t);
  return t.to(g.scalar_type());
}

Tensor softplus_fwd(const Tensor& x, double beta, double threshold) {
  return at::softplus(x, beta, threshold);
}

struct SoftplusCpp : public torch::autograd::Function<SoftplusCpp> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, double beta, double threshold) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor y = at::softplus(x, beta, threshold);
    ctx->saved_data["beta"] = beta;
    if (at::isFloatingType(x.scalar_type()) && needs_mask(x.scalar_type(), threshold)) {
      ctx->save_for_backward({y, opmath(x).mul(beta).gt(threshold)});
    } else {
      ctx->save_for_backward({y});
    }
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    double beta = ctx->saved_data["beta"].toDouble();
    const Tensor& g = grads[0];
    const Tensor& y = saved[0];
    Tensor out;
    bool plain = saved.size() == 1 && !at::GradMode::is_enabled() && g.device().is_cpu() &&
                 g.scalar_type() == y.scalar_type() &&
                 (g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble);
    if (plain) {
      // Through the dispatcher, not a direct call: under torch.compile/export the
      // tensors are fake, and the op's fake kernel (registered from Python) runs instead.
      static auto op = c10::Dispatcher::singleton()
          .findSchemaOrThrow("graph_rewrite_cpp::softplus_grad_fused", "")
          .typed<Tensor(const Tensor&, const Tensor&, double)>();
      out = op.call(g, y, beta);
    } else {
      out = composite_grad(g, y, beta, saved.size() > 1 ? &saved[1] : nullptr);
    }
    return {out, Tensor(), Tensor()};
  }
};

Tensor softplus_autograd(const Tensor& x, double beta, double threshold) {
  return SoftplusCpp::apply(x, beta, threshold);
}

TORCH_LIBRARY(graph_rewrite_cpp, m) {
  m.def("softplus(Tensor x, float beta=1.0, float threshold=20.0) -> Tensor");
  m.def("softplus_grad_fused(Tensor grad, Tensor y, float beta) -> Tensor");
}
TORCH_LIBRARY_IMPL(graph_rewrite_cpp, CompositeExplicitAutograd, m) {
  m.impl("softplus", softplus_fwd);
}
TORCH_LIBRARY_IMPL(graph_rewrite_cpp, CPU, m) {
  m.impl("softplus_grad_fused", softplus_grad_fused);
}
TORCH_LIBRARY_IMPL(graph_rewrite_cpp, Autograd, m) {
  m.impl("softplus", softplus_autograd);
}
"""


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpp_cflags() -> List[str]:
    # ATen's vectorized kernels are built once per CPU capability; build this one for
    # AVX2 where the CPU has it (the same Sleef routines ATen's expm1 calls), else generic.
    if {"avx2", "fma"} <= _cpu_flags():
        return ["-O3", "-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    # No -fopenmp: TensorIterator::for_each, compiled into libtorch, already runs the loop on
    # torch's threads; -fopenmp would link a second OpenMP runtime (two thread pools).
    return ["-O3", "-DCPU_CAPABILITY=DEFAULT"]

_cpp_state: Dict[str, object] = {}


def load_cpp(build_dir: Optional[str] = None, verbose: bool = False) -> Optional[Callable]:
    """Build (once; cached in ``benchmarks/build/``) and return the C++ variant, or None with the reason stored."""
    if "fn" in _cpp_state or "error" in _cpp_state:
        return _cpp_state.get("fn")  # type: ignore[return-value]
    try:
        from torch.utils.cpp_extension import load_inline

        build_dir = build_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "cpp_softplus")
        os.makedirs(build_dir, exist_ok=True)
        t0 = time.perf_counter()
        load_inline(
            name="graph_rewrite_cpp_softplus",
            cpp_sources=[_CPP_SRC],
            is_python_module=False,
            build_directory=build_dir,
            extra_cflags=_cpp_cflags(),
            verbose=verbose,
        )
        _cpp_state["build_s"] = time.perf_counter() - t0

        @torch.library.register_fake("graph_rewrite_cpp::softplus")
        def _(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
            return F.softplus(x, beta, threshold)

        @torch.library.register_fake("graph_rewrite_cpp::softplus_grad_fused")
        def _(grad: Tensor, y: Tensor, beta: float) -> Tensor:
            return torch.empty_like(grad)

        op = torch.ops.graph_rewrite_cpp.softplus.default

        def softplus_cpp(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
            return op(x, beta, threshold)

        _cpp_state["fn"] = softplus_cpp
        return softplus_cpp
    except Exception as e:  # no compiler, no headers, ...
        _cpp_state["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
        return None


def cpp_error() -> Optional[str]:
    return _cpp_state.get("error")  # type: ignore[return-value]


# ----------------------------------------------------------------------------- the table
def native(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    return F.softplus(x, beta, threshold)


_PACKET = torch.ops.graph_rewrite.softplus
_OVERLOAD = torch.ops.graph_rewrite.softplus.default
_CO_OP = torch.ops.graph_rewrite_bench.softplus_co.default


def graph_rewrite_op(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    return _PACKET(x, beta, threshold)


def graph_rewrite_ovl(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    return _OVERLOAD(x, beta, threshold)


def custom_op(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    return _CO_OP(x, beta, threshold)


_FAST_OP = torch.ops.graph_rewrite_bench.softplus_fast.default


def custom_op_fast(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    return _FAST_OP(x, beta, threshold)


def variants(with_cpp: bool = True) -> Dict[str, Callable]:
    """name -> softplus(x, beta, threshold) for every registration (``cpp`` only if it builds)."""
    out: Dict[str, Callable] = {
        "native": native,
        "graph_rewrite": graph_rewrite_op,
        "graph_rewrite_ovl": graph_rewrite_ovl,
        "custom_op": custom_op,
        "custom_op_fast": custom_op_fast,
        "function": softplus_function,
        "library": softplus_library,
        "hybrid": softplus_hybrid,
    }
    if with_cpp:
        fn = load_cpp()
        if fn is not None:
            out["cpp"] = fn
    return out


DESCRIPTIONS = {
    "native": "F.softplus (saves its input)",
    "graph_rewrite": "the library op: Library DEF + CompositeExplicitAutograd + Autograd kernel (autograd.Function calling F.softplus), called as torch.ops.graph_rewrite.softplus",
    "graph_rewrite_ovl": "the library op called as torch.ops.graph_rewrite.softplus.default",
    "custom_op": "torch.library.custom_op + register_autograd, out-of-place backward (the library until 2026-11-23)",
    "custom_op_fast": "torch.library.custom_op with the library's backward",
    "function": "(i) plain torch.autograd.Function",
    "library": "(ii) as the library op, the Autograd kernel's forward redispatches to the op",
    "hybrid": "(iii) autograd.Function in eager, the (ii) op under compile/export",
    "cpp": "(iv) C++ op: TORCH_LIBRARY + C++ autograd::Function (cpp_extension)",
}


# ----------------------------------------------------------------------------- checks
def check_equal(fn: Callable, dtypes=(torch.float32, torch.float64, torch.bfloat16), thresholds=(20.0, 1.0)) -> bool:
    """Forward and gradient bitwise equal to the library op's on a wide range of inputs."""
    for dtype in dtypes:
        for threshold in thresholds:
            for beta in (1.0, 3.0, -0.5):
                x0 = torch.cat([torch.linspace(-60, 60, 4001), torch.tensor([0.2736, -1e-30, 1e-30, float("inf"), -float("inf"), float("nan")])])
                x0 = x0.to(dtype)
                g = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
                xa = x0.clone().requires_grad_()
                xb = x0.clone().requires_grad_()
                ya = torch.ops.graph_rewrite.softplus(xa, beta, threshold)
                yb = fn(xb, beta, threshold)
                (ga,) = torch.autograd.grad(ya, xa, g)
                (gb,) = torch.autograd.grad(yb, xb, g)
                if not (_same(ya, yb) and _same(ga, gb)):
                    return False
    return True


def _same(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def works_under_compile(fn: Callable) -> str:
    """'yes' if torch.compile(fullgraph=True) runs forward+backward and matches eager, else the error."""
    torch._dynamo.reset()
    x = torch.randn(64, dtype=torch.float32) * 10
    g = torch.randn(64)

    def f(t):
        return fn(t * 2, 1.0, 20.0) * 3

    try:
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        ya = f(xa)
        (ga,) = torch.autograd.grad(ya, xa, g)
        yb = torch.compile(f, fullgraph=True, backend="inductor")(xb)
        (gb,) = torch.autograd.grad(yb, xb, g)
        ok = torch.allclose(ya, yb, rtol=1e-5, atol=1e-6) and torch.allclose(ga, gb, rtol=1e-5, atol=1e-6)
        return "yes" if ok else "runs, values differ"
    except Exception as e:
        return "no: " + _first_line(e)
    finally:
        torch._dynamo.reset()


def works_under_export(fn: Callable) -> str:
    """'yes (op kept)' if torch.export.export keeps one opaque op node and the program matches eager."""

    class M(torch.nn.Module):
        def forward(self, t):
            return fn(t, 1.0, 20.0)

    x = torch.randn(64)
    try:
        ep = torch.export.export(M(), (x,))
        targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
        ok = torch.equal(ep.module()(x), F.softplus(x))
        if not ok:
            return "runs, values differ"
        kept = [t for t in targets if "graph_rewrite" in t]
        return f"yes (graph: {', '.join(targets)})" if kept else f"inlined (graph: {', '.join(targets)})"
    except Exception as e:
        return "no: " + _first_line(e)


# The dispatcher op behind each variant, for TorchScript (which can call ops, not Python functions).
SCRIPT_OPS = {
    "native": "torch.nn.functional.softplus",
    "graph_rewrite": "torch.ops.graph_rewrite.softplus",
    "graph_rewrite_ovl": "torch.ops.graph_rewrite.softplus",
    "custom_op": "torch.ops.graph_rewrite_bench.softplus_co",
    "custom_op_fast": "torch.ops.graph_rewrite_bench.softplus_fast",
    "function": None,
    "library": "torch.ops.graph_rewrite_bench.softplus_lib",
    "hybrid": None,
    "cpp": "torch.ops.graph_rewrite_cpp.softplus",
}


def works_under_script(name: str) -> str:
    """'yes' if ``torch.jit.script`` compiles a call of the variant and its forward+backward match eager."""
    target = SCRIPT_OPS.get(name)
    if target is None:
        return "no (Python function / autograd.Function)"
    src = f"def f(x: torch.Tensor) -> torch.Tensor:\n    return {target}(x, 1.0, 20.0)\n"
    try:
        cu = torch.jit.CompilationUnit(src)
        x = torch.randn(64, requires_grad=True)
        y = cu.f(x)
        (gx,) = torch.autograd.grad(y, x, torch.ones(64))
        x2 = x.detach().requires_grad_()
        (g2,) = torch.autograd.grad(F.softplus(x2), x2, torch.ones(64))
        ok = torch.allclose(y, F.softplus(x)) and torch.allclose(gx, g2, rtol=1e-6, atol=1e-7)
        return "yes" if ok else "runs, values differ"
    except Exception as e:
        return "no: " + _first_line(e)


def _first_line(e: BaseException, limit: int = 100) -> str:
    s = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return s if len(s) <= limit else s[: limit - 3] + "..."


def op_names() -> List[str]:
    return list(DESCRIPTIONS)
