"""The C++ Autograd kernels (graph_rewrite/ops/csrc/lean_ops.cpp) against the Python kernels.

Each op has a twin, ``torch.ops.graph_rewrite._<name>_python``, that always runs the Python kernel
(itself tested against native PyTorch and 50-digit references in test_ops.py and test_exactness.py).
Here the two must agree bit for bit: outputs, gradients, their strides, second derivatives, over
dtypes, layouts, extreme values and thread counts. CI sets GRAPH_REWRITE_REQUIRE_CPP=1, where the
install must have built the kernels; elsewhere (a source tree without an install) the comparisons skip.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import graph_rewrite  # noqa: F401
from graph_rewrite.ops import cpp

ops = torch.ops.graph_rewrite
needs_cpp = pytest.mark.skipif(not cpp.active(), reason=f"C++ kernels: {cpp.status()}")

# (op name, extra arguments): softplus at default and other lean parameters; negative threshold
# makes the output's sign unknown (the aminmax test); negative beta gives negative outputs; beta 0.3
# is not a float32 or float16 number (the backward's -beta*y, rounded as the Python kernel rounds it).
CASES = [("softplus", (1.0, 20.0)), ("softplus", (2.0, 20.0)), ("softplus", (1.0, -1.0)),
         ("softplus", (-1.5, 20.0)), ("softplus", (0.3, 20.0)), ("sigmoid", ()), ("logsigmoid", ())]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Values on both branches and where outputs underflow (x < -87 in float32, < -17 in float16),
# and the extremes: infinities, NaN, signed zeros.
EXTREMES = [-1e4, -200.0, -100.0, -90.0, -30.0, -17.5, -1.0, -0.0, 0.0, 1e-30, 1.0, 19.9, 20.0,
            20.1, 30.0, 100.0, 1e4, math.inf, -math.inf, math.nan]


def _both(name, args, x, g, create_graph=False):
    """(output, gradient) of the public op and of its Python twin, from the same leaf values."""
    out = []
    for op in (getattr(ops, name), getattr(ops, f"_{name}_python")):
        leaf = x.detach().clone().requires_grad_()
        y = op(leaf, *args)
        (gx,) = torch.autograd.grad(y, leaf, g, create_graph=create_graph)
        out.append((y, gx, leaf))
    return out


def _identical(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_the_kernels_are_active_where_the_install_built_them():
    if os.environ.get("GRAPH_REWRITE_REQUIRE_CPP", "") in ("", "0"):
        pytest.skip("GRAPH_REWRITE_REQUIRE_CPP is not set (CI sets it)")
    assert cpp.active(), cpp.status()
    x = torch.randn(4, requires_grad=True)
    assert ops.softplus(x).grad_fn.name() == "torch::autograd::CppNode<graph_rewrite::LeanSoftplus>"


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,args", CASES, ids=lambda c: str(c))
def test_bitwise_the_python_kernel_on_extremes_and_random_values(name, args, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor(EXTREMES, dtype=torch.float64), torch.randn(3000, generator=gen, dtype=torch.float64) * 40])
    x = x.to(dtype)
    g = (torch.randn(x.shape, generator=gen, dtype=torch.float64) * 1e3).to(dtype)  # loss-scaled
    (y, gx, _), (y_py, gx_py, _) = _both(name, args, x, g)
    _identical(y, y_py)
    _identical(gx, gx_py)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,args", CASES, ids=lambda c: str(c))
def test_bitwise_the_python_kernel_where_the_cpp_backward_runs(name, args, dtype):
    # Above, the underflowing extremes send the whole backward to Python (an output too small to
    # carry the slope); here no output is that small, so the C++ backward formula itself runs.
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(3000, generator=gen, dtype=torch.float64) * 2).clamp(-4, 4).to(dtype)
    g = (torch.randn(x.shape, generator=gen, dtype=torch.float64) * 1e3).to(dtype)
    (y, gx, _), (y_py, gx_py, _) = _both(name, args, x, g)
    assert (y.abs() >= torch.finfo(dtype).tiny).all()  # else the backward would go to Python
    _identical(y, y_py)
    _identical(gx, gx_py)


@needs_cpp
@pytest.mark.parametrize("name,args", CASES[:1] + CASES[-2:], ids=lambda c: str(c))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "grad_transposed", "expanded_grad"])
@pytest.mark.parametrize("threads", [1, 2])
def test_bitwise_the_python_kernel_over_layouts_and_threads(name, args, layout, threads):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 9, 10, generator=gen) * 20
    g = torch.randn(2, 8, 9, 10, generator=gen)
    if layout == "channels_last":
        x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x, g = x.transpose(1, 3), g.transpose(1, 3)
    elif layout == "grad_transposed":
        g = g.transpose(1, 3).contiguous().transpose(1, 3)  # same shape, other strides than the output
    elif layout == "expanded_grad":
        g = torch.randn(1, 1, 1, 10, generator=gen).expand_as(x)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        (y, gx, _), (y_py, gx_py, _) = _both(name, args, x, g)
    finally:
        torch.set_num_threads(before)
    _identical(y, y_py)
    _identical(gx, gx_py)


@needs_cpp
@pytest.mark.parametrize("name,args", CASES, ids=lambda c: str(c))
def test_second_derivatives_are_the_python_kernels(name, args):
    # create_graph: the C++ backward hands the Python backward op the work, whose derivatives are written out.
    gen = torch.Generator().manual_seed(2)
    x = torch.cat([torch.tensor([-100.0, -30.0, 0.0, 19.9, 30.0]), torch.randn(200, generator=gen) * 10])
    g = torch.randn(x.shape, generator=gen)
    (_, gx, leaf), (_, gx_py, leaf_py) = _both(name, args, x, g, create_graph=True)
    _identical(gx, gx_py)
    (h,) = torch.autograd.grad(gx, leaf, torch.ones_like(gx))
    (h_py,) = torch.autograd.grad(gx_py, leaf_py, torch.ones_like(gx_py))
    _identical(h, h_py)


@needs_cpp
@pytest.mark.parametrize("name,args", [("softplus", (1.5, 50.0)), ("sigmoid", ()), ("logsigmoid", ())], ids=str)
def test_gradcheck_and_gradgradcheck_through_the_cpp_kernel(name, args):
    # float64 softplus needs no branch mask above threshold ~40, so this one stays in C++.
    x = torch.randn(32, dtype=torch.float64, requires_grad=True)
    op = getattr(ops, name)
    assert "CppNode" in op(x, *args).grad_fn.name()
    assert gradcheck(lambda t: op(t, *args), (x,))
    assert gradgradcheck(lambda t: op(t, *args), (x,))


@needs_cpp
def test_values_and_gradients_match_native_where_native_is_exact():
    # Beside the twin: native PyTorch on moderate inputs, where both are correctly rounded to a few ulps.
    # float64 softplus at threshold 50: no branch mask, so the C++ kernel serves it.
    x = torch.linspace(-15, 15, 301, dtype=torch.float64, requires_grad=True)
    for name, native, args in (("softplus", F.softplus, (1.0, 50.0)), ("sigmoid", torch.sigmoid, ()),
                               ("logsigmoid", F.logsigmoid, ())):
        y = getattr(ops, name)(x, *args)
        assert "CppNode" in y.grad_fn.name()
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        yn = native(x, *args)
        (gn,) = torch.autograd.grad(yn, x, torch.ones_like(yn))
        torch.testing.assert_close(y, yn, rtol=0, atol=0)
        torch.testing.assert_close(gx, gn, rtol=4e-16, atol=1e-300)


@needs_cpp
def test_what_the_cpp_kernel_does_not_serve_goes_to_python():
    x = torch.randn(16, requires_grad=True)
    assert "CppNode" in ops.softplus(x).grad_fn.name()
    assert type(ops.softplus(x, 0.0, 20.0).grad_fn).__name__ == "_SoftplusBackward"  # beta 0: not lean
    assert type(ops.softplus(x.double()).grad_fn).__name__ == "_SoftplusBackward"  # branch mask
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "CppNode" not in ops.sigmoid(x).grad_fn.name()
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        assert type(ops.logsigmoid(dual).grad_fn).__name__ == "_LogSigmoidTransformsBackward"
    with fwAD.dual_level():  # a dual level, even for a plain input: the jvp Function, as the Python kernel takes
        assert type(ops.sigmoid(x).grad_fn).__name__ == "_SigmoidTransformsBackward"


@needs_cpp
@pytest.mark.parametrize("name,args", CASES, ids=lambda c: str(c))
def test_without_a_graph_to_record_nothing_is_saved(name, args):
    x = torch.randn(64, requires_grad=True)
    op = getattr(ops, name)
    for call in (lambda: op(x.detach(), *args), lambda: torch.no_grad()(op)(x, *args)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = call()
        assert y.grad_fn is None and not y.requires_grad and not saved
        _identical(y, getattr(ops, f"_{name}_python")(x.detach(), *args))
    with torch.inference_mode():
        y = op(x, *args)
    _identical(y, getattr(ops, f"_{name}_python")(x.detach(), *args))


@needs_cpp
def test_under_the_runtime_front_end_the_python_kernels_run():
    # Its in-place guard makes a Python node keep a copy of the saved output: `y += 1` after softplus.
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            if x.sum() > -1e9:  # data-dependent control flow: FX cannot trace it
                y = F.softplus(self.lin(x))
                out = y * 2
                y += 1
                return out + y
            return x

    torch.manual_seed(0)
    model = Net()
    lean = graph_rewrite.optimize(model)
    x = torch.randn(4, 8)
    (g_native,) = torch.autograd.grad(model(x).sum(), model.lin.weight)
    (g_lean,) = torch.autograd.grad(lean(x).sum(), model.lin.weight)
    torch.testing.assert_close(g_lean, g_native)  # softplus slopes: a few ulps (test_exactness.py)
    y = ops.softplus(x.requires_grad_())  # and after the mode, the C++ kernel again
    assert "CppNode" in y.grad_fn.name()


def _in_subprocess(code: str, **env) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@needs_cpp
def test_the_switch_off_keeps_the_python_kernels():
    out = _in_subprocess("import torch, graph_rewrite.ops.cpp as c; x = torch.randn(3, requires_grad=True);"
                         "print(c.status(), '|', type(torch.ops.graph_rewrite.softplus(x).grad_fn).__name__)",
                         GRAPH_REWRITE_NO_CPP="1")
    assert out == "off: GRAPH_REWRITE_NO_CPP is set | _SoftplusBackward"


@needs_cpp
def test_a_build_for_another_torch_is_not_loaded():
    out = _in_subprocess("import torch; torch.__version__ = '0.0.0'; import graph_rewrite.ops.cpp as c;"
                         "x = torch.randn(3, requires_grad=True);"
                         "print(c.active(), '|', c.status(), '|', type(torch.ops.graph_rewrite.sigmoid(x).grad_fn).__name__)")
    active, status, node = out.split(" | ")
    assert active == "False" and node == "_SigmoidBackward"
    assert status.startswith("not used: built for torch ") and status.endswith("running torch 0.0.0 (reinstall to rebuild)")
