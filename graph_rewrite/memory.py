"""Activation memory: the bytes autograd keeps between forward and backward.

Counted with ``torch.autograd.graph.saved_tensors_hooks``: every storage saved
for backward, each counted once (views share their base's storage), with the
storages of ``exclude`` (parameters, buffers, given inputs) left out. This is the
measurement of shared/seeds/000 made device-independent.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Tuple

import torch
from torch import Tensor

__all__ = ["saved_bytes", "storage_key"]


def storage_key(t: Tensor) -> Tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def saved_bytes(
    fn: Callable[[], Any], exclude: Iterable[Tensor] = (), include_outputs: bool = False
) -> Tuple[int, Any]:
    """Run ``fn()`` and return (bytes saved for backward, fn's result).

    Each storage counts once; storages of ``exclude`` do not count. With
    ``include_outputs`` the tensors ``fn`` returns count too (what is held after
    forward when the caller keeps the outputs).

    >>> lin = torch.nn.Linear(1024, 1024)
    >>> n, _ = saved_bytes(lambda: torch.nn.functional.softplus(lin(torch.randn(256, 1024))),
    ...                    exclude=lin.parameters())
    >>> n // 2**20   # the Linear's input and the softplus input, 1 MiB each
    2
    """
    excluded = {storage_key(t) for t in exclude}
    storages: Dict[Tuple[str, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        key = storage_key(t)
        if key not in excluded and t.device.type != "meta":
            storages[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    if include_outputs:
        for t in _tensors(out):
            key = storage_key(t)
            if key not in excluded:
                storages[key] = t.untyped_storage().nbytes()
    return sum(storages.values()), out


def _tensors(obj: Any):
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
