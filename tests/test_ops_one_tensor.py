"""The one-tensor ops against native PyTorch: output-derived activations and recompute consumers."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import graph_rewrite.ops
from graph_rewrite.ops.recompute import ACTIVATIONS

lean = torch.ops.graph_rewrite
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# (name, lean op, native op, args): bounds and slopes include 0, negative bounds and the defaults.
OUTPUT_CASES = [
    ("relu6", lean.hardtanh, F.hardtanh, (0.0, 6.0)),
    ("hardtanh", lean.hardtanh, F.hardtanh, (-1.0, 1.0)),
    ("hardtanh_-2.5_0.5", lean.hardtanh, F.hardtanh, (-2.5, 0.5)),
    ("leaky_relu", lean.leaky_relu, F.leaky_relu, (0.01,)),
    ("leaky_relu_0.2", lean.leaky_relu, F.leaky_relu, (0.2,)),
    ("leaky_relu_0", lean.leaky_relu, F.leaky_relu, (0.0,)),
    ("leaky_relu_3", lean.leaky_relu, F.leaky_relu, (3.0,)),
]


def _grid(dtype, args):
    """Every bound exactly, its neighbours one ulp away, ±0, ±inf, NaN and a random spread."""
    base = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-30, -1e-30, 1e30, -1e30]
    x = torch.tensor(base + [float(a) for a in args] + [-float(a) for a in args], dtype=dtype)
    near = torch.cat([torch.nextafter(x, torch.full_like(x, math.inf)), torch.nextafter(x, torch.full_like(x, -math.inf))])
    gen = torch.Generator().manual_seed(0)
    spread = (torch.randn(500, generator=gen, dtype=torch.float64) * 5).to(dtype)
    return torch.cat([x, near, spread, torch.linspace(-8, 8, 321, dtype=dtype)])


def _forward_and_grad(fn, x, g, args):
    x = x.detach().requires_grad_()
    y = fn(x, *args)
    (gx,) = torch.autograd.grad(y, x, g)
    return y, gx


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,op,native,args", OUTPUT_CASES, ids=[c[0] for c in OUTPUT_CASES])
def test_output_derived_bitwise_equal_to_native(name, op, native, args, dtype):
    x = _grid(dtype, args)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y_ref, gx_ref = _forward_and_grad(native, x, g, args)
    y, gx = _forward_and_grad(op, x, g, args)
    assert torch.equal(y.isnan(), y_ref.isnan()) and torch.equal(y.nan_to_num(), y_ref.nan_to_num())
    assert torch.equal(gx.isnan(), gx_ref.isnan()) and torch.equal(gx.nan_to_num(), gx_ref.nan_to_num())


@pytest.mark.parametrize("name,op,native,args", OUTPUT_CASES, ids=[c[0] for c in OUTPUT_CASES])
def test_output_derived_gradcheck(name, op, native, args):
    # Away from the kinks, where the derivative is not defined.
    x = torch.linspace(-7.1, 7.3, 37, dtype=torch.float64)
    x = x[(x - args[0]).abs() > 1e-3]
    if len(args) == 2:
        x = x[(x - args[1]).abs() > 1e-3]
    x = x[x.abs() > 1e-3].requires_grad_()
    assert gradcheck(lambda t: op(t, *args), (x,))
    assert gradgradcheck(lambda t: op(t, *args), (x,))


def test_output_derived_keeps_only_the_output():
    x = torch.randn(64, requires_grad=True) * 4
    for op, args in ((lean.hardtanh, (0.0, 6.0)), (lean.leaky_relu, (0.1,))):
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
            y = op(x, *args)
        assert len(seen) == 1 and seen[0].data_ptr() == y.data_ptr()


def test_output_derived_refuses_what_it_cannot_serve():
    with pytest.raises(Exception, match="min_val < max_val"):
        lean.hardtanh(torch.randn(3), 1.0, 1.0)
    with pytest.raises(Exception, match="negative_slope >= 0"):
        lean.leaky_relu(torch.randn(3), -0.1)


def test_hardsigmoid_output_cannot_tell_its_slope():
    # Why there is no output-saving hardsigmoid: just below 3, x + 3 rounds to 6, so the
    # output is exactly 1 (where x >= 3 also gives 1) while native's slope there is 1/6.
    x = torch.tensor([3.0 - 2.0 ** -22, 3.0], requires_grad=True)
    y = F.hardsigmoid(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert y[0] == y[1] == 1.0
    assert gx[0] == 1 / 6 and gx[1] == 0


# ------------------------------------------------------------------ recompute consumers
def _f64(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).requires_grad_()


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_recompute_linear_gradcheck(act):
    x, w, b = _f64(3, 5), _f64(4, 5, seed=1), _f64(4, seed=2)
    f = lambda x, w, b: lean.recompute_linear(x, ACTIVATIONS[act](x, 1.3), act, w, b, None, 1.3)
    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


def test_recompute_linear_gated_gradcheck():
    x, u, w = _f64(2, 3, 5), _f64(2, 3, 5, seed=3), _f64(4, 5, seed=1)
    f = lambda x, u, w: lean.recompute_linear(x, F.silu(x) * u, "silu", w, None, u)
    assert gradcheck(f, (x, u, w))
    assert gradgradcheck(f, (x, u, w))


@pytest.mark.parametrize("affine", [True, False])
def test_recompute_linear_layer_norm_gradcheck(affine):
    x, w, b = _f64(2, 3, 5), _f64(4, 5, seed=1), _f64(4, seed=2)
    lw, lb = (_f64(5, seed=3), _f64(5, seed=4)) if affine else (None, None)
    f = lambda x, w, b, *ln: lean.recompute_linear(
        x, F.layer_norm(x, [5], *ln, eps=1e-3), "layer_norm", w, b, None, 1e-3, [5], *ln)
    args = (x, w, b, lw, lb) if affine else (x, w, b)
    assert gradcheck(f, args)
    assert gradgradcheck(f, args)


@pytest.mark.parametrize("dims,groups,unbatched", [(1, 1, False), (2, 1, False), (2, 3, False), (2, 1, True), (3, 1, False)])
def test_recompute_conv_gradcheck(dims, groups, unbatched):
    size = (2, 6) + (5,) * dims
    x, w, b = _f64(*size), _f64(6, 6 // groups, *(3,) * dims, seed=1), _f64(6, seed=2)
    if unbatched:
        x = x[0].detach().requires_grad_()
    n = [1] * dims
    f = lambda x, w, b: lean.recompute_conv(x, F.hardswish(x), "hardswish", w, b, [2] * dims, n, n, groups)
    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


def test_recompute_mul_gradcheck_with_broadcast():
    x, s = _f64(2, 3, 4, 4), _f64(2, 3, 1, 1, seed=1)
    f = lambda x, s: lean.recompute_mul(x, F.gelu(x), "gelu", s)
    assert gradcheck(f, (x, s))
    assert gradgradcheck(f, (x, s))


def _native_and_lean(native, lean_call, inputs, g):
    return torch.autograd.grad(native(*inputs), inputs, g), torch.autograd.grad(lean_call(*inputs), inputs, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_recompute_consumers_bitwise_equal_to_native(dtype):
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype).requires_grad_()
    cases = [
        ((r(2, 7, 16), r(12, 16), r(12)), lambda x, w, b: F.linear(F.gelu(x, approximate="tanh"), w, b),
         lambda x, w, b: lean.recompute_linear(x, F.gelu(x, approximate="tanh"), "gelu_tanh", w, b)),
        ((r(5, 16), r(12, 16), r(12)), lambda x, w, b: F.linear(F.silu(x), w, b),
         lambda x, w, b: lean.recompute_linear(x, F.silu(x), "silu", w, b)),
        ((r(2, 4, 8, 8), r(4, 1, 3, 3), r(4)), lambda x, w, b: F.conv2d(F.silu(x), w, b, 1, 1, 1, 4),
         lambda x, w, b: lean.recompute_conv(x, F.silu(x), "silu", w, b, [1, 1], [1, 1], [1, 1], 4)),
        ((r(2, 4, 8, 8), r(2, 4, 1, 1)), lambda x, s: s * F.mish(x),
         lambda x, s: lean.recompute_mul(x, F.mish(x), "mish", s)),
        ((r(3, 16), r(3, 16), r(5, 16)), lambda x, u, w: F.linear(F.silu(x) * u, w),
         lambda x, u, w: lean.recompute_linear(x, F.silu(x) * u, "silu", w, None, u)),
        ((r(2, 7, 16), r(16), r(16), r(12, 16), r(12)),
         lambda x, lw, lb, w, b: F.linear(F.layer_norm(x, [16], lw, lb, 1e-6), w, b),
         lambda x, lw, lb, w, b: lean.recompute_linear(x, F.layer_norm(x, [16], lw, lb, 1e-6), "layer_norm", w, b,
                                                       None, 1e-6, [16], lw, lb)),
    ]
    for inputs, native, lean_call in cases:
        out = native(*inputs)
        g = torch.randn(out.shape, generator=gen).to(dtype)
        ref, got = _native_and_lean(native, lean_call, inputs, g)
        for a, b in zip(got, ref):
            assert torch.equal(a, b)


def test_recompute_consumer_keeps_x_not_h():
    x, w = torch.randn(8, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    h = F.gelu(x)
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        lean.recompute_linear(x, h, "gelu", w, None)
    ptrs = {t.data_ptr() for t in seen}
    assert x.data_ptr() in ptrs and h.data_ptr() not in ptrs


@pytest.mark.parametrize("call", ["linear", "linear_layer_norm", "linear_number_gate", "conv", "mul", "mul_number",
                                  "hardtanh", "leaky_relu"])
def test_opcheck(call):
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    lw, lb = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    args = {
        # opcheck takes one overload: the ops with a number overload are named by overload.
        "linear": (lean.recompute_linear.default, (x, F.silu(x).detach(), "silu", torch.randn(4, 5, requires_grad=True),
                                                   None)),
        "linear_number_gate": (lean.recompute_linear.ScalarGate, (x, F.silu(x).detach(), "silu",
                                                                  torch.randn(4, 5, requires_grad=True), None, 2.0)),
        "linear_layer_norm": (lean.recompute_linear.default, (x, F.layer_norm(x, [5], lw, lb).detach(), "layer_norm",
                                                      torch.randn(4, 5, requires_grad=True), None, None, 1e-5, [5],
                                                      lw, lb)),
        "conv": (lean.recompute_conv, (x, F.silu(x).detach(), "silu", w, None, [1, 1], [0, 0], [1, 1], 1)),
        "mul": (lean.recompute_mul.default, (x, F.silu(x).detach(), "silu", torch.randn(2, 3, 1, 1, requires_grad=True))),
        "mul_number": (lean.recompute_mul.Scalar, (x, F.silu(x).detach(), "silu", 2.5)),
        "hardtanh": (lean.hardtanh, (x, 0.0, 6.0)),
        "leaky_relu": (lean.leaky_relu, (x, 0.1)),
    }[call]
    torch.library.opcheck(*args)


# ------------------------------------------------------------------ kind "norm": norm_act
def _bn_chain(train, dtype=torch.float64, channels_last=False, seed=0):
    """z -> BatchNorm2d -> (norm_act | SiLU) -> Conv: the lean and the native call, sharing weights."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    z = r(2, 4, 6, 6)
    if channels_last:
        z = z.to(memory_format=torch.channels_last)
    z.requires_grad_()
    w, b = (r(4) * 0.3 + 1).requires_grad_(), r(4).requires_grad_()
    mean, var = r(4), r(4).abs() + 0.5
    cw = r(5, 4, 3, 3).requires_grad_()

    def native(z, w, b, cw, stats=None):
        rm, rv = stats or (mean.clone(), var.clone())
        return F.conv2d(F.silu(F.batch_norm(z, rm, rv, w, b, train, 0.1, 1e-3)), cw, None, 1, 1)

    def lean_call(z, w, b, cw, stats=None):
        rm, rv = stats or (mean.clone(), var.clone())
        h = F.batch_norm(z, rm, rv, w, b, train, 0.1, 1e-3)
        a = lean.norm_act(h, z, "silu", w, b, rm, rv, 1e-3)
        return lean.recompute_conv(h, a, "silu", cw, None, [1, 1], [1, 1], [1, 1], 1)

    return (z, w, b, cw), native, lean_call, (mean, var)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_norm_act_gradcheck(train):
    inputs, _, lean_call, _ = _bn_chain(train)
    assert gradcheck(lean_call, inputs)
    assert gradgradcheck(lean_call, inputs)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_norm_act_bitwise_equal_to_native_and_keeps_z_not_h(dtype, train, channels_last):
    inputs, native, lean_call, (mean, var) = _bn_chain(train, dtype, channels_last)
    g = torch.randn(2, 5, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9)).to(dtype)
    ref, got = _native_and_lean(native, lean_call, inputs, g)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    # What autograd keeps: z (BatchNorm keeps it), never BatchNorm's output h or silu(h).
    stats = (mean.clone(), var.clone())
    h = F.batch_norm(inputs[0], *stats, inputs[1], inputs[2], train, 0.1, 1e-3).detach()
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        lean_call(*inputs, stats=(mean.clone(), var.clone()))
    kept = [t for t in seen if t.shape == h.shape]
    assert kept and all(t.data_ptr() == inputs[0].data_ptr() for t in kept)


# Shapes with vector tails (7, 13 and 19 are no multiple of 8), one element per channel, 1-D to 3-D.
_BN_SHAPES = [((2, 5, 3, 7), None), ((3, 19, 4, 5), torch.channels_last), ((8, 13), None), ((2, 9, 13), None),
              ((2, 3, 2, 3, 5), torch.channels_last_3d), ((4, 24, 9, 9), torch.channels_last), ((4, 24, 9, 9), None),
              ((1, 6, 1, 1), None), ((2, 40, 17, 17), torch.channels_last)]


def _rebuilds_from_statistics(dtype):
    from graph_rewrite.ops.recompute import _addcmul_is_batch_norm

    if not _addcmul_is_batch_norm(dtype):
        # x86-64 builds (CI's) fuse both alike; elsewhere backward recomputes, tested above.
        assert torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512")
        pytest.skip("this build's addcmul does not round as its BatchNorm kernel does")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_batch_norm_rebuilt_from_kept_statistics_is_the_kernels_bits(dtype, affine):
    # Against the kernel itself, over random values much wider than the one-time check's.
    from graph_rewrite.ops.recompute import _batch_norm_from_stats

    _rebuilds_from_statistics(dtype)
    gen = torch.Generator().manual_seed(3)
    for shape, layout in _BN_SHAPES:
        z = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 50 - 7).to(dtype)
        z = z if layout is None else z.contiguous(memory_format=layout)
        c = shape[1]
        w, b = (torch.randn(c, generator=gen, dtype=dtype), torch.randn(c, generator=gen, dtype=dtype)) if affine \
            else (None, None)
        h, mean, invstd = torch.ops.aten.native_batch_norm(z, w, b, None, None, True, 0.0, 1e-5)
        assert torch.equal(_batch_norm_from_stats(z, w, b, mean, invstd), h), (shape, layout)


class _Calls(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("threads", [(1, 2), (2, 1)], ids=["forward_1_backward_2", "forward_2_backward_1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_norm_act_backward_does_not_reduce_z_again_and_is_bitwise_native(dtype, threads):
    """In training on CPU, backward makes h from the batch mean and invstd BatchNorm keeps: no
    second pass of statistics over z, native's gradients bit for bit, thread counts changed between
    forward and backward (a channels-last reduction depends on them; the rebuild does not)."""
    _rebuilds_from_statistics(dtype)
    before = torch.get_num_threads()
    gen = torch.Generator().manual_seed(5)
    try:
        for shape, layout in _BN_SHAPES:
            if len(shape) != 4 or math.prod(shape) == shape[1]:  # F.batch_norm refuses one value per channel
                continue
            z = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 3 + 1).to(dtype)
            z = (z if layout is None else z.contiguous(memory_format=layout)).requires_grad_()
            c = shape[1]
            w, b = torch.randn(c, generator=gen, dtype=dtype).requires_grad_(), torch.randn(c, dtype=dtype).requires_grad_()
            cw = torch.randn(5, c, 3, 3, generator=gen, dtype=dtype).requires_grad_()
            g = torch.randn(shape[0], 5, *shape[2:], generator=gen, dtype=dtype)
            grads = []
            for lean_call in (False, True):
                torch.set_num_threads(threads[0])
                h = F.batch_norm(z, torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype), w, b, True, 0.1, 1e-5)
                a = lean.norm_act(h, z, "silu", w, b, None, None, 1e-5) if lean_call else F.silu(h)
                y = lean.recompute_conv(h, a, "silu", cw, None, [1, 1], [1, 1], [1, 1], 1) if lean_call \
                    else F.conv2d(a, cw, None, 1, 1)
                torch.set_num_threads(threads[1])
                with _Calls() as calls:
                    grads.append(torch.autograd.grad(y, (z, w, b, cw), g))
            assert torch.ops.aten.native_batch_norm.default not in calls.ops
            for got, want in zip(grads[1], grads[0]):
                assert torch.equal(got, want), (shape, layout)
    finally:
        torch.set_num_threads(before)


def test_norm_act_after_anything_but_batch_norm_keeps_its_input():
    # No BatchNorm node behind h: norm_act keeps h and gives native's gradient.
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    h = x * 2
    g = torch.randn(3, 4, dtype=torch.float64)
    w = torch.ones(4, dtype=torch.float64)
    (got,) = torch.autograd.grad(lean.norm_act(h, x, "gelu", w, None, None, None, 1e-5), x, g)
    (want,) = torch.autograd.grad(F.gelu(x * 2), x, g)
    assert torch.equal(got, want)


def test_norm_act_opcheck():
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    w, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    h = F.batch_norm(z, None, None, w, b, True).detach()
    torch.library.opcheck(lean.norm_act, (h, z, "silu", w, b, None, None, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_activation_backward_table_is_natives_autograd_bit_for_bit(dtype):
    # norm_act's backward calls these kernels directly; autograd calls them for native.
    from graph_rewrite.ops.recompute import ACTIVATION_BACKWARDS

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2000, generator=gen, dtype=torch.float64) * 4).to(dtype).requires_grad_()
    g = torch.randn(2000, generator=gen).to(dtype)
    assert set(ACTIVATION_BACKWARDS) == set(ACTIVATIONS)
    for act in ACTIVATIONS:
        for a in (1.0, 1.3, 0.7):  # CELU's 1/alpha is taken of alpha rounded to float32, as native does
            (want,) = torch.autograd.grad(ACTIVATIONS[act](x, a), x, g)
            assert torch.equal(ACTIVATION_BACKWARDS[act](g, x.detach(), a), want), (act, a)
