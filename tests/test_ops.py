"""The lean ops against native PyTorch and float64 references."""
import math

import mpmath

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import graph_rewrite
import graph_rewrite.ops
from graph_rewrite.ops import softplus_needs_branch_mask
from graph_rewrite.ops.activations import python_kernel

lean = torch.ops.graph_rewrite
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# (name, lean op, native op, extra args)
CASES = [
    ("softplus", lean.softplus, F.softplus, (1.0, 20.0)),
    ("softplus_b3_t1", lean.softplus, F.softplus, (3.0, 1.0)),
    ("softplus_b0.5_t0.1", lean.softplus, F.softplus, (0.5, 0.1)),
    ("softplus_bneg2_t5", lean.softplus, F.softplus, (-2.0, 5.0)),
    ("softplus_b1_tneg1", lean.softplus, F.softplus, (1.0, -1.0)),
    ("sigmoid", lean.sigmoid, torch.sigmoid, ()),
    ("logsigmoid", lean.logsigmoid, F.logsigmoid, ()),
]
IDS = [c[0] for c in CASES]

EXTREMES = [
    -1e4, -745.0, -100.0, -30.0, -20.5, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1e-8, 0.2736, 0.3333,
    0.5, 1.0, 2.5, 5.0, 19.99, 20.0, 20.01, 30.0, 100.0, 1e4, math.inf, -math.inf, math.nan,
]


def _inputs(dtype, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor(EXTREMES, dtype=torch.float64)
    x = torch.cat([x, torch.linspace(-40, 40, 1601, dtype=torch.float64),
                   torch.randn(300, dtype=torch.float64, generator=gen) * 8])
    return x.to(dtype).to(device)


def _grad(fn, x, g, *args):
    x = x.detach().requires_grad_()
    (gx,) = torch.autograd.grad(fn(x, *args), x, g)
    return gx


def _ulp(t: torch.Tensor, dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at each |t| (float64), normals and subnormals."""
    fi = torch.finfo(dtype)
    mag = t.abs().clamp_min(fi.smallest_normal)
    return torch.exp2(torch.floor(torch.log2(mag))) * fi.eps


def _exact_grad(name, x, g, args):
    """g * f'(x) in 50-digit arithmetic (mpmath), rounded once to float64.

    Softplus takes the branch the native kernel takes (beta*x > threshold in opmath);
    the slope within each branch is exact.
    """
    mpmath.mp.dps = 50
    linear = None
    if args:
        xo = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        linear = (xo * args[0] > args[1]).tolist()
    out = []
    for i, (xi, gi) in enumerate(zip(x.double().tolist(), g.double().tolist())):
        if math.isnan(xi):
            out.append(math.nan)
            continue
        X = mpmath.mpf(xi)
        if args:  # softplus: sigmoid(beta*x) or 1
            z = X * args[0]
            slope = 1 if linear[i] else (0 if z == -mpmath.inf else 1 / (1 + mpmath.exp(-z)))
        elif name == "sigmoid":  # s(1-s)
            slope = 0 if abs(X) == mpmath.inf else (1 / (1 + mpmath.exp(-X))) * (1 / (1 + mpmath.exp(X)))
        else:  # logsigmoid: sigmoid(-x)
            slope = 1 if X == -mpmath.inf else 1 / (1 + mpmath.exp(X))
        out.append(float(slope * gi))
    return torch.tensor(out, dtype=torch.float64, device=x.device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,op,native,args", CASES, ids=IDS)
def test_matches_native_and_exact_reference(name, op, native, args, dtype, device):
    x = _inputs(dtype, device)
    torch.testing.assert_close(op(x, *args), native(x, *args), rtol=0, atol=0, equal_nan=True)  # same forward

    g = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    g_lean = _grad(op, x, g, *args)
    g_native = _grad(native, x, g, *args)
    if name == "sigmoid":  # the same kernel as native autograd: bitwise equal
        torch.testing.assert_close(g_lean, g_native, rtol=0, atol=0, equal_nan=True)
    g_ref = _exact_grad(name, x.cpu(), g.cpu(), args).to(device)
    assert torch.equal(g_lean.isnan(), g_ref.isnan()), "NaN pattern differs from the exact gradient"
    ok = ~g_ref.isnan()
    ulp = _ulp(g_ref[ok], dtype)
    err_lean = (g_lean.double() - g_ref)[ok].abs() / ulp
    err_native = (g_native.double() - g_ref)[ok].abs() / ulp
    # A subnormal output (logsigmoid(100) = -3.7e-44 in float32) keeps only a few bits,
    # so a slope derived from it is good to a few subnormal spacings, times |g|.
    fi = torch.finfo(dtype)
    subnormal = 4 * g.double()[ok].abs() * fi.smallest_normal * fi.eps / ulp
    # Measured on CPU (torch 2.14.1, 2026-11-26, this grid and a dense one, beta up to 100):
    # at most 3 ulp beyond native's own error (float32, float64), 1 ulp (float16, bfloat16).
    worst = (err_lean - err_native - subnormal).max().item()
    assert worst <= 3, f"{name} {dtype}: lean gradient {worst:.2f} ulp further from exact than native"


@pytest.mark.parametrize("beta", [0.5, 1.0, 3.0, -2.0])
@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.1, 1.0, 5.0, 20.0])
def test_softplus_gradcheck_gradgradcheck(beta, threshold):
    x = torch.linspace(-6, 6, 61, dtype=torch.float64)
    x = x[(x * beta - threshold).abs() > 1e-3]  # finite differences cannot straddle the branch switch
    x.requires_grad_()
    fn = lambda t: lean.softplus(t, beta, threshold)  # noqa: E731
    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))


@pytest.mark.parametrize("op", [lean.sigmoid, lean.logsigmoid], ids=["sigmoid", "logsigmoid"])
def test_gradcheck_gradgradcheck(op):
    x = (torch.linspace(-30, 30, 101, dtype=torch.float64)).requires_grad_()
    assert gradcheck(op, (x,))
    assert gradgradcheck(op, (x,))


def test_second_derivative_matches_native():
    # Hessian-vector products / PINN-style derivatives: d2/dx2 of softplus and logsigmoid.
    x = torch.linspace(-10, 10, 101, dtype=torch.float64, requires_grad=True)
    for ours, theirs in [(lambda t: lean.softplus(t, 2.0, 3.0), lambda t: F.softplus(t, 2.0, 3.0)),
                         (lean.logsigmoid, F.logsigmoid), (lean.sigmoid, torch.sigmoid)]:
        (d1,) = torch.autograd.grad(ours(x).sum(), x, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), x)
        (n1,) = torch.autograd.grad(theirs(x).sum(), x, create_graph=True)
        (n2,) = torch.autograd.grad(n1.sum(), x)
        torch.testing.assert_close(d2, n2, rtol=1e-12, atol=1e-15)


def test_ambiguous_branch_near_threshold_pytorch_55587():
    # beta*x = 0.8208 <= threshold 1, but beta*y = 1.19 > 1: an output-only test says slope 1.
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([0.2736], dtype=dtype)
        g = _grad(lean.softplus, x, torch.ones_like(x), 3.0, 1.0)
        expected = torch.sigmoid(torch.tensor(3 * 0.2736, dtype=torch.float64)).item()
        assert g.item() == pytest.approx(expected, rel=1e-6)
        assert g.item() < 0.7


def test_float64_default_threshold_is_exact_just_below_20():
    # In float64, log1p(exp(20)) = 20 + 2e-9 > 20: without a branch record the slope would be 1.0.
    x = torch.tensor([20.0, 19.999999999], dtype=torch.float64)
    g_lean = _grad(lean.softplus, x, torch.ones_like(x), 1.0, 20.0)
    g_native = _grad(F.softplus, x, torch.ones_like(x), 1.0, 20.0)
    assert (g_native < 1).all()
    torch.testing.assert_close(g_lean, g_native, rtol=2 * torch.finfo(torch.float64).eps, atol=0)


def _saved(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize(
    "dtype,beta,threshold,mask",
    [(torch.float32, 1.0, 20.0, False), (torch.float16, 1.0, 20.0, False), (torch.bfloat16, 1.0, 20.0, False),
     (torch.float64, 1.0, 20.0, True), (torch.float32, 3.0, 1.0, True), (torch.float64, 1.0, 40.0, False)],
)
def test_softplus_saves_output_and_mask_only_when_needed(dtype, beta, threshold, mask):
    assert softplus_needs_branch_mask(dtype, threshold) is mask
    x = torch.randn(64, dtype=dtype, requires_grad=True)
    y, saved = _saved(lambda: lean.softplus(x, beta, threshold))
    assert not any(s is x for s in saved), "the input must not be saved"
    assert any(s is y or s.data_ptr() == y.data_ptr() for s in saved), "the output must be saved"
    masks = [s for s in saved if s.dtype == torch.bool]
    assert len(masks) == int(mask) and len(saved) == 1 + int(mask)


@pytest.mark.parametrize("op,args", [(lean.sigmoid, ()), (lean.logsigmoid, ())], ids=["sigmoid", "logsigmoid"])
def test_saves_only_output(op, args):
    x = torch.randn(64, requires_grad=True)
    y, saved = _saved(lambda: op(x, *args))
    assert len(saved) == 1 and saved[0].data_ptr() == y.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,op,native,args", CASES, ids=IDS)
def test_plain_and_create_graph_backward_agree_bitwise_and_leave_inputs_alone(name, op, native, args, dtype):
    # The plain backward takes an in-place path; create_graph=True a differentiable one.
    x = _inputs(dtype, "cpu").requires_grad_()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    g_before = g.clone()
    y = op(x, *args)
    y_before = y.detach().clone()
    (plain,) = torch.autograd.grad(y, x, g, retain_graph=True)
    (graph,) = torch.autograd.grad(y, x, g, create_graph=True)
    assert graph.requires_grad
    assert torch.equal(plain.isnan(), graph.isnan())
    assert torch.equal(plain.nan_to_num(), graph.detach().nan_to_num())
    # Neither the incoming gradient nor the saved output was written to.
    assert torch.equal(g, g_before)
    assert torch.equal(y.detach().nan_to_num(), y_before.nan_to_num())


@pytest.mark.parametrize("op,native,args,function",
                         [(lean.softplus, F.softplus, (3.0, 1.0), graph_rewrite.ops.activations._Softplus),
                          (lean.softplus, F.softplus, (), graph_rewrite.ops.activations._Softplus),
                          (lean.sigmoid, torch.sigmoid, (), graph_rewrite.ops.activations._Sigmoid),
                          (lean.logsigmoid, F.logsigmoid, (), graph_rewrite.ops.activations._LogSigmoid)],
                         ids=["softplus", "softplus_defaults", "sigmoid", "logsigmoid"])
def test_without_a_graph_to_record_the_native_kernel_runs_alone(op, native, args, function, monkeypatch):
    # The Python kernel; test_cpp_kernels.py holds the C++ kernel to the same.
    op = python_kernel(op)
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    y = op(x, *args)  # with the schema's defaults left out too
    assert type(y.grad_fn).__name__ == f"{function.__name__}Backward"
    torch.testing.assert_close(y, native(x, *args), rtol=0, atol=0)

    def no_function(*a):
        raise AssertionError("the autograd.Function ran without a graph to record")

    monkeypatch.setattr(function, "apply", no_function)
    with torch.no_grad():
        y, saved = _saved(lambda: op(x, *args))
    assert y.grad_fn is None and not saved
    y, saved = _saved(lambda: op(x.detach(), *args))
    assert y.grad_fn is None and not saved
    with torch.inference_mode():
        y = op(x, *args)
    torch.testing.assert_close(y, native(x.detach(), *args), rtol=0, atol=0)


@pytest.mark.parametrize("op,native_name,args", [(lean.softplus, "softplus", (2.0, 5.0)), (lean.sigmoid, "sigmoid", ()),
                                                 (lean.logsigmoid, "log_sigmoid_forward", ())],
                         ids=["softplus", "sigmoid", "logsigmoid"])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_dispatch_modes_see_the_op_not_its_native_kernel(op, native_name, args, requires_grad):
    # Tracers below autograd (make_fx, export's decompositions) are dispatch modes or
    # tensor subclasses: they must record one graph_rewrite node.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    x = torch.randn(16, requires_grad=requires_grad)
    with Record() as rec:
        y = op(x, *args)
    assert f"graph_rewrite::{op._qualified_op_name.split('::')[1]}" in rec.seen, rec.seen
    assert f"aten::{native_name}" not in rec.seen, rec.seen
    assert (y.grad_fn is not None) == requires_grad


def test_chain_rule_uses_incoming_gradient_mxnet_seed():
    # shared/seeds/001: z = y*y must give dz/dx = 2y * y(1-y), not y(1-y).
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = lean.sigmoid(x)
    (y * y).sum().backward()
    s = torch.sigmoid(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(x.grad.double(), 2 * s * s * (1 - s), rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, torch.tensor([0.28746966, 0.18495613, 0.08606823]), rtol=1e-6, atol=0)


def test_expm1_keeps_tiny_slopes():
    x = torch.tensor([-30.0, -60.0, -80.0])
    g = _grad(lean.softplus, x, torch.ones_like(x), 1.0, 20.0)
    expected = torch.sigmoid(x.double())
    assert (g > 0).all()
    torch.testing.assert_close(g.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("beta", [0.0, math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("shape", [(5,), (0, 3)], ids=["5", "empty"])
def test_softplus_beta_without_a_lean_backward_behaves_like_native(beta, shape):
    # The output cannot carry the slope at these betas; native still returns values
    # (inf/nan) and gradients, so the op does too: the input is kept, as native keeps it.
    x = torch.linspace(-3, 3, math.prod(shape), dtype=torch.float64).reshape(shape)
    expected = F.softplus(x, beta, 20.0)
    for make in (lambda: x, lambda: x.requires_grad_(False)):
        torch.testing.assert_close(lean.softplus(make(), beta, 20.0), expected, rtol=0, atol=0, equal_nan=True)
    with torch.no_grad():
        torch.testing.assert_close(lean.softplus(x.requires_grad_(), beta, 20.0), expected, rtol=0, atol=0, equal_nan=True)
    g = torch.ones(shape, dtype=torch.float64)
    torch.testing.assert_close(_grad(lean.softplus, x, g, beta, 20.0), _grad(F.softplus, x, g, beta, 20.0),
                               rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name,op,native,args", CASES, ids=IDS)
@pytest.mark.parametrize("layout", ["x_transposed", "grad_transposed", "x_sliced", "grad_expanded"])
def test_gradient_takes_the_upstream_gradients_strides_like_native(name, op, native, args, layout):
    base = torch.randn(6, 8, dtype=torch.float64)
    x = {"x_transposed": base.t().contiguous().t(), "x_sliced": base[:, ::2]}.get(layout, base)
    g = torch.randn(x.shape, dtype=torch.float64)
    if layout == "grad_transposed":
        g = g.t().contiguous().t()
    elif layout == "grad_expanded":  # what y.sum().backward() sends
        g = torch.randn(1, 1, dtype=torch.float64).expand(x.shape)
    ours, theirs = _grad(op, x, g, *args), _grad(native, x, g, *args)
    assert ours.stride() == theirs.stride()
    torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize(
    "make",
    [lambda d, dt: torch.randn(3, 5, device=d, dtype=dt),
     lambda d, dt: torch.randn(0, 4, device=d, dtype=dt),
     lambda d, dt: torch.randn(6, 8, device=d, dtype=dt)[:, ::2],
     lambda d, dt: torch.randn(2, 3, 4, 5, device=d, dtype=dt).to(memory_format=torch.channels_last)],
    ids=["contiguous", "empty", "strided", "channels_last"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("op,args", [(graph_rewrite.ops.softplus, (2.0, 1.0)), (graph_rewrite.ops.softplus, (1.0, 20.0)),
                                     (graph_rewrite.ops.sigmoid, ()), (graph_rewrite.ops.logsigmoid, ())],
                         ids=["softplus_b2_t1", "softplus", "sigmoid", "logsigmoid"])
def test_opcheck_and_layouts(op, args, make, dtype, device):
    x = make(device, dtype).requires_grad_()
    torch.library.opcheck(op, (x, *args))
    y = op(x, *args)
    assert y.shape == x.shape and y.stride() == op.default(x.detach(), *args).stride()
    if x.numel():
        y.sum().backward()
        assert x.grad.shape == x.shape


# ------------------------------------------------------------------ slopes at the extremes
def _slope_reference(name, x, beta=1.0, threshold=20.0):
    """d/dx (50 digits, rounded once to float64): softplus's branch as native takes it."""
    mpmath.mp.dps = 50
    out = []
    for xi in x.double().tolist():
        X = mpmath.mpf(xi)
        if name == "softplus":
            out.append(1.0 if float(x.new_tensor(xi).float()) * beta > threshold else float(1 / (1 + mpmath.exp(-beta * X))))
        else:
            out.append(float(1 / (1 + mpmath.exp(X))))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scale", [1.0, 1024.0, 65504.0], ids=["g1", "g1024", "g65504"])
@pytest.mark.parametrize("dtype,span", [(torch.float16, 30.0), (torch.bfloat16, 110.0), (torch.float32, 110.0)], ids=str)
@pytest.mark.parametrize("name", ["softplus", "logsigmoid"])
def test_loss_scaled_gradients_where_the_output_underflows(name, dtype, span, scale):
    # float16 softplus(x <= -17.3) rounds to 0 (logsigmoid(x >= 17.3) to -0): the output
    # cannot carry the slope, yet g * slope is a normal number under loss scaling.
    x = torch.linspace(-span, span, 4001, dtype=torch.float64).to(dtype)
    g = torch.full_like(x, scale)
    op, native = (lean.softplus, F.softplus) if name == "softplus" else (lean.logsigmoid, F.logsigmoid)
    ref = _slope_reference(name, x) * g.double()  # g as the dtype holds it (bfloat16: 65536)
    ulp = _ulp(ref, dtype)
    err_lean = (_grad(op, x, g).double() - ref).abs() / ulp
    err_native = (_grad(native, x, g).double() - ref).abs() / ulp
    # Measured (CPU, torch 2.14.1): at most 1.0 ulp beyond native anywhere, and at most
    # 1.03 ulp (float16), 0.96 (bfloat16), 1.82 (float32) from exact, where native's
    # logsigmoid is 2040 ulp off (float16, g=65504) and its float32 gradients 3.3e4 ulp
    # (subnormal exp(x) for |x| > 87, times g).
    assert (err_lean - err_native).max().item() <= 1.0 + 1e-9
    assert err_lean.max().item() <= (2.0 if dtype == torch.float32 else 1.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["softplus", "logsigmoid"])
def test_slope_from_a_tiny_output_is_as_good_as_natives_where_cuda_keeps_no_record(name, dtype, device):
    # On CUDA, float32/float64 softplus (beta 1) and logsigmoid keep no record of tiny
    # outputs (the test for them costs a host sync). What makes that safe: the slope
    # derived from the output there is within a subnormal spacing (times |g|) of native's,
    # and native's is that far from exact too. Measured on CPU (torch 2.14.1): exactly 1
    # spacing from native, 1.50 (ours) and 1.23 (native) from the 50-digit slope, float32.
    lo, hi = (86.0, 104.0) if dtype == torch.float32 else (706.0, 746.0)
    x = torch.linspace(lo, hi, 4001, dtype=torch.float64).to(dtype).to(device)
    x = -x if name == "softplus" else x
    native = F.softplus if name == "softplus" else F.logsigmoid
    y = native(x)
    assert (y.abs() < torch.finfo(dtype).tiny).sum() > 1000  # the region is covered
    spacing = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    exact = _slope_reference(name, x.cpu()).to(device)
    for scale in (1.0, 65536.0):
        g = torch.full_like(x, scale)
        want = _grad(native, x, g)
        assert (want != 0).sum() > 1000
        with torch.no_grad():  # the backward's own mode: the plain (or fused) path
            if name == "softplus":
                linear = graph_rewrite.ops.activations._softplus_linear_branch(x, 1.0, 20.0) \
                    if softplus_needs_branch_mask(dtype, 20.0) else None
                got = graph_rewrite.ops.activations.softplus_grad(g, y, 1.0, 20.0, linear)
            else:
                got = graph_rewrite.ops.activations.logsigmoid_grad(g, y)
        if x.is_cuda:  # the op itself takes that path there
            op = (lambda t: lean.softplus(t, 1.0, 20.0)) if name == "softplus" else lean.logsigmoid
            assert torch.equal(_grad(op, x, g), got)
        # (no division by the subnormal spacing: CUDA divides by a scalar through its reciprocal, inf)
        assert (got.double() - want.double()).abs().max() <= 2 * scale * spacing
        err_ours = (got.double() - exact * scale).abs().max()
        err_native = (want.double() - exact * scale).abs().max()
        assert err_ours <= err_native + scale * spacing


def test_float16_softplus_table_of_issue_13():
    # Lean used to give 1.221e-4 (+6%), 6.104e-5 (+44%) and 0 here.
    x = torch.tensor([-16.0, -17.0, -18.0, -20.0, -25.0], dtype=torch.float16)
    g = torch.full_like(x, 1024.0)
    ours = _grad(lean.softplus, x, g).double()
    exact = _slope_reference("softplus", x) * 1024
    torch.testing.assert_close(ours[:3], exact[:3], rtol=2 ** -10, atol=2 ** -24)  # one float16 ulp (or subnormal step)
    torch.testing.assert_close(ours, _grad(F.softplus, x, g).double(), rtol=0, atol=0)  # native's formula there


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,x_tiny", [(lean.softplus, -1e4), (lean.logsigmoid, 1e4)], ids=["softplus", "logsigmoid"])
def test_underflow_record_costs_one_input_element_per_tiny_output(op, x_tiny, dtype):
    x = torch.randn(64, dtype=torch.float64).to(dtype).requires_grad_()
    y, saved = _saved(lambda: op(x))
    assert not any(s.numel() and s.dtype == dtype and s.data_ptr() != y.data_ptr() for s in saved), "no record needed"
    x2 = x.detach().clone()
    x2[[3, 7, 9]] = x_tiny
    x2.requires_grad_()
    y, saved = _saved(lambda: op(x2))
    records = [s for s in saved if s.data_ptr() != y.data_ptr() and s.dtype == dtype]
    assert len(records) == 1 and records[0].shape == (3,) and (records[0] == x_tiny).all()
    assert not any(s is x2 for s in saved)


def _second_derivative_reference(name, x, beta=1.0, threshold=20.0):
    mpmath.mp.dps = 50
    out = []
    for xi in x.double().tolist():
        X = mpmath.mpf(xi)
        if name == "softplus":
            # beta e^(-z)/(1+e^(-z))^2: no 1 - s cancellation in the reference either
            e = mpmath.exp(-beta * X)
            out.append(0.0 if float(x.new_tensor(xi).float()) * beta > threshold else float(beta * e / (1 + e) ** 2))
        else:
            e = mpmath.exp(-X)
            out.append(float(-e / (1 + e) ** 2))
    return torch.tensor(out, dtype=torch.float64)


def _second_derivative(fn, x):
    x = x.detach().requires_grad_()
    (d1,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x)
    return d2


@pytest.mark.parametrize("dtype,span,bound", [(torch.float32, 80.0, 1e-4), (torch.float64, 700.0, 1e-10)], ids=str)
@pytest.mark.parametrize("name,args", [("softplus", (1.0, 20.0)), ("softplus", (3.0, 1.0)), ("softplus", (-2.0, 5.0)),
                                       ("logsigmoid", ())], ids=["softplus", "softplus_b3_t1", "softplus_bneg2_t5", "logsigmoid"])
def test_second_derivatives_against_50_digit_references_on_both_sides(name, args, dtype, span, bound):
    # Native's is 0 for x >= 20 (float32) where the exact value is ~1e-9; expm1's
    # backward (result + 1) gave the lean op the mirror image for logsigmoid at x <= -20.
    x = torch.cat([torch.linspace(-span, span, 2001, dtype=torch.float64),
                   torch.tensor([-40.0, -20.0, -10.0, 10.0, 19.99, 20.0, 40.0], dtype=torch.float64)]).to(dtype)
    op = getattr(lean, name)
    ref = _second_derivative_reference(name, x, *args)
    ours = _second_derivative(lambda t: op(t, *args), x).double()
    normal = ref.abs() >= torch.finfo(dtype).tiny  # relative error means something
    rel = ((ours - ref).abs() / ref.abs())[normal]
    # Measured (CPU, torch 2.14.1): 3.9e-6 float32, 5.7e-14 float64 (both at beta=3, x << 0).
    assert rel.max().item() <= bound, f"x={x[normal][rel.argmax()].item()}"
    assert (ours[ref == 0] == 0).all()
    if name == "logsigmoid" or args == (1.0, 20.0):  # and native is not this good
        native = F.logsigmoid if name == "logsigmoid" else F.softplus
        theirs = _second_derivative(lambda t: native(t, *args), x).double()
        assert ((theirs - ref).abs() / ref.abs())[normal].max().item() > 0.5


# ------------------------------------------------------------------ torch.func, forward AD
FUNC_CASES = [("softplus", lambda t: lean.softplus(t, 2.0, 3.0), lambda t: F.softplus(t, 2.0, 3.0)),
              ("softplus_defaults", lean.softplus, F.softplus),
              ("sigmoid", lean.sigmoid, torch.sigmoid),
              ("logsigmoid", lean.logsigmoid, F.logsigmoid)]
FUNC_IDS = [c[0] for c in FUNC_CASES]
_total = lambda f: lambda t: f(t).sum()  # noqa: E731
TRANSFORMS = {
    "grad": lambda f: torch.func.grad(_total(f)),
    "vjp": lambda f: lambda t: torch.func.vjp(f, t)[1](torch.linspace(-1, 2, t.numel(), dtype=t.dtype).view(t.shape))[0],
    "jacrev": lambda f: torch.func.jacrev(f),
    "jacfwd": lambda f: torch.func.jacfwd(f),
    "hessian": lambda f: torch.func.hessian(_total(f)),
    "vmap_grad": lambda f: torch.func.vmap(torch.func.grad(_total(f))),
    "vmap": lambda f: torch.func.vmap(f),
    "jvp": lambda f: lambda t: torch.func.jvp(f, (t,), (torch.ones_like(t),))[1],
}


def _assert_close_rel(ours, theirs, rtol=1e-10):
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=1e-300, equal_nan=True)


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("name,op,native", FUNC_CASES, ids=FUNC_IDS)
def test_torch_func_transforms_match_native(name, op, native, transform):
    # Second order: where native's own second derivative is accurate (|x| <~ 12; the
    # extremes are tested against 50-digit references above).
    span = 12.0 if transform in ("hessian", "jacfwd") else 30.0
    x = torch.cat([torch.linspace(-span, span, 23, dtype=torch.float64), torch.tensor([-745.0, 2.9, 1.51])])
    if transform in ("vmap", "vmap_grad"):
        x = x.view(2, 13)
    _assert_close_rel(TRANSFORMS[transform](op)(x), TRANSFORMS[transform](native)(x))


@pytest.mark.parametrize("name,op,native", FUNC_CASES, ids=FUNC_IDS)
def test_forward_ad_and_forward_over_reverse_match_native(name, op, native):
    import torch.autograd.forward_ad as fwAD

    # Not on softplus(2, 3)'s branch switch (x = 1.5), where native's forward-over-reverse
    # says 0 and its double backward does not; |x| <= 12 where native's second order is accurate.
    x = torch.linspace(-12, 12, 40, dtype=torch.float64)
    t = torch.linspace(-1, 1, 40, dtype=torch.float64)
    results = []
    for fn in (op, native):
        primal = x.clone().requires_grad_()
        with fwAD.dual_level():
            dual = fwAD.make_dual(primal, t)
            y = fn(dual)
            tangent = fwAD.unpack_dual(y).tangent
            (g,) = torch.autograd.grad(y, dual, torch.ones_like(x), create_graph=True)
            results.append((fwAD.unpack_dual(y).primal.detach(), tangent, fwAD.unpack_dual(g).tangent))
        (gx,) = torch.autograd.grad(y.sum(), primal)  # reverse mode through the dual level's graph
        results[-1] += (gx,)
    for ours, theirs in zip(*results):
        _assert_close_rel(ours, theirs)


@pytest.mark.parametrize("name,op,native", FUNC_CASES, ids=FUNC_IDS)
def test_gradcheck_forward_ad_and_batched(name, op, native):
    x = torch.linspace(-8, 8, 33, dtype=torch.float64)
    x = x[(x * 2 - 3).abs() > 1e-3].requires_grad_()  # away from softplus(2, 3)'s branch switch
    # check_batched_grad runs the deprecated torch._vmap_internals, whose batched tensors no
    # public check tells from plain ones (the plain backward writes in place); torch.func's
    # vmap over backward is covered by jacrev and vmap(grad) above.
    assert gradcheck(op, (x,), check_forward_ad=True, check_batched_forward_grad=True, fast_mode=True)
    assert gradgradcheck(op, (x,), check_fwd_over_rev=True, check_rev_over_rev=True, fast_mode=True)


def test_eager_calls_keep_the_fast_function_outside_transforms():
    # The setup_context Functions cost more per call: only transforms and dual levels take them.
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(8, requires_grad=True)
    softplus, logsigmoid = python_kernel(lean.softplus), python_kernel(lean.logsigmoid)  # the C++ kernels defer to these
    assert type(softplus(x).grad_fn).__name__ == "_SoftplusBackward"
    with fwAD.dual_level():
        assert type(softplus(x).grad_fn).__name__ == "_SoftplusTransformsBackward"
        assert type(lean.softplus(x).grad_fn).__name__ == "_SoftplusTransformsBackward"  # the public op too
    assert type(logsigmoid(x).grad_fn).__name__ == "_LogSigmoidBackward"


def test_sigmoid_transforms_on_complex_inputs_match_native():
    # sigmoid_backward conjugates its slope; the jvp must conjugate around it, as native's does.
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(7, dtype=torch.complex128, generator=gen)
    t = torch.randn(7, dtype=torch.complex128, generator=gen)
    ours = torch.func.jvp(lean.sigmoid, (x,), (t,))[1]
    theirs = torch.func.jvp(torch.sigmoid, (x,), (t,))[1]
    _assert_close_rel(ours, theirs)
    _assert_close_rel(torch.func.vjp(lean.sigmoid, x)[1](t)[0], torch.func.vjp(torch.sigmoid, x)[1](t)[0])


class _EveryOpWithoutTransforms(torch.nn.Module):
    """Once optimized: recompute_linear, norm_act, recompute_conv, recompute_mul, hardtanh
    (ReLU6) and leaky_relu, the ops without a transform Function of their own."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(6, 8), torch.nn.Linear(8, 4 * 5 * 5)
        self.conv1, self.bn, self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 3, 1)
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, 3).view(3, 1, 1))

    def forward(self, x):
        h = self.fc2(F.gelu(self.fc1(x))).view(-1, 4, 5, 5)
        h = self.conv2(F.silu(self.bn(self.conv1(h))))
        return F.leaky_relu(F.relu6(F.silu(h) * self.scale), 0.1)


def test_rewritten_models_under_torch_func_match_native():
    # Per-sample gradients (vmap over grad of functional_call, as Opacus-style code does), jacrev,
    # jvp and forward AD through every op that runs its native calls under transforms.
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    model = _EveryOpWithoutTransforms().double().eval()
    lean = graph_rewrite.optimize(model)
    ops = set(lean.rewrite_report.counts())
    assert {"graph_rewrite.recompute_linear", "graph_rewrite.norm_act", "graph_rewrite.recompute_conv",
            "graph_rewrite.recompute_mul", "graph_rewrite.relu6", "graph_rewrite.leaky_relu"} <= ops, ops
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x = torch.randn(3, 6, dtype=torch.float64)
    t = torch.randn(3, 6, dtype=torch.float64)

    def figures(net):
        def loss(p, xi):
            return torch.func.functional_call(net, {**p, **buffers}, (xi.unsqueeze(0),)).square().sum()
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
        f = lambda xi: torch.func.functional_call(net, {**params, **buffers}, (xi,))  # noqa: E731
        jac = torch.func.jacrev(f)(x[:1])
        jvp = torch.func.jvp(f, (x,), (t,))[1]
        with fwAD.dual_level():
            dual = fwAD.unpack_dual(net(fwAD.make_dual(x, t))).tangent
        return [*per_sample.values(), jac, jvp, dual]

    for ours, theirs in zip(figures(lean), figures(model), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
