"""The fused Triton backward kernels against the composite, in Triton's interpreter.

Not collected by the main pytest run (the name does not start with ``test_``):
``tests/test_triton_kernels.py`` runs this file in a subprocess with
``TRITON_INTERPRET=1`` so that the environment variable never reaches the main test
process. Run it alone with::

    TRITON_INTERPRET=1 python -m pytest tests/triton_interpreter_cases.py

References are the composite backward (``activations.softplus_grad`` /
``logsigmoid_grad``, the path CPU and non-contiguous tensors take) and 50-digit
mpmath values, never the kernel itself.
"""
from __future__ import annotations

import math
import os

import mpmath
import pytest
import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - guarded by the runner
    pytest.skip("needs TRITON_INTERPRET=1 (run through tests/test_triton_kernels.py)", allow_module_level=True)

import triton
import triton.language as tl

from graph_rewrite.ops import activations, softplus_needs_branch_mask, triton_kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (beta, threshold): the default, small thresholds (a branch record is kept), a negative
# beta, a negative threshold and a huge one (log1p(exp) overflows below it).
SOFTPLUS_ARGS = [(1.0, 20.0), (3.0, 1.0), (0.5, 0.1), (-2.0, 5.0), (1.0, -1.0), (1.0, 1e4), (1.7, 40.0)]
EXTREMES = [
    -1e4, -745.0, -200.0, -100.0, -30.0, -20.5, -1.0, -1e-30, -1e-40, -0.0, 0.0, 1e-45, 1e-40, 1e-30,
    1e-8, 0.2736, 0.3333, 0.5, 1.0, 2.5, 5.0, 19.99, 20.0, 20.01, 30.0, 88.0, 100.0, 1e4,
    math.inf, -math.inf, math.nan,
]
GRADS = [0.0, -0.0, 1.0, -3.5, 1e-30, 1e-40, 5e-324, 1e30, math.inf, -math.inf, math.nan]


def _inputs(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.tensor(EXTREMES, dtype=torch.float64),
                   torch.linspace(-120, 120, 4801, dtype=torch.float64),
                   torch.randn(3000, dtype=torch.float64, generator=gen) * 10])
    return x.to(dtype)


def _grads(n: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, dtype=torch.float64, generator=gen) * 4
    g[: len(GRADS)] = torch.tensor(GRADS, dtype=torch.float64)
    g[len(GRADS): 2 * len(GRADS)] = 1.0  # slopes alone, for the extremes of y
    return g.to(dtype)


def _ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the dtype's spacing at max(|a|, |b|) (subnormal spacing below normals)."""
    fi = torch.finfo(a.dtype)
    ad, bd = a.double(), b.double()
    mag = torch.maximum(ad.abs(), bd.abs()).clamp_min(fi.smallest_normal)
    ulp = torch.exp2(torch.floor(torch.log2(mag))) * fi.eps
    d = (ad - bd).abs() / ulp
    same = (ad == bd) | (ad.isnan() & bd.isnan())
    return torch.where(same, torch.zeros_like(d), d)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _opmath(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _compare(kernel: torch.Tensor, composite: torch.Tensor, u: torch.Tensor, g: torch.Tensor,
             linear: torch.Tensor) -> dict:
    """The kernel's result is the composite's formula with expm1 at most 1 ulp away.

    ``u`` is the composite's expm1 argument (opmath). The candidates are
    ``-(e * g)`` for e = torch.expm1(u) and its two float neighbours, then ``g`` on
    the linear branch, rounded to the dtype. The first candidate must be the
    composite's own result (so this spelling of it is right); the kernel must be one
    of the three, bit for bit (NaNs aside). Returns the share of identical bits.
    """
    assert kernel.dtype == composite.dtype and kernel.shape == composite.shape
    e = torch.expm1(u)
    g_op = _opmath(g)
    cands = [torch.where(linear, g_op, -(c * g_op)).to(kernel.dtype)
             for c in (e, torch.nextafter(e, torch.full_like(e, math.inf)), torch.nextafter(e, torch.full_like(e, -math.inf)))]
    nan = composite.isnan()
    assert torch.equal(nan, cands[0].isnan()) and torch.equal(_bits(cands[0])[~nan], _bits(composite)[~nan])
    assert torch.equal(kernel.isnan(), nan), "NaN positions differ"
    hit = torch.zeros_like(nan)
    for c in cands:
        hit |= _bits(kernel) == _bits(c)
    assert hit[~nan].all(), f"{(~hit & ~nan).sum()} results not explained by a 1-ulp expm1 difference"
    # Infinities, zeros (with their sign) and the linear branch: the same bits.
    special = ~nan & (linear | composite.isinf() | (composite == 0))
    assert torch.equal(_bits(kernel)[special], _bits(composite)[special]), "special values differ in their bits"
    return {"bitwise": (_bits(kernel) == _bits(composite))[~nan].double().mean().item()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta,threshold", SOFTPLUS_ARGS)
def test_softplus_kernel_matches_composite(dtype, beta, threshold):
    x = _inputs(dtype)
    y = F.softplus(x, beta, threshold)
    mask = activations._softplus_linear_branch(x, beta, threshold) if softplus_needs_branch_mask(dtype, threshold) else None
    g = _grads(len(y), dtype)
    y0, g0 = y.clone(), g.clone()
    with torch.no_grad():  # backward runs without grad mode: the composite's plain path
        want = activations.softplus_grad(g, y, beta, threshold, mask)
        got = triton_kernels.softplus_backward(g, y, beta, mask)
    assert torch.equal(_bits(y), _bits(y0)) and torch.equal(_bits(g), _bits(g0))  # inputs untouched
    linear = mask if mask is not None else torch.zeros_like(y, dtype=torch.bool)
    figures = _compare(got, want, torch.mul(_opmath(y), -beta), g, linear)
    # Mostly the very same bits: only where the composite's expm1 is not correctly rounded.
    assert figures["bitwise"] >= 0.97, figures


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logsigmoid_kernel_matches_composite(dtype):
    x = _inputs(dtype)
    y = F.logsigmoid(x)
    g = _grads(len(y), dtype)
    with torch.no_grad():
        want = activations.logsigmoid_grad(g, y)
        got = triton_kernels.logsigmoid_backward(g, y)
    figures = _compare(got, want, _opmath(y), g, torch.zeros_like(y, dtype=torch.bool))
    assert figures["bitwise"] >= 0.97, figures


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_float32_opmath_differences_are_the_composites_rounding(dtype):
    """Where kernel and composite differ (float32 opmath), the kernel is the one closer
    to -expm1(u)*g in 50 digits: the difference is the composite's expm1 rounding."""
    x = _inputs(dtype, seed=3)
    y = F.softplus(x)
    g = torch.ones_like(y)
    with torch.no_grad():
        want = activations.softplus_grad(g, y, 1.0, 20.0, None)
        got = triton_kernels.softplus_backward(g, y, 1.0, None)
    idx = ((got != want) & ~want.isnan()).nonzero().flatten().tolist()
    mpmath.mp.dps = 50
    u = (y.float() * -1.0).double().tolist()
    for i in idx:
        exact = -mpmath.expm1(mpmath.mpf(u[i]))
        assert abs(got[i].item() - exact) <= abs(want[i].item() - exact), (i, u[i], got[i].item(), want[i].item())


@triton.jit
def _expm1_probe(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    x = tl.load(x_ptr + offs, mask=inb, other=0.0)
    tl.store(out_ptr + offs, triton_kernels._expm1_f64(x), mask=inb)


def test_expm1_formulation_within_one_ulp_of_exact():
    """The kernels' arithmetic-only expm1 in float64, against 50-digit mpmath."""
    gen = torch.Generator().manual_seed(4)
    x = torch.cat([
        torch.tensor([-math.inf, -1e4, -745.0, -40.0, -39.9, -37.0, -1e-300, -5e-324, -0.0, 0.0, 5e-324,
                      1e-300, 1e-8, math.log(2) / 2, -math.log(2) / 2, 0.5, 1.0, 700.0, 709.0, 709.5, 1e4,
                      math.inf, math.nan], dtype=torch.float64),
        torch.linspace(-45, 5, 5001, dtype=torch.float64),
        -torch.rand(2000, dtype=torch.float64, generator=gen) * 1e-3,
        -torch.rand(2000, dtype=torch.float64, generator=gen).exp2() * 20,
        torch.randn(2000, dtype=torch.float64, generator=gen) * 100,
    ])
    out = torch.empty_like(x)
    _expm1_probe[(triton.cdiv(len(x), 1024),)](x, out, len(x), BLOCK=1024)
    mpmath.mp.dps = 50
    exact = []
    for v in x.tolist():
        if math.isnan(v):
            exact.append(math.nan)
        elif v == -math.inf:
            exact.append(-1.0)
        elif v > 709.0:
            exact.append(math.inf)  # documented: inf above 709 (float32 opmath overflows at 88.7)
        else:
            exact.append(float(mpmath.expm1(mpmath.mpf(v))) if v != 0 else v)
    exact = torch.tensor(exact, dtype=torch.float64)
    assert _ulp_distance(out, exact).max() <= 1.0
    zeros = x == 0
    assert torch.equal(_bits(out[zeros]), _bits(x[zeros]))  # -0.0 stays -0.0


def test_wired_in_op_runs_the_kernel_and_matches_the_composite(monkeypatch):
    """With the device test opened up for CPU tensors, the ops' backward runs the
    kernel (counted) and gives the composite's gradients within 1 ulp."""
    calls = []
    real_sp, real_ls = triton_kernels.softplus_backward, triton_kernels.logsigmoid_backward

    def composite_grads(lo=-25.0, hi=25.0):
        out = []
        for dtype in (torch.float32, torch.float64):
            # Within ±25 no output underflows (beta 3 included): with tiny outputs the op keeps their inputs,
            # and the composite (which reads them) must run instead of the kernel.
            x = _inputs(dtype)[:2000].clamp(lo, hi).requires_grad_()
            g = _grads(2000, dtype)
            # The Python kernels: what CUDA tensors reach (the C++ kernels serve CPU tensors only).
            for fn in (lambda t: torch.ops.graph_rewrite._softplus_python(t, 1.0, 20.0),
                       lambda t: torch.ops.graph_rewrite._softplus_python(t, 3.0, 1.0),
                       torch.ops.graph_rewrite._logsigmoid_python):
                (gx,) = torch.autograd.grad(fn(x), x, g)
                out.append(gx)
        return out

    want = composite_grads()
    assert not calls
    monkeypatch.setattr(triton_kernels, "applies", lambda g, y, m=None: triton_kernels.eligible(g, y, m))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(triton_kernels, "softplus_backward", lambda *a, **k: calls.append("sp") or real_sp(*a, **k))
    monkeypatch.setattr(triton_kernels, "logsigmoid_backward", lambda *a, **k: calls.append("ls") or real_ls(*a, **k))
    got = composite_grads()
    assert calls == ["sp", "sp", "ls"] * 2
    calls.clear()
    composite_grads(-1e4, 1e4)  # softplus(-1e4) and logsigmoid(1e4) underflow to 0
    monkeypatch.undo()
    # On "CUDA" softplus with beta 1 and logsigmoid keep no record of tiny outputs in
    # float32/float64 (activations.underflow_record): the kernel runs. Beta 3 keeps the
    # inputs of its tiny outputs, and the composite, which reads them, runs instead.
    assert calls == ["sp", "ls"] * 2
    for a, b in zip(got, want):  # slopes * g: within 2 ulp (1 ulp of expm1, then the product)
        assert _ulp_distance(a, b).max() <= 2.0
        assert torch.equal(a.isnan(), b.isnan())
        assert (_bits(a) == _bits(b)).double().mean() >= 0.97


def test_empty_and_odd_sizes():
    for n in (0, 1, 1023, 1025, 3000):
        y = F.softplus(torch.randn(n) * 10)
        g = torch.randn(n)
        with torch.no_grad():
            want = activations.softplus_grad(g, y, 1.0, 20.0, None)
        got = triton_kernels.softplus_backward(g, y, 1.0, None)
        assert got.shape == want.shape
        _compare(got, want, -y, g, torch.zeros_like(y, dtype=torch.bool))
