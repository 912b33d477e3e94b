"""The FX pass: replace activation calls in a graph by the lean ops of the rules table."""
from __future__ import annotations

import inspect
import operator
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Graph, Node

from ..report import LeftAlone, Replaced
from ..rules import RULES, Pattern, Rule, has_hooks, is_match, module_call_input, pattern_name

__all__ = ["rewrite_graph", "has_hooks", "lean_op_name", "inplace_ok", "behind_aliases", "is_view",
           "inplace_name", "mutates", "mutating_use", "describe"]


def lean_op_name(rule: Rule) -> str:
    return f"graph_rewrite.{rule.name}"


def _where(node: Node) -> str:
    """The module path a node belongs to: its target for modules, else the innermost calling module."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        return path[0] if isinstance(path, tuple) else str(path)
    return "<root>"


# Views (and copies of them, conservatively): a change made through one is a change of its base.
VIEW_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.unsqueeze,
                  torch.squeeze, operator.getitem, torch.chunk, torch.split, torch.narrow, torch.select,
                  torch.unbind, torch.movedim, torch.swapaxes, torch.diagonal, torch.t, torch.as_strided,
                  torch.unflatten, getattr}
VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "permute", "transpose", "unsqueeze", "squeeze",
                "contiguous", "expand", "expand_as", "chunk", "split", "narrow", "select", "unbind", "movedim",
                "swapaxes", "diagonal", "t", "as_strided", "unflatten", "unfold", "detach"}
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul, operator.setitem}


def _is_alias_module(node: Node, modules: Mapping[str, nn.Module]) -> bool:
    """A module call that returns its input itself: ``nn.Identity``, ``Dropout(p=0)``."""
    m = modules.get(node.target) if node.op == "call_module" else None
    return type(m) is nn.Identity or (type(m) is nn.Dropout and m.p == 0)


def is_view(user: Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``user`` returns a view of (or, conservatively, a copy shaped from) its input."""
    if user.op == "call_function":
        return user.target in VIEW_FUNCTIONS
    if user.op == "call_method":
        return user.target in VIEW_METHODS
    return user.op == "call_module" and type(modules.get(user.target)) is nn.Flatten


# Of those, the ones that always return a view of their first argument, never a copy: a consumer
# may take h through them, and its op lays the recomputed h out as that view (ops.recompute).
_STRICT_VIEWS = {torch.permute, torch.transpose, torch.t, torch.unsqueeze, torch.squeeze, torch.movedim,
                 torch.swapaxes, torch.narrow, torch.select, torch.unflatten,
                 "permute", "transpose", "t", "unsqueeze", "squeeze", "movedim", "swapaxes", "narrow", "select",
                 "unflatten", "view", "view_as", "expand", "expand_as"}


def is_strict_view(user: Node, value: Node) -> bool:
    """Whether ``user`` is a view of ``value`` that is never a copy (``permute``, ``view``; not ``reshape``)."""
    return user.op in ("call_function", "call_method") and user.target in _STRICT_VIEWS \
        and bool(user.args) and user.args[0] is value


def inplace_name(name: str) -> bool:
    """Whether a function or method of this name changes its first argument: ``add_``, ``relu_``."""
    return name.endswith("_") and not name.startswith("_")


def _name_of(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", "")


def mutates(user: Node, value: Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``user`` changes ``value`` in place: ``value += y``, ``value.add_(y)``, ``out=value``,
    ``value[i] = y``, an ``inplace=True`` call or module on it.

    >>> mutates(iadd_node, relu6_node, modules)   # doctest: +SKIP
    True
    """
    out = user.kwargs.get("out")
    if out is value or (isinstance(out, (tuple, list)) and value in out):
        return True
    first = user.args[0] if user.args else None
    if first is not value:
        return False
    if user.op == "call_function" and user.target in _INPLACE_OPERATORS:
        return True
    if user.op in ("call_function", "call_method"):
        name = _name_of(user.target)
        return inplace_name(name) or user.kwargs.get("inplace") is True
    if user.op == "call_module":
        return getattr(modules.get(user.target), "inplace", False) is True
    return False


def mutating_use(value: Node, modules: Mapping[str, nn.Module], ignore: Optional[Node] = None) -> Optional[Node]:
    """The first use that changes ``value`` in place, directly or through a view or alias of it, else None.

    A rewrite that keeps ``value`` (a lean op's output) or recomputes from it (a recompute
    op's input) would see the changed value in backward, where native kept another tensor.
    ``ignore``: a use not to count (an in-place activation judged on its own).

    >>> mutating_use(relu6_node, modules)          # doctest: +SKIP
    iadd
    """
    for user in value.users:
        if user is ignore:
            continue
        if mutates(user, value, modules):
            return user
        if is_view(user, modules) or _is_alias_module(user, modules):
            found = mutating_use(user, modules, ignore)
            if found is not None:
                return found
    return None


def describe(node: Node) -> str:
    """``name (target)`` of a node, for reports."""
    return f"{node.name} ({_name_of(node.target) or node.target})"


# Producers whose result is a fresh tensor, never a view of something else: an in-place
# activation on it (and on nothing else's behalf) may run out of place instead.
_FRESH_MODULES = (nn.modules.batchnorm._BatchNorm, nn.modules.conv._ConvNd, nn.Linear, nn.LayerNorm, nn.GroupNorm)
_FRESH_FUNCTIONS = (operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul, F.linear,
                    F.conv1d, F.conv2d, F.conv3d, F.batch_norm, F.layer_norm, F.group_norm)


def behind_aliases(x: Node, modules: Mapping[str, nn.Module]) -> Node:
    """The value ``x`` is, past calls that return their input itself and have no other use
    (``nn.Identity``, ``Dropout(p=0)``: timm's ``BatchNormAct2d`` puts one between its
    BatchNorm and its in-place activation)."""
    while _is_alias_module(x, modules) and x.args and isinstance(x.args[0], Node) and len(x.args[0].users) == 1 and not has_hooks(modules[x.target]):
        x = x.args[0]
    return x


def inplace_ok(node: Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether the in-place activation ``node`` may run out of place: its input is a fresh
    tensor (not a view, input or buffer) that nothing else in the graph reads.

    >>> inplace_ok(relu6_node_after_batchnorm, modules)   # doctest: +SKIP
    True
    """
    x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    if not isinstance(x, Node) or len(x.users) != 1:
        return False
    x = behind_aliases(x, modules)
    if x.op == "call_module":
        return isinstance(modules.get(x.target), _FRESH_MODULES)
    if x.op == "call_method":
        return x.target in ("add", "sub", "mul")
    return x.op == "call_function" and x.target in _FRESH_FUNCTIONS


# Rules whose native op keeps its output already: rewriting them frees nothing.
NATIVE_KEEPS_OUTPUT = {"sigmoid"}


def _output_rules(rules: Sequence[Rule]) -> List[Rule]:
    return [r for r in rules if r.kind == "output"]


def _find(node: Node, rules: Sequence[Rule], modules: Mapping[str, nn.Module]):
    """The first (rule, pattern, inplace) whose pattern matches ``node``, else None."""
    for rule in _output_rules(rules):
        for inplace, patterns in ((False, rule.patterns), (True, rule.inplace)):
            for pattern in patterns:
                if is_match(node, pattern, modules):
                    return rule, pattern, inplace
    return None


def _pop_inplace(node: Node) -> Tuple[tuple, Dict[str, object]]:
    """(args, kwargs) of a call, a positional ``inplace`` moved to the keywords.

    Dynamo records ``nn.ReLU6`` as ``F.hardtanh(x, 0.0, 6.0, False)``: the flag's position
    comes from the function's own signature.
    """
    args, kwargs = node.args, dict(node.kwargs)
    try:
        names = list(inspect.signature(node.target).parameters)
    except (TypeError, ValueError):
        return args, kwargs
    if "inplace" in names and len(args) > names.index("inplace"):
        i = names.index("inplace")
        kwargs["inplace"] = args[i]
        args = args[:i] + args[i + 1:]
    return args, kwargs


def _read_args(node: Node, rule: Rule, modules: Mapping[str, nn.Module]) -> Tuple[Node, Dict[str, float]]:
    """(input node, op parameters) of a matched call; ``ValueError`` says why it cannot be rewritten."""
    if node.op == "call_module":
        module, x = module_call_input(node, modules)
        if getattr(module, "inplace", False) and not inplace_ok(node, modules):
            raise ValueError("in place, and its input has other uses (or may be a view)")
        x, params = rule.bind((x, *(getattr(module, k) for k in rule.params)), {})
    else:
        args, kwargs = _pop_inplace(node)
        inplace = kwargs.pop("inplace", False)  # F.relu6(x, inplace=...) and co.
        if inplace is not False and not (inplace is True and inplace_ok(node, modules)):
            raise ValueError("in place, and its input has other uses (or may be a view)")
        x, params = rule.bind(args, kwargs)
    if not isinstance(x, Node):
        raise ValueError("its input is a constant, not a graph value")
    return x, params


def _saves_something(node: Node, x: Node, modules: Mapping[str, nn.Module]) -> None:
    """``ValueError`` unless keeping the output instead of the input can save bytes.

    Native keeps ``x``; the lean op keeps the output. That frees ``x`` only if no other
    use keeps it, and costs nothing only if a use keeps the output anyway (or may).
    """
    from .fx_recompute import _is_alias, _keeps_nothing  # kind "recompute"'s judgement of a use

    def may_keep(value: Node) -> bool:  # some use, or a use of a view of it, may keep it
        return any(may_keep(u) if is_view(u, modules) or _is_alias(u, modules) else
                   not _keeps_nothing(u, value, modules) for u in value.users)

    source = x
    while (is_view(source, modules) or _is_alias(source, modules)) and source.args and isinstance(source.args[0], Node):
        source = source.args[0]  # x.reshape(...) of the input: its storage is the caller's too
    if source.op in ("placeholder", "get_attr"):
        raise ValueError("its input is the graph's input or a weight (or a view of one), held by the caller anyway")
    if not may_keep(node):
        raise ValueError("no use keeps its output, so keeping it instead of its input saves nothing")
    other = next((u for u in x.users if u is not node and not _keeps_nothing(u, x, modules)), None)
    if other is not None:
        raise ValueError(f"its input is kept by {describe(other)} too, so the lean op would keep both")


def rewrite_graph(
    graph: Graph,
    modules: Mapping[str, nn.Module],
    rules: Sequence[Rule] = RULES,
) -> Tuple[List[Replaced], List[LeftAlone]]:
    """Rewrite, in place, every activation call in ``graph`` that a rule matches.

    Each matched node is turned into ``call_function(rule.op, (x, *params))``;
    the node keeps its name and ``meta`` (plus ``meta["graph_rewrite"]``, what it
    was), so printouts and later passes still recognise it. In-place spellings,
    hooked modules and arguments the lean op cannot serve are left alone and
    reported. The caller recompiles the owning ``GraphModule``.

    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.Softplus()))  # doctest: +SKIP
    >>> replaced, left = rewrite_graph(gm.graph, dict(gm.named_modules())); gm.recompile()  # doctest: +SKIP
    """
    replaced: List[Replaced] = []
    left_alone: List[LeftAlone] = []
    for node in list(graph.nodes):
        found = _find(node, rules, modules)
        if found is None:
            continue
        rule, pattern, inplace = found
        original = pattern_name(pattern)
        if inplace:
            left_alone.append(LeftAlone(node.name, _where(node), original, "in-place: rewriting would drop the mutation of its input"))
            continue
        try:
            x, params = _read_args(node, rule, modules)
            changed = mutating_use(node, modules)
            if changed is not None:
                raise ValueError(f"its output is changed in place by {describe(changed)}, and the lean op "
                                 "keeps its output for backward")
            if rule.name not in NATIVE_KEEPS_OUTPUT:  # (sigmoid's native op keeps its output too)
                _saves_something(node, x, modules)
        except ValueError as e:
            left_alone.append(LeftAlone(node.name, _where(node), original, str(e)))
            continue
        where = _where(node)
        node.meta["graph_rewrite"] = {"was": original, "where": where}
        node.op, node.target = "call_function", rule.op
        node.args, node.kwargs = (x, *params.values()), {}
        frees = "" if rule.name in NATIVE_KEEPS_OUTPUT else x.name
        replaced.append(Replaced(node.name, where, original, lean_op_name(rule), params, frees=frees))
    graph.lint()
    return replaced, left_alone
