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
from typing import Optional, Tuple

import torch
import torch.autograd.forward_ad as _fwAD
import torch.nn.functional as F
from torch import Tensor

from . import cpp

__all__ = ["softplus", "sigmoid", "logsigmoid", "softplus_needs_branch_mask", "softplus_beta_is_lean", "python_kernel",
           "underflow_record", "softplus_grad", "logsigmoid_grad"]

# float16/bfloat16 are computed in float32 by the native kernels ("opmath");
# the backward formulas below do the same so they round like native.
_REDUCED = (torch.float16, torch.bfloat16)

# Kept alive for the life of the process: dropping it would unregister the ops.
_lib = torch.library.Library("graph_rewrite", "DEF")
# Whether the C++ Autograd kernels (csrc/lean_ops.cpp) take the eager CPU calls; see cpp.py.
_CPP = cpp.load()


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


def _is_traced(x: Tensor) -> bool:
    """Whether ``x`` has no data to look at: a tracer (FakeTensor, FunctionalTensor, a dispatch mode) or meta."""
    return type(x) is not Tensor or bool(torch._C._len_torch_dispatch_stack()) or x.is_meta


def _autocast_on(x: Tensor) -> bool:
    """Whether autocast is on for ``x``'s device; False for devices autocast does not know (meta)."""
    kind = x.device.type
    return torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)


def _transforms_active() -> bool:
    """Whether a torch.func transform or a forward-AD dual level is active.

    Only then do the ops take their ``setup_context`` Functions (with ``jvp`` and a
    vmap rule); the plain eager path keeps the cheaper ctx-in-forward form.
    """
    return torch._C._are_functorch_transforms_active() or _fwAD._current_level >= 0


def _define(schema: str, kernel, fake, function: type, transform_function: Optional[type] = None,
            needs_graph=None, under_autocast=None) -> None:
    """Define ``graph_rewrite::<name>``: a backend kernel, a fake kernel and an Autograd kernel.

    The Autograd kernel applies ``function`` (an autograd.Function that saves the
    output) only when a graph is being recorded; otherwise it goes straight to the
    backend kernel. ``function`` takes ``ctx`` in ``forward`` rather than a separate
    ``setup_context``: that form costs ~40 µs less per call, but torch.func
    transforms and forward AD refuse it. While one of those is active the kernel
    applies ``transform_function`` instead (``setup_context``, ``jvp``, vmap rule).
    Without ``transform_function`` it runs ``kernel`` itself there, whose native calls the
    transforms know: native's values, derivatives and saved tensors. ``kernel`` must then
    compute the op from native calls on its arguments, as the recompute ops' and hardtanh's
    do. ``needs_graph(x, *args)``
    says whether a graph is recorded (default: ``x`` requires grad; ops with weights
    also look at those). ``under_autocast(x, *args)``, when given, runs instead of
    ``function`` while autocast is on for ``x``'s device.
    """
    name = schema.split("(", 1)[0]
    # The ops with a C++ kernel get a twin ``_<name>_python`` that always runs the Python kernel.
    names = (name, f"_{name}_python") if name in cpp.OPS else (name,)
    for op_name in names:
        _lib.define(schema.replace(name, op_name, 1))
        _lib.impl(op_name, kernel, "CompositeExplicitAutograd")
        torch.library.register_fake(f"graph_rewrite::{op_name}", fake, lib=_lib)
    op = getattr(torch.ops.graph_rewrite, name).default
    # The dispatcher leaves out trailing arguments equal to their schema defaults;
    # autograd.Function.apply takes no defaults, so put them back.
    defaults = tuple(a.default_value for a in op._schema.arguments[1:])

    under_transforms = kernel if transform_function is None else transform_function.apply

    def autograd_kernel(x: Tensor, *args):
        args += defaults[len(args):]
        if _transforms_active():
            return under_transforms(x, *args)
        if torch.is_grad_enabled() and (x.requires_grad if needs_graph is None else needs_graph(x, *args)):
            if under_autocast is not None and _autocast_on(x):
                return under_autocast(x, *args)
            return function.apply(x, *args)
        return _forward(op, kernel, x, *args)

    # The C++ kernel, where loaded, is the public op's Autograd kernel and hands the twin what it does not serve.
    for op_name in names:
        if not (_CPP and op_name == name and name in cpp.OPS):
            _lib.impl(op_name, autograd_kernel, "Autograd")

    def transforms_kernel(x: Tensor, *args):
        # torch.func's front key sees the call before any transform has lowered it:
        # from here the Function is applied as if the user had called it.
        return under_transforms(x, *args, *defaults[len(args):])

    for op_name in names:
        _lib.impl(op_name, transforms_kernel, "FuncTorchDynamicLayerFrontMode")


def _define_grad(schema: str, grad_fn) -> None:
    """Define a Python backward as an op, for the C++ kernels to call where they defer to Python
    (second derivatives, tiny outputs). Its Autograd kernel records ``grad_fn``'s own derivatives."""
    name = schema.split("(", 1)[0]
    _lib.define(schema)
    _lib.impl(name, grad_fn, "Autograd")

    def no_graph(*args):
        with torch.no_grad():
            return grad_fn(*args)

    _lib.impl(name, no_graph, "CompositeExplicitAutograd")
    torch.library.register_fake(f"graph_rewrite::{name}", lambda grad, *args: torch.empty_like(grad), lib=_lib)


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


def softplus_beta_is_lean(beta: float) -> bool:
    """Whether the output can carry the slope: ``beta*y`` must identify the branch and
    ``-expm1(-beta*y)`` give the slope, which breaks for ``beta == 0`` or non-finite beta
    (native returns inf/nan outputs there). Other betas get the native backward from a
    saved input, like native itself.

    >>> softplus_beta_is_lean(2.0), softplus_beta_is_lean(0.0), softplus_beta_is_lean(math.inf)
    (True, False, False)
    """
    return beta != 0 and math.isfinite(beta)


# ------------------------------------------------------------------ tiny outputs
def _tiny_outputs(y: Tensor) -> Tensor:
    """Where ``|y|`` is below the dtype's smallest normal: subnormal or zero outputs.

    There the output has lost relative precision (float16: |y| < 6.1e-5, softplus at
    x < -9.7, logsigmoid at x > 9.7), yet the slope is about ``|y|`` and a large upstream
    gradient (loss scaling) shows every lost bit. NaN compares False.
    """
    return y.abs() < torch.finfo(y.dtype).tiny


def underflow_record(x: Tensor, y: Tensor, sign: int = 0, native_when_tiny: bool = False) -> Optional[Tensor]:
    """The inputs the backward needs where the output cannot carry the slope, or None.

    Eager: ``x`` at the elements of :func:`_tiny_outputs` (masked_select: bytes = the
    dtype's size per such element; none at all when there are none, the usual case;
    one host sync per call on accelerators). The backward finds those elements again
    from ``y``. ``sign``: 1 or -1 if every output is known to have that sign (or be
    NaN), which makes the test cheaper; 0 if not known. Under tracing the data is unknown: float16 keeps all of ``x`` (2 bytes
    per element, what native keeps), other dtypes nothing: their outputs underflow only
    past |x| ~ 87 (bfloat16, float32) or 708 (float64).

    ``native_when_tiny``: the op's slope derived from a tiny output is as good as
    native's own in float32 and float64 (softplus with beta 1, logsigmoid): native's
    ``exp`` is the same subnormal there, and the two gradients differ by at most one
    subnormal spacing times ``|grad|`` (measured on CPU, ``tests/test_ops.py``). Then
    CUDA tensors skip the test: its host sync stalled the GPU (4 x Linear+Softplus on
    an H100: step 1.31x native with it, 1.00x without, ``benchmarks/GPU.md``), and the
    record would only make those gradients better than native's. CPU keeps it.

    >>> x = torch.tensor([-20.0, 0.0], dtype=torch.float16)
    >>> underflow_record(x, F.softplus(x))   # softplus(-20) = 2e-9 rounds to 0 in float16
    tensor([-20.], dtype=torch.float16)
    """
    if not x.dtype.is_floating_point:
        return None
    if _is_traced(x):
        return x if x.dtype == torch.float16 else None
    if native_when_tiny and y.is_cuda and y.dtype in (torch.float32, torch.float64):
        return None
    if not _may_have_tiny_outputs(y, sign):
        return None
    tiny = _tiny_outputs(y)
    return x.masked_select(tiny) if tiny.any() else None


def _may_have_tiny_outputs(y: Tensor, sign: int) -> bool:
    # One reduction instead of abs, compare, any (~2.5 µs at 1k elements): the extreme
    # nearest 0 decides. NaN (min/max propagate it) falls through to the full test.
    if y.numel() == 0:
        return False
    tiny = torch.finfo(y.dtype).tiny
    if sign > 0:
        return not y.amin().item() >= tiny
    if sign < 0:
        return not y.amax().item() <= -tiny
    lo, hi = torch.aminmax(y)
    return not (lo.item() >= tiny or hi.item() <= -tiny)


def _times_grad(t: Tensor, grad: Tensor, inplace: bool) -> Tensor:
    """``t * grad`` with native's layout: in place into the temporary ``t`` when the
    strides agree; otherwise a new tensor, ``grad`` first as in native's TensorIterator
    (a non-contiguous input then gets the gradient's strides, as native gives)."""
    if inplace and t.stride() == grad.stride():
        return t.mul_(grad)
    return torch.mul(grad, t)


def _fix_tiny(t: Tensor, y: Tensor, record: Optional[Tensor], exact) -> Tensor:
    """``t`` with the elements of tiny outputs replaced by ``exact(x)`` from the record.

    A record of ``y``'s shape is the whole input (tracing, transforms); any other is
    the inputs of the tiny elements, in order. ``exact(x, index)`` gets the inputs and
    the index (a mask, or None for all) it must apply to any other operand.
    """
    if record is None:
        return t
    tiny = _tiny_outputs(y)
    if record.shape == y.shape:
        return torch.where(tiny, exact(record, None), t)
    return t.masked_scatter(tiny, exact(record, tiny).to(t.dtype))


def _fused():
    # The one-pass Triton backward (same bits); imported on the first CUDA backward
    # so that CPU-only use never pays for importing Triton.
    from . import triton_kernels
    return triton_kernels


# --------------------------------------------------------------------------- softplus
# Python kernels receive only the arguments that differ from the schema's defaults,
# so the kernels repeat the defaults. Native semantics for every beta (0, inf, nan too).
def _softplus_kernel(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    return F.softplus(x, beta, threshold)


def _softplus_linear_branch(t: Tensor, beta: float, threshold: float) -> Tensor:
    # Exactly the native kernel's test: in opmath, beta and threshold rounded to it.
    return _opmath(t) * beta > threshold


def _sigmoid_wide(z: Tensor) -> Tensor:
    """sigmoid(z) without overflow in ``exp``: with e = exp(-|z|), 1/(1+e) or e/(1+e).

    torch.sigmoid(-100.) is 0 in float32 (exp(100) overflows) where the slope is 3.7e-44.

    >>> _sigmoid_wide(torch.tensor([-100.0], dtype=torch.float64))
    tensor([3.7201e-44], dtype=torch.float64)
    """
    e = torch.exp(-z.abs())
    return torch.where(z >= 0, 1 / (1 + e), e / (1 + e))


def _softplus_exact_slope(x: Tensor, beta: float, threshold: float) -> Tensor:
    """sigmoid(beta*x) in float64 (1 on native's linear branch), for the few recorded inputs
    of tiny outputs: native's float32 ``exp`` is subnormal there (x < -87), and a loss-scaled
    gradient would show it."""
    return torch.where(_softplus_linear_branch(x, beta, threshold), 1.0, _sigmoid_wide(x.double() * beta))


def _softplus_grad_plain(grad: Tensor, y: Tensor, beta: float, threshold: float,
                         linear: Optional[Tensor], record: Optional[Tensor], inplace: bool = True) -> Tensor:
    """``grad * sigmoid(beta*x)`` from ``y``: ``-(expm1(-beta*y) * grad)``, in opmath.

    Where no branch record is kept, ``-expm1(-beta*y)`` is exactly 1 on the linear
    branch already (what :func:`softplus_needs_branch_mask` tests). Tiny outputs take
    sigmoid(beta*x) in float64 from their recorded inputs. The result has
    ``grad``'s strides, like native's. ``inplace=False`` for transforms (vmap cannot
    write a batched ``grad`` into an unbatched temporary).
    """
    t = torch.mul(_opmath(y), -beta)
    t.expm1_()
    t = _times_grad(t, grad, inplace)
    t = t.neg_() if inplace else t.neg()  # -(expm1(-b*y) * g) == g * -expm1(-b*y), bit for bit
    if linear is not None:  # into t when allowed: keeps grad's strides
        t = torch.where(linear, _opmath(grad), t, out=t) if inplace else torch.where(linear, _opmath(grad), t)

    def exact(x: Tensor, index: Optional[Tensor]) -> Tensor:
        g = grad if index is None else grad.masked_select(index)
        return (g.double() * _softplus_exact_slope(x, beta, threshold)).to(t.dtype)

    return _fix_tiny(t, y, record, exact).to(grad.dtype)


def _softplus_slope(y: Tensor, beta: float, threshold: float, linear: Optional[Tensor],
                    record: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(slope, exp(-beta*y)) in opmath: dy/dx and, times beta, d slope/dy.

    ``exp(-beta*y)`` is computed directly, not as ``1 - slope`` (autograd's ``expm1``
    backward, ``result + 1``, cancels there: second derivatives of 0 for x >> 0).
    On the linear branch slope is 1 and e is 0: second derivative 0, like native's.
    """
    y_op = _opmath(y)
    if linear is None:
        linear = _softplus_linear_branch(y, beta, threshold)
    z = -beta * y_op
    slope = torch.where(linear, torch.ones_like(y_op), -torch.expm1(z))
    e = torch.where(linear, torch.zeros_like(y_op), torch.exp(z))

    def exact(x: Tensor, index: Optional[Tensor]) -> Tensor:
        return _softplus_exact_slope(x, beta, threshold).to(y_op.dtype)

    return _fix_tiny(slope, y, record, exact), e


class _SoftplusBackward(torch.autograd.Function):
    """The softplus backward as a function of (grad, y), with its own derivatives.

    Used for ``create_graph=True`` and under transforms: d/dgrad = slope,
    d/dy = grad * beta * exp(-beta*y) (0 on the linear branch). With dy/dx = slope the
    second derivative is ``beta * slope * exp(-beta*y)``, accurate on both sides.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(grad, y, beta, threshold, linear, record):
        return _softplus_grad_plain(grad, y, beta, threshold, linear, record, inplace=False)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, y, ctx.beta, ctx.threshold, linear, record = inputs
        ctx.save_for_backward(grad, y, linear, record)
        ctx.save_for_forward(grad, y, linear, record)

    @staticmethod
    def backward(ctx, gg):
        grad, y, linear, record = ctx.saved_tensors
        slope, e = _softplus_slope(y, ctx.beta, ctx.threshold, linear, record)
        gg_op = _opmath(gg)
        d_grad = (gg_op * slope).to(grad.dtype)
        d_y = (gg_op * _opmath(grad) * e * ctx.beta).to(y.dtype)
        return d_grad, d_y, None, None, None, None

    @staticmethod
    def jvp(ctx, t_grad, t_y, *_):
        grad, y, linear, record = ctx.saved_tensors
        slope, e = _softplus_slope(y, ctx.beta, ctx.threshold, linear, record)
        out = _opmath(t_grad) * slope + _opmath(grad) * e * ctx.beta * _opmath(t_y)
        return out.to(grad.dtype)


def softplus_grad(grad: Tensor, y: Tensor, beta: float, threshold: float, linear: Optional[Tensor],
                  record: Optional[Tensor] = None) -> Tensor:
    """``grad * d softplus(x)/dx`` from the output ``y`` (and the records kept, if any).

    d/dx = sigmoid(beta*x) = 1 - exp(-beta*y); expm1 keeps the tiny slopes (x ~ -30
    gives ~1e-13, which 1 - exp() rounds to 0 in float32). ``linear`` is the branch
    record (see :func:`softplus_needs_branch_mask`), ``record`` the inputs of tiny
    outputs (see :func:`underflow_record`). With ``create_graph=True`` it is
    :class:`_SoftplusBackward`, whose derivatives are written out; the plain backward
    works in place on one temporary. Both give the same bits.
    """
    if torch.is_grad_enabled():
        return _SoftplusBackward.apply(grad, y, beta, threshold, linear, record)
    # vmap over the backward (jacrev, batched grads) cannot write into an unbatched temporary.
    inplace = not torch._C._are_functorch_transforms_active()
    # CUDA: one fused pass, unless tiny outputs need their recorded inputs.
    if y.is_cuda and inplace and record is None \
            and (out := _fused().try_softplus_backward(grad, y, beta, linear)) is not None:
        return out
    return _softplus_grad_plain(grad, y, beta, threshold, linear, record, inplace)


def _softplus_records(x: Tensor, output: Tensor, beta: float, threshold: float):
    linear = None
    if x.dtype.is_floating_point and softplus_needs_branch_mask(x.dtype, threshold):
        # One bool per element (1 byte: 1/8 of a float64 input, 1/4 of float32 at
        # small thresholds), kept only where the output cannot tell the branch.
        linear = _softplus_linear_branch(x, beta, threshold)
    # threshold >= 0: both branches give outputs of beta's sign.
    sign = (1 if beta > 0 else -1) if threshold >= 0 else 0
    return linear, underflow_record(x, output, sign, native_when_tiny=beta == 1.0 and threshold >= 0)


def saved_with_output(ctx) -> Tuple[Optional[Tensor], ...]:
    """``ctx.saved_tensors`` of an op that saved its output first, with that output replaced by
    ``ctx.output_copy`` where the runtime front end copied it before an in-place change
    (a ``saved_tensors_hooks`` context was active, so the saved tensor itself could not be swapped)."""
    saved = ctx.saved_tensors
    copy = getattr(ctx, "output_copy", None)
    return saved if copy is None else (copy, *saved[1:])


def _softplus_native_backward(ctx, grad: Tensor) -> Tensor:
    (x,) = ctx.saved_tensors
    return torch.ops.aten.softplus_backward(grad, x, ctx.beta, ctx.threshold)


class _Softplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, beta: float, threshold: float) -> Tensor:
        output = _forward(torch.ops.graph_rewrite.softplus.default, _softplus_kernel, x, beta, threshold)
        ctx.beta, ctx.threshold = beta, threshold
        ctx.lean = softplus_beta_is_lean(beta)
        if not ctx.lean:  # the output carries no slope: keep the input, as native does
            ctx.save_for_backward(x)
            return output
        ctx.save_for_backward(output, *_softplus_records(x, output, beta, threshold))
        return output

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not ctx.lean:
            return _softplus_native_backward(ctx, grad), None, None
        y, linear, record = saved_with_output(ctx)
        return softplus_grad(grad, y, ctx.beta, ctx.threshold, linear, record), None, None


class _SoftplusTransforms(torch.autograd.Function):
    """Softplus for torch.func transforms and forward AD (``setup_context``, ``jvp``, vmap rule).

    Keeps the input as well as the output (no data-dependent records under vmap), so
    memory is native's here; the derivatives are the lean ones (better second derivatives).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, beta: float, threshold: float) -> Tensor:
        return _softplus_kernel(x, beta, threshold)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.beta, ctx.threshold = inputs
        ctx.lean = softplus_beta_is_lean(ctx.beta) and x.dtype.is_floating_point
        ctx.save_for_backward(output, x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        y, x = ctx.saved_tensors
        if not ctx.lean:
            return torch.ops.aten.softplus_backward(grad, x, ctx.beta, ctx.threshold), None, None
        linear = _softplus_linear_branch(x, ctx.beta, ctx.threshold)
        return softplus_grad(grad, y, ctx.beta, ctx.threshold, linear, x), None, None

    @staticmethod
    def jvp(ctx, t: Tensor, *_):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.softplus_backward(t, x, ctx.beta, ctx.threshold)  # native's own jvp


# The kernel doubles as the fake kernel: on fake tensors F.softplus runs the native
# meta kernel, which gives the same dtype and strides.
def _softplus_autocast(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    # Under autocast the Linear or convolution after softplus keeps autocast's cast of the output,
    # not the output: where the lean op would keep a branch mask too, native's input alone is less.
    if x.dtype.is_floating_point and softplus_needs_branch_mask(x.dtype, threshold):
        return torch.nn.functional.softplus(x, beta, threshold)
    return _Softplus.apply(x, beta, threshold)


_define("softplus(Tensor x, float beta=1.0, float threshold=20.0) -> Tensor",
        _softplus_kernel, _softplus_kernel, _Softplus, _SoftplusTransforms, under_autocast=_softplus_autocast)
_define_grad("_softplus_grad_python(Tensor grad, Tensor y, float beta, float threshold, Tensor? record=None) -> Tensor",
             lambda grad, y, beta, threshold, record=None: softplus_grad(grad, y, beta, threshold, None, record))


# --------------------------------------------------------------------------- sigmoid
class _Sigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        output = _forward(torch.ops.graph_rewrite.sigmoid.default, torch.sigmoid, x)
        ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = saved_with_output(ctx)
        # The very kernel native autograd uses (dy * (1 - y) * y): bitwise equal to
        # native, complex-aware, and differentiable for double backward.
        return torch.ops.aten.sigmoid_backward(grad, y)


class _SigmoidTransforms(torch.autograd.Function):
    """Sigmoid for torch.func transforms and forward AD: native's formulas, from the output."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.sigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return torch.ops.aten.sigmoid_backward(grad, y)

    @staticmethod
    def jvp(ctx, t: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        # Native's jvp formula: sigmoid_backward conjugates its slope (complex inputs).
        return torch.ops.aten.sigmoid_backward(t.conj(), y).conj()


_define("sigmoid(Tensor x) -> Tensor", torch.sigmoid, torch.sigmoid, _Sigmoid, _SigmoidTransforms)


# --------------------------------------------------------------------------- logsigmoid
def _logsigmoid_kernel(x: Tensor) -> Tensor:
    return F.logsigmoid(x).contiguous()


def _logsigmoid_fake(x: Tensor) -> Tensor:
    # The CPU kernel returns a contiguous result even for channels_last input, while
    # PyTorch's own meta kernel claims channels_last (torch 2.15); the op pins contiguous.
    return x.new_empty(x.shape)


def _logsigmoid_exact_slope(x: Tensor) -> Tensor:
    """sigmoid(-x) from the input (for jvp: in opmath; for the tiny-output records: float64)."""
    return _sigmoid_wide(-_opmath(x))


def _logsigmoid_grad_plain(grad: Tensor, y: Tensor, record: Optional[Tensor], inplace: bool = True) -> Tensor:
    """``grad * sigmoid(-x)`` from ``y``: ``-(expm1(y) * grad)`` in opmath; tiny outputs
    (x >> 0) from their recorded inputs. ``grad``'s strides, like native's."""
    t = _times_grad(torch.expm1(_opmath(y)), grad, inplace)
    t = t.neg_() if inplace else t.neg()

    def exact(x: Tensor, index: Optional[Tensor]) -> Tensor:
        g = grad if index is None else grad.masked_select(index)
        return (g.double() * _logsigmoid_exact_slope(x.double())).to(t.dtype)

    return _fix_tiny(t, y, record, exact).to(grad.dtype)


def _logsigmoid_slope(y: Tensor, record: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(slope, exp(y)) in opmath: slope = sigmoid(-x) = -expm1(y), d slope/dy = -exp(y).

    ``exp(y)`` directly, not ``expm1(y) + 1``, which cancels to 0 for x << 0."""
    y_op = _opmath(y)
    slope = _fix_tiny(-torch.expm1(y_op), y, record, lambda x, index: _logsigmoid_exact_slope(x.double()).to(y_op.dtype))
    return slope, torch.exp(y_op)


class _LogSigmoidBackward(torch.autograd.Function):
    """The logsigmoid backward as a function of (grad, y): d/dgrad = slope,
    d/dy = -grad * exp(y); second derivative ``-slope * exp(y)`` = -sigmoid(x)sigmoid(-x)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad, y, record):
        return _logsigmoid_grad_plain(grad, y, record, inplace=False)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, gg):
        grad, y, record = ctx.saved_tensors
        slope, e = _logsigmoid_slope(y, record)
        gg_op = _opmath(gg)
        return (gg_op * slope).to(grad.dtype), (-(gg_op * _opmath(grad)) * e).to(y.dtype), None

    @staticmethod
    def jvp(ctx, t_grad, t_y, _):
        grad, y, record = ctx.saved_tensors
        slope, e = _logsigmoid_slope(y, record)
        return (_opmath(t_grad) * slope - _opmath(grad) * e * _opmath(t_y)).to(grad.dtype)


def logsigmoid_grad(grad: Tensor, y: Tensor, record: Optional[Tensor] = None) -> Tensor:
    """``grad * d logsigmoid(x)/dx`` from the output: sigmoid(-x) = 1 - exp(y) = -expm1(y).

    ``record``: the inputs of tiny outputs (:func:`underflow_record`)."""
    if torch.is_grad_enabled():  # create_graph=True: derivatives written out
        return _LogSigmoidBackward.apply(grad, y, record)
    inplace = not torch._C._are_functorch_transforms_active()
    if y.is_cuda and inplace and record is None and (out := _fused().try_logsigmoid_backward(grad, y)) is not None:
        return out
    return _logsigmoid_grad_plain(grad, y, record, inplace)


class _LogSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        output = _forward(torch.ops.graph_rewrite.logsigmoid.default, _logsigmoid_kernel, x)
        ctx.save_for_backward(output, underflow_record(x, output, sign=-1, native_when_tiny=True))  # logsigmoid <= 0
        return output

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        y, record = saved_with_output(ctx)
        return logsigmoid_grad(grad, y, record)


class _LogSigmoidTransforms(torch.autograd.Function):
    """Logsigmoid for torch.func transforms and forward AD; keeps the input as well."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return F.logsigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output, inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        y, x = ctx.saved_tensors
        return logsigmoid_grad(grad, y, x)

    @staticmethod
    def jvp(ctx, t: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return (_opmath(t) * _logsigmoid_exact_slope(x)).to(t.dtype)


_define("logsigmoid(Tensor x) -> Tensor", _logsigmoid_kernel, _logsigmoid_fake, _LogSigmoid, _LogSigmoidTransforms)
_define_grad("_logsigmoid_grad_python(Tensor grad, Tensor y, Tensor? record=None) -> Tensor", logsigmoid_grad)


def python_kernel(op):
    """The twin of a lean op that always runs the Python kernel (``softplus`` -> ``_softplus_python``),
    whose autograd node is the Python Function's; ``op`` itself if it has none.

    >>> python_kernel(torch.ops.graph_rewrite.softplus)
    <OpOverloadPacket(op='graph_rewrite._softplus_python')>
    """
    twin = f"_{op.__name__}_python"
    return getattr(torch.ops.graph_rewrite, twin) if hasattr(torch.ops.graph_rewrite, twin) else op


# The packets: what the FX pass inserts, and what users and TorchScript call.
softplus = torch.ops.graph_rewrite.softplus
sigmoid = torch.ops.graph_rewrite.sigmoid
logsigmoid = torch.ops.graph_rewrite.logsigmoid
