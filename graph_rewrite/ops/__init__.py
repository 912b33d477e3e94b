"""The lean ops, by kind; each kind is a module here.

* :mod:`.activations`: activations that save their output (softplus, sigmoid, logsigmoid).
"""
from .activations import logsigmoid, sigmoid, softplus, softplus_needs_branch_mask

__all__ = ["softplus", "sigmoid", "logsigmoid", "softplus_needs_branch_mask"]
