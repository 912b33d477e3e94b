"""Activation memory: the bytes autograd still holds when forward ends.

Counted with ``torch.autograd.graph.saved_tensors_hooks``: every storage saved
for backward is remembered through a weak reference, and when forward returns
only the storages still alive count, each once (views share their base's
storage). Storages of ``exclude`` (parameters, buffers, given inputs) are left
out. It counts on every device alike, with no allocator statistics.

Why weak references and not addresses: a branch of the graph that forward drops
(a detached statistic, detection post-processing) frees what it saved, and the
allocator may hand the same address to a later tensor within the same forward.
Keyed by address, the count then depended on the allocator's luck; the same
model measured against itself differed by a few percent from run to run. A
``StorageWeakRef`` keeps the storage object (not its memory) from being reused,
so it tells a freed storage from a live one whatever their addresses.

The pack hook keeps a detached alias, not the tensor: a saved output packed
together with its own ``grad_fn`` is a reference cycle that autograd cannot free,
so under the hooks a dropped branch stayed alive and the measured forward held
more than the same forward does without them.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Tuple

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["saved_bytes", "storage_key"]


def storage_key(t: Tensor) -> Tuple[str, int]:
    """(device, data pointer) of ``t``'s storage: unique only among storages alive at once."""
    return (str(t.device), t.untyped_storage().data_ptr())


def saved_bytes(
    fn: Callable[[], Any], exclude: Iterable[Tensor] = (), include_outputs: bool = False,
    exclude_casts: bool = False,
) -> Tuple[int, Any]:
    """Run ``fn()`` and return (bytes autograd holds for backward when it returns, fn's result).

    Each storage saved during ``fn`` and still alive when it returns counts once;
    storages freed before then (saved by a graph branch that was dropped) and
    storages of ``exclude`` do not count. With ``include_outputs`` the tensors
    ``fn`` returns count too (what is held after forward when the caller keeps
    the outputs). The same call measured twice gives the same figure.

    With ``exclude_casts`` the dtype casts of ``exclude``'s tensors that require grad do not
    count either: under autocast, the low-precision weight copies it makes and keeps for
    backward, whose size goes with the weights, not with the activations.

    >>> lin = torch.nn.Linear(1024, 1024)
    >>> n, _ = saved_bytes(lambda: torch.nn.functional.softplus(lin(torch.randn(256, 1024))),
    ...                    exclude=lin.parameters())
    >>> n // 2**20   # the Linear's input and the softplus input, 1 MiB each
    2
    """
    excluded = {StorageWeakRef(t.untyped_storage()).cdata for t in exclude}
    saved: Dict[int, Tuple[StorageWeakRef, int]] = {}  # storage object -> (weak ref, bytes)

    def pack(t: Tensor) -> Tensor:
        if t.device.type != "meta":
            ref = StorageWeakRef(t.untyped_storage())
            saved.setdefault(ref.cdata, (ref, t.untyped_storage().nbytes()))
            if exclude_casts and _cast_of_excluded(t, excluded):
                excluded.add(ref.cdata)
        # Not ``t`` itself: a saved output packed with its own grad_fn forms a cycle
        # that keeps a dropped branch alive. Unpacking restores the autograd metadata.
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    held = {key: n for key, (ref, n) in saved.items() if not ref.expired() and key not in excluded}
    if include_outputs:
        for t in _tensors(out):
            key = StorageWeakRef(t.untyped_storage()).cdata
            if key not in excluded:
                held[key] = t.untyped_storage().nbytes()
    return sum(held.values()), out


def _cast_of_excluded(t: Tensor, excluded: set) -> bool:
    """Whether ``t`` (or the tensor it views) is a dtype copy of an excluded leaf (autocast's weight cast)."""
    node = (t if t._base is None else t._base).grad_fn
    if type(node).__name__ != "ToCopyBackward0":
        return False
    leaf = getattr(node.next_functions[0][0], "variable", None)
    return isinstance(leaf, Tensor) and StorageWeakRef(leaf.untyped_storage()).cdata in excluded


def _tensors(obj: Any):
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
