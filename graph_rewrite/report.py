"""What a rewrite did: each replaced node, each match left alone, and what no graph covered.

``print(optimize(model).rewrite_report)`` gives a readable table.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List

from tabulate import tabulate

__all__ = ["Replaced", "Respelled", "LeftAlone", "Uncovered", "RewriteReport"]


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

    def counts(self) -> Dict[str, int]:
        """Replaced nodes per lean op."""
        return dict(Counter(r.lean_op for r in self.replaced))

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
            lines.append(tabulate(rows, headers=("node", "where", "was", "now", "args") + self._site_header))
        if self.spellings:
            lines.append("hand-written spellings rewritten to the op they spell; forward values change where noted:")
            rows = [(r.node, r.where, r.original, r.now, r.changes) for r in self.spellings]
            lines.append(tabulate(rows, headers=("node", "where", "was", "now", "what changes"), maxcolwidths=[None] * 4 + [60]))
        if self.left_alone:
            lines.append("left alone:")
            rows = [(r.node, r.where, r.original, r.reason) + ((_short(r.site),) if self._sites else ())
                    for r in self.left_alone]
            lines.append(tabulate(rows, headers=("node", "where", "spelling", "reason") + self._site_header))
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
