"""``optimize(model)``: the entry point; it picks the front end that rewrites the model."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .frontends.fx import (
    RewrittenModule, _clone_tree, _rewrite_and_build, _RootUntraceable, _trace_modes, cheap_modules, trace_children,
    _warn_uncovered,
)
from .frontends.fx_calls import optional_arguments, serve_calls
from .frontends.runtime import run_under_mode
from .frontends.torchscript import optimize_script
from .report import RewriteReport, Uncovered
from .rules import Rule, rules_for

__all__ = ["optimize", "RewrittenModule"]


def optimize(model: nn.Module, *, ops: Optional[Sequence[str]] = None) -> nn.Module:
    """Return a copy of ``model`` whose activations save their output, not their input, for backward.

    An eager model is traced with ``torch.fx`` and every rule of :mod:`graph_rewrite.rules`
    applies: activations of kind ``"output"`` (softplus, sigmoid, logsigmoid, hardtanh,
    relu6, leaky_relu) become ``torch.ops.graph_rewrite`` ops that keep their output;
    for kind ``"recompute"``, the Linear/Conv/mul after a GELU, SiLU, Hardswish, ...
    becomes an op that keeps the activation's input and recomputes it. Code FX cannot
    trace (a module, or the model's own ``forward``) runs under the runtime front end
    (:mod:`graph_rewrite.frontends.runtime`), which sends the same calls to the same
    ops as they happen, every kind call by call; a warning names those modules. When
    nothing rewritten frees memory (a ResNet: ReLU keeps only its output already), a
    warning says so, at ``optimize()`` or, for the runtime front end, after the first forward.
    ``model`` itself is not modified: the result has new module objects but
    shares its parameters and buffers, keeps ``state_dict()`` keys and train/eval
    mode, and carries ``.rewrite_report``.

    The copy keeps the model's interface: ``inspect.signature(lean.forward)`` is the model's
    (positional-only, ``*args`` and keyword-only parameters are taken as the model takes
    them), and it pickles, deep-copies and ``torch.save``-s.

    Hooks: a module that has hooks when ``optimize`` is called is left as a call, so its
    hooks keep running in the copy. A module the rewrite turned into an op (an
    ``nn.Softplus`` into ``torch.ops.graph_rewrite.softplus``, the Linear after a GELU into
    ``graph_rewrite.recompute_linear``) is no longer called by the copy's graph: registering a
    forward, forward-pre or backward hook on the copy's instance of it raises a
    ``RuntimeError`` naming the op, instead of registering a hook that would never run.
    Register such hooks on the model before optimizing it. Hooks on modules the graph
    still calls work as usual.

    A ``torch.jit.ScriptModule`` (scripted, traced or loaded) goes to the TorchScript
    front end (:mod:`graph_rewrite.frontends.torchscript`): the result is a rewritten
    ScriptModule copy that shares the parameters and carries ``.rewrite_report``.

    Args:
        model: any ``nn.Module``, a ``torch.jit.ScriptModule`` included.
        ops: the rule names or kinds to apply, e.g. ``["softplus"]`` or ``["recompute"]``; default
            all. ``"spellings"`` rewrites hand-written spellings such as ``torch.log(1 + torch.exp(x))``
            (see :mod:`graph_rewrite.spellings`; listed apart in the report, as forward values change).

    Returns:
        For a ScriptModule, a ScriptModule. Otherwise a :class:`RewrittenModule`
        (a ``torch.fx.GraphModule``), or, when the model's own ``forward`` cannot be
        traced, a copy of the model (same class) whose ``forward`` runs under the
        runtime front end.

        The :class:`RewrittenModule` is also an instance of the model's class: its other
        methods (``forward_features``, ``reset_classifier``, ...) and attributes are there and
        run the class's eager code on the copy's submodules. Its ``forward`` is the graph, in
        which FX fixed what the model's code read while tracing: only ``train()``/``eval()``
        switch graphs, and an attribute set on the copy changes those methods but not
        ``lean(x)``. The exception is a checkpointing flag (timm's ``grad_checkpointing``, Hugging
        Face's ``gradient_checkpointing``) switched on on the copy: ``lean(x)`` then runs the
        model's own forward under the runtime front end, checkpointed. Arguments that default to
        None get a graph traced with them given and one with them None. Pickled, it names the
        class by module and name; where that cannot be imported, it loads (with a warning)
        without the methods.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Softplus(), nn.Linear(8, 1))
        >>> lean = optimize(model)
        >>> lean.rewrite_report.counts()
        {'graph_rewrite.softplus': 1}
        >>> isinstance(lean, nn.Sequential)
        True
        >>> lean[1].register_forward_hook(print)          # doctest: +ELLIPSIS
        Traceback (most recent call last):
        RuntimeError: graph_rewrite: module '1' was rewritten into graph_rewrite.softplus, ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize() takes a torch.nn.Module, got {type(model).__name__}")
    rules: Tuple[Rule, ...] = rules_for(ops)
    if isinstance(model, torch.jit.ScriptModule):
        scripted = optimize_script(model, rules)
        _note_fx_only(scripted.rewrite_report, rules, "the TorchScript front end")
        return scripted
    root = _clone_tree(model)
    report = RewriteReport()
    try:
        if "forward" in model.__dict__:
            raise _RootUntraceable("forward is overridden on the instance; FX would trace the class's forward")
        cheap = cheap_modules(root, rules)
        defaults = {name: default for name, _, default in optional_arguments(type(model).forward)}
        try:
            # A second graph at the defaults serves only a model with arguments that default to None.
            with_none = defaults if any(v is None for v in defaults.values()) else None
            graphs, reasons, constants = _trace_modes(root, list(cheap), with_none)
            untraced = None
        except _RootUntraceable as e:
            if not defaults:
                raise
            # The path of given arguments does not trace (`if flag:` on a Proxy); the defaults' may.
            try:
                graphs, reasons, constants = _trace_modes(root, list(cheap), defaults, defaults_only=True)
            except _RootUntraceable:
                raise e from None  # the first reason: the code's, not the defaults'
            untraced = str(e)
    except _RootUntraceable as e:
        # FX cannot trace the model's own forward: submodules FX can trace on their own
        # get graphs, and the copy's forward runs under the runtime front end, which
        # reaches every other call as it happens.
        report = RewriteReport("root not traced: runtime front end", uncovered=[Uncovered("", str(e))])
        trace_children(root, "", rules, report)
        run_under_mode(root, rules, report)
        _note_fx_only(report, rules, "the runtime front end (code outside the FX graphs)", runtime=True)
        _warn_uncovered(report)
        root.rewrite_report = report
        return root
    gm = _rewrite_and_build(root, graphs, reasons, constants, rules, report, keep_class=True, cheap=cheap)
    serve_calls(gm, type(model).forward, graphs, rules, report, untraced)
    if reasons:
        _note_fx_only(report, rules, "the runtime front end (modules FX could not trace)", runtime=True)
    _warn_uncovered(report)
    if not reasons:  # with leaves under the runtime front end, their first forward tells
        report.warn_if_nothing_saves(type(model).__name__)
    return gm


def _note_fx_only(report: RewriteReport, rules: Sequence[Rule], front_end: str, runtime: bool = False) -> None:
    """Say in the report which kinds ``front_end`` could not apply without an FX graph
    (the runtime front end applies them call by call)."""
    if not any(r.kind == "recompute" for r in rules):
        return
    if runtime:
        report.notes.append(
            f"{front_end} applies every kind call by call: a Linear, Conv or mul whose input is a fresh output "
            "(of GELU/SiLU/..., LayerNorm, a rewritten norm or cheap module) keeps what made it, and an activation "
            "on a fresh BatchNorm/GroupNorm output keeps the norm's input; other uses of that output keep it as "
            "natively. Outputs read through a view or changed in place, and in-place activations, stay native"
        )
    else:
        report.notes.append(
            f"{front_end} applies rules of kind \"output\" only; kind \"recompute\" needs an FX graph "
            "(every use of the activation's output must be known), so there its activations and consumers stay native"
        )
