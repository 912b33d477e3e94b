"""The C++ Autograd kernels of the lean ops (``csrc/lean_ops.cpp``: softplus, sigmoid, logsigmoid;
``csrc/recompute_ops.cpp``: norm_act and the Linear, convolution and mul recompute ops), when built
for this torch.

``pip install`` compiles them where a C++ compiler is found; without one the install goes on and
the ops run their Python kernels, which give the same bits at a higher per-call cost on small
tensors (benchmarks/OVERHEAD.md). The kernels serve plain CPU tensors; tracers, subclasses, torch.func transforms,
autocast and CUDA tensors are handed to the Python kernels (so are the activations' second derivatives,
GroupNorm, LayerNorm recomputes and consumers of a Python lean producer).

The library is used only if it was built against the running torch (the same ``torch.__version__``):
a build for another torch is left unloaded rather than risk a mismatched ABI. Set
``GRAPH_REWRITE_NO_CPP=1`` to keep the Python kernels.

Example::

    >>> import graph_rewrite.ops.cpp as cpp
    >>> cpp.status()  # doctest: +SKIP
    'active: built for torch 2.14.1+cu130'
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import os
from typing import Optional

import torch

__all__ = ["OPS", "load", "register", "active", "status", "python_only"]

# The ops whose Autograd kernel the library provides.
OPS = ("softplus", "sigmoid", "logsigmoid", "norm_act", "recompute_conv", "recompute_mul", "recompute_linear")

_DISABLE = "GRAPH_REWRITE_NO_CPP"
_NAME = "_lean_ops"  # the extension's module name, next to this file

_lib: Optional[ctypes.CDLL] = None
_status = "not loaded"
_registered = False


def _path() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, _NAME + suffix)
        if os.path.exists(path):
            return path
    return None


def load() -> bool:
    """Open the library if it is there, enabled, and built for this torch; say why not in :func:`status`."""
    global _lib, _status
    if _lib is not None:
        return True
    if os.environ.get(_DISABLE, "") not in ("", "0"):
        _status = f"off: {_DISABLE} is set"
        return False
    path = _path()
    if path is None:
        _status = "not built: the install found no C++ compiler, or this is a source tree without an install"
        return False
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:  # e.g. a symbol this torch lacks
        _status = f"not loaded: {e}"
        return False
    lib.graph_rewrite_built_for.restype = ctypes.c_char_p
    lib.graph_rewrite_python_only.argtypes = [ctypes.c_int]
    built_for = lib.graph_rewrite_built_for().decode()
    if built_for != torch.__version__:
        _status = f"not used: built for torch {built_for}, running torch {torch.__version__} (reinstall to rebuild)"
        return False
    _lib, _status = lib, f"loaded: built for torch {built_for}"
    return True


def register() -> None:
    """Make the library's kernels the ops' Autograd kernels (after activations.py defined the ops)."""
    global _registered, _status
    if _lib is not None and not _registered:
        _lib.graph_rewrite_register()
        _registered = True
        _status = "active" + _status[len("loaded"):]


def python_only(delta: int) -> None:
    """Enter (+1) or leave (-1) a region of this thread where the ops take their Python kernels.

    The runtime front end's mode is one: its in-place guard reads the Python nodes.
    """
    if _registered:
        _lib.graph_rewrite_python_only(delta)


def active() -> bool:
    """Whether the ops of :data:`OPS` run their C++ Autograd kernels on CPU tensors."""
    return _registered


def status() -> str:
    """One line: whether the C++ kernels are in use, and if not, why."""
    return _status
