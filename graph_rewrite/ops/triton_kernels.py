"""Fused one-pass backward kernels (Triton) for the lean activations.

The composite backward in :mod:`.activations` makes four passes over memory
(``mul``, ``expm1_``, ``mul_``, ``neg_``); these kernels read ``y``, ``grad`` (and
the softplus branch record, if one is kept) once and write the result once.
:func:`applies` decides whether a call may take them: plain contiguous CUDA tensors
of one float dtype and shape, no dispatch mode active (tracers such as FakeTensor
and FunctionalTensor take the composite, which the compiler can trace), and an
importable Triton. Everything else takes the composite.

Exactness: the kernels compute the composite's formulas in the same order and in
the same "opmath" (float32 for float16/bfloat16, like the native kernels):

* softplus: ``u = y * -beta`` (rounded to opmath), ``-(expm1(u) * grad)``, and
  ``grad`` where the branch record says "linear";
* logsigmoid: ``-(expm1(y) * grad)``.

Only ``expm1`` is computed differently. libdevice's ``expm1`` is unavailable in
Triton's interpreter (``TRITON_INTERPRET=1``) and ``tl.exp``/``tl.log`` compile to
approximate instructions on NVIDIA GPUs, so :func:`_expm1_f64` is written out with
arithmetic only (a Cody-Waite range reduction, a Taylor polynomial and an exact
power of two built from its bits), in float64, the same code in both modes. For
float32 opmath that is the correctly rounded ``expm1f`` except for values within
~1e-16 of a rounding boundary, so the result equals the composite bit for bit
wherever the composite's own ``expm1`` is correctly rounded, and is otherwise the
composite's formula with ``expm1`` one ulp away (``tests/triton_interpreter_cases.py``
checks both). For float64 it is within 1 ulp of the true ``expm1``, as the
composite's is.

The ops call :func:`try_softplus_backward` / :func:`try_logsigmoid_backward`, which
return None (the caller then runs the composite) where the kernel does not apply, or
after a launch failed once (a warning says why): a GPU this was never run on must not
stop training.

Example (on a GPU; on CPU the same call runs under ``TRITON_INTERPRET=1``)::

    >>> y = torch.nn.functional.softplus(torch.randn(1 << 20, device="cuda"))
    >>> g = torch.randn_like(y)
    >>> dx = softplus_backward(g, y, 1.0, None)   # == activations.softplus_grad(g, y, 1.0, 20.0, None)
"""
from __future__ import annotations

import struct
import warnings
from typing import Optional

import torch
from torch import Tensor

try:  # optional: without Triton (or on a broken install) every call takes the composite
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the machine
    triton = None

__all__ = ["applies", "available", "eligible", "softplus_backward", "logsigmoid_backward",
           "try_softplus_backward", "try_logsigmoid_backward"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# 2048 elements and 8 warps a program: 90% of copy_ bandwidth on an H100 at 16M float32
# elements, against 79% for 1024 / 4 (benchmarks/GPU.md).
BLOCK = 2048
NUM_WARPS = 8
_failed: Optional[str] = None  # why a launch failed; the ops stop trying after that


def available() -> bool:
    """Whether Triton imported, the kernels are defined and none has failed to launch."""
    return triton is not None and _failed is None


def _try(fn, *args) -> Optional[Tensor]:
    global _failed
    try:
        return fn(*args)
    except Exception as e:  # compile or launch failure: the composite serves from now on
        _failed = f"{type(e).__name__}: {e}"
        warnings.warn(f"graph_rewrite: the fused Triton backward failed ({_failed}); "
                      "using the composite backward from now on", RuntimeWarning, stacklevel=3)
        return None


def try_softplus_backward(grad: Tensor, y: Tensor, beta: float, linear: Optional[Tensor]) -> Optional[Tensor]:
    """:func:`softplus_backward` where :func:`applies`, else None (the caller runs the composite)."""
    return _try(softplus_backward, grad, y, beta, linear) if applies(grad, y, linear) else None


def try_logsigmoid_backward(grad: Tensor, y: Tensor) -> Optional[Tensor]:
    """:func:`logsigmoid_backward` where :func:`applies`, else None (the caller runs the composite)."""
    return _try(logsigmoid_backward, grad, y) if applies(grad, y) else None


def applies(grad: Tensor, y: Tensor, mask: Optional[Tensor] = None) -> bool:
    """Whether the fused kernel may replace the composite for these tensors.

    Cheap on CPU tensors (the first test fails). Tracers are not plain ``Tensor``s,
    and a dispatch mode may be recording: both keep the traceable composite.
    """
    return y.is_cuda and eligible(grad, y, mask) and available()


def eligible(grad: Tensor, y: Tensor, mask: Optional[Tensor] = None) -> bool:
    """Every condition of :func:`applies` except the device: plain, dense, alike tensors."""
    if type(y) is not Tensor or type(grad) is not Tensor or torch._C._len_torch_dispatch_stack():
        return False
    if grad.dtype != y.dtype or y.dtype not in _DTYPES or grad.device != y.device or grad.shape != y.shape:
        return False
    if not (y.is_contiguous() and grad.is_contiguous()):
        return False
    return mask is None or (type(mask) is Tensor and mask.dtype == torch.bool and mask.shape == y.shape
                            and mask.device == y.device and mask.is_contiguous())


def _double_bits(x: float) -> int:
    # A float64 scalar travels as its int64 bits: Triton passes Python floats as
    # float32, which would round beta for float64 tensors.
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _launch(kernel, grad: Tensor, y: Tensor, mask: Optional[Tensor], neg_beta: float, block: int, num_warps: int) -> Tensor:
    out = torch.empty_like(grad)
    n = y.numel()
    if n == 0:
        return out
    m = mask.view(torch.uint8) if mask is not None else y  # y: an unused stand-in pointer
    f64, bf16 = y.dtype == torch.float64, y.dtype == torch.bfloat16
    if bf16:  # bfloat16 travels as its bits: see _bf16_to_f32
        grad, y, out_arg = grad.view(torch.int16), y.view(torch.int16), out.view(torch.int16)
        m = m.view(torch.int16) if mask is None else m
    else:
        out_arg = out
    grid = (_cdiv(n, block),)
    args = (grad, y, m, out_arg, n, _double_bits(neg_beta))
    kw = dict(HAS_MASK=mask is not None, IS_F64=f64, IS_BF16=bf16, BLOCK=block)
    if y.device.type == "cuda":  # (the interpreter runs CPU tensors)
        kw["num_warps"] = num_warps
        if y.device.index != torch.cuda.current_device():
            with torch.cuda.device(y.device):
                kernel[grid](*args, **kw)
            return out
    kernel[grid](*args, **kw)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def softplus_backward(grad: Tensor, y: Tensor, beta: float, linear: Optional[Tensor] = None,
                      *, block: int = BLOCK, num_warps: int = NUM_WARPS) -> Tensor:
    """``grad * d softplus/dx`` from the output, in one pass; the composite's bits.

    ``linear`` is the branch record (bool, True where native took ``y = x``) or None.
    The threshold is not an argument: without a record the formula is exactly 1 on
    the linear branch already (see ``activations.softplus_needs_branch_mask``).
    Callers check :func:`applies` first (or run under ``TRITON_INTERPRET=1``).
    """
    if triton is None:
        raise RuntimeError("graph_rewrite: Triton is not installed; the fused backward is unavailable")
    return _launch(_softplus_bwd, grad, y, linear, -float(beta), block, num_warps)


def logsigmoid_backward(grad: Tensor, y: Tensor, *, block: int = BLOCK, num_warps: int = NUM_WARPS) -> Tensor:
    """``grad * d logsigmoid/dx = -(expm1(y) * grad)`` in one pass; the composite's bits."""
    if triton is None:
        raise RuntimeError("graph_rewrite: Triton is not installed; the fused backward is unavailable")
    return _launch(_logsigmoid_bwd, grad, y, None, -1.0, block, num_warps)


if triton is not None:
    @triton.jit
    def _expm1_f64(x):
        """expm1 of a float64 tensor with arithmetic only (no libdevice, no approximate exp).

        x = k*ln2 + r with |r| <= ln2/2 (Cody-Waite: k*LN2_HI is exact), expm1(r) from
        its Taylor series to r**14 (truncation < 0.01 ulp), then
        expm1(x) = 2**k * expm1(r) + (2**k - 1), where 2**k - 1 is exact for k >= -53.
        Error below 1 ulp on [-40, 709]; -1 below, inf above, NaN and signed zeros kept.
        """
        LN2_HI: tl.constexpr = 6.93147180369123816490e-01  # low 32 bits zero: k*LN2_HI exact
        LN2_LO: tl.constexpr = 1.90821492927058770002e-10
        INV_LN2: tl.constexpr = 1.44269504088896338700e+00
        ok = (x >= -40.0) & (x <= 709.0)  # False for NaN and both infinities
        xs = tl.where(ok, x, 0.0)
        t = xs * INV_LN2
        k = tl.where(t < 0, t - 0.5, t + 0.5).to(tl.int32)  # round half away from zero
        kf = k.to(tl.float64)
        r = (xs - kf * LN2_HI) - kf * LN2_LO
        q = 1.0 / 87178291200.0  # 1/14!
        q = q * r + 1.0 / 6227020800.0
        q = q * r + 1.0 / 479001600.0
        q = q * r + 1.0 / 39916800.0
        q = q * r + 1.0 / 3628800.0
        q = q * r + 1.0 / 362880.0
        q = q * r + 1.0 / 40320.0
        q = q * r + 1.0 / 5040.0
        q = q * r + 1.0 / 720.0
        q = q * r + 1.0 / 120.0
        q = q * r + 1.0 / 24.0
        q = q * r + 1.0 / 6.0
        q = q * r + 0.5
        p = r + (r * r) * q  # expm1(r)
        scale = ((k.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)  # 2**k, exact
        res = scale * p + (scale - 1.0)
        res = tl.where(x < -40.0, -1.0, res)
        res = tl.where(x > 709.0, float("inf"), res)
        res = tl.where(x == 0.0, x, res)  # keeps -0.0 (the polynomial gives +0.0)
        return tl.where(x == x, res, x)  # NaN in, NaN out

    @triton.jit
    def _bf16_to_f32(bits):
        """bfloat16 bits (int16) to float32: exact, the upper half of a float32."""
        return (bits.to(tl.uint16).to(tl.uint32) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _f32_to_bf16(x):
        """float32 to bfloat16 bits (int16), rounded to nearest even as torch rounds.

        Done by hand because Triton's interpreter truncates float32 -> bfloat16; the
        same integer code compiles for the GPU. NaN stays a quiet NaN.
        """
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        nan = tl.full(bits.shape, 0x7FC0, tl.uint32)  # torch's canonical bfloat16 NaN
        out = tl.where(x == x, rounded, nan)
        return out.to(tl.uint16).to(tl.int16, bitcast=True)

    @triton.jit
    def _load_opmath(ptr, offs, inb, IS_F64: tl.constexpr, IS_BF16: tl.constexpr):
        if IS_F64:
            v = tl.load(ptr + offs, mask=inb, other=0.0).to(tl.float64)
        elif IS_BF16:
            v = _bf16_to_f32(tl.load(ptr + offs, mask=inb, other=0))
        else:
            v = tl.load(ptr + offs, mask=inb, other=0.0).to(tl.float32)
        return v

    @triton.jit
    def _store(ptr, offs, inb, v, IS_BF16: tl.constexpr):
        if IS_BF16:
            tl.store(ptr + offs, _f32_to_bf16(v), mask=inb)
        else:
            tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=inb)

    @triton.jit
    def _softplus_bwd(grad_ptr, y_ptr, mask_ptr, out_ptr, n, neg_beta_bits,
                      HAS_MASK: tl.constexpr, IS_F64: tl.constexpr, IS_BF16: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        neg_beta = neg_beta_bits.to(tl.int64).to(tl.float64, bitcast=True)
        y = _load_opmath(y_ptr, offs, inb, IS_F64, IS_BF16)
        g = _load_opmath(grad_ptr, offs, inb, IS_F64, IS_BF16)
        if IS_F64:
            e = _expm1_f64(y * neg_beta)
        else:
            # The product is rounded to float32 before expm1, like the composite's mul.
            u = y * neg_beta.to(tl.float32)
            e = _expm1_f64(u.to(tl.float64)).to(tl.float32)
        res = -(e * g)
        if HAS_MASK:
            lin = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
            res = tl.where(lin, g, res)
        _store(out_ptr, offs, inb, res, IS_BF16)

    @triton.jit
    def _logsigmoid_bwd(grad_ptr, y_ptr, mask_ptr, out_ptr, n, neg_beta_bits,
                        HAS_MASK: tl.constexpr, IS_F64: tl.constexpr, IS_BF16: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        y = _load_opmath(y_ptr, offs, inb, IS_F64, IS_BF16)
        g = _load_opmath(grad_ptr, offs, inb, IS_F64, IS_BF16)
        if IS_F64:
            e = _expm1_f64(y)
        else:
            e = _expm1_f64(y.to(tl.float64)).to(tl.float32)
        res = -(e * g)
        _store(out_ptr, offs, inb, res, IS_BF16)
