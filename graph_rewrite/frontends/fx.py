"""The FX front end: trace with torch.fx, rewrite activations, keep the model's structure."""
from __future__ import annotations

import copy
import dataclasses
import inspect
import operator
import sys
import warnings
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch import fx

from ..report import Respelled, RewriteReport, Uncovered
from ..rules import Rule
from ..spellings import rewrite_spellings
from .fx_pass import _where, has_hooks, rewrite_graph
from .fx_recompute import rewrite_recompute
from .runtime import run_under_mode, saved_tensors_hooks_in_effect

__all__ = ["RewrittenModule"]

AUTOCAST_NOTE = (
    "recompute consumers stay off under autocast: there they run the native layer, in autocast's "
    "dtypes, and keep what it keeps (no saving from them)"
)

# Per-module containers that a shallow copy would otherwise share with the original.
_CONTAINERS = (
    "_parameters", "_buffers", "_non_persistent_buffers_set", "_forward_hooks",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


class RewrittenModule(fx.GraphModule):
    """What :func:`optimize` returns: a GraphModule with the original's module tree.

    Submodule names, parameters and buffers are the original's (shared, not
    copied), so ``state_dict()`` keys are identical. Where the model's own code
    reads ``self.training`` (stochastic depth, ``F.dropout(training=...)``), FX
    bakes the flag into the graph, so one graph per mode is kept and
    ``train()``/``eval()`` switch between them.
    """

    def train(self, mode: bool = True) -> "RewrittenModule":
        graphs = self.__dict__.get("_mode_graphs")
        if graphs is not None and self.graph is not graphs[mode]:
            self.graph = graphs[mode]  # the setter recompiles forward
        return super().train(mode)

    # GraphModule's own copy and pickle rebuild from the graph, keeping only the
    # submodules it uses; these keep the whole tree, the mode graphs and the report.
    def __deepcopy__(self, memo):
        res = RewrittenModule.__new__(RewrittenModule)  # a fresh per-instance class for forward
        memo[id(self)] = res
        state = {k: v for k, v in self.__dict__.items() if k != "_graph"}
        res.__dict__.update(copy.deepcopy(state, memo))
        res.__class__.__name__ = type(self).__name__
        res.graph = copy.deepcopy(self.graph, memo)
        return res

    def __reduce__(self):
        body = {k: v for k, v in self.__dict__.items() if k not in ("_graph", "_mode_graphs")}
        graphs = self.__dict__.get("_mode_graphs")
        codes = {m: g.python_code("self").src for m, g in graphs.items()} if graphs else None
        return (_unpickle, (body, self.code, codes, type(self).__name__))


def _graph_from_code(body: dict, code: str) -> fx.Graph:
    # What GraphModule's own unpickling does: run the saved code once and trace it.
    from torch.fx.graph_module import _deserialize_graph_module, _forward_from_src

    return _deserialize_graph_module(_forward_from_src("import torch\n" + code, {}), body).graph


def _unpickle(body: dict, code: str, mode_codes: Optional[dict], class_name: str) -> "RewrittenModule":
    # Lives in this module, so unpickling imports graph_rewrite and registers the ops.
    res = RewrittenModule.__new__(RewrittenModule)
    res.__dict__.update(body)
    res.__class__.__name__ = class_name
    res.graph = _graph_from_code(body, code)
    if mode_codes is not None:
        res._mode_graphs = {
            m: res.graph if c == code else _graph_from_code(body, c) for m, c in mode_codes.items()
        }
    return res


class _GuardedForward:
    """``forward`` of a submodule traced on its own: the rewritten graph for calls with
    exactly its tensors, the class's own forward for anything else. A class, not a
    closure, so the model still pickles and deep-copies."""

    def __init__(self, module: nn.Module, gm: "RewrittenModule", arity: int) -> None:
        self.module, self.gm, self.arity = module, gm, arity

    def __call__(self, *args, **kwargs):
        if kwargs or len(args) != self.arity or not all(isinstance(a, torch.Tensor) for a in args):
            return type(self.module).forward(self.module, *args, **kwargs)
        if self.gm.training != self.module.training:
            self.gm.train(self.module.training)  # picks the graph for the mode
        return self.gm(*args)


class _InPlaceProxy(fx.Proxy):
    """A Proxy on which ``a += b`` records ``operator.iadd``, as eager runs it: in place.

    ``fx.Proxy`` has no ``__iadd__``, so Python falls back to ``a = a + b``: a new tensor
    of the promoted dtype. Under autocast that differs from eager (a float16 ``out +=
    float32_identity`` stays float16 in eager, becomes float32 traced), and so does
    anything else that reads ``a`` afterwards. FX prints the node back as ``a += b``.
    """

    def _inplace(self, op, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    def __iadd__(self, other):
        return self._inplace(operator.iadd, other)

    def __isub__(self, other):
        return self._inplace(operator.isub, other)

    def __imul__(self, other):
        return self._inplace(operator.imul, other)

    def __itruediv__(self, other):
        return self._inplace(operator.itruediv, other)


class ContextNotRecorded(RuntimeError):
    """Forward changed grad mode, autocast or saved-tensor hooks while tracing: FX records calls, not context managers."""


def _context() -> Tuple[object, ...]:
    # What a `with torch.no_grad()` or `with torch.autocast(...)` in forward changes, and
    # the saved-tensor hooks that torch.utils.checkpoint (or save_on_cpu) pushes.
    return (torch.is_grad_enabled(),
            *((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")),
            saved_tensors_hooks_in_effect())


_CHECKPOINT_FILE = torch.utils.checkpoint.__file__

# Under 160 characters with the exception's name: the report keeps the first 160.
CHECKPOINT_KEPT = "torch.utils.checkpoint in forward: kept checkpointed under the runtime front end (FX would inline it)"


def _in_checkpoint() -> bool:
    """Whether a frame of ``torch.utils.checkpoint`` is on the Python stack (read only when tracing fails)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == _CHECKPOINT_FILE:
            return True
        frame = frame.f_back
    return False


def _context_changed(before: Tuple[object, ...], now: Tuple[object, ...]) -> ContextNotRecorded:
    """The error for a call recorded under another context than the trace began with, saying which."""
    if _in_checkpoint():  # reentrant checkpoint runs its region under no_grad, the other one under hooks
        return ContextNotRecorded(CHECKPOINT_KEPT)
    if before[:-1] == now[:-1]:  # only the hooks (the last entry) differ: save_on_cpu, hooks of one's own
        return ContextNotRecorded("saved-tensor hooks pushed inside forward (FX records no hooks)")
    return ContextNotRecorded("grad mode or autocast changed inside forward (FX records no context managers)")


class _LeafTracer(fx.Tracer):
    """``symbolic_trace``'s tracer that also keeps hooked modules and ``leaves`` as calls.

    Hooked modules stay ``call_module`` so their hooks keep running. When tracing
    fails, ``failed_in`` names the innermost module whose code raised. Augmented
    assignment is recorded in place (:class:`_InPlaceProxy`). A call recorded under
    another grad mode, autocast state or saved-tensor hooks than the trace began with
    raises :class:`ContextNotRecorded`: the graph would run it without that context (a
    ``torch.utils.checkpoint`` region would be inlined, every activation in it kept).
    The module whose code entered the context is the one named in ``failed_in``.
    """

    # Buffers as graph values: an in-place update (self.count.add_(1)) is then recorded
    # in the graph instead of running on the user's shared tensor while tracing.
    proxy_buffer_attributes = True

    def __init__(self, leaves: Optional[Set[str]] = None) -> None:  # FX's unpickling calls it bare
        super().__init__()
        self.leaves = set() if leaves is None else leaves
        self.failed_in: Optional[str] = None

    def trace(self, root, concrete_args=None):
        self._context = _context()
        return super().trace(root, concrete_args)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InPlaceProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, *rest, **kw):
        now = _context()
        if now != self._context:
            raise _context_changed(self._context, now)
        return super().create_proxy(kind, target, args, kwargs, *rest, **kw)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or has_hooks(m) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        called_in_context = _context() == self._context
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            path = self.path_of_module(m)
            # A leaf's own call failing, or any call made inside its caller's autocast region
            # or checkpoint, is its caller's failure: the caller's code entered that context.
            if self.failed_in is None and called_in_context and not self.is_leaf_module(m, path):
                self.failed_in = path
            raise


def _clone_tree(module: nn.Module, memo: Optional[Dict[int, nn.Module]] = None) -> nn.Module:
    """New module objects with the same classes and attributes, sharing every tensor.

    Train/eval flags, attributes set during tracing and swapped submodules then
    stay with the copy; parameters and buffers are the same tensor objects.
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    new = object.__new__(type(module))
    new.__dict__.update(module.__dict__)
    memo[id(module)] = new
    for name in _CONTAINERS:
        if name in module.__dict__:
            new.__dict__[name] = copy.copy(module.__dict__[name])
    new.__dict__["_modules"] = {
        k: None if v is None else _clone_tree(v, memo) for k, v in module._modules.items()
    }
    return new


def _snapshot(root: nn.Module):
    # Containers are copied too: forward code may register a buffer or module in place.
    return [
        (m, {k: copy.copy(v) if k in _CONTAINERS or k == "_modules" else v for k, v in m.__dict__.items()})
        for m in root.modules()
    ]


def _restore(snapshot) -> None:
    # Tracing runs the model's Python, which may cache values (even Proxies) on
    # modules; put every module's attributes back as they were.
    for m, saved in snapshot:
        m.__dict__.clear()
        m.__dict__.update(saved)


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _RootUntraceable(Exception):
    pass


def _trace(root: nn.Module, leaves: Set[str], reasons: Dict[str, str], constants: Dict[str, object]) -> fx.Graph:
    """Trace ``root``; each module whose code cannot be traced becomes a leaf, and tracing restarts.

    Tensor constants the tracer stores on ``root`` move to ``constants``, renamed
    so that the graphs of several traces never share a name for different values.
    """
    while True:
        tracer = _LeafTracer(leaves)
        snapshot = _snapshot(root)
        try:
            graph = tracer.trace(root)
            for node in graph.nodes:
                # The tracer adds its constants to the root's own __dict__ only.
                if node.op == "get_attr" and node.target in root.__dict__ and node.target not in snapshot[0][1]:
                    value = root.__dict__[node.target]
                    node.target = f"_tensor_constant{len(constants)}"
                    constants[node.target] = value
            return graph
        except Exception as e:
            if not tracer.failed_in:
                raise _RootUntraceable(_explain(_first_line(e))) from e
            leaves.add(tracer.failed_in)
            reasons[tracer.failed_in] = _explain(_first_line(e))
        finally:
            _restore(snapshot)


# Attributes by which libraries switch a module's forward to activation checkpointing.
_CHECKPOINT_FLAGS = ("grad_checkpointing", "gradient_checkpointing")  # timm, Hugging Face


def _checkpointing_modules(root: nn.Module) -> Dict[str, str]:
    """{path: reason} of the outermost modules of ``root`` with a checkpointing flag on.

    Tracing meets a checkpoint call only on the branch FX takes, and FX may take
    another than eager does: timm's ViT tests ``attn_mask is not None``, which a
    Proxy for the omitted mask passes, and runs its blocks without checkpoint.
    A module that says it checkpoints runs its own code instead.

    >>> vit.set_grad_checkpointing(True)                  # doctest: +SKIP
    >>> _checkpointing_modules(vit)                       # doctest: +SKIP
    {'': 'grad_checkpointing is on: ...'}
    """
    found: Dict[str, str] = {}
    for path, m in root.named_modules():  # parents before children: the outermost comes first
        flag = next((f for f in _CHECKPOINT_FLAGS if getattr(m, f, None) is True), None)
        if flag and not any(_within(path, outer) for outer in found):
            found[path] = f"{flag} is on: its forward runs under the runtime front end, kept checkpointed"
    return found


def _within(path: str, outer: str) -> bool:
    """Whether module ``path`` is ``outer`` or inside it ("" is the root)."""
    return not outer or path == outer or path.startswith(outer + ".")


def _trace_modes(root: nn.Module) -> Tuple[Dict[object, fx.Graph], Dict[str, str], Dict[str, object]]:
    """Graphs for the current train/eval flags, all-train and all-eval; the leaves' reasons; constants.

    Modules with a checkpointing flag on start as leaves (:func:`_checkpointing_modules`).
    """
    reasons: Dict[str, str] = _checkpointing_modules(root)
    if "" in reasons:
        raise _RootUntraceable(reasons[""])
    flags = [(m, m.training) for m in root.modules()]
    uniform = {f for _, f in flags}
    # With uniform flags "current" is one of the two modes: two traces, not three.
    modes: List[object] = [True, False] if len(uniform) == 1 else ["current", True, False]
    leaves: Set[str] = set(reasons)
    constants: Dict[str, object] = {}
    try:
        while True:
            graphs = {}
            n_leaves = len(leaves)
            for mode in modes:
                if mode == "current":
                    for m, f in flags:
                        m.training = f
                else:
                    root.train(mode)
                graphs[mode] = _trace(root, leaves, reasons, constants)
            if len(leaves) == n_leaves:  # every mode agreed on the same leaves
                current = graphs.pop("current") if "current" in graphs else graphs[next(iter(uniform))]
                return {"current": current, **graphs}, reasons, constants
    finally:
        for m, f in flags:
            m.training = f


def _build(root: nn.Module, graph: fx.Graph, graphs: Sequence[fx.Graph], constants: Dict[str, object]) -> RewrittenModule:
    for name, value in constants.items():
        root.__dict__[name] = value  # as the tracer left them: plain attributes, not buffers
    gm = RewrittenModule(root, graph, class_name=type(root).__name__)
    # GraphModule copies only what the graph uses, into fresh containers, and turns
    # every get_attr tensor into a persistent buffer. Take the original tree instead,
    # so names, unused submodules and persistence are exactly the original's.
    for name in _CONTAINERS:
        if name in root.__dict__:
            gm.__dict__[name] = copy.copy(root.__dict__[name])
    gm._modules.clear()
    gm._modules.update(root._modules)
    for g in graphs:
        for node in g.nodes:
            if node.op == "get_attr" and "." not in node.target and not hasattr(gm, node.target):
                setattr(gm, node.target, getattr(root, node.target))
    for key, value in root.__dict__.items():
        # Plain attributes (num_classes, ...) that user code may still read.
        if key not in gm.__dict__ and key != "forward":
            gm.__dict__[key] = value
    gm.training = root.training
    return gm


def _tensor_arity(module: nn.Module) -> Optional[int]:
    """How many arguments ``forward`` takes if each is a positional ``Tensor`` without default, else None.

    Only such modules are traced on their own: their code was written for tensors,
    so a Proxy stands in for every argument faithfully.
    """
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    tensor = (torch.Tensor, "Tensor", "torch.Tensor")
    ok = params and all(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty and p.annotation in tensor
        for p in params
    )
    return len(params) if ok else None


def _trace_on_its_own(child: nn.Module, path: str, rules: Sequence[Rule], report: RewriteReport) -> bool:
    """Trace a submodule of untraceable code by itself and, if that rewrites something, run it.

    The module keeps its class and methods (the untraceable caller may use them);
    only its ``forward`` is replaced by a guard that runs the rewritten graph for
    calls with exactly its tensors, and the class's own forward otherwise.
    """
    arity = _tensor_arity(child)
    if arity is None:
        return False
    try:
        graphs, reasons, constants = _trace_modes(child)
    except _RootUntraceable:
        return False
    sub = RewriteReport()
    gm = _rewrite_and_build(child, graphs, reasons, constants, rules, sub, runtime_report=report, prefix=path)
    if not sub.replaced and not sub.spellings:
        return True  # traced: nothing to rewrite in it, nothing left to search
    child.forward = _GuardedForward(child, gm, arity)
    for rec in sub.replaced:
        report.replaced.append(dataclasses.replace(rec, where=_join(path, rec.where)))
    report.left_alone += [dataclasses.replace(r, where=_join(path, r.where)) for r in sub.left_alone]
    report.spellings += [dataclasses.replace(r, where=_join(path, r.where)) for r in sub.spellings]
    report.uncovered += [Uncovered(_join(path, u.module), u.reason) for u in sub.uncovered]
    report.notes += [n for n in sub.notes if n not in report.notes]
    return True


def _join(prefix: str, path: str) -> str:
    return prefix if path in ("", "<root>") else f"{prefix}.{path}"


def _rewrite_and_build(root, graphs, reasons, constants, rules, report: RewriteReport,
                       runtime_report: Optional[RewriteReport] = None, prefix: str = "") -> RewrittenModule:
    """Rewrite every mode's graph, run the leaves FX could not enter under the runtime front end, build the result.

    The leaves record their call sites in ``runtime_report`` (default ``report``) with
    paths under ``prefix``: a submodule traced on its own reports into its root's record.
    """
    modules = dict(root.named_modules())
    seen = set()
    codes = {}
    code_of: Dict[int, str] = {}  # a graph may serve two modes: rewrite it once
    names = [r.name for r in rules]
    for mode, graph in graphs.items():
        if id(graph) not in code_of:
            # Spellings first: -F.softplus(-x) must be seen before F.softplus is rewritten alone.
            for node, where, spelling in rewrite_spellings(graph, names, _where):
                if (node, where, "spelling") not in seen:
                    seen.add((node, where, "spelling"))
                    report.spellings.append(Respelled(node, where, spelling.name, spelling.lean_op, spelling.changes))
            replaced, left = rewrite_graph(graph, modules, rules)
            more, more_left = rewrite_recompute(graph, modules, rules)
            replaced, left = replaced + more, left + more_left
            # The mode graphs mostly repeat each other: report each call site once.
            for rec in replaced:
                if (rec.node, rec.where) not in seen:
                    seen.add((rec.node, rec.where))
                    report.replaced.append(rec)
            for rec in left:
                if (rec.node, rec.where, rec.reason) not in seen:
                    seen.add((rec.node, rec.where, rec.reason))
                    report.left_alone.append(rec)
            code_of[id(graph)] = graph.python_code("self").src
        codes[mode] = code_of[id(graph)]
    for path in sorted(reasons):
        run_under_mode(modules[path], rules, runtime_report or report, _join(prefix, path) if prefix else path)
        report.uncovered.append(Uncovered(path, reasons[path]))
    if reasons:
        report.tracing = f"partial: {len(reasons)} module(s) run under the runtime front end"
    if any(r.kind == "recompute" for r in report.replaced) and AUTOCAST_NOTE not in report.notes:
        report.notes.append(AUTOCAST_NOTE)

    gm = _build(root, graphs["current"], list(graphs.values()), constants)
    if len(set(codes.values())) > 1:  # the code reads self.training somewhere
        gm._mode_graphs = {
            True: graphs["current"] if codes[True] == codes["current"] else graphs[True],
            False: graphs["current"] if codes[False] == codes["current"] else graphs[False],
        }
    gm.rewrite_report = report
    return gm


def _warn_uncovered(report: RewriteReport) -> None:
    if report.uncovered:
        why = "; ".join(f"{u.module or '<root>'}: {u.reason}" for u in report.uncovered[:3])
        more = f"; and {len(report.uncovered) - 3} more" if len(report.uncovered) > 3 else ""
        warnings.warn(
            f"graph_rewrite: FX could not trace {why}{more}. The calls there are rewritten by the runtime "
            "front end as they run (see .rewrite_report after the first forward)",
            stacklevel=3,
        )


# FX's own messages for code that uses sizes as Python numbers do not say so.
_HINTS = (
    ("object cannot be interpreted as an integer", "a tensor size is used as a Python int (range(x.size(1)), ...)"),
    ("takes 1 positional argument but", "a tensor size is passed where a Python int is needed (torch.zeros(x.shape[0], n), ...)"),
    ("co_varnames is too small", "forward is wrapped by a decorator taking *args/**kwargs"),
    ("symbolically traced variables cannot be used as inputs to control flow", "Python control flow depends on tensor values"),
)


def _explain(error: str) -> str:
    """FX's error, with what in the model's code causes it where FX does not say."""
    for needle, cause in _HINTS:
        if needle in error:
            return f"{error} [{cause}]"
    return error
