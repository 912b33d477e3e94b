"""The lean ops against native PyTorch and float64 references."""
import math

import mpmath

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import graph_rewrite.ops
from graph_rewrite.ops import softplus_needs_branch_mask

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
    # Measured on CPU (torch 2.15): at most 2.5 ulp beyond native's own error.
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


def test_rejects_beta_it_cannot_serve():
    for beta in (0.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="beta"):
            lean.softplus(torch.ones(2), beta, 20.0)


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
