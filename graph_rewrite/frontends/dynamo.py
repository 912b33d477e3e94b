"""The ``torch.compile`` front end: a Dynamo backend that rewrites each captured graph.

``torch.compile(model, backend="graph_rewrite")`` (registered through the
``torch_dynamo_backends`` entry point, so nothing needs importing first) runs the
FX pass of the rules table over every graph Dynamo captures, then runs the graph
eagerly, or hands it on to inductor with ``options={"inductor": True}``.

Dynamo captures code FX's symbolic tracer cannot (decorated forwards, loops over
sizes), but it runs the model's **compile-time** code path: Hugging Face models
that branch on ``is_torchdynamo_compiling()`` take another path under it, with other
memory (README, "Works on", gives a measured case). Eager users who want their own
eager code path use :func:`graph_rewrite.optimize`.

Example::

    >>> report = graph_rewrite.RewriteReport()
    >>> fast = torch.compile(model, backend="graph_rewrite", options={"report": report})  # doctest: +SKIP
    >>> fast(x).sum().backward(); print(report)                                           # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from torch import fx

from ..report import RewriteReport
from ..rules import rules_for
from .fx_pass import rewrite_graph
from .fx_recompute import rewrite_recompute

__all__ = ["backend"]

_OPTIONS = {"inductor", "ops", "report"}


def backend(gm: fx.GraphModule, example_inputs: List[Any], options: Optional[Dict[str, Any]] = None,
            mode: Optional[str] = None) -> Callable[..., Any]:
    """Rewrite one Dynamo graph with the rules table; run it eagerly or compile it with inductor.

    ``options``: ``inductor`` (bool, default False) hands the rewritten graph to
    inductor; ``ops`` picks rules by name, as in
    :func:`graph_rewrite.optimize`; ``report`` (a :class:`RewriteReport`) receives
    what each graph had rewritten. The graph is Dynamo's own, made for this call.
    """
    options = dict(options or {})
    if mode not in (None, "default"):
        raise ValueError(f"graph_rewrite backend: mode={mode!r} is inductor's; the backend runs inductor's default")
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ValueError(f"graph_rewrite backend: unknown option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}")
    rules, modules = rules_for(options.get("ops")), dict(gm.named_modules())
    replaced, left_alone = rewrite_graph(gm.graph, modules, rules)
    # Kind "recompute" too: Dynamo's graph shows every use of an activation's output.
    more, more_left = rewrite_recompute(gm.graph, modules, rules)
    replaced, left_alone = replaced + more, left_alone + more_left
    gm.recompile()
    report = options.get("report")
    if report is not None:
        report.tracing = "torch.compile (Dynamo graphs)"
        report.replaced += replaced
        report.left_alone += left_alone
    if options.get("inductor"):
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)
    return gm.forward
