"""The FX front end: trace with torch.fx, rewrite activations, keep the model's structure."""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import inspect
import operator
import re
import sys
import types
import warnings
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch import fx

from ..ops.recompute import recompute_module, uses_of_input
from ..report import Replaced, Respelled, RewriteReport, Uncovered
from ..rules import CheapModule, Rule, pattern_name
from ..spellings import rewrite_spellings
from .fx_pass import _where, has_hooks, rewrite_graph
from .fx_recompute import rewrite_cheap_consumers, rewrite_recompute
from .fx_calls import _CHECKPOINT_FLAGS, MADE_ON_CALL, _at_defaults, _forward_by_call
from .runtime import in_checkpoint, run_under_mode, saved_tensors_hooks_in_effect

__all__ = ["RewrittenModule"]

AUTOCAST_NOTE = (
    "under autocast, recompute consumers run the native layer (autocast's casts and cached weights) keeping no "
    "copy of their input, which backward makes again with the forward's autocast state; norm_act keeps the "
    "input the norm's kernel got (autocast's cast of it, where autocast casts) and reruns that kernel"
)

# Per-module containers that a shallow copy would otherwise share with the original.
_CONTAINERS = (
    "_parameters", "_buffers", "_non_persistent_buffers_set", "_forward_hooks",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


class _InitAsModule(nn.Module):
    """Between GraphModule and a model's own class in the MRO of :func:`_rewritten_class`:
    GraphModule's ``super().__init__()`` then sets up a plain Module, instead of running the
    model's ``__init__`` (which needs its arguments and would build a second model)."""

    def __init__(self) -> None:
        nn.Module.__init__(self)


class RewrittenModule(fx.GraphModule, _InitAsModule):
    """What :func:`optimize` returns: a GraphModule with the original's module tree.

    Submodule names, parameters and buffers are the original's (shared, not
    copied), so ``state_dict()`` keys are identical. Where the model's own code
    reads ``self.training`` (stochastic depth, ``F.dropout(training=...)``), FX
    bakes the flag into the graph, so one graph per mode is kept and
    ``train()``/``eval()`` switch between them.

    The copy of a model is also an instance of the model's class (see
    :func:`_rewritten_class`): its other methods and attributes are there, and
    ``isinstance(copy, type(model))`` holds.
    """

    # The model's class, for the per-class subclasses of _rewritten_class.
    _original_class: Optional[type] = None

    def train(self, mode: bool = True) -> "RewrittenModule":
        graphs = self.__dict__.get("_mode_graphs")
        if graphs is not None and self.graph is not graphs[mode]:
            self.graph = graphs[mode]  # the setter recompiles forward
        self.__dict__["_graph_key"] = mode  # which of the graphs for calls at the defaults serves now
        return super().train(mode)

    def recompile(self) -> "fx.graph.PythonCode":
        with self.graph.on_generate_code(lambda earlier: _direct_lookups(self, self.graph, earlier)):
            code = super().recompile()
        if "_call_rules" in self.__dict__:  # set by serve_calls
            type(self).forward = _forward_by_call(type(self).forward, self._optional_arguments, self._checkpoint_flags)
        # Each recompile makes a new forward function: it gets the model's signature again.
        if self._original_class is not None:
            _sign_like(type(self).forward, self._original_class.forward)
        return code

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except KeyError as e:
            missing = _missing_submodule(self, e)
            if missing is None:
                raise
            raise RuntimeError(missing) from e

    def __prepare_scriptable__(self) -> "RewrittenModule":
        optional = self.__dict__.get("_optional_arguments", ())
        if self.__dict__.get("_graph_serves") or any(default is None for _, _, default in optional):
            # serve_calls: the graph that runs depends on the call's arguments, some calls the runtime front end
            raise TypeError(
                "graph_rewrite: this copy picks its graph by the arguments of each call (arguments that default "
                "to None, or a flag whose other values FX could not trace) and runs some calls under the runtime "
                "front end, which TorchScript cannot compile. Script the original model and pass the ScriptModule "
                "to graph_rewrite.optimize().")
        # TorchScript compiles forward's source and has no `_modules`: it gets a twin whose code
        # spells each path FX's way. Same submodules, parameters and buffers; this copy is unchanged.
        twin = RewrittenModule.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin.__dict__["_modules"] = dict(self._modules)  # TorchScript's preparation may write to it
        fx.GraphModule.recompile(twin)
        return twin

    # GraphModule's own copy and pickle rebuild from the graph, keeping only the
    # submodules it uses; these keep the whole tree, the mode graphs and the report.
    def __deepcopy__(self, memo):
        res = RewrittenModule.__new__(type(self))  # a fresh per-instance class for forward
        memo[id(self)] = res
        state = {k: v for k, v in self.__dict__.items() if k not in ("_graph",) + MADE_ON_CALL}
        res.__dict__.update(copy.deepcopy(state, memo))
        res.__class__.__name__ = type(self).__name__
        res.graph = copy.deepcopy(self.graph, memo)
        return res

    def __reduce__(self):
        body = {k: v for k, v in self.__dict__.items()
                if k not in ("_graph", "_mode_graphs", "_default_graphs") + MADE_ON_CALL}
        graphs = self.__dict__.get("_mode_graphs")
        codes = {m: _source(g) for m, g in graphs.items()} if graphs else None
        default_graphs = self.__dict__.get("_default_graphs")
        default_codes = {m: _source(g) for m, g in default_graphs.items()} if default_graphs else None
        # The per-class subclass is made at run time: it is rebuilt from the model's class,
        # named by module and qualified name (a copy still loads where that class cannot be imported).
        original = self._original_class
        where = None if original is None else (original.__module__, original.__qualname__)
        return (_unpickle, (body, _source(self.graph), codes, type(self).__name__, where, default_codes))


@functools.lru_cache(maxsize=None)
def _rewritten_class(original: type) -> type:
    """``RewrittenModule`` that is also an ``original``: a subclass of both, made once per class.

    GraphModule comes first in the MRO, so its ``forward``, ``graph``, ``code``, calling and
    copying win; ``original``'s other methods (``forward_features``, ``reset_classifier``,
    ...) run its eager code on the copy's submodules. ``original`` itself is not changed.

    >>> lean = optimize(torchvision.models.resnet18())          # doctest: +SKIP
    >>> isinstance(lean, torchvision.models.ResNet)             # doctest: +SKIP
    True
    """
    def body(ns: dict) -> None:
        ns.update(__module__=__name__, __qualname__=original.__qualname__, _original_class=original)

    return types.new_class(original.__name__, (RewrittenModule, original), exec_body=body)


def _class_for(original: type) -> type:
    """The class of the copy of a model of class ``original``.

    A GraphModule given to ``optimize`` has a per-instance class of FX's: that one is not kept.
    """
    if issubclass(original, fx.GraphModule) or original is nn.Module:
        return RewrittenModule
    return _rewritten_class(original)


def _source(graph: fx.Graph) -> str:
    """The graph's forward as a module's source: the imports of what it calls, then the code.

    The imports are those ``GraphModule.__reduce__`` writes: functions FX keeps as calls
    (``torch.fx.wrap``, e.g. torchvision's ``stochastic_depth``) are globals of the code.
    """
    from torch.fx.graph_module import _format_import_block
    from torch.package import sys_importer

    code = graph.python_code("self")
    return _format_import_block(code.globals, sys_importer) + "\n" + code.src


def _fx_spelling(base: str, name: str) -> str:
    """How FX's code reads attribute ``name`` of ``base``: ``base.name``, or ``getattr(base, "0")``."""
    return f"{base}.{name}" if name.isidentifier() else f'getattr({base}, "{name}")'


_MISSING = object()


def _plain_submodule(parent: nn.Module, name: str) -> bool:
    """Whether ``getattr(parent, name)`` is ``parent._modules[name]``: nothing that Python or
    ``Module.__getattr__`` looks at first (the instance's dict, the class, parameters, buffers)
    has that name, and the class keeps Module's own attribute lookup."""
    cls = type(parent)
    return (name in parent._modules and name not in parent.__dict__ and name not in parent._parameters
            and name not in parent._buffers and cls.__getattr__ is nn.Module.__getattr__
            and cls.__getattribute__ is object.__getattribute__
            and inspect.getattr_static(cls, name, _MISSING) is _MISSING)


def _spelling(root: nn.Module, target: str, calls_module: bool) -> Tuple[str, str]:
    """(FX's spelling of ``target`` in the code, ours): ours reads each submodule on the path
    from its parent's ``_modules``, where that is what ``getattr`` finds.

    FX's ``getattr(getattr(self.features, "1"), "0")`` runs ``Module.__getattr__``, a Python
    function, once per step of the path, on every call; ``self._modules['features']._modules['1']``
    is two dict reads per step. The last step of a ``get_attr`` (a parameter, a buffer, a
    pruned or parametrized weight) stays an attribute read, as do steps that fail the check.
    """
    names = target.split(".")
    fx_text = ours = "self"
    module: Optional[nn.Module] = root
    for i, name in enumerate(names):
        fx_text = _fx_spelling(fx_text, name)
        is_module_step = calls_module or i < len(names) - 1
        if is_module_step and module is not None and _plain_submodule(module, name):
            ours, module = f"{ours}._modules[{name!r}]", module._modules[name]
        else:
            ours, module = _fx_spelling(ours, name), None
    return fx_text, ours


def _missing_submodule(root: nn.Module, error: KeyError) -> Optional[str]:
    """What to say when the code's ``_modules[name]`` raised ``error`` because a submodule on a
    graph path now lacks ``name``: a wrapper put in after ``optimize()`` (checkpoint_wrapper,
    FSDP's auto-wrap), which the graph would skip, as FX's spelling does silently. None if the
    error is not that (a KeyError of the model's own code)."""
    for node in root.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        names = node.target.split(".")
        module, path = root, []
        for name in names if node.op == "call_module" else names[:-1]:
            if name not in module._modules:
                if error.args != (name,):
                    return None
                where = f"submodule '{'.'.join(path)}'" if path else "the model"
                return (f"the optimized model's graph calls '{node.target}', but {where} is now a "
                        f"{type(module).__name__} without a submodule '{name}': a wrapper put in after "
                        f"optimize() (checkpoint_wrapper, FSDP's auto-wrap) would not run, as the graph "
                        f"calls the modules inside it. Apply it to the model before optimize().")
            module = module._modules[name]
            path.append(name)
            if module is None:
                break
    return None


_COUNTER = re.compile(r"# COUNTER: (\d+)\n?$")


def _direct_lookups(root: nn.Module, graph: fx.Graph, earlier=None):
    """A body transformer for ``graph.on_generate_code``: in the line each ``call_module`` and
    ``get_attr`` node emits, FX's spelling of the target becomes :func:`_spelling`'s. FX marks
    each node's lines with ``# COUNTER: <index>``; a line not as expected is left as it is."""
    nodes = list(graph.nodes)

    def transform(body: List[str]) -> List[str]:
        body = earlier(body) if earlier is not None else body
        out, node = [], None
        for line in body:
            counter = _COUNTER.match(line)
            if counter is not None:
                node = nodes[int(counter.group(1))]
            elif node is not None and node.op in ("call_module", "get_attr") and line.startswith(node.name):
                fx_text, ours = _spelling(root, node.target, node.op == "call_module")
                head, sep, rest = line.partition(" = ")
                if sep and rest.startswith(fx_text) and rest[len(fx_text):len(fx_text) + 1] in ("(", ""):
                    line = head + sep + ours + rest[len(fx_text):]
                node = None
            out.append(line)
        return out

    return transform


class _OriginalOrder(fx.graph.CodeGen):
    """FX's code generator, with the parameters of ``def forward`` in the order and kinds of the model's own.

    FX writes its placeholders in the order of the code's variables: keyword-only
    parameters before ``*args``, and no ``/`` or ``*``. For ``forward(self, *xs,
    scale=1.0)`` that is ``forward(self, scale=1.0, *xs)``, where ``lean(a, b)`` would
    bind ``a`` to ``scale``.
    """

    def __init__(self, params: Tuple[Tuple[str, "inspect._ParameterKind"], ...]) -> None:
        super().__init__()
        self.params = params  # (name, kind), in the model's order

    def gen_fn_def(self, free_vars: List[str], maybe_return_annotation: str, **kwargs) -> str:
        # Each entry is "<target>[ : annotation][ = default]", the target "*xs" for *args.
        written = {re.match(r"\**(\w+)", v).group(1): v for v in free_vars if v != "self"}
        if sorted(written) != sorted(name for name, _ in self.params):
            return super().gen_fn_def(free_vars, maybe_return_annotation, **kwargs)
        P = inspect.Parameter
        ordered = ["self"]
        for i, (name, kind) in enumerate(self.params):
            if kind is P.KEYWORD_ONLY and not any(k in (P.KEYWORD_ONLY, P.VAR_POSITIONAL) for _, k in self.params[:i]):
                ordered.append("*")
            ordered.append(written[name])
            if kind is P.POSITIONAL_ONLY and (i + 1 == len(self.params) or self.params[i + 1][1] is not P.POSITIONAL_ONLY):
                ordered.append("/")
        return super().gen_fn_def(ordered, maybe_return_annotation, **kwargs)


def _keep_order(graph: fx.Graph, forward) -> None:
    """Make ``graph``'s code take its arguments as ``forward`` (a function with ``self``) does,
    where FX would write them otherwise: positional-only or keyword-only parameters."""
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return
    P = inspect.Parameter
    if any(p.kind in (P.POSITIONAL_ONLY, P.KEYWORD_ONLY) for p in params):
        graph.set_codegen(_OriginalOrder(tuple((p.name, p.kind) for p in params)))


def _check_parameters(graph: fx.Graph, forward) -> None:
    """Raise :class:`_RootUntraceable` unless the graph's placeholders are ``forward``'s parameters
    (what :class:`_OriginalOrder` needs to write them back as ``forward`` takes them) and the
    graph leaves ``**kwargs`` unread."""
    try:
        names = list(inspect.signature(forward).parameters)[1:]
    except (TypeError, ValueError):
        return  # nothing to compare with: FX's own order
    placeholders = [str(n.target).lstrip("*") for n in graph.nodes if n.op == "placeholder"]
    if sorted(placeholders) != sorted(names):
        raise _RootUntraceable(f"FX's inputs {placeholders} are not forward's parameters {names}: "
                               "the graph would bind arguments otherwise")
    read = [str(n.target) for n in graph.nodes if n.op == "placeholder" and str(n.target).startswith("**") and n.users]
    if read:
        raise _RootUntraceable(f"forward reads {read[0]}: FX stands one Proxy for the whole dict, whose .get(name) "
                               "is never None, so the graph would take the path of an argument given")


def _same_default(a: object, b: object) -> bool:
    try:
        return a is b or (type(a) is type(b) and bool(a == b))
    except Exception:  # a tensor default, ...: not comparable here
        return False


def _sign_like(generated, original) -> None:
    """Give the generated ``forward`` the signature of the model's own, annotations included,
    where both take the same arguments (names, kinds, defaults): FX drops some annotations
    (``*xs: Tensor``). Where they differ, the generated signature stays, as it is the truth."""
    try:
        ours, theirs = inspect.signature(generated), inspect.signature(original)
    except (TypeError, ValueError):
        return
    if len(ours.parameters) == len(theirs.parameters) and all(
            a.name == b.name and a.kind is b.kind and _same_default(a.default, b.default)
            for a, b in zip(ours.parameters.values(), theirs.parameters.values())):
        generated.__signature__ = theirs


def _graph_from_code(body: dict, code: str) -> fx.Graph:
    """What GraphModule's own unpickling does: run the saved code once and trace it.

    The code registers its wrapped functions in FX's global table (``torch.fx.wrap``
    keeps the namespace that calls it); those entries are removed again, whether or
    not the code ran, as one whose name is missing breaks every later trace.
    """
    from torch.fx.graph_module import _deserialize_graph_module, _exec_with_source

    namespace: dict = {}
    try:
        # "import torch" first: code saved before the imports were written relies on it.
        _exec_with_source("import torch\n" + code, namespace)
        graph = _deserialize_graph_module(namespace["forward"], body).graph
        _keep_order(graph, namespace["forward"])  # retracing the code reorders as the first trace did
        return graph
    finally:
        _forget_wrapped(namespace)


def _forget_wrapped(namespace: dict) -> None:
    """Remove the entries of FX's wrapped-function table that point at ``namespace``."""
    from torch.fx import _symbolic_trace

    table = _symbolic_trace._wrapped_fns_to_patch
    for key in [k for k, v in table.items() if v is namespace]:
        del table[key]


def _import_class(where: Tuple[str, str]) -> Optional[type]:
    """The class named ``(module, qualified name)``; None, with a warning, where it cannot be imported."""
    module, qualname = where
    try:
        found = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
        if not (isinstance(found, type) and issubclass(found, nn.Module)):
            raise TypeError(f"{module}.{qualname} is not an nn.Module class")
        return found
    except Exception as e:
        warnings.warn(f"graph_rewrite: the model's class {module}.{qualname} cannot be imported here ({_first_line(e)}); "
                      "the loaded copy runs its graph but lacks the class's other methods", stacklevel=3)
        return None


def _unpickle(body: dict, code: str, mode_codes: Optional[dict], class_name: str,
              original: Optional[Tuple[str, str]] = None, default_codes: Optional[dict] = None) -> "RewrittenModule":
    # Lives in this module, so unpickling imports graph_rewrite and registers the ops.
    cls = _import_class(original) if original is not None else None
    res = RewrittenModule.__new__(RewrittenModule if cls is None else _class_for(cls))
    res.__dict__.update(body)
    res.__class__.__name__ = class_name
    res.graph = _graph_from_code(body, code)
    if mode_codes is not None:
        res._mode_graphs = {
            m: res.graph if c == code else _graph_from_code(body, c) for m, c in mode_codes.items()
        }
    if default_codes is not None:
        res.__dict__["_default_graphs"] = {m: _graph_from_code(body, c) for m, c in default_codes.items()}
    return res


class _ModuleForward:
    """A ``forward`` set on the copy's instance of a module, with that module's own signature.
    A class, not a closure, so the model still pickles and deep-copies."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.own_forward())

    def own_forward(self):
        return type(self.module).forward.__get__(self.module)


class _GuardedForward(_ModuleForward):
    """``forward`` of a submodule traced on its own: the rewritten graph for calls with
    exactly its tensors, the class's own forward for anything else."""

    def __init__(self, module: nn.Module, gm: "RewrittenModule", arity: int) -> None:
        super().__init__(module)
        self.gm, self.arity = gm, arity

    def __call__(self, *args, **kwargs):
        if kwargs or len(args) != self.arity or not all(isinstance(a, torch.Tensor) for a in args) \
                or in_checkpoint():  # calls in a checkpointed region stay native, as under the runtime mode
            return self.own_forward()(*args, **kwargs)
        if self.gm.training != self.module.training:
            self.gm.train(self.module.training)  # picks the graph for the mode
        return self.gm(*args)


# The Module methods that register a hook run by calling the module.
_HOOK_REGISTRARS = ("register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
                    "register_full_backward_pre_hook", "register_backward_hook")


class _RefuseHook:
    """Stands for a hook registrar (``register_forward_hook``, ...) on the copy's instance of a
    module that the rewritten graph no longer calls, or never called (a container traced
    through): such a hook would never run in forward. An object of a module-level class, not a
    closure, so the model still pickles and deep-copies."""

    traced_through = False  # the class default: copies pickled before the attribute existed

    def __init__(self, path: str, op: str, method: str, traced_through: bool = False) -> None:
        self.path, self.op, self.method, self.traced_through = path, op, method, traced_through

    def __call__(self, *args, **kwargs):
        why = ("is traced through: the optimized model's graph calls the modules inside it, not it, so"
               if self.traced_through else f"was rewritten into {self.op}, so the optimized model no longer calls it:")
        raise RuntimeError(
            f"graph_rewrite: module '{self.path}' {why} a hook registered with {self.method}() would never run "
            "in forward. Hooks registered on the model before graph_rewrite.optimize() are kept (a module with hooks "
            "is left as a call): register the hook on the original model, then optimize it."
        )


def _calls(graph: fx.Graph) -> Dict[str, str]:
    """{node name: module path} of the graph's module calls."""
    return {n.name: n.target for n in graph.nodes if n.op == "call_module"}


def _refuse_hooks_on_dropped(graphs: Sequence[fx.Graph], before: Sequence[Dict[str, str]],
                             modules: Dict[str, nn.Module], prefix: str = "") -> None:
    """Refuse hooks on the modules that some graph called before rewriting and none calls after.

    The rewrite keeps a node's name when it turns a module call into an op, so the
    node of that name tells which op took the module's place.
    """
    still_called = {t for g in graphs for t in _calls(g).values()}
    for graph, calls in zip(graphs, before):
        nodes = {n.name: n for n in graph.nodes}
        for name, path in calls.items():
            if path in still_called:
                continue
            node = nodes.get(name)
            op = _op_name(node.target) if node is not None and node.op == "call_function" else "other calls"
            for method in _HOOK_REGISTRARS:
                # On the instance, which is the copy's: the class, shared with the user's model, is left alone.
                setattr(modules[path], method, _RefuseHook(_join(prefix, path) if prefix else path, op, method))


def _refuse_hooks_on_traced_through(graphs: Sequence[fx.Graph], modules: Dict[str, nn.Module],
                                    prefix: str = "") -> None:
    """Refuse hooks on the modules whose insides some graph calls or reads, and that no graph
    calls: containers FX traced through (``model.layer3``, a transformer block). A module run by
    its own code (a call in the graph) calls its submodules itself: those take hooks."""
    called = {t for g in graphs for t in _calls(g).values()}
    targets = {n.target for g in graphs for n in g.nodes if n.op in ("call_module", "get_attr")}
    inside = {t.rsplit(".", k)[0] for t in targets for k in range(1, t.count(".") + 1)}
    for path in sorted(inside - called):
        module = modules.get(path)
        if module is None or isinstance(module.__dict__.get(_HOOK_REGISTRARS[0]), _RefuseHook) \
                or any(_within(path, c) for c in called):
            continue
        for method in _HOOK_REGISTRARS:
            setattr(module, method, _RefuseHook(_join(prefix, path) if prefix else path, "", method, True))


def _op_name(target) -> str:
    """``graph_rewrite.softplus`` for a torch op, ``F.silu`` for a Python function."""
    if isinstance(target, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        return str(target)
    return pattern_name(target)


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


def _checkpoint_on_stack() -> bool:
    """Whether a frame of ``torch.utils.checkpoint`` is on the Python stack (read only when tracing fails)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == _CHECKPOINT_FILE:
            return True
        frame = frame.f_back
    return False


def _context_changed(before: Tuple[object, ...], now: Tuple[object, ...]) -> ContextNotRecorded:
    """The error for a call recorded under another context than the trace began with, saying which."""
    if _checkpoint_on_stack():  # reentrant checkpoint runs its region under no_grad, the other one under hooks
        return ContextNotRecorded(CHECKPOINT_KEPT)
    if before[:-1] == now[:-1]:  # only the hooks (the last entry) differ: save_on_cpu, hooks of one's own
        return ContextNotRecorded("saved-tensor hooks pushed inside forward (FX records no hooks)")
    return ContextNotRecorded("grad mode or autocast changed inside forward (FX records no context managers)")


_IS_TENSOR = torch.is_tensor


def _is_tensor_recorded(obj) -> object:
    """``torch.is_tensor`` while :class:`_LeafTracer` traces: on a traced value, a recorded call.

    ``torch.is_tensor`` is ``isinstance(obj, Tensor)``, False for FX's stand-in: a trace would
    silently take the code's branch for non-tensors (diffusers' UNet2DModel then made
    ``torch.tensor([timestep])`` of a tensor). Recorded, the call runs on the real value, and a
    branch on its answer stops the trace like any branch on a traced value.
    """
    if isinstance(obj, fx.Proxy):
        return obj.tracer.create_proxy("call_function", _IS_TENSOR, (obj,), {})
    return _IS_TENSOR(obj)


class _LeafTracer(fx.Tracer):
    """``symbolic_trace``'s tracer that also keeps hooked modules and ``leaves`` as calls.

    Hooked modules stay ``call_module`` so their hooks keep running. When tracing
    fails, ``failed_in`` names the innermost module whose code raised. Augmented
    assignment is recorded in place (:class:`_InPlaceProxy`). A call recorded under
    another grad mode, autocast state or saved-tensor hooks than the trace began with
    raises :class:`ContextNotRecorded`: the graph would run it without that context (a
    ``torch.utils.checkpoint`` region would be inlined, every activation in it kept).
    The module whose code entered the context is the one named in ``failed_in``.
    ``torch.is_tensor`` of a traced value is recorded (:func:`_is_tensor_recorded`).
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
        # For this trace only, as FX patches Module.__call__: the name the model's code reads.
        previous, torch.is_tensor = torch.is_tensor, _is_tensor_recorded
        try:
            return super().trace(root, concrete_args)
        finally:
            torch.is_tensor = previous  # a trace started inside another leaves the outer one's

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


def _trace(root: nn.Module, leaves: Set[str], reasons: Dict[str, str], constants: Dict[str, object],
           defaults: Optional[Dict[str, object]] = None) -> fx.Graph:
    """Trace ``root``; each module whose code cannot be traced becomes a leaf, and tracing restarts.

    Tensor constants the tracer stores on ``root`` move to ``constants``, renamed
    so that the graphs of several traces never share a name for different values.
    The arguments in ``defaults`` are traced as those values (:func:`_at_defaults`).
    """
    while True:
        tracer = _LeafTracer(leaves)
        snapshot = _snapshot(root)
        try:
            graph = tracer.trace(root, defaults)
            if defaults:
                _at_defaults(graph, defaults)
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


def _trace_modes(root: nn.Module, cheap: Sequence[str] = (), defaults: Optional[Dict[str, object]] = None,
                 defaults_only: bool = False) -> Tuple[Dict[object, fx.Graph], Dict[str, str], Dict[str, object]]:
    """Graphs for the current train/eval flags, all-train and all-eval; the leaves' reasons; constants.

    Modules with a checkpointing flag on start as leaves (:func:`_checkpointing_modules`),
    and so do the ``cheap`` modules (:func:`cheap_modules`), which run whole again in backward.
    With ``defaults``, the optional arguments at their defaults (:func:`optional_arguments`), each
    mode also gets a graph traced with those values, under the key ``("default", mode)``, where FX
    can trace that; with ``defaults_only`` that is each mode's only graph.
    """
    reasons: Dict[str, str] = _checkpointing_modules(root)
    if "" in reasons:
        raise _RootUntraceable(reasons[""])
    flags = [(m, m.training) for m in root.modules()]
    uniform = {f for _, f in flags}
    # With uniform flags "current" is one of the two modes: two traces, not three.
    modes: List[object] = [True, False] if len(uniform) == 1 else ["current", True, False]
    leaves: Set[str] = set(reasons) | set(cheap)
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
                graphs[mode] = _trace(root, leaves, reasons, constants, defaults if defaults_only else None)
                if defaults and not defaults_only:
                    try:
                        graphs[("default", mode)] = _trace(root, leaves, reasons, constants, defaults)
                    except _RootUntraceable:  # such calls run the model's own forward instead
                        defaults = None
                        graphs = {k: g for k, g in graphs.items() if not isinstance(k, tuple)}
            if len(leaves) == n_leaves:  # every mode agreed on the same leaves
                current = graphs.pop("current") if "current" in graphs else graphs[next(iter(uniform))]
                _check_parameters(current, type(root).forward)
                if defaults and not defaults_only and ("default", "current") not in graphs:
                    graphs[("default", "current")] = graphs[("default", next(iter(uniform)))]
                return {"current": current, **graphs}, reasons, constants
    finally:
        for m, f in flags:
            m.training = f


def _build(root: nn.Module, graph: fx.Graph, graphs: Sequence[fx.Graph], constants: Dict[str, object],
           cls: type = RewrittenModule) -> RewrittenModule:
    for name, value in constants.items():
        root.__dict__[name] = value  # as the tracer left them: plain attributes, not buffers
    for g in graphs:
        _keep_order(g, type(root).forward)
    gm = cls(root, graph, class_name=type(root).__name__)
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
    """How many arguments ``forward`` takes if each is positional, without default, and
    annotated ``Tensor`` or not at all; else None.

    Only such modules are traced on their own. The guard (:class:`_GuardedForward`) runs
    the graph only for calls whose arguments are all tensors, so there a Proxy stood in for
    each faithfully; an argument annotated otherwise (``int``, ``Optional``) says it may not be.
    """
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    tensor = (torch.Tensor, "Tensor", "torch.Tensor")
    ok = params and all(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        and (p.annotation in tensor or p.annotation is p.empty)
        for p in params
    )
    return len(params) if ok else None


def _cheap(graph: fx.Graph, rule: CheapModule) -> bool:
    """Whether ``graph`` is what ``rule`` describes: one input, cheap ops on it and the module's
    parameters, a reduction among them if the rule asks for one, and its input passed straight
    to an op that saves it if the rule asks for that. Running it again in backward costs little
    and keeps its intermediates (and casts) out of memory."""
    ops = [n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    return len(inputs) == 1 and cheap_ops(ops, inputs[0], rule)


def cheap_ops(ops: Sequence[fx.Node], x: fx.Node, rule: CheapModule) -> bool:
    """Whether ``ops``, a module's calls on its one input ``x``, are what ``rule`` describes
    (see :func:`_cheap`); the Dynamo backend asks it of the nodes one module made."""
    if not ops:
        return False
    if rule.reductions and not any(n.target in rule.reductions for n in ops):
        return False
    if rule.saves_input and not any(_saves_its_input(n, x) for n in x.users if n in ops):
        return False
    return all((n.op == "call_method" and n.target in rule.methods)
               or (n.op == "call_function" and n.target in rule.functions) for n in ops)


_PRODUCTS = ("mul", operator.mul, torch.mul)
_POWERS = ("pow", operator.pow, torch.pow)


def _saves_its_input(node: fx.Node, x: fx.Node) -> bool:
    """Whether ``node`` saves ``x`` for backward natively: ``x * t`` with ``t`` a tensor, ``x ** p``."""
    if node.target in _PRODUCTS and len(node.args) == 2:
        other = node.args[1] if node.args[0] is x else node.args[0]
        return isinstance(other, fx.Node)
    return node.target in _POWERS and bool(node.args) and node.args[0] is x


class _RecomputedForward(_ModuleForward):
    """``forward`` of a cheap module: :func:`~graph_rewrite.ops.recompute.recompute_module` keeps its input only and runs the
    same ops again in backward, so gradients are native's bit for bit."""

    def __call__(self, *args, **kwargs):
        forward = self.own_forward()
        x = args[0] if len(args) == 1 and not kwargs else None
        if torch.compiler.is_compiling():
            # Dynamo cannot trace _Recompute (a callable argument, hooks in backward). A non-reentrant
            # checkpoint it can: inductor's partitioner then recomputes the module alike, from x.
            if torch.is_grad_enabled() and isinstance(x, torch.Tensor):
                return torch.utils.checkpoint.checkpoint(forward, x, use_reentrant=False)
            return forward(*args, **kwargs)
        if not (torch.is_grad_enabled() and isinstance(x, torch.Tensor)) or in_checkpoint() \
                or torch._C._are_functorch_transforms_active():
            return forward(*args, **kwargs)
        params = tuple(p for p in self.module.parameters() if p.requires_grad)
        if not (x.requires_grad or params):
            return forward(x)
        key = (x.dtype, x.device.type, x.requires_grad, torch.is_autocast_enabled(x.device.type),
               torch.get_autocast_dtype(x.device.type) if x.device.type in ("cpu", "cuda") else None)
        uses = self.__dict__.setdefault("uses", {})
        if key not in uses:  # the module's ops are fixed: how many times they read x depends on these only
            uses[key] = uses_of_input(forward, x)
        return recompute_module(forward, x, *params, uses=uses[key])


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
        graph = _typed_trace(child)  # T5's norm reads self.weight.dtype
        return graph is not None and _recompute_if_cheap(child, path, rules, report, [graph])
    if not reasons and _recompute_if_cheap(child, path, rules, report, graphs.values()):
        return True
    sub = RewriteReport()
    gm = _rewrite_and_build(child, graphs, reasons, constants, rules, sub, runtime_report=report, prefix=path)
    if not sub.replaced and not sub.spellings:
        # Nothing here; its submodules may still be cheap modules (T5's MLP calls gelu_new).
        return False
    child.forward = _GuardedForward(child, gm, arity)
    for rec in sub.replaced:
        report.replaced.append(dataclasses.replace(rec, where=_join(path, rec.where)))
    report.left_alone += [dataclasses.replace(r, where=_join(path, r.where)) for r in sub.left_alone]
    report.spellings += [dataclasses.replace(r, where=_join(path, r.where)) for r in sub.spellings]
    report.uncovered += [Uncovered(_join(path, u.module), u.reason) for u in sub.uncovered]
    report.notes += [n for n in sub.notes if n not in report.notes]
    return True


def cheap_modules(root: nn.Module, rules: Sequence[Rule]) -> Dict[str, fx.Graph]:
    """{path: graph} of the hand-written norms in ``root`` (LLaMA's RMSNorm: a :class:`CheapModule`
    rule with a reduction) that FX would otherwise trace into their caller's graph, where no rule
    sees them whole. Only modules without submodules, of a class outside torch, without hooks,
    taking one tensor. Hand-written activations are left to the spellings, which rewrite them
    inside the graph."""
    norms = [r for r in rules if isinstance(r, CheapModule) and r.reductions]
    found: Dict[str, fx.Graph] = {}
    if not norms:
        return found
    for path, child in root.named_modules():
        # No buffers: tracing runs the module's Python, and an in-place update of a real buffer
        # would change the user's tensor (the copy shares it).
        if not path or child._modules or type(child).__module__.startswith("torch.") or has_hooks(child) \
                or _tensor_arity(child) != 1 or "forward" in child.__dict__ or next(child.buffers(), None) is not None:
            continue
        snapshot = _snapshot(child)
        try:
            graph = _typed_trace(child)
        finally:
            _restore(snapshot)
        if graph is not None and any(_cheap(graph, r) for r in norms):
            found[path] = graph
    return found


def _recompute_if_cheap(child: nn.Module, path: str, rules: Sequence[Rule], report: RewriteReport,
                        graphs: Sequence[fx.Graph]) -> bool:
    """A hand-written norm or activation (LLaMA's RMSNorm, GPT-2's tanh-GELU) whose ``graphs`` a
    :class:`CheapModule` rule describes: keep its input only and run its own forward again in
    backward. Better than rewriting inside it: nothing else is kept."""
    if not any(isinstance(r, CheapModule) and all(_cheap(g, r) for g in graphs) for r in rules):
        return False
    child.forward = _RecomputedForward(child)
    report.replaced.append(Replaced(path or "<root>", path or "<root>", type(child).__name__,
                                    "graph_rewrite.recompute_module", {}, kind="recompute",
                                    detail="keeps its input only; its cheap elementwise forward runs again in backward"))
    return True


class _TypedParameterProxy(fx.proxy.ParameterProxy):
    """A parameter whose dtype and device read as constants while tracing, as its shape does."""

    @property
    def dtype(self) -> torch.dtype:
        return self.param.dtype

    @property
    def device(self) -> torch.device:
        return self.param.device


class _TypedTracer(fx.Tracer):
    """Reads parameters' shape, dtype and device as constants. Its graph only tells whether a
    module is cheap (:func:`_recompute_if_cheap`): the module's own forward runs, never this graph,
    so nothing depends on those constants staying true."""

    def __init__(self) -> None:
        super().__init__(param_shapes_constant=True)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        proxy = super().getattr(attr, attr_val, parameter_proxy_cache)
        if type(proxy) is fx.proxy.ParameterProxy:
            proxy.__class__ = _TypedParameterProxy
        return proxy


def _typed_trace(module: nn.Module) -> Optional[fx.Graph]:
    try:
        return _TypedTracer().trace(module)
    except Exception:  # noqa: BLE001 - untraceable either way: not a cheap module
        return None


def trace_children(module: nn.Module, prefix: str, rules: Sequence[Rule], report: RewriteReport) -> None:
    """Trace each submodule of ``module`` (code FX could not trace) on its own where it can be.

    Its own code runs under the runtime front end; submodules with a graph get the rules
    that need one (kind "recompute") there. ``prefix`` is ``module``'s path in the model.
    """
    traced: List[str] = []
    for path, child in module.named_modules():
        # torch's own modules hold no code worth a graph of its own: the mode reaches them.
        if path and not type(child).__module__.startswith("torch.") \
                and not any(path.startswith(p + ".") for p in traced):
            if _trace_on_its_own(child, _join(prefix, path) if prefix else path, rules, report):
                traced.append(path)


def _join(prefix: str, path: str) -> str:
    return prefix if path in ("", "<root>") else f"{prefix}.{path}"


def _rewrite_and_build(root, graphs, reasons, constants, rules, report: RewriteReport,
                       runtime_report: Optional[RewriteReport] = None, prefix: str = "",
                       keep_class: bool = False, cheap: Optional[Dict[str, fx.Graph]] = None) -> RewrittenModule:
    """Rewrite every mode's graph, run the leaves FX could not enter under the runtime front end, build the result.

    The leaves record their call sites in ``runtime_report`` (default ``report``) with
    paths under ``prefix``: a submodule traced on its own reports into its root's record.
    With ``keep_class`` the result is also an instance of ``root``'s class (:func:`_rewritten_class`).
    ``cheap`` (:func:`cheap_modules`, leaves of the graphs) run whole again in backward, and
    the Linear, convolution or mul after one asks it for its output instead of keeping it.
    """
    cheap = cheap or {}
    modules = dict(root.named_modules())
    seen = set()
    codes = {}
    code_of: Dict[int, str] = {}  # a graph may serve two modes: rewrite it once
    names = [r.name for r in rules]
    unique = list({id(g): g for g in graphs.values()}.values())
    calls_before = [_calls(g) for g in unique]
    for mode, graph in graphs.items():
        if id(graph) not in code_of:
            # Spellings first: -F.softplus(-x) must be seen before F.softplus is rewritten alone.
            for node, where, spelling in rewrite_spellings(graph, names, _where, modules):
                if (node, where, "spelling") not in seen:
                    seen.add((node, where, "spelling"))
                    report.spellings.append(Respelled(node, where, spelling.name, spelling.lean_op, spelling.changes))
            replaced, left = rewrite_graph(graph, modules, rules)
            more, more_left = rewrite_recompute(graph, modules, rules)
            replaced, left = replaced + more, left + more_left
            replaced += rewrite_cheap_consumers(graph, modules, list(cheap), rules)
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
    _refuse_hooks_on_dropped(unique, calls_before, modules, prefix)
    _refuse_hooks_on_traced_through(unique, modules, prefix)
    for path, graph in cheap.items():
        _recompute_if_cheap(modules[path], path, rules, report, [graph])
    for path in sorted(reasons):
        full = _join(prefix, path) if prefix else path
        trace_children(modules[path], full, rules, runtime_report or report)
        run_under_mode(modules[path], rules, runtime_report or report, full)
        report.uncovered.append(Uncovered(path, reasons[path]))
    if reasons:
        report.tracing = f"partial: {len(reasons)} module(s) run under the runtime front end"
    if any(r.kind == "recompute" for r in report.replaced) and AUTOCAST_NOTE not in report.notes:
        report.notes.append(AUTOCAST_NOTE)

    gm = _build_keeping_class(root, graphs, constants, report) if keep_class else \
        _build(root, graphs["current"], list(graphs.values()), constants)
    if len(set(codes.values())) > 1:  # the code reads self.training somewhere
        gm._mode_graphs = {
            True: graphs["current"] if codes[True] == codes["current"] else graphs[True],
            False: graphs["current"] if codes[False] == codes["current"] else graphs[False],
        }
    gm.rewrite_report = report
    return gm


def _build_keeping_class(root: nn.Module, graphs: Dict[object, fx.Graph], constants: Dict[str, object],
                         report: RewriteReport) -> RewrittenModule:
    """:func:`_build` with the class of :func:`_class_for`; a plain RewrittenModule, noted in
    the report, where the model's class refuses (its ``__init_subclass__``, a metaclass, ...)."""
    try:
        return _build(root, graphs["current"], list(graphs.values()), constants, _class_for(type(root)))
    except Exception as e:
        report.notes.append(f"the copy is not an instance of {type(root).__qualname__} and lacks its other methods "
                            f"({_first_line(e)})")
        return _build(root, graphs["current"], list(graphs.values()), constants)


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
