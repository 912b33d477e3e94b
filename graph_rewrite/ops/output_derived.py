"""Activations whose slope is a function of their output: keep ``y``, not ``x``, for backward.

* ``hardtanh(x, min_val, max_val)`` (ReLU6 is ``hardtanh(x, 0, 6)``): native's slope
  is 1 unless ``x <= min_val or x >= max_val``. Clamping keeps those tests: ``y <= min_val``
  exactly when ``x <= min_val``, ``y >= max_val`` exactly when ``x >= max_val``, and NaN
  fails both either way. So native's own ``hardtanh_backward`` applied to ``y`` gives
  native's bits.
* ``leaky_relu(x, negative_slope)`` with ``negative_slope >= 0``: ``y > 0`` exactly when
  ``x > 0``; native's ``leaky_relu_backward`` has a ``self_is_result`` flag for this (its
  in-place form already keeps the output).

Hardsigmoid is not here: ``(x + 3)`` rounds to 6 for the largest values below 3
(float32: ``x = 3 - 2**-22``), so ``y == 1`` there while native's slope is 1/6; the
output cannot tell those elements apart (tests/test_one_tensor.py shows the element).

Example::

    >>> import torch, graph_rewrite.ops
    >>> x = torch.randn(4, requires_grad=True)
    >>> y = torch.ops.graph_rewrite.hardtanh(x, 0.0, 6.0)   # ReLU6 that keeps only y
    >>> y.sum().backward()
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import _define, _forward, saved_with_output

__all__ = ["hardtanh", "leaky_relu"]


def _check_bounds(min_val: float, max_val: float) -> None:
    if not min_val < max_val:
        raise ValueError(f"graph_rewrite.hardtanh needs min_val < max_val, got {min_val}, {max_val}")


def _hardtanh_kernel(x: Tensor, min_val: float = -1.0, max_val: float = 1.0) -> Tensor:
    _check_bounds(min_val, max_val)
    return F.hardtanh(x, min_val, max_val)


class _Hardtanh(torch.autograd.Function):
    """Keeps y; the slope is 1 where min_val < y < max_val."""

    @staticmethod
    def forward(ctx, x: Tensor, min_val: float, max_val: float) -> Tensor:
        y = _forward(torch.ops.graph_rewrite.hardtanh.default, _hardtanh_kernel, x, min_val, max_val)
        ctx.bounds = (min_val, max_val)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        (y,) = saved_with_output(ctx)
        return torch.ops.aten.hardtanh_backward(grad, y, *ctx.bounds), None, None


_define("hardtanh(Tensor x, float min_val=-1.0, float max_val=1.0) -> Tensor",
        _hardtanh_kernel, _hardtanh_kernel, _Hardtanh)


def _check_slope(negative_slope: float) -> None:
    if not (negative_slope >= 0 and math.isfinite(negative_slope)):
        raise ValueError(
            f"graph_rewrite.leaky_relu needs a finite negative_slope >= 0 (the output's sign tells the branch), "
            f"got {negative_slope}"
        )


def _leaky_relu_kernel(x: Tensor, negative_slope: float = 0.01) -> Tensor:
    _check_slope(negative_slope)
    return F.leaky_relu(x, negative_slope)


class _LeakyReLU(torch.autograd.Function):
    """Keeps y; the slope is 1 where y > 0, else negative_slope."""

    @staticmethod
    def forward(ctx, x: Tensor, negative_slope: float) -> Tensor:
        y = _forward(torch.ops.graph_rewrite.leaky_relu.default, _leaky_relu_kernel, x, negative_slope)
        ctx.negative_slope = negative_slope
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        (y,) = saved_with_output(ctx)
        return torch.ops.aten.leaky_relu_backward(grad, y, ctx.negative_slope, True), None


_define("leaky_relu(Tensor x, float negative_slope=0.01) -> Tensor",
        _leaky_relu_kernel, _leaky_relu_kernel, _LeakyReLU)

hardtanh = torch.ops.graph_rewrite.hardtanh
leaky_relu = torch.ops.graph_rewrite.leaky_relu
