"""The analytic floor of activation memory, and a graph walk that checks the hook count.

Activation bytes are the storages that are alive after forward because backward
needs them, plus the outputs, each storage counted once, with parameters, buffers
and inputs left out (``graph_rewrite.memory.saved_bytes`` with ``include_outputs``).

The *floor* asks: if every activation with an output-only derivative (softplus,
sigmoid, logsigmoid) kept its output instead of what it keeps natively, and every
other op kept exactly what PyTorch's own derivative formulas keep, how many bytes
would be alive? It is computed on the native model, without the lean ops:

1. run forward under a ``TorchFunctionMode`` that, for every result whose
   ``grad_fn`` is ``SoftplusBackward0``, ``SigmoidBackward0`` or
   ``LogSigmoidBackward0``, records that node and its output's storage (a
   strong reference is held for the measurement, so no address is reused);
2. count, as ``saved_bytes`` does, every storage saved for backward
   (``saved_tensors_hooks``);
3. walk the autograd graph from the outputs and attribute each saved storage to
   the nodes that keep it (their ``_saved_*`` attributes; ``saved_tensors`` for
   Python ``autograd.Function`` nodes; for ``CopySlices``, the in-place node it
   wraps);
4. floor = the storages of step 2, minus those that only activation nodes keep,
   plus the activation outputs of step 1 and the model's outputs; each storage
   once; parameters, buffers and inputs dropped.

The walk must find every storage the hooks saw (``walk_all`` equals the hook count,
``unattributed`` is 0): the report prints this check for every model.

This floor is what eager PyTorch can reach with output-saving activations; it is
not a lower bound for torch.compile, whose partitioner may recompute cheap
tensors in backward instead of keeping them (and may so go below it).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Tuple

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from graph_rewrite.memory import _tensors, storage_key

ACTIVATION_NODES = ("SoftplusBackward0", "SigmoidBackward0", "LogSigmoidBackward0")

Key = Tuple[str, int]


class _RecordActivationOutputs(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.outputs: Dict[Any, Tensor] = {}  # grad_fn node -> its output (kept alive)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in _tensors(result):
            node = t.grad_fn
            if node is not None and type(node).__name__ in ACTIVATION_NODES and node not in self.outputs:
                self.outputs[node] = t
        return result


def _saved_of(node) -> List[Tensor]:
    found: List[Tensor] = []
    wrapped = getattr(node, "_wrapped_node", None)
    if wrapped is not None:  # CopySlices: an in-place op on a view keeps its node inside
        found.extend(_saved_of(wrapped))
    names = [n for n in dir(node) if n.startswith("_saved_")]
    if hasattr(node, "saved_tensors") and not names:  # Python autograd.Function nodes
        names = ["saved_tensors"]
    for name in names:
        try:
            value = getattr(node, name)
        except Exception:  # released or undefined saved variables
            continue
        found.extend(_tensors(value))
    return found


def walk(outputs: Any) -> Tuple[Dict[Key, int], Dict[Key, int], List[Any]]:
    """Storages saved by activation nodes, storages saved by every other node (``{key: bytes}``
    each), and the activation nodes, over the graph reachable from ``outputs``."""
    act: Dict[Key, int] = {}
    other: Dict[Key, int] = {}
    act_nodes: List[Any] = []
    seen = set()
    stack = [t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        is_act = type(node).__name__ in ACTIVATION_NODES
        if is_act:
            act_nodes.append(node)
        for t in _saved_of(node):
            if t.device.type != "meta":
                (act if is_act else other)[storage_key(t)] = t.untyped_storage().nbytes()
        for nxt, _ in node.next_functions:
            if nxt is not None:
                stack.append(nxt)
    return act, other, act_nodes


def floor_bytes(fn: Callable[[], Any], exclude: Iterable[Tensor]) -> Dict[str, int]:
    """Run ``fn()`` (the native model's forward); return bytes (outputs included, ``exclude`` left out):

    ``floor``: what the hooks see, minus the storages that only activation nodes keep,
    plus the activation outputs. ``walk_all``: everything the walk finds that the hooks
    also saw, plus the outputs; equal to the hook count when the walk attributes every
    saved storage (``unattributed`` counts the hook-saved bytes the walk did not find;
    they stay in the floor). ``walk_only``: bytes the walk finds that no hook saw (0-dim
    wrapped Python numbers, e.g. the 16 in ``16 * x``, are saved without hooks).
    """
    excluded = {storage_key(t) for t in exclude}
    hooked: Dict[Key, int] = {}

    def pack(t: Tensor) -> Tensor:
        if t.device.type != "meta":
            hooked[storage_key(t)] = t.untyped_storage().nbytes()
        return t

    mode = _RecordActivationOutputs()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode:
        out = fn()
    act, other, act_nodes = walk(out)
    outs = {storage_key(t): t.untyped_storage().nbytes() for t in _tensors(out)}
    act_outs: Dict[Key, int] = {}
    missing = 0
    for node in act_nodes:
        y = mode.outputs.get(node)
        if y is None:  # not seen by the mode: keep what the node saved (no substitution)
            missing += 1
            for t in _saved_of(node):
                other[storage_key(t)] = t.untyped_storage().nbytes()
        else:
            act_outs[storage_key(y)] = y.untyped_storage().nbytes()

    def total(d: Dict[Key, int]) -> int:
        return sum(v for k, v in d.items() if k not in excluded)

    only_act = set(act) - set(other)
    floor = {k: v for k, v in hooked.items() if k not in only_act}
    floor.update(act_outs)
    floor.update(outs)
    walked = {**act, **other}
    walk_all = {k: v for k, v in walked.items() if k in hooked}
    walk_all.update(outs)
    unattributed = {k: v for k, v in hooked.items() if k not in walked}
    walk_only = {k: v for k, v in walked.items() if k not in hooked}
    result = {
        "floor": total(floor),
        "hooks": total({**hooked, **outs}),
        "walk_all": total(walk_all),
        "unattributed": total(unattributed),
        "walk_only": total(walk_only),
        "missing": missing,
        "activation_nodes": len(act_nodes),
    }
    del out, mode
    return result
