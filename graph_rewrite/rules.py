"""The rules table: which activation spellings map to which lean op, and how to read their arguments.

A new activation is one :class:`Rule` in :data:`RULES`. Patterns follow
``torch.ao.quantization``'s matcher: a module *type* matches ``call_module``
nodes, a *callable* matches ``call_function`` nodes, and a *string* matches
``call_method`` nodes.

Example::

    >>> from graph_rewrite.rules import RULES
    >>> [r.name for r in RULES]
    ['softplus', 'sigmoid', 'logsigmoid', 'spellings']
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

from . import ops as _ops  # noqa: F401  (registers torch.ops.graph_rewrite.*)

Pattern = Union[type, Callable[..., Any], str]

__all__ = ["Rule", "RULES", "Pattern", "is_match", "pattern_name", "rules_for"]


@dataclass(frozen=True)
class Rule:
    """One activation the pass can rewrite.

    name:       what ``optimize(model, ops=[...])`` calls it.
    op:         the lean op packet inserted in the graph.
    params:     the op's arguments after the input, with their defaults, in the
                op's order; call sites are bound against ``("input", *params)``.
    patterns:   spellings that are rewritten.
    inplace:    spellings that are found but left native (they mutate their input).
    check:      raises ``ValueError`` for argument values the lean op cannot serve.
    jit_ops:    TorchScript node kinds that are rewritten; their schema arguments
                named like ``params`` are read as the op's parameters (constants only).
    jit_inplace: TorchScript node kinds that are found but left native.
    """

    name: str
    op: Any
    params: Mapping[str, float] = field(default_factory=dict)
    patterns: Tuple[Pattern, ...] = ()
    inplace: Tuple[Pattern, ...] = ()
    check: Optional[Callable[..., None]] = None
    jit_ops: Tuple[str, ...] = ()
    jit_inplace: Tuple[str, ...] = ()

    @functools.cached_property
    def signature(self) -> inspect.Signature:
        P = inspect.Parameter
        return inspect.Signature(
            [P("input", P.POSITIONAL_OR_KEYWORD)]
            + [P(k, P.POSITIONAL_OR_KEYWORD, default=v) for k, v in self.params.items()]
        )

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Tuple[Any, Dict[str, float]]:
        """(input, the op's parameters as floats) of a call ``f(*args, **kwargs)`` of a spelling.

        Raises ``ValueError`` saying why the lean op cannot serve the call: other
        arguments (``out=``), parameters that are not plain numbers, values ``check`` refuses.

        >>> RULES[0].bind((x, 2), {})          # doctest: +SKIP
        (x, {'beta': 2.0, 'threshold': 20.0})
        """
        if not kwargs and 0 < len(args) <= 1 + len(self.params):  # the common case, without inspect
            values = dict(self.params)
            values.update(zip(self.params, args[1:]))
            x = args[0]
        else:
            try:
                bound = self.signature.bind(*args, **kwargs)
            except TypeError as e:
                raise ValueError(f"unexpected arguments ({e})") from None
            bound.apply_defaults()
            x, values = bound.arguments.pop("input"), dict(bound.arguments)
        for k, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{k} is not a number known when the call is rewritten ({v!r})")
        params = {k: float(v) for k, v in values.items()}
        if self.check is not None:
            self.check(**params)
        return x, params


def _check_softplus(beta: float, threshold: float) -> None:
    if beta == 0 or not math.isfinite(beta):
        raise ValueError(f"beta={beta} (the lean op needs a finite, non-zero beta)")


RULES: Tuple[Rule, ...] = (
    Rule(
        name="softplus",
        op=torch.ops.graph_rewrite.softplus,
        params={"beta": 1.0, "threshold": 20.0},
        patterns=(nn.Softplus, F.softplus),
        check=_check_softplus,
        jit_ops=("aten::softplus",),
    ),
    Rule(
        name="sigmoid",
        op=torch.ops.graph_rewrite.sigmoid,
        # F.sigmoid is a Python function that FX traces into x.sigmoid().
        patterns=(nn.Sigmoid, torch.sigmoid, torch.special.expit, F.sigmoid, "sigmoid"),
        inplace=(torch.sigmoid_, "sigmoid_"),
        # torch.special.expit and F.sigmoid compile to aten::sigmoid too.
        jit_ops=("aten::sigmoid",),
        jit_inplace=("aten::sigmoid_",),
    ),
    Rule(
        name="logsigmoid",
        op=torch.ops.graph_rewrite.logsigmoid,
        patterns=(nn.LogSigmoid, F.logsigmoid),
        jit_ops=("aten::log_sigmoid",),
    ),
    # Hand-written spellings (torch.log(1 + torch.exp(x)), ...): matched as whole
    # subgraphs by graph_rewrite.spellings, not node by node, so no patterns here.
    Rule(name="spellings", op=None),
)


def rules_for(ops: Optional[Sequence[str]]) -> Tuple[Rule, ...]:
    """The rules named in ``ops`` (all of them for ``None``); unknown names raise ``ValueError``."""
    if ops is None:
        return RULES
    if isinstance(ops, str):
        ops = [ops]
    known = {r.name: r for r in RULES}
    unknown = [o for o in ops if o not in known]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; choose from {sorted(known)}")
    return tuple(known[o] for o in dict.fromkeys(ops))


def is_match(node: Node, pattern: Pattern, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``node`` is a call of ``pattern`` (module type, callable or method name).

    Module types match exactly, not by ``isinstance``: a subclass may override ``forward``.
    """
    if isinstance(pattern, type):
        return (
            node.op == "call_module"
            and isinstance(node.target, str)
            and type(modules.get(node.target)) is pattern
        )
    if isinstance(pattern, str):
        return node.op == "call_method" and node.target == pattern
    return node.op == "call_function" and node.target is pattern


@functools.lru_cache(maxsize=None)
def pattern_name(pattern: Pattern) -> str:
    """A readable name for a pattern: ``nn.Softplus``, ``F.softplus``, ``Tensor.sigmoid``."""
    if isinstance(pattern, str):
        return f"Tensor.{pattern}"
    if isinstance(pattern, type):
        return f"nn.{pattern.__name__}" if pattern.__module__.startswith("torch.nn") else pattern.__qualname__
    namespaces = (("F", F), ("torch", torch), ("torch.special", torch.special), ("Tensor", torch.Tensor))
    for prefix, namespace in namespaces:
        for name in dir(namespace):
            if getattr(namespace, name, None) is pattern:
                return f"{prefix}.{name}"
    return getattr(pattern, "__qualname__", repr(pattern))
