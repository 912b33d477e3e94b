"""Memory-lean activation ops: each saves its *output* for backward, never its input.

The ops live in the ``graph_rewrite`` namespace. Each is defined in the order
of the "Python Custom Operators" tutorial (define the op, register a fake
kernel, then autograd that saves the output), with one difference, for speed:
the op is defined with ``torch.library.Library`` and its autograd is an
``Autograd`` dispatch-key kernel that applies an ``autograd.Function``
directly, instead of ``torch.library.custom_op`` + ``register_autograd``. The custom_op wrappers (argument checks, pytree
flattening, a second Python round trip to the backend kernel) cost several
times more per eager call; ``benchmarks/RESULTS.md`` has the measurements. Under
torch.compile and torch.export the op is traced like any other: the fake kernel
gives shapes, the ``Autograd`` kernel gives the backward graph.

Use the op packets (``torch.ops.graph_rewrite.softplus``), not ``.default``:
TorchScript can script the packet but not the overload attribute.

Example::

    >>> import torch, graph_rewrite.ops
    >>> x = torch.randn(4, requires_grad=True)
    >>> y = torch.ops.graph_rewrite.softplus(x, 1.0, 20.0)
    >>> y.sum().backward()  # only y was kept for this backward
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["softplus", "sigmoid", "logsigmoid", "softplus_needs_branch_mask"]

# float16/bfloat16 are computed in float32 by the native kernels ("opmath");
# the backward formulas below do the same so they round like native.
_REDUCED = (torch.float16, torch.bfloat16)

# Kept alive for the life of the process: dropping it would unregister the ops.
_lib = torch.library.Library("graph_rewrite", "DEF")


def _opmath(t: Tensor) -> Tensor:
    return t.float() if t.dtype in _REDUCED else t


def _forward(op: torch._ops.OpOverload, kernel, x: Tensor, *args) -> Tensor:
    """The forward value, computed past the Autograd key.

    A plain tensor with no dispatch mode active goes straight to the native kernel
    (one dispatcher round trip less per call). Anything else may be a tracer
    (FakeTensor, FunctionalTensor, make_fx's mode): it gets the op itself, so what
    it records below autograd keeps one ``graph_rewrite`` node. torch.export's
    ``run_decompositions`` would otherwise dissolve the op into aten ops that save
    their inputs.
    """
    if type(x) is Tensor and not torch._C._len_torch_dispatch_stack():
        return kernel(x, *args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(x, *args)


def _define(schema: str, kernel, fake, function: type) -> None:
    """Define ``graph_rewrite::<name>``: a backend kernel, a fake kernel and an Autograd kernel.

    The Autograd kernel applies ``function`` (an autograd.Function that saves the
    output) only when a graph is being recorded; otherwise it goes straight to the
    backend kernel. The Functions take ``ctx`` in ``forward`` rather than a separate
    ``setup_context``: on torch 2.15 that form costs ~40 µs less per call. (It
    rules out torch.func transforms, which custom_op did not support either.)
    """
    name = schema.split("(", 1)[0]
    _lib.define(schema)
    _lib.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"graph_rewrite::{name}", fake, lib=_lib)
    op = getattr(torch.ops.graph_rewrite, name).default
    # The dispatcher leaves out trailing arguments equal to their schema defaults;
    # autograd.Function.apply takes no defaults, so put them back.
    defaults = tuple(a.default_value for a in op._schema.arguments[1:])

    def autograd_kernel(x: Tensor, *args):
        args += defaults[len(args):]
        if torch.is_grad_enabled() and x.requires_grad:
            return function.apply(x, *args)
        return _forward(op, kernel, x, *args)

    _lib.impl(name, autograd_kernel, "Autograd")


def softplus_needs_branch_mask(dtype: torch.dtype, threshold: float) -> bool:
    """Whether the softplus backward must keep a record of which branch each element took.

    Native softplus returns ``x`` where ``beta*x > threshold`` (gradient 1) and
    ``log1p(exp(beta*x))/beta`` elsewhere (gradient ``sigmoid(beta*x)``). From the
    output alone, ``beta*y > threshold`` identifies the linear branch, except for
    elements just below the threshold whose output lands above it (PyTorch bug
    #55587). There the true gradient is ``sigmoid(beta*x) = 1 - u`` with
    ``u <= ~exp(-threshold)``. If ``u`` is far below the dtype's rounding unit,
    ``1 - u`` rounds to exactly 1 and guessing "linear" is exact; otherwise a
    mask is needed. The factor 16 below is a safety margin over half an ulp.

    >>> softplus_needs_branch_mask(torch.float32, 20.0)   # exp(-20) ~ 2e-9 << 6e-8
    False
    >>> softplus_needs_branch_mask(torch.float64, 20.0)   # 2e-9 >> 1.1e-16
    True
    """
    if math.isnan(threshold):
        return False  # every element takes the log1p branch, and the test agrees
    return math.exp(-threshold) >= torch.finfo(dtype).eps / 16


def _fused():
    # The one-pass Triton backward (same bits); imported on the first CUDA backward
    # so that CPU-only use never pays for importing Triton.
    from . import triton_kernels
    return triton_kernels


def _check_beta(beta: float) -> None:
    # beta*y must identify the branch and -expm1(-beta*y) the slope: both break
    # for beta == 0 or non-finite beta, where native returns inf/nan outputs.
    if beta == 0 or not math.isfinite(beta):
        raise ValueError(f"graph_rewrite.softplus needs a finite, non-zero beta, got {beta}")


# --------------------------------------------------------------------------- softplus
# Python kernels receive only the arguments that differ from the schema's defaults,
# so the kernels repeat the defaults.
def _softplus_kernel(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    _check_beta(beta)
    return F.softplus(x, beta, threshold)


def _softplus_linear_branch(t: Tensor, beta: float, threshold: float) -> Tensor:
    # Exactly the native kernel's test: in opmath, beta and threshold rounded to it.
    return _opmath(t) * beta > threshold


def softplus_grad(grad: Tensor, y: Tensor, beta: float, threshold: float, linear: Optional[Tensor]) -> Tensor:
    """``grad * d softplus(x)/dx`` from the output ``y`` (and the branch record, if one is kept).

    d/dx = sigmoid(beta*x) = 1 - exp(-beta*y); expm1 keeps the tiny slopes (x ~ -30
    gives ~1e-13, which 1 - exp() rounds to 0 in float32). Where no branch record is
    kept, ``-expm1(-beta*y)`` is exactly 1 on the linear branch already (that is what
    :func:`softplus_needs_branch_mask` tests), so the plain backward skips the branch
    test and works in place on one temporary. Both paths give the same bits.
    """
    if torch.is_grad_enabled():
        # create_graph=True: differentiable ops only, and a slope that is constant 1
        # on the linear branch, so second derivatives there are 0 like native's.
        if linear is None:
            linear = _softplus_linear_branch(y, beta, threshold)
        y_op = _opmath(y)
        slope = torch.where(linear, torch.ones_like(y_op), -torch.expm1(-beta * y_op))
        return (_opmath(grad) * slope).to(grad.dtype)
    if y.is_cuda and (out := _fused().try_softplus_backward(grad, y, beta, linear)) is not None:
        return out
    t = torch.mul(_opmath(y), -beta)  # the one new tensor
    t.expm1_()
    t.mul_(grad)
    t.neg_()  # -(expm1(-b*y) * g) == g * -expm1(-b*y), bit for bit
    if linear is not None:
        t = torch.where(linear, _opmath(grad), t)
    return t.to(grad.dtype)


class _Softplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, beta: float, threshold: float) -> Tensor:
        output = _forward(torch.ops.graph_rewrite.softplus.default, _softplus_kernel, x, beta, threshold)
        ctx.beta, ctx.threshold = beta, threshold
        if x.dtype.is_floating_point and softplus_needs_branch_mask(x.dtype, threshold):
            # One bool per element (1 byte: 1/8 of a float64 input, 1/4 of float32 at
            # small thresholds), kept only where the output cannot tell the branch.
            ctx.save_for_backward(output, _softplus_linear_branch(x, beta, threshold))
        else:
            ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx, grad: Tensor):
        y, *linear = ctx.saved_tensors
        return softplus_grad(grad, y, ctx.beta, ctx.threshold, linear[0] if linear else None), None, None


# The kernel doubles as the fake kernel: on fake tensors F.softplus runs the native
# meta kernel, which gives the same dtype and strides.
_define("softplus(Tensor x, float beta=1.0, float threshold=20.0) -> Tensor",
        _softplus_kernel, _softplus_kernel, _Softplus)


# --------------------------------------------------------------------------- sigmoid
class _Sigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        output = _forward(torch.ops.graph_rewrite.sigmoid.default, torch.sigmoid, x)
        ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        # The very kernel native autograd uses (dy * (1 - y) * y): bitwise equal to
        # native, complex-aware, and differentiable for double backward.
        return torch.ops.aten.sigmoid_backward(grad, y)


_define("sigmoid(Tensor x) -> Tensor", torch.sigmoid, torch.sigmoid, _Sigmoid)


# --------------------------------------------------------------------------- logsigmoid
def _logsigmoid_kernel(x: Tensor) -> Tensor:
    return F.logsigmoid(x).contiguous()


def _logsigmoid_fake(x: Tensor) -> Tensor:
    # The CPU kernel returns a contiguous result even for channels_last input, while
    # PyTorch's own meta kernel claims channels_last (torch 2.15); the op pins contiguous.
    return x.new_empty(x.shape)


def logsigmoid_grad(grad: Tensor, y: Tensor) -> Tensor:
    """``grad * d logsigmoid(x)/dx`` from the output: sigmoid(-x) = 1 - exp(y) = -expm1(y)."""
    if torch.is_grad_enabled():  # create_graph=True: differentiable ops only
        return (_opmath(grad) * -torch.expm1(_opmath(y))).to(grad.dtype)
    if y.is_cuda and (out := _fused().try_logsigmoid_backward(grad, y)) is not None:
        return out
    t = torch.expm1(_opmath(y))
    t.mul_(grad)
    t.neg_()
    return t.to(grad.dtype)


class _LogSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        output = _forward(torch.ops.graph_rewrite.logsigmoid.default, _logsigmoid_kernel, x)
        ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return logsigmoid_grad(grad, y)


_define("logsigmoid(Tensor x) -> Tensor", _logsigmoid_kernel, _logsigmoid_fake, _LogSigmoid)


# The packets: what the FX pass inserts, and what users and TorchScript call.
softplus = torch.ops.graph_rewrite.softplus
sigmoid = torch.ops.graph_rewrite.sigmoid
logsigmoid = torch.ops.graph_rewrite.logsigmoid
