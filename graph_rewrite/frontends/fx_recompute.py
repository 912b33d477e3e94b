"""The FX pass for kind ``"recompute"``: the layers after GELU/SiLU/... keep the activation's input.

For each activation a :class:`~graph_rewrite.rules.Recomputable` matches, the pass looks
at every use of its output ``h`` (following aliases: ``Dropout(p=0)``, ``Identity``):

* a :class:`~graph_rewrite.rules.Consumer` (Linear, Conv, mul) becomes its recompute op,
  which keeps ``x`` (the activation keeps it anyway) instead of ``h``;
* a use that keeps nothing of ``h`` (add, mean, dropout with p > 0, views whose own uses
  keep nothing, ...) needs nothing;
* anything else may keep ``h``, so rewriting would save nothing: the activation is left
  alone and reported.

In-place spellings (torchvision's ``SiLU(inplace=True)``) clone their input for backward;
they are made out of place when their input has no other use, which the graph tells.
A Linear fed by ``act(g) * u`` where that product is used nowhere else gets ``gate=u``: it
keeps ``g`` and ``u`` (kept by the activation and the mul anyway), not the product.

Kind ``"norm"``: where the activation's input is a BatchNorm's output used by the activation
alone, the activation becomes ``graph_rewrite.norm_act``, which keeps BatchNorm's input (kept
by BatchNorm anyway) and recomputes its output in backward; its consumers then keep nothing
of it either (``ops/recompute.py``).
"""
from __future__ import annotations

import inspect
import operator
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Graph, Node

from ..report import LeftAlone, Replaced
from ..rules import Attr, Consumer, Norm, Recomputable, is_match, pattern_name
from .fx_pass import (_where, behind_aliases, describe, has_hooks, inplace_ok, is_strict_view, is_view,
                      module_call_input, mutates, mutating_use)

__all__ = ["rewrite_recompute", "rewrite_cheap_consumers"]

# Uses that keep nothing of their input for backward (checked on this torch: their
# backward nodes save shapes, scalars or masks only).
_FREE_FUNCTIONS = {
    operator.add, operator.sub, operator.neg, torch.add, torch.sub, torch.neg,
    torch.cat, torch.stack, torch.sum, torch.mean,
}
_FREE_METHODS = {"add", "sub", "neg", "sum", "mean", "size", "dim", "numel", "stride"}
# Attributes that read metadata, not values: ``B, N, C = x.shape`` keeps nothing.
_METADATA = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
class _Keeps(Exception):
    """A use of the activation's output that keeps it (or may): nothing to gain."""


def _dropout_p(node: Node, modules: Mapping[str, nn.Module]) -> Optional[float]:
    """Dropout's p for a dropout call that is not in place, else None."""
    if node.op == "call_module" and type(modules.get(node.target)) is nn.Dropout:
        m = modules[node.target]
        return None if m.inplace or has_hooks(m) else float(m.p)
    if node.op == "call_function" and node.target is F.dropout:
        sig = inspect.signature(F.dropout)
        try:
            a = sig.bind(*node.args, **node.kwargs)
        except TypeError:
            return None
        a.apply_defaults()
        p, inplace = a.arguments["p"], a.arguments["inplace"]
        return float(p) if isinstance(p, (int, float)) and inplace is False else None
    return None


def _pools_to_one(node: Node, modules: Mapping[str, nn.Module]) -> bool:
    # adaptive_avg_pool2d to 1x1 is a mean (keeps nothing); other sizes keep their input.
    if node.op == "call_module" and type(modules.get(node.target)) is nn.AdaptiveAvgPool2d:
        size = modules[node.target].output_size
    elif node.op == "call_function" and node.target is F.adaptive_avg_pool2d and len(node.args) == 2:
        size = node.args[1]
    else:
        return False
    return size in (1, (1, 1), [1, 1])


def _keeps_nothing(user: Node, value: Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``user`` keeps nothing of ``value`` for backward (and leaves it as it is)."""
    if mutates(user, value, modules):
        return False  # torch.add(h, 1, out=h): the consumers after it read the new value
    if user.op == "call_function" and user.target in _FREE_FUNCTIONS:
        return True
    if user.op == "call_function" and user.target in (operator.iadd, operator.isub):
        # y += value keeps nothing; value += y changes value itself, which native would notice.
        return user.args[0] is not value
    if user.op == "call_method" and user.target in _FREE_METHODS:
        return True
    if user.op == "call_function" and user.target is getattr and len(user.args) == 2:
        return user.args[1] in _METADATA
    if user.op == "call_function" and user.target in (operator.mul, torch.mul, operator.truediv) or (
        user.op == "call_method" and user.target in ("mul", "div")
    ):
        # Times (or divided by) a number: the backward keeps the number only. h / t keeps h for
        # t's gradient, t / h keeps h.
        divides = user.target is operator.truediv or user.target == "div"
        return not any(isinstance(a, Node) for a in user.args if a is not value) and (
            not divides or user.args[0] is value)
    p = _dropout_p(user, modules)
    if p is not None and p > 0:
        return True  # keeps its mask; its output is a new tensor
    return _pools_to_one(user, modules)


def _is_alias(user: Node, modules: Mapping[str, nn.Module]) -> bool:
    """Returns its input itself: ``Dropout(p=0)`` (in both modes) and ``Identity``."""
    if user.op == "call_module" and type(modules.get(user.target)) is nn.Identity:
        return True
    return _dropout_p(user, modules) == 0.0


def _match_consumer(user: Node, consumers: Sequence[Consumer], modules) -> Optional[Tuple[Consumer, Any]]:
    for c in consumers:
        for pattern in c.patterns:
            if is_match(user, pattern, modules):
                return c, pattern
    return None


def _plan(h: Node, consumers: Sequence[Consumer], modules) -> List[Tuple[Node, Node, Consumer, Any, tuple]]:
    """(use, value it takes, consumer rule, pattern, op args) for every consumer of ``h``.

    Raises :class:`_Keeps` naming a use that keeps ``h`` (or that cannot be rewritten).
    """
    plan = []

    def visit(value: Node, through_view: bool, strict: bool) -> None:
        for user in list(value.users):
            if user.op == "output":
                raise _Keeps("the model returns it")
            if _keeps_nothing(user, value, modules):
                continue
            if _is_alias(user, modules):
                visit(user, through_view, strict)
                continue
            if is_view(user, modules):
                visit(user, True, strict and is_strict_view(user, value))
                continue
            found = _match_consumer(user, consumers, modules)
            if found is None:
                raise _Keeps(f"{user.name} ({user.op} {getattr(user.target, '__name__', user.target)}) may keep it")
            if through_view and not (strict and found[0].name in ("linear", "conv")):
                raise _Keeps(f"{user.name} keeps a view of it that may be a copy")
            rule, pattern = found
            try:
                args = rule.read(user, value, modules)
            except ValueError as e:
                raise _Keeps(f"{user.name} ({pattern_name(pattern)}) keeps it: {e}") from None
            plan.append((user, value, rule, pattern, args))

    visit(h, False, True)
    return plan


def _read_activation(node: Node, rule: Recomputable, modules) -> Tuple[Node, Dict[str, Any], bool]:
    """(input, params, in place?) of a matched activation call; ``ValueError`` says why not."""
    if node.op == "call_module":
        module, x = module_call_input(node, modules)
        # Tensors of the module (LayerNorm's weight) enter the graph as get_attr nodes.
        params = {k: Attr(f"{node.target}.{k}") if isinstance(getattr(module, k), torch.Tensor) else getattr(module, k)
                  for k in rule.params}
        inplace = bool(getattr(module, "inplace", False))
    else:
        P = inspect.Parameter
        sig = inspect.Signature(
            [P("input", P.POSITIONAL_OR_KEYWORD)]
            + [P(k, P.POSITIONAL_OR_KEYWORD, default=v) for k, v in rule.params.items()]
            + [P("inplace", P.POSITIONAL_OR_KEYWORD, default=False)]
        )
        try:
            bound = sig.bind(*node.args, **node.kwargs)
        except TypeError as e:
            raise ValueError(f"unexpected arguments ({e})") from None
        bound.apply_defaults()
        params = dict(bound.arguments)
        x, inplace = params.pop("input"), params.pop("inplace")
        if not isinstance(inplace, bool):
            raise ValueError(f"inplace is not known at trace time ({inplace!r})")
    if not isinstance(x, Node):
        raise ValueError("its input is a constant, not a graph value")
    return x, params, inplace


def _materialize(graph: Graph, before: Node, value: Any) -> Any:
    if isinstance(value, Attr):
        with graph.inserting_before(before):
            return graph.get_attr(value.target)
    return value


def _rewrite_consumer(graph: Graph, user: Node, h: Node, x: Node, rule: Consumer, args: tuple, act: str,
                      act_arg: float, gate: Optional[Node] = None, extra: Optional[Mapping[str, Any]] = None) -> None:
    args = tuple(_materialize(graph, user, a) for a in args)
    kwargs: Dict[str, Any] = {}
    if gate is not None:
        kwargs["gate"] = gate
    if act_arg:
        kwargs["act_arg"] = act_arg
    for k, v in (extra or {}).items():
        if v is not None:
            kwargs[k] = _materialize(graph, user, v)
    user.op, user.target = "call_function", rule.op
    user.args, user.kwargs = (x, h, act, *args), kwargs


def rewrite_recompute(
    graph: Graph, modules: Mapping[str, nn.Module], rules: Sequence[Any]
) -> Tuple[List[Replaced], List[LeftAlone]]:
    """Rewrite, in place, the consumers of every recomputable activation in ``graph``.

    Each consumer node becomes ``call_function(consumer.op, (x, h, act, ...))``, keeping
    its name and ``meta`` (plus ``meta["graph_rewrite"]``: what it was, and which node's
    value it no longer keeps). The caller recompiles the owning ``GraphModule``.

    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.GELU(), nn.Linear(2, 2)))  # doctest: +SKIP
    >>> replaced, left = rewrite_recompute(gm.graph, dict(gm.named_modules()), RULES); gm.recompile()  # doctest: +SKIP
    """
    acts = [r for r in rules if isinstance(r, Recomputable)]
    consumers = [r for r in rules if isinstance(r, Consumer)]
    norms = [r for r in rules if isinstance(r, Norm)]
    replaced: List[Replaced] = []
    left_alone: List[LeftAlone] = []
    if not acts or not (consumers or norms):
        return replaced, left_alone
    for node in list(graph.nodes):
        found = next(((r, p) for r in acts for p in r.patterns if is_match(node, p, modules)), None)
        if found is None:
            continue
        rule, pattern = found
        original, where = pattern_name(pattern), _where(node)
        try:
            x, params, inplace = _read_activation(node, rule, modules)
            act, act_arg, *more = rule.encode(**params)
            extra = more[0] if more else {}
            if inplace and not rule.outplace:
                raise ValueError("in place: native's in-place form computes its gradient from its output, "
                                 "which the rewrite would not reproduce bit for bit")
            if inplace and not inplace_ok(node, modules):
                raise ValueError("in place, and its input has other uses (or may be a view)")
            _not_changed_later(x, node, modules, "its input")
        except ValueError as e:
            left_alone.append(LeftAlone(node.name, where, original, f"recompute: {e}"))
            continue
        try:
            plan = _plan(node, [c for c in consumers if not rule.consumers or c.name in rule.consumers], modules)
        except _Keeps as e:  # a use keeps the activation's output; the norm rule may still apply
            left_alone.append(LeftAlone(node.name, where, original, f"recompute: {e}"))
            plan = []
        norm = _norm_before(node, x, norms, modules, left_alone) if not rule.consumers else None
        source = x.name  # what the consumers recompute the activation from
        if norm is not None:
            replaced.append(_rewrite_norm_act(graph, node, x, act, act_arg, *norm, original, where))
            source = f"{pattern_name(norm[1])}({norm[2].name})"
        if not plan:
            continue  # no consumer keeps h: nothing to gain
        if inplace and norm is None:
            # Out of place: the in-place form would clone x for its backward.
            node.op, node.target = "call_function", rule.function
            node.args, node.kwargs = (x,), {k: v for k, v in params.items() if v != rule.params.get(k)}
            node.meta["graph_rewrite"] = {"was": f"{original}(inplace=True)", "where": where}
            replaced.append(Replaced(node.name, where, f"{original}(inplace=True)", f"{pattern_name(rule.function)} (out of place)",
                                     {}, kind="recompute", detail="its consumers keep its input"))
        for user, value, consumer, cpattern, args in plan:
            _rewrite_consumer(graph, user, value, x, consumer, args, act, act_arg, extra=extra)
            uwhere = _where(user) if user.op != "call_function" or "nn_module_stack" in user.meta else where
            user.meta["graph_rewrite"] = {"was": pattern_name(cpattern), "where": uwhere, "frees": node.name}
            replaced.append(Replaced(user.name, uwhere, pattern_name(cpattern), f"graph_rewrite.recompute_{consumer.name}",
                                     {"act_arg": act_arg} if act_arg else {}, kind="recompute",
                                     frees=node.name, detail=f"recomputes {act}({source})"))
            if consumer.name == "mul":
                replaced += _gate(graph, user, x, args[0], act, act_arg, consumers, modules)
    graph.lint()
    return replaced, left_alone


def rewrite_cheap_consumers(graph: Graph, modules: Mapping[str, nn.Module], cheap: Sequence[str],
                            rules: Sequence[Any]) -> List[Replaced]:
    """Rewrite, in place, the consumers of each call to a cheap module at a path in ``cheap``
    (a leaf whose forward keeps its input only and runs again in backward): each Linear,
    convolution or mul after it becomes its recompute op with ``act="identity"``, which asks
    the module's node for its output in backward instead of keeping it, as the runtime front
    end does after a cheap module (LLaMA's q, k, v projections after RMSNorm)."""
    consumers = [r for r in rules if isinstance(r, Consumer)]
    replaced: List[Replaced] = []
    if not consumers:
        return replaced
    for node in list(graph.nodes):
        if node.op != "call_module" or node.target not in cheap:
            continue
        try:
            plan = _plan(node, consumers, modules)
        except _Keeps:
            continue  # a use keeps the output anyway: the module still keeps no intermediates
        for user, value, consumer, cpattern, args in plan:
            _rewrite_consumer(graph, user, value, node, consumer, args, "identity", 0.0)
            where = _where(user)
            user.meta["graph_rewrite"] = {"was": pattern_name(cpattern), "where": where, "frees": node.name}
            replaced.append(Replaced(user.name, where, pattern_name(cpattern),
                                     f"graph_rewrite.recompute_{consumer.name}", {}, kind="recompute",
                                     frees=node.name, detail=f"recomputes {node.target}"))
    graph.lint()
    return replaced


def _not_changed_later(value: Node, act: Node, modules, what: str) -> None:
    """``ValueError`` when a use changes ``value`` in place: the recompute in backward would read the new value."""
    changed = mutating_use(value, modules, ignore=act)
    if changed is not None:
        raise ValueError(f"{what} is changed in place by {describe(changed)}, and the rewrite recomputes from it")


def _norm_before(act_node: Node, x: Node, norms: Sequence[Norm], modules,
                 left_alone: List[LeftAlone]) -> Optional[Tuple[Norm, Any, Node, tuple]]:
    """(rule, pattern, z, op args) when ``x``, the activation's input, is a BatchNorm's output
    used by this activation alone; None otherwise (a refusal is reported)."""
    norm = behind_aliases(x, modules) if len(x.users) == 1 else x  # timm: BatchNorm -> Identity -> activation
    found = next(((r, p) for r in norms for p in r.patterns if is_match(norm, p, modules)), None)
    if found is None:
        return None
    rule, pattern = found
    try:
        if len(norm.users) != 1 or list(x.users) != [act_node]:
            raise ValueError("its output has other uses, which keep it")
        z, args = rule.read(norm, modules)
        _not_changed_later(z, norm, modules, "its input")
    except ValueError as e:
        left_alone.append(LeftAlone(norm.name, _where(norm), pattern_name(pattern), f"norm: {e}"))
        return None
    return rule, pattern, z, args


def _rewrite_norm_act(graph: Graph, node: Node, x: Node, act: str, act_arg: float, rule: Norm, pattern: Any,
                      z: Node, args: tuple, original: str, where: str) -> Replaced:
    """The activation ``node`` becomes ``norm_act(x, z, act, ...)``: it keeps z, not x."""
    args = tuple(_materialize(graph, node, a) for a in args)
    node.op, node.target = "call_function", rule.op
    groups = {"groups": args[5]} if len(args) > 5 else {}  # GroupNorm's (BatchNorm has running statistics)
    node.args, node.kwargs = (x, z, act, *args[:5]), {**({"act_arg": act_arg} if act_arg else {}), **groups}
    node.meta["graph_rewrite"] = {"was": original, "where": where, "frees": x.name}
    return Replaced(node.name, where, original, "graph_rewrite.norm_act", {"act_arg": act_arg} if act_arg else {},
                    kind="norm", frees=x.name, detail=f"recomputes {pattern_name(pattern)}({z.name})")


def _gate(graph: Graph, product: Node, x: Node, other: Node, act: str, act_arg: float,
          consumers: Sequence[Consumer], modules) -> List[Replaced]:
    """Gated consumers of ``product = act(x) * other``: they keep ``x`` and ``other`` instead of it."""
    gated = [c for c in consumers if c.gated]
    if mutating_use(other, modules) is not None:
        return []  # the gated op would recompute from a changed gate
    try:
        plan = _plan(product, gated, modules)
    except _Keeps:
        return []
    out = []
    for user, value, consumer, cpattern, args in plan:
        _rewrite_consumer(graph, user, value, x, consumer, args, act, act_arg, gate=other)
        where = _where(user)
        user.meta["graph_rewrite"] = {"was": pattern_name(cpattern), "where": where, "frees": product.name}
        out.append(Replaced(user.name, where, pattern_name(cpattern), f"graph_rewrite.recompute_{consumer.name}",
                            {"act_arg": act_arg} if act_arg else {}, kind="recompute", frees=product.name,
                            detail=f"recomputes {act}({x.name}) * {other.name}"))
    return out
