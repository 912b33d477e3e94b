"""The TorchScript front end: rewrite activation calls inside a ``torch.jit.ScriptModule``.

For users who have a ``.pt`` TorchScript archive (``torch.jit.save``) and no eager model.
:func:`optimize_script` works in four steps:

1. **Copy through an archive.** The module is saved with ``torch.jit.save`` into an
   in-memory buffer and imported into a *new* compilation unit, as ``torch.jit.load``
   does. TorchScript compiles methods per type, and every submodule of one type runs the
   same method graph, so rewriting a graph in place would change every module of that
   type, the original's included. The copy's types and functions are its own; the
   original's graphs are never touched (a guard checks that no type is shared).
2. **Rewrite node by node, in place.** Every function of the new compilation unit is
   visited: each method of each submodule type, and each free function that a method
   calls (``F.sigmoid`` compiles to a ``prim::CallFunction``; the executor inlines the
   rewritten function), and the ``torch.jit.fork`` closures inside them. Each ``aten`` node that a rule of :data:`graph_rewrite.rules.RULES`
   names in ``jit_ops`` gets a lean-op node inserted *at its own position*, its uses
   are moved to the new node, and it is destroyed. Staying at the same position keeps
   the order with respect to in-place ops on the same tensors (a pattern rewriter that
   re-inserts elsewhere can move the new op past ``x.sigmoid_()`` and change the result).
   The arguments (``beta``, ``threshold``) are read by the names in ``Rule.params`` from the
   node's schema and must be constants; ints become float constants, because the op's
   schema takes ``float`` and an ``int`` value there trips the profiling executor's alias
   analysis.
3. **Leave alone and report** in-place forms (``sigmoid_``), ``out=`` overloads, inputs whose
   dtype the graph knows is not floating point, and non-constant or unservable arguments.
4. **Share the tensors.** The copy's parameters and buffers are rebound to the original's
   tensors, as the FX front end does: gradients land in the original's parameters, and
   ``state_dict()`` keys are the same.

A module the pass cannot handle (one ``torch.jit.save`` refuses, such as a module calling a
``@torch.jit.ignore`` Python function, or one whose types the copy would share) raises
:class:`ScriptRewriteError`, and no copy is returned: the result is never half-rewritten.

Example::

    >>> scripted = torch.jit.script(nn.Sequential(nn.Linear(8, 8), nn.Softplus()))
    >>> lean = optimize_script(scripted)
    >>> "graph_rewrite::softplus" in str(lean.inlined_graph)
    True
    >>> "aten::softplus" in str(scripted.inlined_graph)   # the original is unchanged
    True
"""
from __future__ import annotations

import io
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..report import LeftAlone, Replaced, RewriteReport
from ..rules import RULES, Rule
from .fx_pass import lean_op_name

__all__ = ["optimize_script", "rewrite_script_graph", "fresh_copy", "ScriptRewriteError"]

# c10::ScalarType codes of the integer and bool dtypes (stable: they are serialized in archives).
_NON_FLOAT_SCALAR_TYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 11: "bool"}
_MANGLE = re.compile(r"___torch_mangle_\d+\.")


class ScriptRewriteError(TypeError):
    """A ScriptModule the TorchScript front end cannot rewrite; nothing was returned."""


# --------------------------------------------------------------------------- copy
def fresh_copy(module: torch.jit.ScriptModule) -> Tuple[torch.jit.ScriptModule, torch._C.CompilationUnit]:
    """(a copy of ``module`` in a new compilation unit, that unit), via an in-memory archive.

    >>> copy, cu = fresh_copy(torch.jit.script(nn.Linear(2, 2)))   # doctest: +SKIP
    """
    buffer = io.BytesIO()
    try:
        torch.jit.save(module, buffer)
    except Exception as e:
        raise ScriptRewriteError(
            f"the ScriptModule cannot be copied with torch.jit.save ({type(e).__name__}: {_first_line(e)}), "
            "so it cannot be rewritten without touching the original"
        ) from e
    cu = torch._C.CompilationUnit()
    # What torch.jit.load does, keeping hold of the compilation unit to reach every function.
    cpp = torch._C.import_ir_module_from_buffer(cu, buffer.getvalue(), None, {}, False)
    return torch.jit._recursive.wrap_cpp_module(cpp), cu


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _types(module: nn.Module) -> Dict[str, List[str]]:
    """{qualified type name: [module paths of that type]} for a ScriptModule tree."""
    paths: Dict[str, List[str]] = {}
    for path, sub in module.named_modules():
        if isinstance(sub, torch.jit.ScriptModule):
            paths.setdefault(sub._c._type().qualified_name(), []).append(path or "<root>")
    return paths


def _check_types_not_shared(original: nn.Module, copy: nn.Module) -> None:
    theirs = [sub._c._type() for sub in original.modules() if isinstance(sub, torch.jit.ScriptModule)]
    for sub in copy.modules():
        # ClassType equality is identity: a re-imported type with the same name is not equal.
        if isinstance(sub, torch.jit.ScriptModule) and any(sub._c._type() == t for t in theirs):
            raise ScriptRewriteError(
                f"the copy shares type {sub._c._type().qualified_name()} with the original; "
                "rewriting it would change the original's methods"
            )


def _share_tensors(original: nn.Module, copy: nn.Module) -> None:
    """Rebind the copy's parameters and buffers to the original's tensors (tied ones stay tied)."""
    modules = dict(copy.named_modules())  # ScriptModules have no get_submodule
    for kind in ("named_parameters", "named_buffers"):
        theirs = dict(getattr(original, kind)(remove_duplicate=False))
        for name, _ in list(getattr(copy, kind)(remove_duplicate=False)):
            owner, _, attr = name.rpartition(".")
            modules[owner]._c.setattr(attr, theirs[name])


# --------------------------------------------------------------------------- the pass
def _nodes(block) -> List[torch._C.Node]:
    """Every node of a graph or block, nested blocks (``if``, loops) included, in order.

    A list, taken before any rewrite: a destroyed node can no longer be walked into.
    """
    found: List[torch._C.Node] = []
    for node in block.nodes():
        found.append(node)
        for inner in node.blocks():
            found += _nodes(inner)
    return found


def _find(node: torch._C.Node, rules: Sequence[Rule]) -> Optional[Tuple[Rule, bool]]:
    """(rule, is in-place) for a node kind some rule names, else None."""
    kind = node.kind()
    for rule in rules:
        if rule.kind != "output":  # kind "recompute" is FX only
            continue
        if kind in rule.jit_ops:
            return rule, False
        if kind in rule.jit_inplace:
            return rule, True
    return None


def _known_non_float(value: torch._C.Value) -> Optional[str]:
    """The dtype name if the graph says ``value`` is an integer or bool tensor, else None."""
    t = value.type()
    if isinstance(t, torch._C.TensorType) and t.dtype() is not None:
        return None if (t.dtype().is_floating_point or t.dtype().is_complex) else str(t.dtype())
    # Scripted code has no dtypes in its types; ``x.long()`` and ``x.to(torch.int64)`` say it anyway.
    producer = value.node()
    if producer.kind() == "aten::to" and "dtype" in _arg_names(producer):
        dtype = producer.namedInput("dtype")
        if dtype.node().kind() == "prim::Constant":
            code = dtype.toIValue()
            if isinstance(code, int):
                return _NON_FLOAT_SCALAR_TYPES.get(code)
    return None


def _arg_names(node: torch._C.Node) -> List[str]:
    return [a.name for a in torch._C.parse_schema(node.schema()).arguments]


def _read_args(node: torch._C.Node, rule: Rule) -> Tuple[torch._C.Value, Dict[str, float], List[object]]:
    """(input, parameters, for each parameter the float constant Value to reuse or the number to insert).

    ``ValueError`` says why the node cannot be rewritten.
    """
    text = node.schema()
    if text == "(no schema)":
        raise ValueError("no operator schema matches the call")
    schema = torch._C.parse_schema(text)
    if schema.overload_name or len(schema.returns) != 1 or any(a.alias_info for a in schema.arguments):
        overload = f"{schema.name}.{schema.overload_name}" if schema.overload_name else schema.name
        raise ValueError(f"overload {overload} writes to or aliases an argument")
    names = [a.name for a in schema.arguments]
    extra = [n for n in names[1:] if n not in rule.params]
    if extra:
        raise ValueError(f"arguments {extra} have no counterpart in the lean op")
    x = node.inputsAt(0)
    dtype = _known_non_float(x)
    if dtype is not None:
        raise ValueError(f"its input is a {dtype} tensor, not a floating-point one")
    params: Dict[str, float] = {}
    values: List[object] = []
    for name, default in rule.params.items():
        if name not in names:
            params[name] = float(default)
            values.append(float(default))
            continue
        v = node.namedInput(name)
        if v.node().kind() != "prim::Constant":
            raise ValueError(f"{name} is computed at run time, not a constant")
        number = v.toIValue()
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ValueError(f"{name} is not a number ({number!r})")
        params[name] = float(number)
        # The op takes float: reuse a float constant, insert one for an int.
        values.append(v if isinstance(number, float) else float(number))
    if rule.check is not None:
        rule.check(**params)
    return x, params, values


def _replace(graph: torch._C.Graph, node: torch._C.Node, rule: Rule, x: torch._C.Value, values: List[object]) -> None:
    """Put a lean-op node where ``node`` is, move its uses there, and destroy ``node``."""
    with graph.insert_point_guard(node):
        args = [x] + [v if isinstance(v, torch._C.Value) else graph.insertConstant(v) for v in values]
        out = graph.insert(rule.op._qualified_op_name, args)
    out.node().copyMetadata(node)  # source range and scope, for error messages and printouts
    out.copyMetadata(node.output())  # the value's name and type
    node.output().replaceAllUsesWith(out)
    node.destroy()


def rewrite_script_graph(
    graph: torch._C.Graph, rules: Sequence[Rule] = RULES, where: str = ""
) -> Tuple[List[Replaced], List[LeftAlone]]:
    """Rewrite, in place, every activation node in a TorchScript ``graph`` that a rule's ``jit_ops`` names.

    Each node becomes a call of the rule's lean op at the same position in the
    same block, so mutation order is kept. In-place forms, ``out=`` overloads,
    known non-float inputs and non-constant arguments are left alone and reported.
    Closures of ``torch.jit.fork`` (graphs held in a node attribute) are rewritten too.

    >>> fn = torch.jit.script(lambda x: torch.sigmoid(x))                  # doctest: +SKIP
    >>> replaced, left = rewrite_script_graph(fn.graph)                    # doctest: +SKIP
    """
    replaced: List[Replaced] = []
    left_alone: List[LeftAlone] = []
    for node in _nodes(graph):
        found = _find(node, rules)
        if found is None:
            continue
        rule, inplace = found
        name = "%" + node.output().debugName()
        if inplace:
            left_alone.append(LeftAlone(name, where, node.kind(), "in-place: rewriting would drop the mutation of its input"))
            continue
        try:
            x, params, values = _read_args(node, rule)
        except ValueError as e:
            left_alone.append(LeftAlone(name, where, node.kind(), str(e)))
            continue
        kind = node.kind()
        _replace(graph, node, rule, x, values)
        replaced.append(Replaced(name, where, kind, lean_op_name(rule), params))
    for node in _nodes(graph):
        # A torch.jit.fork closure is a graph held in the node's attribute, not a function.
        if "Subgraph" in node.attributeNames():
            sub = rewrite_script_graph(node.g("Subgraph"), rules, f"{where} ({node.kind()} closure)")
            replaced += sub[0]
            left_alone += sub[1]
    torch._C._jit_pass_lint(graph)
    return replaced, left_alone


def _readable(qualified: str) -> str:
    return _MANGLE.sub("", qualified).replace("__torch__.", "", 1)


def _where(qualified_fn: str, paths_by_type: Dict[str, List[str]]) -> str:
    """``Softplus.forward in 1, 3, 5, 7``: the function and the module paths that run it."""
    owner = qualified_fn.rpartition(".")[0]
    paths = paths_by_type.get(owner)
    short = _readable(qualified_fn)
    if owner in paths_by_type:
        short = ".".join(short.split(".")[-2:])
    if not paths:
        return short
    listed = ", ".join(paths[:4]) + (f", ... ({len(paths)} modules)" if len(paths) > 4 else "")
    return f"{short} in {listed}"


# --------------------------------------------------------------------------- front end
def optimize_script(module: torch.jit.ScriptModule, rules: Sequence[Rule] = RULES) -> torch.jit.ScriptModule:
    """A rewritten copy of a ScriptModule (from ``torch.jit.script``, ``trace`` or ``load``).

    The copy shares the original's parameters and buffers and carries
    ``.rewrite_report`` (a Python attribute: ``torch.jit.save`` does not keep it).
    ``graph_rewrite.optimize`` calls this for ScriptModules.

    >>> lean = optimize_script(torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.Sigmoid())))  # doctest: +SKIP
    >>> print(lean.rewrite_report)                                                             # doctest: +SKIP

    Raises:
        ScriptRewriteError: the module cannot be copied or contains code the pass cannot rewrite.
    """
    if not isinstance(module, torch.jit.ScriptModule):
        raise TypeError(f"optimize_script() takes a torch.jit.ScriptModule, got {type(module).__name__}")
    lean, cu = fresh_copy(module)
    _check_types_not_shared(module, lean)
    functions = sorted(cu.get_functions(), key=lambda f: f.qualified_name)
    paths = _types(lean)
    report = RewriteReport(tracing=f"TorchScript, {len(functions)} methods and functions")
    for fn in functions:
        replaced, left = rewrite_script_graph(fn.graph, rules, _where(fn.qualified_name, paths))
        report.replaced += replaced
        report.left_alone += left
    _share_tensors(module, lean)
    lean.rewrite_report = report
    return lean
