"""The C++ Autograd kernels of norm_act and the recompute consumers (csrc/recompute_ops.cpp).

Each op has a twin, ``torch.ops.graph_rewrite._<name>_python``, that runs the Python autograd.Function
(tested against native PyTorch in test_one_tensor.py, test_runtime_kinds.py and the zoo). Here the
C++ kernels must give the twins' bits, and native's where native is the reference: outputs, every
gradient, second derivatives, and the same bytes held, over activations, BatchNorm modes, layouts,
dtypes and thread counts; and hand the Python kernels what they do not serve.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import graph_rewrite
from graph_rewrite.memory import saved_bytes
from graph_rewrite.ops import cpp

ops = torch.ops.graph_rewrite
pytestmark = pytest.mark.skipif(not cpp.active(), reason=f"C++ kernels: {cpp.status()}")

# (recompute.ACTIVATIONS name, act_arg, the native function).
ACTS = [("silu", 0.0, F.silu), ("hardswish", 0.0, F.hardswish), ("gelu", 0.0, F.gelu),
        ("gelu_tanh", 0.0, lambda x: F.gelu(x, approximate="tanh")), ("mish", 0.0, F.mish),
        ("elu", 0.7, lambda x: F.elu(x, 0.7)), ("celu", 1.3, lambda x: F.celu(x, 1.3)), ("selu", 0.0, F.selu)]


def _op(name: str, python: bool):
    return getattr(ops, f"_{name}_python" if python else name)


def _identical(a, b) -> None:
    assert (a is None) == (b is None)
    if a is not None:
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


class Block(nn.Module):
    """BatchNorm -> act -> depthwise convolution, and a squeeze-excitation mul of the same act's
    output: efficientnet_b0's MBConv in small. ``how``: "native", "cpp" or "python" (the twins)."""

    def __init__(self, c=8, act="silu", act_arg=0.0, native_act=F.silu, affine=True, track=True):
        super().__init__()
        self.bn = nn.BatchNorm2d(c, affine=affine, track_running_stats=track)
        self.conv = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.fc = nn.Conv2d(c, c, 1)
        self.act, self.act_arg, self.native_act = act, act_arg, native_act
        with torch.no_grad():  # varied, non-trivial affine parameters
            if affine:
                self.bn.weight.uniform_(0.5, 1.5)
                self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, z, how="cpp"):
        h = self.bn(z)
        if how == "native":
            a = self.native_act(h)
            return self.conv(a) + a * torch.sigmoid(self.fc(a.mean((2, 3), keepdim=True)))
        py = how == "python"
        bn = self.bn
        running = (bn.running_mean, bn.running_var) if bn.track_running_stats else (None, None)
        a = _op("norm_act", py)(h, z, self.act, bn.weight, bn.bias, *running, bn.eps, self.act_arg)
        y = _op("recompute_conv", py)(h, a, self.act, self.conv.weight, None, [1, 1], [1, 1], [1, 1], self.conv.groups,
                                      self.act_arg)
        scale = torch.sigmoid(self.fc(a.mean((2, 3), keepdim=True)))
        return y + _op("recompute_mul", py)(h, a, self.act, scale, self.act_arg)


def _run(block: Block, z: torch.Tensor, how: str, g: torch.Tensor, threads_backward=None):
    """(output, gradients of z and of every parameter, bytes held), from fresh copies of the buffers."""
    block = _copy(block)
    leaf = z.detach().clone().requires_grad_()
    held, y = saved_bytes(lambda: block(leaf, how), exclude=[leaf, *block.parameters(), *block.buffers()])
    if threads_backward is not None:
        before = torch.get_num_threads()
        torch.set_num_threads(threads_backward)
    try:
        grads = torch.autograd.grad(y, [leaf, *block.parameters()], g)
    finally:
        if threads_backward is not None:
            torch.set_num_threads(before)
    return y, grads, held, block


def _copy(block: Block) -> Block:
    import copy
    return copy.deepcopy(block)


def _compare(block, z, g, threads_backward=None):
    y, grads, held, cpp_block = _run(block, z, "cpp", g, threads_backward)
    y_py, grads_py, held_py, py_block = _run(block, z, "python", g, threads_backward)
    _identical(y, y_py)
    for a, b in zip(grads, grads_py):
        _identical(a, b)
    assert held == held_py
    for a, b in zip(cpp_block.buffers(), py_block.buffers()):  # running statistics updated alike
        _identical(a, b)
    y_n, grads_n, held_n, _ = _run(block, z, "native", g, threads_backward)
    _identical(y, y_n)
    for a, b in zip(grads, grads_n):
        _identical(a, b)
    assert held < held_n
    return y


def test_the_cpp_kernels_serve_the_plain_cpu_calls():
    block = Block()
    z = torch.randn(2, 8, 5, 5, requires_grad=True)
    h = block.bn(z)
    a = ops.norm_act(h, z, "silu", block.bn.weight, block.bn.bias, block.bn.running_mean, block.bn.running_var, 1e-5)
    assert a.grad_fn.name() == "torch::autograd::CppNode<graph_rewrite::LeanNormAct>"
    y = ops.recompute_conv(h, a, "silu", block.conv.weight, None, [1, 1], [1, 1], [1, 1], 8)
    assert y.grad_fn.name() == "torch::autograd::CppNode<graph_rewrite::LeanConv>"
    assert ops.recompute_mul(h, a, "silu", torch.rand(2, 8, 1, 1)).grad_fn.name().endswith("LeanMul>")
    x = torch.randn(3, 6, requires_grad=True)
    assert ops.recompute_linear(x, F.gelu(x), "gelu", torch.randn(4, 6)).grad_fn.name().endswith("LeanLinear>")


@pytest.mark.parametrize("act,act_arg,native_act", ACTS, ids=[a[0] for a in ACTS])
def test_bitwise_the_python_kernels_and_native_for_each_activation(act, act_arg, native_act):
    torch.manual_seed(0)
    block = Block(act=act, act_arg=act_arg, native_act=native_act).train()
    z = torch.randn(3, 8, 6, 6) * 3 + 1
    _compare(block, z, torch.randn(3, 8, 6, 6))


@pytest.mark.parametrize("mode", ["train", "eval", "no_running_stats", "no_affine"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_bitwise_over_batch_norm_modes_layouts_and_dtypes(mode, layout, dtype):
    torch.manual_seed(1)
    block = Block(affine=mode != "no_affine", track=mode != "no_running_stats").to(dtype)
    block.train(mode != "eval")
    z = (torch.randn(2, 8, 7, 9) * 2 - 0.5).to(dtype)
    g = torch.randn(2, 8, 7, 9).to(dtype)
    if layout == "channels_last":
        block = block.to(memory_format=torch.channels_last)
        z = z.contiguous(memory_format=torch.channels_last)
    _compare(block, z, g)


@pytest.mark.parametrize("threads", [(1, 2), (2, 1)])
def test_thread_counts_changed_between_forward_and_backward(threads):
    # The BatchNorm output is rebuilt from the kept statistics, not reduced again: no thread-count dependence.
    before = torch.get_num_threads()
    torch.set_num_threads(threads[0])
    try:
        torch.manual_seed(2)
        block = Block(c=16).train().to(memory_format=torch.channels_last)
        z = torch.randn(4, 16, 12, 12).contiguous(memory_format=torch.channels_last)
        _compare(block, z, torch.randn(4, 16, 12, 12), threads_backward=threads[1])
    finally:
        torch.set_num_threads(before)


def test_linear_consumers_plain_gated_and_addmm():
    torch.manual_seed(3)
    x = torch.randn(2, 5, 6)
    gate = torch.randn(2, 5, 6)
    weight, bias = torch.randn(4, 6), torch.randn(4)
    conv1d_weight = torch.randn(6, 4)  # HF Conv1D: (k, n), for addmm on the rows
    for kwargs in ({}, {"gate": gate}, {"addmm": True}):
        out = []
        for py in (False, True):
            leaves = [t.clone().requires_grad_() for t in (x, weight, bias, gate, conv1d_weight)]
            xl, wl, bl, gl, cl = leaves
            h = F.gelu(xl)
            if "gate" in kwargs:
                h = h * gl
            args = (cl, bl) if kwargs.get("addmm") else (wl, bl)
            y = _op("recompute_linear", py)(xl, h, "gelu", *args, **({"gate": gl} if "gate" in kwargs else {}),
                                            **({"addmm": True} if kwargs.get("addmm") else {}))
            if not py:
                assert "LeanLinear" in y.grad_fn.name()
            y2 = y.view(2, 5, -1) if kwargs.get("addmm") else y
            y2 += 1  # in place after it: its output is no view (native's linear returns none either)
            grads = torch.autograd.grad(y2, leaves, torch.ones_like(y2), allow_unused=True)
            out.append((y2, grads))
        _identical(out[0][0], out[1][0])
        for a, b in zip(out[0][1], out[1][1]):
            _identical(a, b)


def test_linear_on_a_transposed_activation_gives_natives_bits():
    # MLP-Mixer's token mixing: a Linear on act(x).transpose(1, 2). at::linear called from the C++
    # kernel rounded otherwise than native's (9.5e-7 apart); the Python kernel serves this layout.
    torch.manual_seed(5)
    x, weight, bias = torch.randn(3, 4, 8), torch.randn(5, 4), torch.randn(5)
    out = []
    for how in ("native", "cpp"):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        xl, wl, bl = leaves
        h = F.gelu(xl).transpose(1, 2)
        y = F.linear(h, wl, bl) if how == "native" else ops.recompute_linear(xl, h, "gelu", wl, bl)
        out.append((y, torch.autograd.grad(y.square().sum(), leaves)))
    _identical(out[1][0], out[0][0])
    for a, b in zip(out[1][1], out[0][1]):
        _identical(a, b)


@pytest.mark.parametrize("dims", [1, 2, 3, "unbatched"])
def test_convolutions_of_each_rank_with_bias_stride_and_dilation(dims):
    torch.manual_seed(4)
    n = 2 if dims == "unbatched" else dims
    shape = (3, 4) + (7,) * n
    x = torch.randn(shape[1:] if dims == "unbatched" else shape)
    weight, bias = torch.randn((6, 2) + (3,) * n), torch.randn(6)
    out = []
    for py in (False, True):
        xl, wl, bl = (t.clone().requires_grad_() for t in (x, weight, bias))
        y = _op("recompute_conv", py)(xl, F.silu(xl), "silu", wl, bl, [2] * n, [1] * n, [2] * n, 2)
        out.append((y, torch.autograd.grad(y, (xl, wl, bl), torch.ones_like(y))))
    _identical(out[0][0], out[1][0])
    for a, b in zip(out[0][1], out[1][1]):
        _identical(a, b)


def test_second_derivatives_and_gradcheck():
    torch.manual_seed(5)
    block = Block(c=3).double().train()
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    fc = block.fc.weight

    def f(z, w, how):
        h = block.bn(z)
        bn = block.bn
        a = _op("norm_act", how == "python")(h, z, "silu", bn.weight, bn.bias, None, None, bn.eps)
        return _op("recompute_conv", how == "python")(h, a, "silu", w, None, [1, 1], [0, 0], [1, 1], 1)

    assert gradcheck(lambda z, w: f(z, w, "cpp"), (z, fc))
    assert gradgradcheck(lambda z, w: f(z, w, "cpp"), (z, fc))
    firsts = []
    for how in ("cpp", "python"):
        y = f(z, fc, how)
        gz, gw = torch.autograd.grad(y, (z, fc), torch.ones_like(y), create_graph=True)
        firsts.append((gz, gw, torch.autograd.grad((gz ** 2).sum() + (gw ** 2).sum(), (z, fc))))
    for a, b in zip(firsts[0][:2] + tuple(firsts[0][2]), firsts[1][:2] + tuple(firsts[1][2])):
        _identical(a, b)


def test_backward_orders_and_partial_gradients():
    torch.manual_seed(6)
    block = Block().train()
    z = torch.randn(2, 8, 5, 5)
    results = []
    for how in ("cpp", "python"):
        b = _copy(block)
        leaf = z.clone().requires_grad_()
        h = b.bn(leaf)
        bn = b.bn
        a = _op("norm_act", how == "python")(h, leaf, "silu", bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                            bn.eps)
        y = _op("recompute_conv", how == "python")(h, a, "silu", b.conv.weight, None, [1, 1], [1, 1], [1, 1], 8)
        # The activation's own backward first (retained), then the consumer's, then the weight alone.
        g1 = torch.autograd.grad(a.sum(), leaf, retain_graph=True)
        g2 = torch.autograd.grad(y.sum(), (leaf, b.conv.weight), retain_graph=True)
        g3 = torch.autograd.grad(y.sum(), b.conv.weight)
        results.append((*g1, *g2, *g3))
    for a, b in zip(*results):
        _identical(a, b)


def test_saved_tensor_hooks_see_the_same_calls_as_with_the_python_kernels():
    # An offloading hook (save_on_cpu and the like) sees what it sees with the Python kernels: the
    # consumer takes the norm_act's tensors as Python does, not by unpacking them from its node in
    # forward, and in backward unpacks the node's only where the cached norm output is not there.
    torch.manual_seed(9)
    block = Block().train()
    z = torch.randn(2, 8, 5, 5)
    calls = {}
    for how in ("cpp", "python"):
        packed, unpacked = [], []

        def pack(t):
            packed.append((tuple(t.shape), t.dtype))
            return t

        def unpack(t):
            unpacked.append(tuple(t.shape))
            return t

        b = _copy(block)
        leaf = z.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            y = b(leaf, how)
            in_forward = len(unpacked)
            y.sum().backward()
        calls[how] = (sorted(packed, key=str), in_forward, len(unpacked))
    assert calls["cpp"] == calls["python"]
    assert calls["cpp"][1] == 2  # the BatchNorm's statistics, read off its node (Python does the same)


def test_what_the_cpp_kernels_do_not_serve_goes_to_python():
    torch.manual_seed(7)
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    gn = F.group_norm(z, 2)
    assert type(ops.norm_act(gn, z, "silu", None, None, None, None, 1e-5, 0.0, 2).grad_fn).__name__ == "_NormActBackward"
    bn = F.batch_norm(z, None, None, training=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = ops.norm_act(bn, z, "silu", None, None, None, None, 1e-5)
    assert "CppNode" not in a.grad_fn.name()
    # A consumer of a Python lean producer (a cheap module run again) goes to Python, which knows it.
    lin = nn.Linear(8, 8)
    x = torch.randn(3, 8, requires_grad=True)
    from graph_rewrite.ops.recompute import recompute_module
    out = recompute_module(nn.LayerNorm(8).forward, x)
    assert "CppNode" not in ops.recompute_linear(x, out, "identity", lin.weight, lin.bias).grad_fn.name()
    assert "CppNode" not in ops.recompute_linear(x, out, "layer_norm", lin.weight, lin.bias, None, 1e-5, [8]).grad_fn.name()
    # No graph to record: no node, the same bits.
    a = ops.norm_act(bn.detach(), z.detach(), "silu", None, None, None, None, 1e-5)
    assert a.grad_fn is None
    _identical(a, F.silu(bn.detach()))


def test_efficientnet_b0_gradients_are_native_bitwise_and_the_bytes_held_those_of_the_python_kernels():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(8)
    model = torchvision.models.efficientnet_b0().train()
    x = torch.randn(2, 3, 64, 64)
    lean = graph_rewrite.optimize(model)
    native_state = {k: v.clone() for k, v in model.state_dict().items()}

    def grads(m):
        model.load_state_dict(native_state)
        torch.manual_seed(9)  # dropout and stochastic depth draw alike
        held, y = saved_bytes(lambda: m(x), exclude=[*model.parameters(), *model.buffers()])
        return held, y, torch.autograd.grad(y.sum(), list(model.parameters()))

    held_n, y_n, g_n = grads(model)
    held_c, y_c, g_c = grads(lean)
    names = {n.name() for n in _nodes(y_c.grad_fn)}
    assert "torch::autograd::CppNode<graph_rewrite::LeanNormAct>" in names
    assert not any(n.startswith("_NormAct") or n.startswith("_RecomputeConv") for n in names)
    _identical(y_c, y_n)
    for a, b in zip(g_c, g_n):
        _identical(a, b)
    # The bytes held here with the Python kernels (GRAPH_REWRITE_NO_CPP=1, measured 2026-12-06).
    assert (held_n, held_c) == (14723208, 6718632)


def _nodes(top):
    seen, stack = set(), [top]
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        yield n
        stack.extend(f for f, _ in n.next_functions)
