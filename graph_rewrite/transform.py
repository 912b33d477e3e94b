"""``optimize(model)``: the entry point; it picks the front end that rewrites the model."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .frontends.fx import (
    RewrittenModule, _clone_tree, _rewrite_and_build, _RootUntraceable, _trace_modes, _trace_on_its_own,
    _warn_uncovered,
)
from .frontends.fx_pass import swap_modules
from .report import RewriteReport, Uncovered
from .rules import Rule, rules_for

__all__ = ["optimize", "RewrittenModule"]


def optimize(model: nn.Module, *, ops: Optional[Sequence[str]] = None) -> nn.Module:
    """Return a copy of ``model`` whose activations save their output, not their input, for backward.

    The model is traced with ``torch.fx``; every softplus, sigmoid and logsigmoid
    spelling (see :mod:`graph_rewrite.rules`) becomes a ``torch.ops.graph_rewrite``
    op. ``model`` itself is not modified: the result has new module objects but
    shares its parameters and buffers, keeps ``state_dict()`` keys and train/eval
    mode, and carries ``.rewrite_report``. Modules FX cannot trace are kept as
    calls, with their activation modules swapped, and a warning names them.

    Args:
        model: any ``nn.Module`` (not a ``torch.jit.ScriptModule``).
        ops: the rule names to apply, e.g. ``["softplus"]``; default all. ``"spellings"``
            rewrites hand-written spellings such as ``torch.log(1 + torch.exp(x))`` (see
            :mod:`graph_rewrite.spellings`; listed apart in the report, as forward values change).

    Returns:
        A :class:`RewrittenModule` (a ``torch.fx.GraphModule``), or, when the
        model's own ``forward`` cannot be traced, a copy of the model with
        activation modules swapped.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Softplus(), nn.Linear(8, 1))
        >>> lean = optimize(model)
        >>> lean.rewrite_report.counts()
        {'graph_rewrite.softplus': 1}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize() takes a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "optimize() takes the eager nn.Module, not a TorchScript module: "
            "call optimize(model) first, then torch.jit.script() the result"
        )
    rules: Tuple[Rule, ...] = rules_for(ops)
    root = _clone_tree(model)
    report = RewriteReport()
    try:
        if "forward" in model.__dict__:
            raise _RootUntraceable("forward is overridden on the instance; FX would trace the class's forward")
        graphs, reasons, constants = _trace_modes(root)
    except _RootUntraceable as e:
        report = RewriteReport("root not traced", uncovered=[Uncovered("", str(e))])

        def descend(child: nn.Module, path: str) -> bool:
            return not _trace_on_its_own(child, path, rules, report)

        replaced, left = swap_modules(root, rules, descend=descend)
        report.replaced += replaced
        report.left_alone += left
        _warn_uncovered(report)
        root.rewrite_report = report
        return root
    gm = _rewrite_and_build(root, graphs, reasons, constants, rules, report)
    _warn_uncovered(report)
    return gm
