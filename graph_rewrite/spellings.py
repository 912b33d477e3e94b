"""Hand-written activation spellings, rewritten to the op they spell.

``torch.log(1 + torch.exp(x))`` is softplus, written so that it keeps two
intermediate tensors for backward (``exp(x)`` for exp's backward and ``1 + exp(x)``
for log's) and gives NaN gradients in float32 from x = 89, where ``exp`` overflows.
Each :class:`Spelling` is a pair of plain functions, a pattern and its replacement,
in the style of ``torch._inductor``'s ``register_replacement``: both are traced
with ``torch.fx`` and :func:`rewrite_spellings` finds the pattern's graph in a
model's graph and puts the replacement's graph in its place.

Forward values change where the spelling itself was inexact: where ``exp``
overflowed (inf or NaN before, finite now), where ``1 + exp(x)`` rounded to 1
(0 before, the tiny true value now), and by a rounding or two elsewhere. So these
rewrites are listed apart in the rewrite report, each with what changes, and
``optimize(model, ops=[...])`` applies them only when ``"spellings"`` is named
(it is, by default) together with the rule of the op the spelling maps to.

Example::

    >>> import torch.nn as nn
    >>> from graph_rewrite import optimize
    >>> class M(nn.Module):
    ...     def forward(self, x):
    ...         return torch.log(1 + torch.exp(x))
    >>> [s.original for s in optimize(M()).rewrite_report.spellings]
    ['torch.log(1 + torch.exp(x))']
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx import Node

from . import ops as _ops  # noqa: F401  (registers torch.ops.graph_rewrite.*)
from .frontends.fx_pass import mutating_use

__all__ = ["Spelling", "SPELLINGS", "RULE_NAME", "rewrite_spellings"]

RULE_NAME = "spellings"
"""The name that turns these rewrites on in ``optimize(model, ops=[...])``."""

_OVERFLOW = "finite where exp(x) overflowed (x >= 89 in float32: inf/NaN before)"


@dataclass(frozen=True)
class Spelling:
    """One hand-written spelling and what it is rewritten to.

    name:        how the report shows the spelling.
    pattern:     a function of one tensor ``x`` written the way users write it.
    replacement: the function that replaces it (a lean op, or a native one).
    rule:        the rule that must be enabled too (None: only ``"spellings"``).
    lean_op:     how the report shows the replacement.
    changes:     what changes in forward values.
    """

    name: str
    pattern: Callable[[torch.Tensor], torch.Tensor]
    replacement: Callable[[torch.Tensor], torch.Tensor]
    rule: Optional[str]
    lean_op: str
    changes: str


# ----------------------------------------------------------------- pattern, replacement
def log_one_plus_exp(x):
    return torch.log(1 + torch.exp(x))


def log1p_exp(x):
    return torch.log1p(torch.exp(x))


def lean_softplus(x):
    return torch.ops.graph_rewrite.softplus(x, 1.0, 20.0)


def one_over_one_plus_exp_neg(x):
    return 1 / (1 + torch.exp(-x))


def lean_sigmoid(x):
    return torch.ops.graph_rewrite.sigmoid(x)


def neg_softplus_neg(x):
    return -F.softplus(-x)


def lean_logsigmoid(x):
    return torch.ops.graph_rewrite.logsigmoid(x)


def x_sigmoid_x(x):
    return x * torch.sigmoid(x)


def native_silu(x):
    # Native SiLU keeps x alone; x * sigmoid(x) keeps x and sigmoid(x). Measured against
    # 50-digit references (CPU, torch 2.14.1) it is as close or closer in every dtype
    # (float16: 0.5 ulp against 6.2 forward, 14.8 gradient), so nothing is lost.
    return F.silu(x)


SPELLINGS: Tuple[Spelling, ...] = (
    Spelling("torch.log(1 + torch.exp(x))", log_one_plus_exp, lean_softplus, "softplus", "graph_rewrite.softplus",
             f"{_OVERFLOW}; nonzero where 1 + exp(x) rounded to 1 (x < -17 in float32: 0 before); "
             "x itself above x = 20 (softplus's threshold: 2e-9 less in float64)"),
    Spelling("torch.log1p(torch.exp(x))", log1p_exp, lean_softplus, "softplus", "graph_rewrite.softplus",
             f"{_OVERFLOW}; x itself above x = 20 (softplus's threshold: 2e-9 less in float64)"),
    Spelling("1 / (1 + torch.exp(-x))", one_over_one_plus_exp_neg, lean_sigmoid, "sigmoid", "graph_rewrite.sigmoid",
             "the tiny true value where exp(-x) overflowed (x <= -89 in float32: 0 before, NaN gradients); "
             "rounding elsewhere"),
    Spelling("-F.softplus(-x)", neg_softplus_neg, lean_logsigmoid, "logsigmoid", "graph_rewrite.logsigmoid",
             "x - log1p(exp(x)) instead of x below x = -20 (softplus's threshold: 2e-9 in float64); rounding"),
    Spelling("x * torch.sigmoid(x)", x_sigmoid_x, native_silu, None, "F.silu",
             "native SiLU's rounding (at most as far from exact as the spelling, measured)"),
)


# ----------------------------------------------------------------------------- matcher
# Targets that compute the same thing, by function or by method name.
_CANONICAL: Dict[Any, str] = {
    torch.exp: "exp", "exp": "exp",
    torch.log: "log", "log": "log",
    torch.log1p: "log1p", "log1p": "log1p",
    operator.add: "add", torch.add: "add", "add": "add",
    operator.mul: "mul", torch.mul: "mul", "mul": "mul",
    operator.neg: "neg", torch.neg: "neg", "neg": "neg",
    operator.truediv: "div", torch.div: "div", torch.true_divide: "div", "div": "div",
    torch.reciprocal: "reciprocal", "reciprocal": "reciprocal",
    torch.sigmoid: "sigmoid", torch.special.expit: "sigmoid", F.sigmoid: "sigmoid", "sigmoid": "sigmoid",
    F.softplus: "softplus",
}
_COMMUTATIVE = {"add", "mul"}
# Functions with optional arguments: their defaults, so F.softplus(y) and F.softplus(y, 1, 20) agree.
_DEFAULTS: Dict[str, Tuple[Tuple[str, Any], ...]] = {"softplus": (("beta", 1.0), ("threshold", 20.0))}


def _kind(node: Any) -> Optional[str]:
    if not isinstance(node, Node) or node.op not in ("call_function", "call_method"):
        return None
    try:
        return _CANONICAL.get(node.target)
    except TypeError:  # an unhashable target
        return None


def _arguments(node: Node, kind: str) -> Optional[List[Any]]:
    """The node's arguments, defaults filled in; None when it has others (alpha=, rounding_mode=)."""
    args = list(node.args)
    defaults = _DEFAULTS.get(kind, ())
    kwargs = dict(node.kwargs)
    for name, default in defaults[len(args) - 1:]:
        args.append(kwargs.pop(name, default))
    return None if kwargs else args


def _same_constant(p: Any, t: Any) -> bool:
    numbers = (int, float)
    if isinstance(p, bool) or isinstance(t, bool) or not isinstance(p, numbers) or not isinstance(t, numbers):
        return False
    return float(p) == float(t)


def _match(p: Any, t: Any, binding: Dict[Node, Node], matched: List[Node]) -> bool:
    """Whether graph value ``t`` is pattern value ``p``; fills ``binding`` (placeholder -> node)
    and ``matched`` (the target's call nodes) only on success."""
    if isinstance(p, Node) and p.op == "placeholder":
        if p in binding:
            return binding[p] is t
        if not isinstance(t, Node):
            return False
        binding[p] = t
        return True
    if not isinstance(p, Node):
        return _same_constant(p, t)
    kind = _kind(p)
    if kind is None or _kind(t) != kind:
        return False
    p_args, t_args = _arguments(p, kind), _arguments(t, kind)
    if p_args is None or t_args is None or len(p_args) != len(t_args):
        return False
    orders = [t_args] + ([t_args[::-1]] if kind in _COMMUTATIVE and len(t_args) == 2 else [])
    for order in orders:
        b, m = dict(binding), list(matched)
        if all(_match(pa, ta, b, m) for pa, ta in zip(p_args, order)):
            binding.update(b)
            matched[:] = m + [t]
            return True
    return False


def _no_other_users(anchor: Node, matched: Sequence[Node]) -> bool:
    # An intermediate used elsewhere must stay, and then nothing is saved: leave it.
    inside = set(matched)
    return all(set(n.users) <= inside for n in matched if n is not anchor)


@dataclass(frozen=True)
class _Compiled:
    spelling: Spelling
    pattern: fx.Graph
    output: Any  # the pattern's output value
    replacement: fx.Graph


_compiled: Optional[List[_Compiled]] = None


def _compile() -> List[_Compiled]:
    global _compiled
    if _compiled is None:
        out = []
        for s in SPELLINGS:
            pattern = fx.symbolic_trace(s.pattern).graph
            output = next(n for n in pattern.nodes if n.op == "output").args[0]
            out.append(_Compiled(s, pattern, output, fx.symbolic_trace(s.replacement).graph))
        _compiled = out
    return _compiled


def _enabled(rule_names: Sequence[str]) -> List[_Compiled]:
    if RULE_NAME not in rule_names:
        return []
    return [c for c in _compile() if c.spelling.rule is None or c.spelling.rule in rule_names]


def rewrite_spellings(graph: fx.Graph, rule_names: Sequence[str], where=lambda node: "<root>",
                      modules: Optional[Mapping[str, Any]] = None) -> List[Tuple[str, str, Spelling]]:
    """Rewrite, in place, every enabled spelling found in ``graph``; returns (node, where, spelling).

    A spelling is rewritten only where its intermediate values have no users outside
    it, and where nothing changes its result in place later (the lean op keeps it;
    ``modules`` tells which called modules run in place). The new node carries ``meta["graph_rewrite"]`` (``was``, ``where``,
    ``spelling``). The caller recompiles the owning ``GraphModule``.

    >>> g = fx.symbolic_trace(log1p_exp).graph
    >>> [s.name for _, _, s in rewrite_spellings(g, ["spellings", "softplus"])]
    ['torch.log1p(torch.exp(x))']
    """
    enabled = _enabled(rule_names)
    done: List[Tuple[str, str, Spelling]] = []
    if not enabled:
        return done
    for node in list(graph.nodes):
        if node.graph is not graph or _kind(node) is None:  # erased by an earlier rewrite
            continue
        for c in enabled:
            binding: Dict[Node, Node] = {}
            matched: List[Node] = []
            if not _match(c.output, node, binding, matched) or not _no_other_users(node, matched):
                continue
            if mutating_use(node, modules or {}) is not None:
                continue
            placeholders = [n for n in c.pattern.nodes if n.op == "placeholder"]
            val_map = {r: binding[p] for r, p in zip((n for n in c.replacement.nodes if n.op == "placeholder"), placeholders)}
            with graph.inserting_before(node):
                new = graph.graph_copy(c.replacement, val_map)
            place = where(node)
            new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
            new.meta["graph_rewrite"] = {"was": c.spelling.name, "where": place, "spelling": True}
            node.replace_all_uses_with(new)
            for old in reversed(matched):  # users before what they use
                if not old.users:
                    graph.erase_node(old)
            done.append((new.name, place, c.spelling))
            break
    graph.lint()
    return done
