"""Memory-lean activation ops: each saves its *output* for backward, never its input.

The ops live in the ``graph_rewrite`` namespace and follow the "Python Custom
Operators" recipe: define the op, ``register_fake``, then ``register_autograd``
with a ``setup_context`` that saves the output. Use the op packets
(``torch.ops.graph_rewrite.softplus``), not ``.default``: TorchScript can
script the packet but not the overload attribute.

Example::

    >>> import torch, graph_rewrite.ops
    >>> x = torch.randn(4, requires_grad=True)
    >>> y = torch.ops.graph_rewrite.softplus(x, 1.0, 20.0)
    >>> y.sum().backward()  # only y was kept for this backward
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["softplus", "sigmoid", "logsigmoid", "softplus_needs_branch_mask"]

# float16/bfloat16 are computed in float32 by the native kernels ("opmath");
# the backward formulas below do the same so they round like native.
_REDUCED = (torch.float16, torch.bfloat16)


def _opmath(t: Tensor) -> Tensor:
    return t.float() if t.dtype in _REDUCED else t


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


def _check_beta(beta: float) -> None:
    # beta*y must identify the branch and -expm1(-beta*y) the slope: both break
    # for beta == 0 or non-finite beta, where native returns inf/nan outputs.
    if beta == 0 or not math.isfinite(beta):
        raise ValueError(f"graph_rewrite.softplus needs a finite, non-zero beta, got {beta}")


# --------------------------------------------------------------------------- softplus
@torch.library.custom_op("graph_rewrite::softplus", mutates_args=())
def softplus(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    """``F.softplus(x, beta, threshold)`` whose backward keeps only the output."""
    _check_beta(beta)
    return F.softplus(x, beta, threshold)


@softplus.register_fake
def _(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    _check_beta(beta)
    return F.softplus(x, beta, threshold)  # the native meta kernel: same dtype and strides


def _softplus_linear_branch(t: Tensor, beta: float, threshold: float) -> Tensor:
    # Exactly the native kernel's test: in opmath, beta and threshold rounded to it.
    return _opmath(t) * beta > threshold


def _softplus_setup_context(ctx, inputs, output) -> None:
    x, beta, threshold = inputs
    ctx.beta, ctx.threshold = beta, threshold
    if x.dtype.is_floating_point and softplus_needs_branch_mask(x.dtype, threshold):
        # One bool per element (1 byte: 1/8 of a float64 input, 1/4 of float32 at
        # small thresholds), kept only where the output cannot tell the branch.
        ctx.save_for_backward(output, _softplus_linear_branch(x, beta, threshold))
    else:
        ctx.save_for_backward(output)


def _softplus_backward(ctx, grad: Tensor):
    y, *mask = ctx.saved_tensors
    beta, threshold = ctx.beta, ctx.threshold
    linear = mask[0] if mask else _softplus_linear_branch(y, beta, threshold)
    y_op = _opmath(y)
    # d/dx = sigmoid(beta*x) = 1 - exp(-beta*y); expm1 keeps the tiny slopes
    # (x ~ -30 gives ~1e-13, which 1 - exp() rounds to 0 in float32).
    slope = torch.where(linear, torch.ones_like(y_op), -torch.expm1(-beta * y_op))
    # Written with differentiable ops on y, so double backward comes for free.
    return (_opmath(grad) * slope).to(grad.dtype), None, None


softplus.register_autograd(_softplus_backward, setup_context=_softplus_setup_context)


# --------------------------------------------------------------------------- sigmoid
@torch.library.custom_op("graph_rewrite::sigmoid", mutates_args=())
def sigmoid(x: Tensor) -> Tensor:
    """``torch.sigmoid(x)``; backward keeps only the output, like native."""
    return torch.sigmoid(x)


@sigmoid.register_fake
def _(x: Tensor) -> Tensor:
    return torch.sigmoid(x)


def _save_output(ctx, inputs, output) -> None:
    ctx.save_for_backward(output)


def _sigmoid_backward(ctx, grad: Tensor):
    (y,) = ctx.saved_tensors
    # The very kernel native autograd uses (dy * (1 - y) * y): bitwise equal to
    # native, complex-aware, and differentiable for double backward.
    return torch.ops.aten.sigmoid_backward(grad, y)


sigmoid.register_autograd(_sigmoid_backward, setup_context=_save_output)


# --------------------------------------------------------------------------- logsigmoid
@torch.library.custom_op("graph_rewrite::logsigmoid", mutates_args=())
def logsigmoid(x: Tensor) -> Tensor:
    """``F.logsigmoid(x)`` whose backward keeps only the output (native keeps x and a buffer)."""
    return F.logsigmoid(x).contiguous()


@logsigmoid.register_fake
def _(x: Tensor) -> Tensor:
    # The CPU kernel returns a contiguous result even for channels_last input, while
    # PyTorch's own meta kernel claims channels_last (torch 2.15); the op pins contiguous.
    return x.new_empty(x.shape)


def _logsigmoid_backward(ctx, grad: Tensor):
    (y,) = ctx.saved_tensors
    # d/dx log(sigmoid(x)) = sigmoid(-x) = 1 - exp(y) = -expm1(y), exact for tiny |y|.
    return (_opmath(grad) * -torch.expm1(_opmath(y))).to(grad.dtype)


logsigmoid.register_autograd(_logsigmoid_backward, setup_context=_save_output)
