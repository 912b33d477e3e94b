"""What a rewrite did: each replaced node, each match left alone, and what no graph covered.

``print(optimize(model).rewrite_report)`` gives a readable table.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List

from tabulate import tabulate

__all__ = ["Replaced", "Respelled", "LeftAlone", "Uncovered", "RewriteReport", "estimated_savings"]


@dataclass(frozen=True)
class Replaced:
    """A call now made to a lean op: an FX node (``node`` is its name), or a call site the
    runtime front end rewrites (``node`` is ``"-"``, ``site`` its ``file:line``).
    ``where`` is the module path of the call."""

    node: str
    where: str
    original: str
    lean_op: str
    args: Dict[str, float]
    site: str = ""
    kind: str = "output"  # the rule kind that fired (graph_rewrite.rules.KINDS)
    frees: str = ""  # the node whose value the model no longer keeps for this (kind "recompute")
    detail: str = ""


@dataclass(frozen=True)
class Respelled:
    """A hand-written spelling (``torch.log(1 + torch.exp(x))``) now calling the op it spells.

    ``changes`` says where forward values differ from the spelling's (see
    :mod:`graph_rewrite.spellings`): these are listed apart from :class:`Replaced`.
    """

    node: str
    where: str
    original: str
    now: str
    changes: str


@dataclass(frozen=True)
class LeftAlone:
    """A matching spelling that was not rewritten, and why."""

    node: str
    where: str
    original: str
    reason: str
    site: str = ""


@dataclass(frozen=True)
class Uncovered:
    """A module whose own code is not in any FX graph: it runs under the runtime front end."""

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
    spellings: List[Respelled] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # caveats of the rules that fired (autocast, ...)

    def counts(self) -> Dict[str, int]:
        """Replaced nodes per lean op."""
        return dict(Counter(r.lean_op for r in self.replaced))

    def counts_by_kind(self) -> Dict[str, int]:
        """Replaced nodes per rule kind: ``{"output": 3, "recompute": 12}``."""
        return dict(Counter(r.kind for r in self.replaced))

    def saves_memory(self) -> bool:
        """Whether something rewritten frees memory: a lean sigmoid keeps what native's keeps, and an
        in-place activation made out of place only lets a rule after it apply."""
        return bool(self.spellings) or any(
            r.lean_op != "graph_rewrite.sigmoid" and not r.lean_op.endswith("(out of place)") for r in self.replaced)

    def warn_if_nothing_saves(self, what: str, stacklevel: int = 3) -> None:
        """A ``UserWarning`` when nothing rewritten frees memory: the optimized model holds what the
        original holds, and the user should know rather than read it off a benchmark."""
        if self.saves_memory():
            return
        found = f"{len(self.replaced)} rewrite(s) that keep what native keeps, " if self.replaced else ""
        alone = f"{len(self.left_alone)} activation(s) left alone, " if self.left_alone else ""
        warnings.warn(
            f"graph_rewrite: nothing rewritten in {what} frees memory ({found}{alone}"
            f"{'no other' if found or alone else 'no'} activation of the rules table found); it holds what the "
            "original holds. See .rewrite_report for why (ReLU, for one, keeps only its output already)",
            stacklevel=stacklevel)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        sites = sum(1 for r in self.replaced if r.site)
        done = f"{len(self.replaced) - sites} node(s)" + (f" and {sites} call site(s)" if sites else "")
        spelled = f" (+{len(self.spellings)} hand-written spelling(s), below)" if self.spellings else ""
        lines = [f"graph_rewrite: {done} rewritten{spelled}; tracing: {self.tracing}"]
        if self.replaced:
            rows = [
                (r.node, r.where, r.original, r.lean_op, ", ".join(f"{k}={v:g}" for k, v in r.args.items()))
                + ((_short(r.site),) if self._sites else ())
                for r in self.replaced
            ]
            headers = ("node", "where", "was", "now", "args") + self._site_header
            if any(r.kind != "output" for r in self.replaced):  # the rule kind and what it recomputes
                rows = [row + (r.kind, r.detail) for row, r in zip(rows, self.replaced)]
                headers += ("kind", "recomputes")
            lines.append(tabulate(rows, headers=headers))
        if self.spellings:
            lines.append("hand-written spellings rewritten to the op they spell; forward values change where noted:")
            rows = [(r.node, r.where, r.original, r.now, r.changes) for r in self.spellings]
            lines.append(tabulate(rows, headers=("node", "where", "was", "now", "what changes"), maxcolwidths=[None] * 4 + [60]))
        if self.left_alone:
            lines.append("left alone:")
            rows = [(r.node, r.where, r.original, r.reason) + ((_short(r.site),) if self._sites else ())
                    for r in self.left_alone]
            lines.append(tabulate(rows, headers=("node", "where", "spelling", "reason") + self._site_header))
        for note in self.notes:
            lines.append(f"note: {note}")
        if self.uncovered:
            lines.append("not traced by FX (run under the runtime front end; its call sites are listed "
                         "above from their first call):")
            lines.append(tabulate([(u.module or "<root>", u.reason) for u in self.uncovered], headers=("module", "reason")))
        return "\n".join(lines)

    @property
    def _sites(self) -> bool:
        return any(r.site for r in [*self.replaced, *self.left_alone])

    @property
    def _site_header(self) -> tuple:
        return ("call site",) if self._sites else ()


def _short(site: str) -> str:
    """``.../transformers/models/mamba/modeling_mamba.py:412`` -> ``mamba/modeling_mamba.py:412``."""
    parts = site.replace("\\", "/").split("/")
    return "/".join(parts[-2:]) if len(parts) > 2 else site


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
