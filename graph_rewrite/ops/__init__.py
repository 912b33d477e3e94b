"""The lean ops, by kind; each kind is a module here.

* :mod:`.activations`: activations that save their output (softplus, sigmoid, logsigmoid).
* :mod:`.output_derived`: more of that kind, whose slope is read off the output (hardtanh/ReLU6, leaky_relu).
* :mod:`.recompute`: consumers (Linear, Conv, mul) that keep their activation's input and recompute it.

Kernels apart: :mod:`.triton_kernels` (the fused CUDA backward of softplus and logsigmoid) and
:mod:`.cpp`, which loads ``csrc/*.cpp`` (C++ Autograd kernels of the first three and of the
recompute ops on CPU).
"""
from .activations import logsigmoid, sigmoid, softplus, softplus_needs_branch_mask
from .output_derived import hardtanh, leaky_relu
from .recompute import ACTIVATIONS, recompute_conv, recompute_linear, recompute_mul
from . import cpp

# Once every op is defined: the C++ kernels, where built, become the Autograd kernels of cpp.OPS.
cpp.register()

__all__ = [
    "softplus", "sigmoid", "logsigmoid", "softplus_needs_branch_mask", "hardtanh", "leaky_relu",
    "ACTIVATIONS", "recompute_linear", "recompute_conv", "recompute_mul",
]
