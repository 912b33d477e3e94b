"""Graph printouts: what the rewrite changed, as a short unified diff of the model's code.

Example::

    >>> model = nn.Sequential(nn.Linear(8, 8), nn.Softplus(), nn.Linear(8, 1))
    >>> print(graph_diff(model, optimize(model)))       # doctest: +SKIP
    --- original
    +++ optimized
    @@ -2,5 +2,5 @@
         input_1 = input
         _0 = getattr(self, "0")(input_1)
    -    _1 = getattr(self, "1")(_0)
    +    _1 = torch.ops.graph_rewrite.softplus(_0, 1.0, 20.0)
         _2 = getattr(self, "2")(_1)
         return _2
    <BLANKLINE>
    1 node(s) rewritten:
    node      where  was          now                               args
    ------  -------  -----------  --------------------------------  --------------------
    _1            1  nn.Softplus  torch.ops.graph_rewrite.softplus  beta=1, threshold=20
"""
from __future__ import annotations

import difflib
import re
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tabulate import tabulate
from torch import fx

from .rules import RULES

__all__ = ["graph_diff", "rewritten_nodes"]

# FX ends lines with ";  x = y = None" to free values early: noise for a reader.
_FREE_VALUES = re.compile(r";\s+[\w\s=]*= None\s*$")


def _readable(code: str) -> List[str]:
    return [_FREE_VALUES.sub("", line).rstrip() for line in code.strip("\n").splitlines()]


def _fx_code(gm: fx.GraphModule) -> str:
    """The module's code as FX writes it: ``optimize()``'s copy runs a spelling of it with
    faster submodule lookups, which would make every line of a diff differ."""
    return gm.graph.python_code("self").src


def _target_name(target: object) -> str:
    qualified = getattr(target, "_qualified_op_name", None)  # an op packet, e.g. graph_rewrite::sigmoid
    if qualified:
        return "torch.ops." + qualified.replace("::", ".")
    return getattr(target, "__qualname__", str(target))


def _args_text(target: object, values: Sequence[object]) -> str:
    """``beta=1, threshold=20``: the op's arguments after the input, named from the rules table."""
    if any(r.kind == "recompute" and getattr(r, "op", None) is target for r in RULES):
        # (h, act, ...): say what backward recomputes rather than list weights.
        return f"recomputes {values[1]}, keeps its input instead of {values[0]}"
    names = next((list(r.params) for r in RULES if r.kind == "output" and r.op is target), [])
    texts = [f"{v:g}" if isinstance(v, float) else str(v) for v in values]
    return ", ".join(f"{k}={t}" for k, t in zip(names, texts)) if len(names) == len(texts) else ", ".join(texts)


def rewritten_nodes(optimized: nn.Module) -> List[Tuple[str, str, str, str, str]]:
    """(node, where, was, now, args) for each node the rewrite replaced in ``optimized``.

    Read from ``node.meta["graph_rewrite"]`` of a GraphModule, else from ``.rewrite_report``.
    """
    if isinstance(optimized, fx.GraphModule):
        rows = []
        for node in optimized.graph.nodes:
            info = node.meta.get("graph_rewrite")
            if info is not None:
                args = _args_text(node.target, node.args[1:])
                rows.append((node.name, info.get("where", ""), info.get("was", ""), _target_name(node.target), args))
        return rows
    report = getattr(optimized, "rewrite_report", None)
    if report is None:
        return []
    return [
        (r.node, r.where, r.original, r.lean_op, ", ".join(f"{k}={v:g}" for k, v in r.args.items()))
        for r in report.replaced
    ]


def _original_code(original: nn.Module, optimized: nn.Module) -> Tuple[Optional[str], str]:
    """(code of ``original`` as FX would print it, or None; why it is None)."""
    if isinstance(original, fx.GraphModule):
        return _fx_code(original), ""
    # Trace a shallow copy with optimize()'s tracer, keeping as calls the modules that
    # optimize() could not trace, so node names line up with the optimized graph. The
    # copy keeps the user's modules free of what tracing caches on them.
    from .frontends.fx import _clone_tree, _LeafTracer

    report = getattr(optimized, "rewrite_report", None)
    leaves = {u.module for u in getattr(report, "uncovered", ()) if u.module}
    try:
        return _LeafTracer(leaves).trace(_clone_tree(original)).python_code("self").src, ""
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:120]
        return None, f"the original model could not be traced ({type(e).__name__}: {first})"


# TorchScript IR: unnamed values print as %<number>, renumbered when a node is inserted
# anywhere before them; source comments are long and the same on both sides.
_UNNAMED = re.compile(r"%\d+\b")
_SOURCE = re.compile(r"\s+# \S+:\d+:\d+$")


def _script_diff(original: nn.Module, optimized: nn.Module, context: int) -> str:
    """Unified diff of ``inlined_graph``: the original's (re-imported, so names match) vs the optimized one's.

    Lines are matched with unnamed values' numbers blanked out, so an inserted
    constant does not turn every later line into a change; they print as they are.
    """
    from .frontends.torchscript import fresh_copy

    before = [_SOURCE.sub("", line) for line in str(fresh_copy(original)[0].inlined_graph).splitlines()]
    after = [_SOURCE.sub("", line) for line in str(optimized.inlined_graph).splitlines()]
    matcher = difflib.SequenceMatcher(None, [_UNNAMED.sub("%_", l) for l in before],
                                      [_UNNAMED.sub("%_", l) for l in after], autojunk=False)
    out = ["--- original (inlined_graph)", "+++ optimized (inlined_graph)"]
    for group in matcher.get_grouped_opcodes(max(0, context)):
        i1, j1, i2, j2 = group[0][1], group[0][3], group[-1][2], group[-1][4]
        out.append(f"@@ -{i1 + 1},{i2 - i1} +{j1 + 1},{j2 - j1} @@")
        for tag, a1, a2, b1, b2 in group:
            if tag == "equal":
                out += [" " + l for l in after[b1:b2]]
                continue
            out += ["-" + l for l in before[a1:a2]] + ["+" + l for l in after[b1:b2]]
    return "\n".join(out) if len(out) > 2 else "(the code is unchanged)"


def graph_diff(original: nn.Module, optimized: nn.Module, context: int = 2, table: bool = True) -> str:
    """A unified diff of the original's and the optimized model's code, then a table of rewritten nodes.

    Only changed regions are shown, each with ``context`` lines around it, so the
    printout of a 250-node model stays a page or two. ``original`` may be the
    eager model (traced here with torch.fx) or a GraphModule; if it cannot be
    traced, or ``optimized`` is not a GraphModule (``optimize`` fell back to
    swapping modules), only the table is given. ``table=False`` leaves the table
    out (the CLI prints ``rewrite_report`` instead).

    Example::

        >>> lean = optimize(model)                       # doctest: +SKIP
        >>> print(graph_diff(model, lean))               # doctest: +SKIP
    """
    if not isinstance(original, nn.Module) or not isinstance(optimized, nn.Module):
        raise TypeError(
            f"graph_diff() takes two torch.nn.Module models, got {type(original).__name__} "
            f"and {type(optimized).__name__}"
        )
    parts: List[str] = []
    scripts = [isinstance(m, torch.jit.ScriptModule) for m in (original, optimized)]
    if all(scripts):
        parts.append(_script_diff(original, optimized, context))
    elif any(scripts):
        parts.append("(no code diff: give both models as TorchScript modules, or both as eager ones)")
    else:
        parts.append(_eager_diff(original, optimized, context))
    report = getattr(optimized, "rewrite_report", None)
    if table and not isinstance(optimized, (fx.GraphModule, torch.jit.ScriptModule)) \
            and report is not None and report.replaced:
        parts.append(str(report))  # call sites of the runtime front end, with file:line
    elif table:
        rows = rewritten_nodes(optimized)
        parts.append(f"{len(rows)} node(s) rewritten:\n" + tabulate(rows, headers=("node", "where", "was", "now", "args"))
                     if rows else "no node was rewritten")
    return "\n\n".join(parts)


def _eager_diff(original: nn.Module, optimized: nn.Module, context: int) -> str:
    before, why = _original_code(original, optimized)
    if not isinstance(optimized, fx.GraphModule):
        return ("(no code diff: the optimized model is not a GraphModule; its forward runs under the runtime "
                "front end, whose call sites are listed from their first call)")
    if before is None:
        return f"(no code diff: {why})"
    diff = list(difflib.unified_diff(
        _readable(before), _readable(_fx_code(optimized)), "original", "optimized", n=max(0, context), lineterm=""
    ))
    return "\n".join(diff) if diff else "(the code is unchanged)"
