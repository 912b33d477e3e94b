"""What a rewrite did: each replaced node, each match left alone, and what no graph covered.

``print(optimize(model).rewrite_report)`` gives a readable table.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List

from tabulate import tabulate

__all__ = ["Replaced", "LeftAlone", "Uncovered", "RewriteReport", "estimated_savings"]


@dataclass(frozen=True)
class Replaced:
    """A node now calling a lean op. ``where`` is the module path or the call site's module."""

    node: str
    where: str
    original: str
    lean_op: str
    args: Dict[str, float]
    kind: str = "output"  # the rule kind that fired (graph_rewrite.rules.KINDS)
    frees: str = ""  # the node whose value the model no longer keeps for this (kind "recompute")
    detail: str = ""


@dataclass(frozen=True)
class LeftAlone:
    """A matching spelling that was not rewritten, and why."""

    node: str
    where: str
    original: str
    reason: str


@dataclass(frozen=True)
class Uncovered:
    """A module whose own code is not in any graph, so functional calls in it stay native."""

    module: str
    reason: str


@dataclass
class RewriteReport:
    """The record that travels with an optimized model as ``.rewrite_report``.

    >>> report = optimize(model).rewrite_report   # doctest: +SKIP
    >>> report.counts()                             # doctest: +SKIP
    {'graph_rewrite.softplus': 4}
    """

    tracing: str = "whole model"
    replaced: List[Replaced] = field(default_factory=list)
    left_alone: List[LeftAlone] = field(default_factory=list)
    uncovered: List[Uncovered] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # caveats of the rules that fired (autocast, ...)

    def counts(self) -> Dict[str, int]:
        """Replaced nodes per lean op."""
        return dict(Counter(r.lean_op for r in self.replaced))

    def counts_by_kind(self) -> Dict[str, int]:
        """Replaced nodes per rule kind: ``{"output": 3, "recompute": 12}``."""
        return dict(Counter(r.kind for r in self.replaced))

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"graph_rewrite: {len(self.replaced)} node(s) rewritten; tracing: {self.tracing}"]
        if self.replaced:
            rows = [
                (r.node, r.where, r.original, r.lean_op, ", ".join(f"{k}={v:g}" for k, v in r.args.items()))
                for r in self.replaced
            ]
            if any(r.kind != "output" for r in self.replaced):  # the rule kind and what it recomputes
                rows = [row + (r.kind, r.detail) for row, r in zip(rows, self.replaced)]
                lines.append(tabulate(rows, headers=("node", "where", "was", "now", "args", "kind", "recomputes")))
            else:
                lines.append(tabulate(rows, headers=("node", "where", "was", "now", "args")))
        if self.left_alone:
            lines.append("left alone:")
            rows = [(r.node, r.where, r.original, r.reason) for r in self.left_alone]
            lines.append(tabulate(rows, headers=("node", "where", "spelling", "reason")))
        for note in self.notes:
            lines.append(f"note: {note}")
        if self.uncovered:
            lines.append("not traced (activation modules inside are swapped; functional calls stay native):")
            lines.append(tabulate([(u.module or "<root>", u.reason) for u in self.uncovered], headers=("module", "reason")))
        return "\n".join(lines)


def estimated_savings(optimized: Any, *example_inputs: Any) -> Dict[str, int]:
    """Bytes the optimized model no longer keeps for backward, per rule kind, **estimated** from shapes.

    Shapes and dtypes come from running ``optimized``'s graph on fake tensors
    (``torch.fx.passes.shape_prop.ShapeProp``: no real compute, no buffer updates),
    which records ``tensor_meta`` on its nodes. Each rewrite names the value it
    stops keeping (``Replaced.frees``): for kind ``"recompute"``, the activation
    output its consumers no longer keep (the pass checked that no other use keeps
    it); for kind ``"output"``, the activation's input, counted where the activation
    is its one use (this assumes the next layer keeps the output, as Conv and Linear
    do; where nothing keeps it, as before a mean, it overcounts). Each value counts once. To
    measure instead, compare ``graph_rewrite.memory.saved_bytes`` of both models.

    >>> lean = optimize(model)                                   # doctest: +SKIP
    >>> estimated_savings(lean, torch.randn(2, 3, 64, 64))       # doctest: +SKIP
    {'recompute': 3981312}
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp

    report = getattr(optimized, "rewrite_report", None)
    if report is None or not hasattr(optimized, "graph"):
        return {}
    ShapeProp(optimized, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)
    nodes = {n.name: n for n in optimized.graph.nodes}
    out: Dict[str, int] = {}
    seen = set()
    for r in report.replaced:
        node = nodes.get(r.frees)
        meta = node.meta.get("tensor_meta") if node is not None else None
        if meta is None or (r.frees, r.kind) in seen or not hasattr(meta, "shape"):
            continue
        if r.kind == "output" and len(node.users) != 1:
            continue
        seen.add((r.frees, r.kind))
        numel = 1
        for s in meta.shape:
            numel *= int(s)
        out[r.kind] = out.get(r.kind, 0) + numel * torch.empty((), dtype=meta.dtype).element_size()
    return out
