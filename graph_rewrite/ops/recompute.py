"""Consumers that recompute their activation: keep ``x``, not ``h = act(x)``, for backward.

An activation such as GELU or SiLU keeps its input ``x`` for its own backward; the
layer after it (Linear, Conv, mul) keeps its output ``h``. Both are held. The ops
here are those layers with one change: they keep ``x`` (already held by the
activation: no new bytes) and recompute ``h = act(x)`` in backward with the same
native kernel, so every gradient is computed from the same values as native.
The activation itself stays native; its input's gradient flows through ``h`` into
it, so these ops return no gradient for ``x``.

Each op takes ``(x, h, act, <the consumer's own arguments>, act_arg)``: ``h`` is
what forward uses (the native activation already computed it), ``act`` names the
activation in :data:`ACTIVATIONS` and ``act_arg`` is its one parameter (ELU's alpha).
``recompute_linear`` also takes ``gate``: then ``h`` is ``act(x) * gate``, the
gated MLP of LLaMA-style models, and only ``x`` and ``gate`` are kept. With ``addmm`` it is
``torch.addmm(bias, h.view(-1, k), weight)`` (Hugging Face's ``Conv1D`` in GPT-2). It also
recomputes a LayerNorm (``act="layer_norm"``, ``act_arg`` its eps, ``norm_shape``,
``norm_weight`` and ``norm_bias`` the rest of its arguments): LayerNorm keeps its
input too, and recomputing it is the same row-wise kernel on the same input.

On plain CPU tensors the ops run the C++ kernels of ``csrc/recompute_ops.cpp``, which make the
same ATen calls as the Functions here (the same bits, tested against the twins
``_<name>_python``); these serve everything else.

Example::

    >>> import torch, torch.nn.functional as F, graph_rewrite.ops
    >>> x = torch.randn(4, 8, requires_grad=True); w = torch.randn(3, 8, requires_grad=True)
    >>> h = F.gelu(x)                                  # keeps x
    >>> y = torch.ops.graph_rewrite.recompute_linear(x, h, "gelu", w, None)   # keeps x, not h
    >>> y.sum().backward()                             # recomputes gelu(x), then the Linear's gradients
"""
from __future__ import annotations

import contextlib
import functools
import math
import struct
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import _autocast_on, _define, _forward, _is_traced, _lib

__all__ = ["ACTIVATIONS", "recompute_linear", "recompute_conv", "recompute_mul", "norm_act", "recompute_module"]

# The activations a consumer can recompute: name -> native call with its one parameter.
# The same kernels as forward, on the same input, so h comes back bit for bit.
# The C entry points the F.* functions end in (the same kernels, minus a Python hop each).
ACTIVATIONS: Dict[str, Callable[[Tensor, float], Tensor]] = {
    "gelu": lambda x, a: torch._C._nn.gelu(x),
    "gelu_tanh": lambda x, a: torch._C._nn.gelu(x, approximate="tanh"),
    "silu": lambda x, a: torch._C._nn.silu(x),
    "hardswish": lambda x, a: torch._C._nn.hardswish(x),
    "mish": lambda x, a: torch._C._nn.mish(x),
    "elu": lambda x, a: torch._C._nn.elu(x, a),
    "celu": lambda x, a: torch.celu(x, a),
    "selu": lambda x, a: torch.selu(x),
    # What a consumer reads straight from a lean producer (a cheap module's output).
    "identity": lambda x, a: x,
}


# Their backward kernels, called as native autograd calls them (derivatives.yaml): with h,
# the activation's input, they give native's gradient bit for bit. CELU and SELU are ELU's.
_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946
ACTIVATION_BACKWARDS: Dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "gelu": lambda g, x, a: torch.ops.aten.gelu_backward(g, x),
    "gelu_tanh": lambda g, x, a: torch.ops.aten.gelu_backward(g, x, approximate="tanh"),
    "silu": lambda g, x, a: torch.ops.aten.silu_backward(g, x),
    "hardswish": lambda g, x, a: torch.ops.aten.hardswish_backward(g, x),
    "mish": lambda g, x, a: torch.ops.aten.mish_backward(g, x),
    "elu": lambda g, x, a: torch.ops.aten.elu_backward(g, a, 1, 1, False, x),
    # (derivatives.yaml: 1.0 / alpha.toFloat(), alpha rounded to float32 first)
    "celu": lambda g, x, a: torch.ops.aten.elu_backward(g, a, 1, 1.0 / struct.unpack("f", struct.pack("f", a))[0],
                                                         False, x),
    "selu": lambda g, x, a: torch.ops.aten.elu_backward(g, _SELU_ALPHA, _SELU_SCALE, 1, False, x),
    "identity": lambda g, x, a: g,
}


def recompute_activation(x: Tensor, act: str, act_arg: float, gate: Optional[Tensor] = None,
                         norm: Optional[Tuple[List[int], Optional[Tensor], Optional[Tensor]]] = None) -> Tensor:
    """``act(x)`` (times ``gate`` for the gated MLP), with the native kernels forward used.

    ``act == "layer_norm"`` takes ``norm = (normalized_shape, weight, bias)`` and ``act_arg`` as eps.
    """
    if act == "layer_norm":
        shape, weight, bias = norm
        return torch.layer_norm(x, shape, weight, bias, act_arg)
    h = ACTIVATIONS[act](x, act_arg)
    return h if gate is None else h * gate


# A consumer's backward makes h again with the same aten calls its producer ran in forward. Traced
# into one joint graph (AOTAutograd under torch.compile), the two are the same expression of the
# same x, and the partitioner's common-subexpression pass merges them whenever forward's h is an
# ancestor of anything backward reads (the residual stream after it, a layer scale's input): h is
# then a forward value an mm reads in backward, so it is saved, and the saving is gone. Traced,
# backward therefore makes h with one opaque op, which matches no forward node; it runs the same
# native kernels. Eager backward (real tensors) calls them directly, as before.
# Not after a norm: a norm's output is pointwise in its input and statistics, which its own
# backward keeps, so the partitioner remakes it in backward rather than saving it, unless an
# opaque op reads it (then it must exist in backward, and is saved: efficientnet_b0 held 1.6x).
def _activation_again_kernel(x: Tensor, act: str, act_arg: float = 0.0, gate: Optional[Tensor] = None,
                             norm_shape: Sequence[int] = (), norm_weight: Optional[Tensor] = None,
                             norm_bias: Optional[Tensor] = None) -> Tensor:
    return recompute_activation(x, act, act_arg, gate, (list(norm_shape), norm_weight, norm_bias))


_lib.define("activation_again(Tensor x, str act, float act_arg=0.0, Tensor? gate=None, int[] norm_shape=[], "
            "Tensor? norm_weight=None, Tensor? norm_bias=None) -> Tensor")
_lib.impl("activation_again", _activation_again_kernel, "CompositeExplicitAutograd")
torch.library.register_fake("graph_rewrite::activation_again", _activation_again_kernel, lib=_lib)


def activation_in_backward(x: Tensor, act: str, act_arg: float, gate: Optional[Tensor] = None,
                           norm: Optional[Tuple[List[int], Optional[Tensor], Optional[Tensor]]] = None,
                           opaque: bool = True) -> Tensor:
    """:func:`recompute_activation` for a consumer's backward: one ``graph_rewrite::activation_again``
    node when traced without grad mode (torch.compile's joint graph) and ``opaque``, so that it is not
    merged with forward's h; the native calls otherwise. An identity without gate is x itself."""
    if opaque and (act != "identity" or gate is not None) and _is_traced(x) and not torch.is_grad_enabled():
        shape, weight, bias = norm if norm is not None else ((), None, None)
        return torch.ops.graph_rewrite.activation_again(x, act, act_arg, gate, list(shape), weight, bias)
    return recompute_activation(x, act, act_arg, gate, norm)


def _geometry(h: Tensor) -> Tuple[Tuple[int, ...], Tuple[int, ...], int]:
    return tuple(h.shape), h.stride(), h.storage_offset()


def _as_geometry(u: Tensor, geometry: Tuple[Tuple[int, ...], Tuple[int, ...], int]) -> Tensor:
    """The recomputed activation ``u`` laid out as the consumer's ``h`` was: h may be a view of it
    (LayerNorm2d's ``permute`` before a 1x1 convolution), which the consumer's backward reads as such."""
    shape, stride, offset = geometry
    if tuple(u.shape) == shape and u.stride() == stride and u.storage_offset() == offset:
        return u
    return u.as_strided(shape, stride, offset)


def _any_requires_grad(*args) -> bool:
    return any(isinstance(a, Tensor) and a.requires_grad for a in args)


# --------------------------------------------------------------------------- under autocast
# Under autocast a consumer runs natively (its inputs cast as autocast casts them, with the
# weights' cached casts, and native's own backward and gradient sums), inside saved-tensor
# hooks that keep no copy of h: where the native op saves h, or autocast's cast of h, or a view
# of either, the hooks keep a recipe instead, and backward makes that tensor again from x with
# the forward's autocast state. Saved tensors that are not h go to the hooks in effect outside.
def _autocast_state() -> list:
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")]


@contextlib.contextmanager
def _as_forward_ran(state: list):
    """Autocast as it was when ``state`` was read (the forward's), whatever it is now (backward's)."""
    with contextlib.ExitStack() as stack:
        for device, enabled, dtype in state:
            if enabled != torch.is_autocast_enabled(device) or (enabled and dtype != torch.get_autocast_dtype(device)):
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        yield


def _made_from(t: Tensor, h: Tensor) -> bool:
    """Whether ``t`` is ``h`` or autocast's cast of it (a dtype copy whose node reads h)."""
    if t is h:
        return True
    node = t.grad_fn
    return (h.grad_fn is not None and type(node).__name__ == "ToCopyBackward0" and t.shape == h.shape
            and node.next_functions[0][0] is h.grad_fn)


class _Again:
    """A saved tensor made again in backward: ``remake(*held)`` cast to its dtype, in its geometry."""

    __slots__ = ("remake", "held", "dtype", "view")

    def __init__(self, remake, held: "_Held", t: Tensor) -> None:
        self.remake, self.held, self.dtype = remake, held, t.dtype
        self.view = None if t._base is None else (t.shape, t.stride(), t.storage_offset())

    def __call__(self) -> Tensor:
        h = self.remake(*self.held.unpack())
        h = h if h.dtype == self.dtype else h.to(self.dtype)
        return h if self.view is None else h.as_strided(*self.view)


class _Held:
    """The tensors a remake needs (x, gate, ...), kept as the hooks in effect outside keep saved
    tensors (an offloading hook moves them too), packed once, when first needed."""

    __slots__ = ("outer", "tensors", "packed")

    def __init__(self, outer, tensors: Sequence[Optional[Tensor]]) -> None:
        self.outer, self.tensors, self.packed = outer, tuple(tensors), None

    def pack(self) -> "_Held":
        if self.packed is None:
            pack = self.outer[0] if self.outer is not None else None
            self.packed = tuple(t if t is None or pack is None else pack(t) for t in self.tensors)
            self.tensors = ()
        return self

    def unpack(self) -> tuple:
        unpack = self.outer[1] if self.outer is not None else None
        return tuple(p if p is None or unpack is None else unpack(p) for p in self.packed)


@contextlib.contextmanager
def _keep_no_copy_of(h: Tensor, remake: Callable[..., Tensor], *tensors: Optional[Tensor]):
    """Native ops run inside save ``remake(*tensors)`` instead of h (or its cast, or a view of either)."""
    outer = torch._C._autograd._top_saved_tensors_default_hooks(True)
    held = _Held(outer, tensors)

    def pack(t):
        base = t if t._base is None else t._base
        if _made_from(t, h) or _made_from(base, h):
            return _Again(remake, held.pack(), t)
        return (outer[0](t),) if outer is not None else (t,)

    def unpack(packed):
        if isinstance(packed, _Again):
            return packed()
        return outer[1](packed[0]) if outer is not None else packed[0]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def _keep_no_copy_of_input(x: Tensor, h: Tensor, act: str, act_arg: float, gate: Optional[Tensor] = None,
                           norm=None, norm_node=None):
    """:func:`_keep_no_copy_of` for a consumer's h = act(x) [* gate], a LayerNorm's output, or a lean
    producer's (``norm_node``): made again under the forward's autocast state (read now)."""
    state, geometry = _autocast_state(), _geometry(h)
    shape, norm_weight, norm_bias = norm if norm is not None else ((), None, None)

    def remake(x, gate, norm_weight, norm_bias) -> Tensor:
        with _as_forward_ran(state):
            a = x if norm_node is None else norm_output(norm_node)
            return _as_geometry(recompute_activation(a, act, act_arg, gate, (shape, norm_weight, norm_bias)), geometry)
    return _keep_no_copy_of(h, remake, None if norm_node is not None else x, gate, norm_weight, norm_bias)


def call_keeping_input(func: Callable[..., Tensor], args: tuple, kwargs: dict, x: Tensor, h: Tensor, act: str,
                       act_arg: float = 0.0, gate: Optional[Tensor] = None, norm_shape: Sequence[int] = (),
                       norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None) -> Tensor:
    """``func(*args, **kwargs)``, a native consumer of h = act(x) [* gate] (or of a LayerNorm's or a lean
    producer's output), run so that it keeps no copy of h: backward makes h again from x.

    The recompute ops under autocast (autocast's casts and cached weights are the native op's),
    and consumers with no lean op of their own (``F.grouped_mm`` of a mixture of experts): the
    native op's forward, backward and gradient order, so bit for bit native's by construction.
    """
    with _keep_no_copy_of_input(x, h, act, act_arg, gate, (list(norm_shape), norm_weight, norm_bias),
                                _norm_node(h) if gate is None else None):
        return func(*args, **kwargs)


# --------------------------------------------------------------------------- linear
def _linear_kernel(x: Tensor, h: Tensor, act: str, weight: Tensor, bias: Optional[Tensor] = None,
                   gate: Optional[Tensor] = None, act_arg: float = 0.0, norm_shape: Sequence[int] = (),
                   norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None,
                   addmm: bool = False) -> Tensor:
    if addmm:  # HF's Conv1D (GPT-2): addmm(bias, h.view(-1, k), weight), weight laid out (k, n)
        return torch.addmm(bias, _rows(h), weight)
    out = F.linear(h, weight, bias)
    # On a 3-D input F.linear views its 2-D result back to 3-D. A view made inside an
    # autograd.Function may not be changed in place (``h += x`` after a transformer's MLP);
    # _unsafe_view is how native's own linear returns the same data as no view.
    return out if out._base is None else torch.ops.aten._unsafe_view(out, out.shape)


def linear_backward(grad: Tensor, h: Tensor, weight: Tensor, needs: Sequence[bool]) -> List[Optional[Tensor]]:
    """Gradients of ``F.linear(h, weight, bias)`` for (h, weight, bias), as native's addmm backward forms them.

    Native linear runs ``addmm`` on ``h`` flattened to 2-D; its backward is
    ``grad @ weight`` for h, ``grad.t() @ h`` for the weight and the sum over rows for the bias.
    """
    rows = math.prod(h.shape[:-1])  # not -1: a zero-width layer has 0 elements in any row count
    g2 = grad.reshape(rows, grad.shape[-1])
    h2 = h.reshape(rows, h.shape[-1])
    gh = g2.mm(weight).view(h.shape) if needs[0] else None
    gw = g2.t().mm(h2) if needs[1] else None
    gb = g2.sum_to_size(grad.shape[-1:]) if needs[2] else None
    return [gh, gw, gb]


def _rows(h: Tensor) -> Tensor:
    return h.view(math.prod(h.shape[:-1]), h.shape[-1])


def addmm_backward(grad: Tensor, h: Tensor, weight: Tensor, needs: Sequence[bool]) -> List[Optional[Tensor]]:
    """Gradients of ``torch.addmm(bias, h.view(-1, k), weight)`` for (h, weight, bias), as native's
    AddmmBackward0 forms them (``mm_mat1_backward``/``mm_mat2_backward`` for a row-major h)."""
    h2 = _rows(h)
    gh = grad.mm(weight.t()).view(h.shape) if needs[0] else None
    gw = None
    if needs[1]:
        column_major = weight.stride(0) == 1 and weight.stride(1) == weight.shape[0]
        gw = grad.t().mm(h2).t() if column_major else h2.t().mm(grad)
    gb = grad.sum_to_size(grad.shape[-1:]) if needs[2] else None
    return [gh, gw, gb]


class _RecomputeLinear(torch.autograd.Function):
    """Keeps x (and gate, or LayerNorm's weight and bias); recomputes h = act(x) [* gate] in backward."""

    @staticmethod
    def forward(ctx, x, h, act, weight, bias, gate, act_arg, norm_shape, norm_weight, norm_bias, addmm):
        out = _forward(torch.ops.graph_rewrite.recompute_linear.default, _linear_kernel,
                       x, h, act, weight, bias, gate, act_arg, norm_shape, norm_weight, norm_bias, addmm)
        ctx.act, ctx.act_arg, ctx.norm_shape, ctx.addmm = act, act_arg, list(norm_shape), addmm
        ctx.geometry = _geometry(h)
        _save(ctx, _norm_node(h) if gate is None else None, x, weight, gate, norm_weight, norm_bias)
        return out

    @staticmethod
    def backward(ctx, grad):
        (x, weight, gate, norm_weight, norm_bias), norm = _unpack(ctx)
        h = _as_geometry(activation_in_backward(_act_input(ctx, x, norm), ctx.act, ctx.act_arg, gate,
                                              (ctx.norm_shape, norm_weight, norm_bias), ctx.opaque), ctx.geometry)
        needs = ctx.needs_input_grad
        backward = addmm_backward if ctx.addmm else linear_backward
        gh, gw, gb = backward(grad, h, weight, (needs[1], needs[3], needs[4]))
        return None, gh, None, gw, gb, None, None, None, None, None, None


def _linear_autocast(x, h, act, weight, bias=None, gate=None, act_arg=0.0, norm_shape=(), norm_weight=None,
                     norm_bias=None, addmm=False):
    func, args = (torch.addmm, (bias, _rows(h), weight)) if addmm else (F.linear, (h, weight, bias))
    return call_keeping_input(func, args, {}, x, h, act, act_arg, gate, norm_shape, norm_weight, norm_bias)


_define("recompute_linear(Tensor x, Tensor h, str act, Tensor weight, Tensor? bias=None, "
        "Tensor? gate=None, float act_arg=0.0, int[] norm_shape=[], Tensor? norm_weight=None, "
        "Tensor? norm_bias=None, bool addmm=False) -> Tensor",
        _linear_kernel, _linear_kernel, _RecomputeLinear, needs_graph=_any_requires_grad, under_autocast=_linear_autocast)
# FX cannot tell a tensor argument from a number: `linear(act(h) * scale)` with a float scale
# (forward(x, scale: float = 1.0)) takes this overload, native's linear on h (see recompute_mul.Scalar).
_lib.define("recompute_linear.ScalarGate(Tensor x, Tensor h, str act, Tensor weight, Tensor? bias=None, "
            "Scalar gate=1, float act_arg=0.0, int[] norm_shape=[], Tensor? norm_weight=None, "
            "Tensor? norm_bias=None, bool addmm=False) -> Tensor")


def _linear_scalar_gate(x: Tensor, h: Tensor, act: str, weight: Tensor, bias: Optional[Tensor] = None, gate=1,
                        act_arg: float = 0.0, norm_shape: Sequence[int] = (), norm_weight: Optional[Tensor] = None,
                        norm_bias: Optional[Tensor] = None, addmm: bool = False) -> Tensor:
    return _linear_kernel(x, h, act, weight, bias, addmm=addmm)


_lib.impl("recompute_linear.ScalarGate", _linear_scalar_gate, "CompositeImplicitAutograd")


# --------------------------------------------------------------------------- convolution
def _conv_kernel(x: Tensor, h: Tensor, act: str, weight: Tensor, bias: Optional[Tensor], stride: List[int],
                 padding: List[int], dilation: List[int], groups: int, act_arg: float = 0.0,
                 norm_shape: Sequence[int] = (), norm_weight: Optional[Tensor] = None,
                 norm_bias: Optional[Tensor] = None) -> Tensor:
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
    return conv(h, weight, bias, stride, padding, dilation, groups)


def conv_backward(grad: Tensor, h: Tensor, weight: Tensor, has_bias: bool, stride, padding, dilation, groups,
                  needs: Sequence[bool]) -> List[Optional[Tensor]]:
    """Gradients of the convolution for (h, weight, bias): the kernel native's ConvolutionBackward0 calls."""
    unbatched = h.dim() == weight.dim() - 1
    if unbatched:
        grad, h = grad.unsqueeze(0), h.unsqueeze(0)
    n = weight.dim() - 2
    gh, gw, gb = torch.ops.aten.convolution_backward.default(
        grad, h, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation,
        False, [0] * n, groups, [needs[0], needs[1], needs[2] and has_bias],
    )
    if unbatched and gh is not None:
        gh = gh.squeeze(0)
    return [gh, gw, gb if has_bias else None]


class _RecomputeConv(torch.autograd.Function):
    """Keeps x (or LayerNorm's input, weight and bias); recomputes h = act(x) in backward, laid out as
    forward's h (a view of it after LayerNorm2d's permute)."""

    @staticmethod
    def forward(ctx, x, h, act, weight, bias, stride, padding, dilation, groups, act_arg, norm_shape, norm_weight,
                norm_bias):
        out = _forward(torch.ops.graph_rewrite.recompute_conv.default, _conv_kernel,
                       x, h, act, weight, bias, stride, padding, dilation, groups, act_arg, norm_shape, norm_weight,
                       norm_bias)
        ctx.act, ctx.act_arg, ctx.norm_shape, ctx.geometry = act, act_arg, list(norm_shape), _geometry(h)
        ctx.conv = (bias is not None, stride, padding, dilation, groups)
        _save(ctx, _norm_node(h), x, weight, norm_weight, norm_bias)
        return out

    @staticmethod
    def backward(ctx, grad):
        (x, weight, norm_weight, norm_bias), norm = _unpack(ctx)
        h = _as_geometry(activation_in_backward(_act_input(ctx, x, norm), ctx.act, ctx.act_arg, None,
                                              (ctx.norm_shape, norm_weight, norm_bias), ctx.opaque), ctx.geometry)
        needs = ctx.needs_input_grad
        gh, gw, gb = conv_backward(grad, h, weight, *ctx.conv, (needs[1], needs[3], needs[4]))
        return None, gh, None, gw, gb, None, None, None, None, None, None, None, None


def _conv_autocast(x, h, act, weight, bias, stride, padding, dilation, groups, act_arg=0.0, norm_shape=(),
                   norm_weight=None, norm_bias=None):
    return call_keeping_input(_conv_kernel, (x, h, act, weight, bias, stride, padding, dilation, groups), {},
                              x, h, act, act_arg, None, norm_shape, norm_weight, norm_bias)


_define("recompute_conv(Tensor x, Tensor h, str act, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
        "int[] dilation, int groups, float act_arg=0.0, int[] norm_shape=[], Tensor? norm_weight=None, "
        "Tensor? norm_bias=None) -> Tensor",
        _conv_kernel, _conv_kernel, _RecomputeConv, needs_graph=_any_requires_grad, under_autocast=_conv_autocast)


# --------------------------------------------------------------------------- mul
def _mul_kernel(x: Tensor, h: Tensor, act: str, other: Tensor, act_arg: float = 0.0) -> Tensor:
    return torch.mul(h, other)


def mul_backward(grad: Tensor, h: Optional[Tensor], other: Tensor, needs: Sequence[bool],
                 h_meta: Optional[Tuple[torch.Size, torch.dtype]] = None) -> List[Optional[Tensor]]:
    """Gradients of ``h * other`` for (h, other), reduced to each operand's shape like native's MulBackward0.

    ``h`` is needed for other's gradient only; ``h_meta`` (its shape and dtype) serves without it.
    """
    h_meta = (h.shape, h.dtype) if h is not None else h_meta
    gh = _reduce_to(grad * other, *h_meta) if needs[0] else None
    go = _reduce_to(grad * h, other.shape, other.dtype) if needs[1] else None
    return [gh, go]


def _reduce_to(g: Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    # What autograd's engine does to a broadcast operand's gradient: sum, then cast.
    if g.shape != shape:
        g = g.sum_to_size(shape)
    return g if g.dtype == dtype else g.to(dtype)


class _RecomputeMul(torch.autograd.Function):
    """Keeps x and other; recomputes h = act(x) in backward."""

    @staticmethod
    def forward(ctx, x, h, act, other, act_arg):
        out = _forward(torch.ops.graph_rewrite.recompute_mul.default, _mul_kernel, x, h, act, other, act_arg)
        ctx.act, ctx.act_arg, ctx.h_meta = act, act_arg, (h.shape, h.dtype)
        _save(ctx, _norm_node(h), x, other)
        return out

    @staticmethod
    def backward(ctx, grad):
        (x, other), norm = _unpack(ctx)
        needs = ctx.needs_input_grad
        h = (activation_in_backward(_act_input(ctx, x, norm), ctx.act, ctx.act_arg, opaque=ctx.opaque)
             if needs[3] else None)  # for other's gradient
        gh, go = mul_backward(grad, h, other, (needs[1], needs[3]), ctx.h_meta)
        return None, gh, None, go, None


def _mul_autocast(x, h, act, other, act_arg=0.0):
    return call_keeping_input(torch.mul, (h, other), {}, x, h, act, act_arg)


_define("recompute_mul(Tensor x, Tensor h, str act, Tensor other, float act_arg=0.0) -> Tensor",
        _mul_kernel, _mul_kernel, _RecomputeMul, needs_graph=_any_requires_grad, under_autocast=_mul_autocast)
# FX cannot tell a tensor argument from a number (forward(x, scale: float = 1.0)): the rewrite of
# `act(h) * scale` calls the op either way, and a number takes this overload, native's mul, which
# keeps nothing for backward anyway.
_lib.define("recompute_mul.Scalar(Tensor x, Tensor h, str act, Scalar other, float act_arg=0.0) -> Tensor")
_lib.impl("recompute_mul.Scalar", lambda x, h, act, other, act_arg=0.0: torch.mul(h, other), "CompositeImplicitAutograd")


# --------------------------------------------------------------------------- norm -> activation
# BatchNorm and GroupNorm keep their input z; the activation after them keeps the norm's
# output h. norm_act is that activation keeping z instead, and recomputing h = norm(z) in
# backward with the same call (so the same kernel, statistics and bits). Consumers of its
# output (the ops above) see that in the autograd graph and keep nothing of h either: they
# ask the norm_act node for h, which computes it once for all of them and for its own backward.
_BATCH_NORM_NODES = ("NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0")
_GROUP_NORM_NODES = ("NativeGroupNormBackward0",)
# Every node a norm's output may have, traced (AOTAutograd's functional batch norm) too.
_NORM_NODES = (*_BATCH_NORM_NODES, *_GROUP_NORM_NODES, "NativeBatchNormLegitBackward0",
               "NativeBatchNormLegitNoTrainingBackward0")


def _batch_norm_training(h: Tensor) -> Optional[bool]:
    """Whether the BatchNorm that made ``h`` used batch statistics, read from its autograd node.

    None if ``h`` did not come from a BatchNorm node that records it: then nothing is recomputed.
    The module decides this at run time (train/eval, ``track_running_stats``); the node knows.
    """
    node = h.grad_fn
    if type(node).__name__ not in _BATCH_NORM_NODES:
        return None
    training = getattr(node, "_saved_training", None)
    return training if isinstance(training, bool) else None


def _kept_statistics(h: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The batch mean and invstd that ``h``'s BatchNorm node keeps for its backward, or Nones."""
    node = h.grad_fn
    if type(node).__name__ != "NativeBatchNormBackward0":
        return None, None
    try:
        return node._saved_result1, node._saved_result2
    except (AttributeError, RuntimeError):
        return None, None


def _norm_act_kernel(h: Tensor, z: Tensor, act: str, weight: Optional[Tensor], bias: Optional[Tensor],
                     running_mean: Optional[Tensor], running_var: Optional[Tensor], eps: float,
                     act_arg: float = 0.0, groups: int = 0) -> Tensor:
    return ACTIVATIONS[act](h, act_arg)


def _norm_again(ctx, saved: Optional[Sequence[Optional[Tensor]]] = None) -> Tensor:
    """h = norm(z) again: the forward's own call on the saved z.

    GroupNorm (``ctx.groups``) reduces each group of z again. BatchNorm with batch
    statistics is rebuilt from the mean and invstd its node keeps where that is known to give
    forward's bits (:func:`_batch_norm_from_stats`); elsewhere it recomputes them (one more pass
    over z), with throwaway buffers for the running ones, which forward has updated since. Eval
    mode uses the saved running statistics, as forward did. The recomputed statistics are the
    same bits as forward's as long as the kernel reduces in the same order: on CPU a
    channels-last input is reduced per thread, so a ``torch.set_num_threads`` between forward
    and backward can move h by a rounding (the rebuild from the kept statistics cannot).
    """
    z, weight, bias, first, second = ctx.saved_tensors if saved is None else saved
    if ctx.training and first is not None and not torch.is_grad_enabled():
        h = _batch_norm_from_stats(z, weight, bias, first, second)
        if h is not None:
            return h
    with _as_forward_ran(ctx.autocast):  # autocast's casts as in forward (CUDA's float32 GroupNorm)
        if ctx.groups:
            return torch.group_norm(z, ctx.groups, weight, bias, ctx.eps, torch.backends.cudnn.enabled)
        running_mean, running_var = (None, None) if ctx.training else (first, second)
        if ctx.training and ctx.buffers is not None:
            c, dtype = ctx.buffers
            running_mean = torch.zeros(c, dtype=dtype, device=z.device)
            running_var = torch.ones(c, dtype=dtype, device=z.device)
        return torch.batch_norm(z, weight, bias, running_mean, running_var, ctx.training, 0.0, ctx.eps,
                                torch.backends.cudnn.enabled)


# --------------------------------------------------------------------------- BatchNorm from its statistics
# ATen's CPU BatchNorm (batch_norm_kernel.cpp) writes h = z * alpha + beta, alpha = invstd * weight,
# beta = bias - mean * alpha, from the mean and invstd it keeps for backward; the compiler fuses
# each multiply-add where the build allows. addcmul does the same arithmetic, so backward can
# make h from those two vectors in one pass over z instead of reducing z again. That the build
# fuses both alike is checked once per dtype against the kernel itself; where it does not, or
# off CPU, the statistics are recomputed as before.
def _batch_norm_from_stats(z: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                           invstd: Tensor) -> Optional[Tensor]:
    """BatchNorm's training output rebuilt from its kept ``mean`` and ``invstd``, or None where
    that is not known to give the kernel's bits."""
    dtype = z.dtype
    if (z.device.type != "cpu" or z.dim() < 2 or not _batch_norm_fast_layout(z)
            or any(t is not None and (t.dtype != dtype or not t.is_contiguous()) for t in (weight, bias, mean, invstd))
            or not _addcmul_is_batch_norm(dtype)):
        return None
    return _linear_terms_applied(z, weight, bias, mean, invstd)


def _batch_norm_fast_layout(z: Tensor) -> bool:
    # The layouts of the kernel's fast paths; any other goes through a different formula.
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return z.is_contiguous() or (z.dim() in formats and z.is_contiguous(memory_format=formats[z.dim()]))


def _linear_terms_applied(z, weight, bias, mean, invstd) -> Tensor:
    c = z.shape[1]
    weight = weight if weight is not None else torch.ones(c, dtype=z.dtype)
    bias = bias if bias is not None else torch.zeros(c, dtype=z.dtype)
    alpha = invstd * weight
    beta = torch.addcmul(bias, mean, alpha, value=-1)  # bias - mean * alpha, one rounding where fused
    shape = (c,) + (1,) * (z.dim() - 2)
    return torch.addcmul(beta.view(shape), z, alpha.view(shape))


@functools.lru_cache(maxsize=None)
def _addcmul_is_batch_norm(dtype: torch.dtype) -> bool:
    """Whether :func:`_linear_terms_applied` gives the CPU kernel's bits on this build, for ``dtype``.

    Fused or not is one fixed instruction sequence per code path, so a few layouts of varied
    values tell: contiguous and channels-last, with vector tails, no weight, one element per
    channel. The values come from a fixed sequence, not the random generator.
    """
    layouts = [((2, 5, 3, 7), None), ((3, 19, 4, 5), torch.channels_last), ((4, 11), None), ((2, 9, 13), None),
               ((2, 3, 2, 3, 5), torch.channels_last_3d), ((2, 16, 8, 8), None), ((2, 16, 8, 8), torch.channels_last),
               ((1, 6, 1, 1), None)]
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for i, (shape, layout) in enumerate(layouts):
            n, c = math.prod(shape), shape[1]
            z = _weyl(n, 3.0 + i, 1.7).view(shape).to(dtype)
            if layout is not None:
                z = z.contiguous(memory_format=layout)
            weight = None if i == 2 else _weyl(c, 0.5, 1.0).to(dtype)
            bias = None if i == 2 else _weyl(c, 0.25, -0.3).to(dtype)
            h, mean, invstd = torch.ops.aten.native_batch_norm.default(z, weight, bias, None, None, True, 0.0, 1e-5)
            if not torch.equal(h, _linear_terms_applied(z, weight, bias, mean, invstd)):
                return False
    return True


# The C++ norm_act (csrc/recompute_ops.cpp) asks this once per dtype: one check, kept here.
_lib.define("_batch_norm_rebuild_exact(Tensor like) -> bool")
_lib.impl("_batch_norm_rebuild_exact", lambda like: _addcmul_is_batch_norm(like.dtype), "CompositeImplicitAutograd")


def _weyl(n: int, scale: float, shift: float) -> Tensor:
    # A fixed sequence spread over [shift - scale, shift + scale), with many mantissa bits set.
    return (torch.arange(n, dtype=torch.float64) * 0.6180339887498949 % 1.0 - 0.5) * (2 * scale) + shift


# A lean producer is the autograd node of an op that made h without keeping it, and can make it
# again from what it keeps: norm_act (h = act(norm(z))) and recompute_module (h = module(x)).
# A consumer after one keeps the producer's tensors (the same storages: no new bytes) and asks
# it for h in backward.
def _norm_node(h: Tensor):
    """The lean producer node that made ``h`` (keeping its input, not h), or None."""
    node = h.grad_fn
    remake = getattr(getattr(node, "_forward_cls", None), "remake", None)
    return node if remake is not None and getattr(node, "lean", False) else None


def norm_output(node, saved: Optional[Sequence[Optional[Tensor]]] = None) -> Tensor:
    """What a lean producer ``node`` recomputes (the norm's output; the module's output): once per
    backward, shared by its consumers.

    ``saved``: the node's tensors as a consumer saved them, for when the node has run its own
    backward (and freed them) first: ``aux.backward()`` through the activation, then the consumer.
    """
    remake = node._forward_cls.remake
    if torch.is_grad_enabled():  # create_graph: differentiable through the inputs, not cached
        return remake(node, saved)
    if node.cache is None:
        node.cache = remake(node, saved)
    return node.cache


def _save(ctx, norm, x: Tensor, *rest: Optional[Tensor]) -> None:
    """A consumer's ``save_for_backward``: ``(x, *rest)``, or, after a lean producer (``norm``),
    ``(None, *rest)`` and that node's own tensors: the same storages, so no new bytes."""
    ctx.norm = norm
    ctx.opaque = x is None or type(x.grad_fn).__name__ not in _NORM_NODES
    tensors = () if norm is None else _tensors_for_consumers(norm)
    ctx.norm_saved = len(tensors)
    ctx.save_for_backward(None if norm is not None else x, *rest, *tensors)


def _unpack(ctx) -> Tuple[tuple, Optional[tuple]]:
    """(what :func:`_save` saved after x and x itself, the lean producer's tensors or None)."""
    saved = ctx.saved_tensors
    k = len(saved) - ctx.norm_saved
    return saved[:k], (saved[k:] if ctx.norm_saved else None)


def _tensors_for_consumers(node) -> tuple:
    # Weak references: the node holds its tensors through save_for_backward (hooks see them);
    # these only hand the same tensors to consumers made while they are alive.
    tensors = tuple(None if r is None else r() for r in node.for_consumers)
    dead = any(r is not None and t is None for r, t in zip(node.for_consumers, tensors))
    return () if dead else tensors


def _act_input(ctx, x: Optional[Tensor], norm: Optional[tuple] = None) -> Tensor:
    """The activation's input for a consumer's recompute: its saved ``x``, or h from the lean producer."""
    return x if ctx.norm is None else norm_output(ctx.norm, norm)


def _weak(tensors: Sequence[Optional[Tensor]]) -> tuple:
    return tuple(None if t is None else weakref.ref(t) for t in tensors)


class _NormAct(torch.autograd.Function):
    """``act(h)`` for ``h = BatchNorm(z)`` or ``GroupNorm(z)`` (``groups`` > 0): keeps z (the norm
    keeps it too), recomputes h in backward."""

    @staticmethod
    def forward(ctx, h, z, act, weight, bias, running_mean, running_var, eps, act_arg, groups):
        out = _forward(torch.ops.graph_rewrite.norm_act.default, _norm_act_kernel,
                       h, z, act, weight, bias, running_mean, running_var, eps, act_arg, groups)
        ctx.act, ctx.act_arg, ctx.eps, ctx.groups, ctx.cache = act, act_arg, eps, groups, None
        ctx.autocast = _autocast_state()
        if _is_traced(h):
            training = None
        elif groups:
            training = True if type(h.grad_fn).__name__ in _GROUP_NORM_NODES else None
        else:
            training = _batch_norm_training(h)
        ctx.lean = training is not None
        if not ctx.lean:  # not known to come from the norm (or traced): keep h, as native does
            ctx.save_for_backward(h)
            return out
        ctx.training = training
        if _autocast_on(h):
            # The input the norm's kernel got (autocast's cast of z where it casts), kept by its node
            # anyway; the recompute then runs that kernel on it again.
            try:
                z = h.grad_fn._saved_input
            except RuntimeError:  # changed in place since: keep h, as native does
                ctx.lean = False
                ctx.save_for_backward(h)
                return out
        ctx.buffers = None if running_mean is None else (running_mean.shape[0], running_mean.dtype)
        # Running statistics only in eval mode: in training forward updates them in place. In
        # training, the batch mean and invstd the BatchNorm node keeps (the same storages).
        if not training:
            stats = (running_mean, running_var)
        else:
            stats = (None, None) if groups else _kept_statistics(h)
        ctx.save_for_backward(z, weight, bias, *stats)
        ctx.for_consumers = _weak((z, weight, bias, *stats))
        return out

    remake = staticmethod(_norm_again)

    @staticmethod
    def backward(ctx, grad):
        if ctx.lean:
            h = norm_output(ctx)
            ctx.cache = None
        else:
            (h,) = ctx.saved_tensors
        nones = (None,) * 9
        if not torch.is_grad_enabled():  # the usual backward: the activation's kernel, at h
            return (ACTIVATION_BACKWARDS[ctx.act](grad, h, ctx.act_arg), *nones)
        with torch.enable_grad():  # create_graph: through autograd, so that it can be differentiated again
            h_in = h if h.requires_grad else h.detach().requires_grad_()
            (gh,) = torch.autograd.grad(ACTIVATIONS[ctx.act](h_in, ctx.act_arg), h_in, grad, create_graph=True)
        return (gh, *nones)


_define("norm_act(Tensor h, Tensor z, str act, Tensor? weight, Tensor? bias, Tensor? running_mean, "
        "Tensor? running_var, float eps, float act_arg=0.0, int groups=0) -> Tensor",
        _norm_act_kernel, _norm_act_kernel, _NormAct)


# --------------------------------------------------------------------------- a cheap module
def _run_as_forward_ran(ctx, x: Tensor) -> Tensor:
    with _as_forward_ran(ctx.autocast):
        return ctx.forward(x)


class _Recompute(torch.autograd.Function):
    """``forward(x)`` that keeps ``x`` alone, and in backward runs ``forward`` again on it with
    autograd on: the same ops on the same values, so the same gradients, for x and the module's
    parameters (passed in so that their gradients flow). Lighter than ``torch.utils.checkpoint``:
    the ops are cheap and draw no random numbers, so there is no RNG state to keep.

    ``x`` comes in ``uses`` times, once per edge by which the module's ops read it (RMSNorm
    reads it in ``x.pow(2)`` and in ``x * rsqrt(...)``), and backward returns each edge's
    gradient in its own slot, in the order native's engine adds them to x's gradient. Summed
    here first, they would meet x's other gradients (the residual's) in another order than
    native's: one rounding off.

    A lean producer: a Linear after it (LLaMA's q, k, v projections after RMSNorm) keeps x too,
    and asks this node for the output in backward."""

    @staticmethod
    def forward(ctx, forward, uses, x, *rest):
        ctx.forward, ctx.uses, ctx.autocast, ctx.cache = forward, uses, _autocast_state(), None
        ctx.again, ctx.ran = None, False  # see remake
        ctx.save_for_backward(x)
        ctx.lean, ctx.for_consumers = True, _weak((x,))
        return forward(x)

    @staticmethod
    def remake(ctx, saved: Optional[Sequence[Tensor]] = None) -> Tensor:
        """The module's output again, for a consumer. In the usual backward (no create_graph, this
        node's backward still to come) it is made with the graph that backward differentiates,
        kept for it until then: the module runs once in backward, not twice. That graph keeps the
        module's intermediates meanwhile, which native keeps from forward on."""
        (x,) = ctx.saved_tensors if saved is None else saved
        if torch.is_grad_enabled() or ctx.ran:  # create_graph; or after this node's backward
            return _run_as_forward_ran(ctx, x)
        ctx.again = _again_with_graph(ctx, x)
        return ctx.again[1].detach()

    @staticmethod
    def backward(ctx, grad):
        ctx.cache, ctx.ran = None, True
        again, ctx.again = ctx.again, None
        (x,) = ctx.saved_tensors
        k = max(ctx.uses, 1)
        params = tuple(p for p in ctx.forward.__self__.parameters() if p.requires_grad)
        needs_x = any(ctx.needs_input_grad[2:2 + k])
        create = torch.is_grad_enabled()
        xd, y = again if again is not None else _again_with_graph(ctx, x, create)
        arrived: List[Optional[Tensor]] = []
        handles = [node.register_hook(functools.partial(_arrive, slots, arrived))
                   for node, slots in (_edges_into(y.grad_fn, xd.grad_fn).items() if needs_x else ())]
        try:
            grads = list(torch.autograd.grad(y, ((xd,) if needs_x else ()) + params, grad, allow_unused=True,
                                             create_graph=create))
        finally:
            for h in handles:
                h.remove()
        gx = grads.pop(0) if needs_x else None
        if len(arrived) != k:  # not the edges forward counted: the sum, in one slot
            arrived = [gx] + [None] * (k - 1)
        return (None, None, *arrived, *grads)


def _again_with_graph(ctx, x: Tensor, create: bool = False) -> Tuple[Tensor, Tensor]:
    """(xd, the module's output from it, with its graph): what :class:`_Recompute`'s backward
    differentiates. ``xd`` is a view of ``x`` (detached, unless ``create``: create_graph
    differentiates through x itself, so that the gradients are functions of it), a node of its
    own where x needs a gradient: the edges into it are x's uses."""
    needs_x = any(ctx.needs_input_grad[2:2 + max(ctx.uses, 1)])
    base = x if create and x.requires_grad else x.detach().requires_grad_(needs_x)
    with torch.enable_grad():
        xd = base.view_as(base) if needs_x else base
        return xd, _run_as_forward_ran(ctx, xd)


def _arrive(slots: List[int], arrived: List[Optional[Tensor]], grad_inputs, grad_outputs) -> None:
    arrived.extend(grad_inputs[j] for j in slots)


def _edges_into(top, target) -> Dict[object, List[int]]:
    """{node: its input slots that lead into ``target``} over the graph from ``top`` down to ``target``."""
    edges: Dict[object, List[int]] = {}
    seen, stack = set(), [top]
    while stack:
        node = stack.pop()
        if node is None or node is target or id(node) in seen:
            continue
        seen.add(id(node))
        for j, (nxt, _) in enumerate(node.next_functions):
            if nxt is target:
                edges.setdefault(node, []).append(j)
            elif nxt is not None:
                stack.append(nxt)
    return edges


def uses_of_input(forward, x: Tensor) -> int:
    """How many edges the graph of ``forward(x)`` has into ``x``: :class:`_Recompute` takes x that
    many times. Run once per dtype, device and autocast state, without torch-function modes (as
    backward runs it)."""
    base = x.detach().requires_grad_()
    xd = base.view_as(base)
    with torch.enable_grad(), torch._C.DisableTorchFunction():
        y = forward(xd)
    top = getattr(y, "grad_fn", None)
    return sum(len(v) for v in _edges_into(top, xd.grad_fn).values()) if top is not None else 0


def recompute_module(forward, x: Tensor, *params: Tensor, uses: Optional[int] = None) -> Tensor:
    """``forward(x)`` keeping ``x`` only; ``forward`` runs again in backward (a cheap module's own
    forward, bound to it; ``params`` its parameters that require grad). ``uses``: see
    :func:`uses_of_input` (counted here if not given)."""
    if uses is None:
        uses = uses_of_input(forward, x)
    return _Recompute.apply(forward, uses, x, *([x] * (max(uses, 1) - 1)), *params)


recompute_linear = torch.ops.graph_rewrite.recompute_linear
recompute_conv = torch.ops.graph_rewrite.recompute_conv
recompute_mul = torch.ops.graph_rewrite.recompute_mul
norm_act = torch.ops.graph_rewrite.norm_act
