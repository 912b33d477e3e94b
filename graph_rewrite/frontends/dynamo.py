"""The ``torch.compile`` front end: a Dynamo backend that rewrites each captured graph.

``torch.compile(model, backend="graph_rewrite")`` (registered through the
``torch_dynamo_backends`` entry point, so nothing needs importing first) runs the
FX pass of the rules table over every graph Dynamo captures, then runs the graph
eagerly, or hands it on to inductor with ``options={"inductor": True}``. With inductor,
the nodes of each cheap module (hand-written RMSNorm), which Dynamo inlines, are tagged
for the partitioner to recompute in backward.

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

import re
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

from ..report import Replaced, RewriteReport
from ..rules import CheapModule, Rule, rules_for
from .fx import cheap_ops
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
    if options.get("inductor"):
        replaced += mark_cheap_modules(gm.graph, example_inputs, rules)
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


def _module_calls(graph: fx.Graph) -> Dict[str, List[fx.Node]]:
    """The call nodes of ``graph`` by the innermost module that made them (Dynamo records the
    module stack of each node; it inlines modules, so no ``call_module`` node stands for one)."""
    calls: Dict[str, List[fx.Node]] = {}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op in ("call_function", "call_method") and stack:
            calls.setdefault(next(reversed(stack)), []).append(node)
    return calls


def _outside_inputs(ops: Sequence[fx.Node], parameters: set) -> List[fx.Node]:
    """The nodes ``ops`` read from outside themselves, the module's parameters left out."""
    inside = set(ops)
    found: List[fx.Node] = []
    for op in ops:
        for arg in op.all_input_nodes:
            if arg not in inside and arg not in parameters and arg not in found:
                found.append(arg)
    return found


def mark_cheap_modules(graph: fx.Graph, example_inputs: Sequence[Any], rules: Sequence[Rule]) -> List[Replaced]:
    """Mark the nodes of each cheap module (hand-written RMSNorm, tanh-GELU: a :class:`CheapModule`
    rule) for inductor's partitioner to recompute in backward, as ``optimize`` runs such a module
    again from its input (``node.meta["recompute"]``, the tag selective checkpointing sets, which
    AOTAutograd copies onto the nodes it traces). Native keeps the module's output for the matmul
    after it; marked, it keeps the input only. Returns what was marked, for the report."""
    cheap = [r for r in rules if isinstance(r, CheapModule)]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    parameters = {n for n, v in zip(placeholders, example_inputs) if isinstance(v, torch.nn.Parameter)}
    parameters |= {n for n in graph.nodes if n.op == "get_attr"}
    marked: List[Replaced] = []
    for key, ops in _module_calls(graph).items():
        inputs = _outside_inputs(ops, parameters)
        if len(inputs) != 1 or not any(cheap_ops(ops, inputs[0], r) for r in cheap):
            continue
        for op in ops:
            op.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        path, cls = ops[0].meta["nn_module_stack"][key]
        marked.append(Replaced(ops[-1].name, _module_path(path), getattr(cls, "__name__", str(cls)),
                               "graph_rewrite.recompute_module", {}, kind="recompute",
                               detail="inductor recomputes it in backward; it keeps its input only"))
    return marked


def _module_path(dynamo_path: str) -> str:
    # Dynamo writes L['self'].model.layers[0].input_layernorm (or L['args'][0]... for a module passed
    # in); the report writes model.layers.0.input_layernorm
    path = re.sub(r"^L\['[^']*'\](\[\d+\])?", "", dynamo_path)
    return re.sub(r"\[(\d+)\]", r".\1", path).strip(".") or "<root>"
