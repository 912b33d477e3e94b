"""Calls to an FX copy whose graph depends on the call: optional arguments and checkpointing flags.

FX traces every argument as a Proxy: ``mask is None`` of a Proxy is False without FX seeing the
test, and ``if flag:`` stops a trace. A model whose ``forward`` takes arguments that default to
None gets a graph traced with them given and one traced with them at their defaults
(:func:`optional_arguments`); a flag whose other values do not trace gets a graph at its default
only; a checkpointing flag switched on on the copy cannot be served by a graph at all. The copy's
``forward`` (:func:`_forward_by_call`) picks the graph by the call's arguments and runs any other
call as the model's own forward under the runtime front end.
"""
from __future__ import annotations

import functools
import inspect
import re
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import fx

from ..report import RewriteReport
from ..rules import Rule, rules_for
from .runtime import LeanFunctionMode, _forward_under_mode

if TYPE_CHECKING:
    from .fx import RewrittenModule


# What a copy makes for itself on the first call its given-arguments graph does not serve (the
# runtime mode, owned by the copy; the default graphs' compiled forwards): never copied or pickled.
MADE_ON_CALL = ("_call_mode", "_default_forwards")


# Attributes by which libraries switch a module's forward to activation checkpointing.
_CHECKPOINT_FLAGS = ("grad_checkpointing", "gradient_checkpointing")  # timm, Hugging Face


def checkpoint_flags(root: nn.Module) -> Tuple[Tuple[str, str], ...]:
    """(path, flag) of each checkpointing flag in ``root``'s modules that is off (one that is on
    makes :func:`_trace_modes` leave its module to the runtime front end)."""
    return tuple((path, flag) for path, m in root.named_modules() for flag in _CHECKPOINT_FLAGS
                 if getattr(m, flag, None) is False)


_OptionalArguments = Tuple[Tuple[str, Optional[int], object], ...]  # (name, position, default)


def optional_arguments(forward) -> _OptionalArguments:
    """(name, position, default) of each parameter of ``forward`` (a function with ``self``) that
    defaults to None or to a bool, position None for a keyword-only one.

    FX traces such a parameter as a Proxy, and ``mask is None`` of a Proxy is False without FX
    seeing the test: the graph is the code's path for a given value. For a call that leaves it
    None it may be another path (a mask applied to nothing, a loss on no labels). A flag tested
    with ``if`` stops a trace with a Proxy; at its default it does not (timm's ViT tests
    ``attn_mask is not None or is_causal``).

    >>> optional_arguments(lambda self, x, mask=None, *, causal=False: x)
    (('mask', 1, None), ('causal', None, False))
    """
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return ()
    P = inspect.Parameter
    return tuple((p.name, i if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD) else None, p.default)
                 for i, p in enumerate(params)
                 if (p.default is None or type(p.default) is bool) and p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD))


def _call_kind(spec: _OptionalArguments, args: tuple, kwargs: dict) -> Tuple[bool, bool]:
    """(given, at defaults) of a call: whether it gives every argument of ``spec``
    (:func:`optional_arguments`) that defaults to None, and whether it leaves every one at its default."""
    given = at_defaults = True
    for name, position, default in spec:
        value = args[position] if position is not None and position < len(args) else kwargs.get(name, default)
        if default is None:
            given = given and value is not None
        at_defaults = at_defaults and (value is default or (type(value) is bool and value == default))
    return given, at_defaults


@torch.compiler.disable  # code generation, once per graph: under torch.compile it ran as traced frames, recompiled per name
def _forward_of(module: "RewrittenModule", graph: fx.Graph):
    """The function ``recompile`` would make of ``graph``, without making it ``module``'s forward."""
    from .fx import _direct_lookups  # fx imports this module

    with graph.on_generate_code(lambda earlier: _direct_lookups(module, graph, earlier)):
        code = graph.python_code(root_module="self")
    return fx.graph_module._forward_from_src(code.src, code.globals)


def _switched_on(module: nn.Module, flags: Tuple[Tuple[str, str], ...]) -> bool:
    """Whether a checkpointing flag in ``flags`` (:func:`checkpoint_flags`) is on now."""
    return any(getattr(module.get_submodule(path), flag, False) for path, flag in flags)


def _forward_by_call(graph_forward, spec: _OptionalArguments, flags: Tuple[Tuple[str, str], ...] = ()):
    """``forward`` of a copy whose model takes optional arguments (:func:`optional_arguments`) or has
    checkpointing flags (:func:`checkpoint_flags`). The graph serves calls that give every argument
    that defaults to None, or, where only the defaults' path traced (``_graph_serves`` is
    ``"default"``), calls that leave every optional argument at its default; a second graph traced
    at the defaults (``_default_graphs``) serves those. The model's own forward under the runtime
    front end, which rewrites the same calls as they run, serves other calls, and every call
    once a flag is switched on (``lean.set_grad_checkpointing()``: the graph cannot checkpoint,
    the runtime front end leaves checkpointed regions native)."""

    @functools.wraps(graph_forward)
    def forward(self, *args, **kwargs):
        if not (flags and _switched_on(self, flags)):
            given, at_defaults = _call_kind(spec, args, kwargs)
            if self.__dict__.get("_graph_serves") == "default":
                if at_defaults:
                    return graph_forward(self, *args, **kwargs)
            elif given:
                return graph_forward(self, *args, **kwargs)
            elif at_defaults and "_default_graphs" in self.__dict__:
                key = self.__dict__.get("_graph_key", "current")
                made = self.__dict__.setdefault("_default_forwards", {})
                if key not in made:
                    made[key] = _forward_of(self, self._default_graphs[key])
                return made[key](self, *args, **kwargs)
        mode = self.__dict__.get("_call_mode")
        if mode is None:
            mode = self.__dict__["_call_mode"] = LeanFunctionMode(rules_for(self._call_rules), self.rewrite_report, self)
        own = self._original_class.forward if self._original_class is not None else self._model_forward
        return _forward_under_mode(self, mode, own.__get__(self), *args, **kwargs)

    return forward


def serve_calls(gm: "RewrittenModule", model_forward, graphs: Dict[object, fx.Graph], rules: Sequence[Rule],
                report: RewriteReport, untraced: Optional[str] = None) -> None:
    """Give ``gm`` the forward of :func:`_forward_by_call` where its model's forward takes arguments
    that default to None (with the graphs ``("default", mode)`` of ``graphs``, which
    :func:`_trace_modes` traced with them at their defaults), where its modules have checkpointing
    flags, or where ``gm``'s graphs were traced at the defaults only, as the path of given
    arguments did not trace (``untraced`` says why); say so in ``report``. ``model_forward`` is the
    model's class's ``forward``, which the other calls run."""
    spec = optional_arguments(model_forward)
    flags = checkpoint_flags(gm)
    nones = [name for name, _, default in spec if default is None]
    if not (nones or flags or untraced):
        return
    default_graphs = {key[1]: g for key, g in graphs.items() if isinstance(key, tuple)}
    gm.__dict__.update(_optional_arguments=spec, _checkpoint_flags=flags, _call_rules=tuple(r.name for r in rules))
    if gm._original_class is None:  # not an instance of the model's class (the note says why)
        gm.__dict__["_model_forward"] = model_forward
    if default_graphs:
        gm.__dict__["_default_graphs"] = default_graphs
    if untraced:
        gm.__dict__["_graph_serves"] = "default"
    elif nones:
        for graph in {id(g): g for key, g in graphs.items() if not isinstance(key, tuple)}.values():
            _check_given(graph, nones)
    gm.recompile()
    arguments = ", ".join(f"{name}={default}" for name, _, default in spec)
    if untraced:
        report.notes.append(
            f"forward({arguments}): FX could not trace the path of other values ({untraced}), so the graph was "
            f"traced with these defaults and serves calls that leave them so; any other call runs the model's own "
            f"forward under the runtime front end, which rewrites the same calls as they run")
    elif nones:
        rest = ("a call that leaves them None (and its flags at their defaults) runs a graph traced so; any other "
                "call " if default_graphs else "a call that leaves one of them None ")
        report.notes.append(
            f"forward({', '.join(n + '=None' for n in nones)}): FX cannot see a test such as `mask is None`, so the "
            f"graph was traced with these arguments given; {rest}runs the model's own forward under the runtime "
            f"front end, which rewrites the same calls as they run")


def expect_none(value: Any, message: str) -> None:
    """FX's ``_assert_is_none``, as a function whose graph code loads again from a pickle (FX's
    own is written by a dotted name its unpickling cannot find)."""
    if value is not None:
        raise AssertionError(message)


def expect_given(value: Any, message: str) -> None:
    """The check that an argument traced as given is not None, at the top of such a graph."""
    if value is None:
        raise AssertionError(message)


torch.fx.wrap("expect_none")  # calls in a graph, not traced into
torch.fx.wrap("expect_given")


def _check_given(graph: fx.Graph, names: Sequence[str]) -> None:
    """Put :func:`expect_given` of each argument in ``names`` after ``graph``'s placeholders: run
    otherwise than through :func:`_forward_by_call` (``torch.export`` runs the graph), the graph
    traced with them given raises for None instead of taking the given path."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        for node in reversed([n for n in placeholders if str(n.target) in names]):
            check = graph.call_function(expect_given, (node, f"{node.target} was given when this graph was traced: "
                                                               "call the optimized copy, which picks the graph for None"))
            check.meta["is_wrapped"] = True


def _at_defaults(graph: fx.Graph, defaults: Dict[str, object]) -> None:
    """Give the placeholders of a graph FX traced with ``defaults`` as constants (``concrete_args``)
    their parameter names back (FX writes ``mask_1``). FX's checks of their values stay (as
    :func:`expect_none` for None): run otherwise than through :func:`_forward_by_call`
    (``torch.export`` runs a GraphModule's graph, not its forward; TorchScript compiles it), the
    graph raises for another value instead of taking the defaults' path."""
    for node in graph.nodes:
        if node.op == "placeholder":
            base = re.sub(r"_\d+$", "", str(node.target))
            if base in defaults:
                node.target = base
        elif node.op == "call_function" and node.target is fx._symbolic_trace._assert_is_none:
            node.target = expect_none
            node.meta["is_wrapped"] = True  # the code then says wrap(...), so a trace of it keeps the call
