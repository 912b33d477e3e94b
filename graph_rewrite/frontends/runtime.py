"""The runtime front end: for code torch.fx cannot trace, rewrite calls as they happen.

``optimize()`` uses FX wherever FX traces: graphs can be printed, diffed, scripted
and exported. Much real code cannot be traced symbolically: Hugging Face
transformers 5 decorates ``forward(*args, **kwargs)``, recurrent loops run
``for t in range(x.size(1))``, ``torch.zeros(x.shape[0], H)`` needs real sizes,
and one untraceable helper (mambapy's ``pscan``) hides every call in its module.
For those modules the copy's ``forward`` runs under :class:`LeanFunctionMode`, a
``torch.overrides.TorchFunctionMode`` that sees every torch call at the Python
API level and sends the activations of the rules table to the lean ops.

Why a function mode and not the alternatives, measured on 12 third-party models:

* It runs the model's **own eager code path**. Dynamo (``torch.compile`` with a
  pass-through backend) captured every model, but under Dynamo Hugging Face's
  Mamba switches to its compile-only scan (``is_torchdynamo_compiling()``), which
  doubled activation memory.
* It needs **no example inputs** and specialises nothing. ``torch.export``
  (non-strict) saw every call, but needs inputs and fixes shapes and control flow.
* It is **scoped**: the mode is entered by the optimized module's ``forward`` and
  left when it returns, only while autograd records (without a graph nothing is
  saved, so there is nothing to rewrite). Nothing is patched globally; the
  original model, other models and torch functions outside that forward behave
  exactly as before. A mode the user entered around the call stays below ours
  and sees the lean ops.

The price is a Python call per torch function inside the scoped forward, which
``benchmarks/runtime_overhead.py`` measures. Call sites are recorded in the
model's ``rewrite_report`` at their first call: module path and ``file:line``.

Example::

    >>> lean = graph_rewrite.optimize(hf_mamba)          # doctest: +SKIP
    >>> lean(ids).logits.sum().backward()               # doctest: +SKIP
    >>> print(lean.rewrite_report)                      # doctest: +SKIP
"""
from __future__ import annotations

import functools
import inspect
import os
import sys
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from ..report import LeftAlone, Replaced, RewriteReport
from ..ops import cpp
from ..ops.activations import softplus_needs_branch_mask
from ..ops.recompute import _RecomputeMul, _norm_node, call_keeping_input
from ..rules import Consumer, Norm, Recomputable, Rule, pattern_name, rules_for
from .fx_pass import NATIVE_KEEPS_OUTPUT, inplace_name, lean_op_name

__all__ = ["LeanFunctionMode", "run_under_mode", "runtime_table", "saved_tensors_hooks_in_effect", "in_checkpoint"]

# Frames in these directories are torch's own (F.sigmoid, nn.Softplus.forward,
# Module._call_impl): a call site is the first frame outside them.
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


# Kind "recompute" at run time. A consumer's input h whose autograd node is a recomputable
# activation's, untouched since (version 0, not a view), tells everything the recompute op
# needs: the node keeps the activation's input x (so x costs nothing more) and its arguments.
_SELU = (1.6732632423543772848170429916717, 1.0507009873554804934193349852946)


def _recomputable(node: Any) -> Optional[Tuple[str, str, float]]:
    """(rule name, recompute.ACTIVATIONS key, act_arg) of the activation that made a node, else None."""
    kind = type(node).__name__
    if kind == "GeluBackward0":
        return ("gelu", "gelu_tanh" if node._saved_approximate == "tanh" else "gelu", 0.0)
    if kind in ("SiluBackward0", "HardswishBackward0", "MishBackward0"):
        name = kind[: -len("Backward0")].lower()
        return (name, name, 0.0)
    if kind == "CeluBackward0":
        return ("celu", "celu", float(node._saved_alpha))
    if kind == "EluBackward0" and node._saved_input_scale == 1:
        alpha, scale = float(node._saved_alpha), float(node._saved_scale)
        if scale == 1:
            return ("elu", "elu", alpha)
        if (alpha, scale) == _SELU:
            return ("selu", "selu", 0.0)
    return None


_F = torch.nn.functional
_CONSUMERS = {"linear": (_F.linear, torch.addmm), "conv": (_F.conv1d, _F.conv2d, _F.conv3d),
              "mul": (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__)}
# Consumers with no lean op of their own, run natively under saved-tensor hooks that keep x, not h
# (ops.recompute.call_keeping_input), by the Consumer rule named here; their first argument is h.
# Hugging Face's mixture-of-experts layers call grouped_mm by default.
_NATIVE_CONSUMERS = {"linear": tuple(f for f in (getattr(_F, "grouped_mm", None), getattr(torch, "_grouped_mm", None))
                                     if f is not None)}
# The norms whose output the mode remembers (weakly) with their inputs: F.layer_norm for a
# Linear after it, F.batch_norm and F.group_norm for an activation after them (kind "norm").
_NORM_CALLS = {
    _F.layer_norm: ("layer_norm", inspect.signature(_F.layer_norm)),
    _F.batch_norm: ("batch_norm", inspect.signature(_F.batch_norm)),
    _F.group_norm: ("group_norm", inspect.signature(_F.group_norm)),
}


def _consumer_table(rules: Sequence[Rule]) -> Dict[Any, Tuple[Any, str, frozenset]]:
    """{F.linear, F.conv2d, Tensor.__mul__, ...: (the Consumer rule, its spelling, the recomputable
    activations' names)} for the consumers chosen."""
    acts = frozenset(r.name for r in rules if isinstance(r, Recomputable))
    table = {}
    for rule in rules:
        if isinstance(rule, Consumer) and acts:
            for func in _CONSUMERS.get(rule.name, ()) + _NATIVE_CONSUMERS.get(rule.name, ()):
                table[func] = (rule, pattern_name(func), acts)
    return table


def _activation_table(rules: Sequence[Rule]) -> Dict[Any, Tuple[Recomputable, inspect.Signature]]:
    """{F.silu, F.gelu, ...: (its Recomputable rule, how to read a call)} when a norm rule is chosen."""
    if not any(isinstance(r, Norm) for r in rules):
        return {}
    P = inspect.Parameter
    table = {}
    for rule in rules:
        if isinstance(rule, Recomputable) and rule.name != "layer_norm":
            sig = inspect.Signature([P("input", P.POSITIONAL_OR_KEYWORD)]
                                    + [P(k, P.POSITIONAL_OR_KEYWORD, default=v) for k, v in rule.params.items()]
                                    + [P("inplace", P.POSITIONAL_OR_KEYWORD, default=False)])
            table[rule.function] = (rule, sig)
    return table


def runtime_table(rules: Sequence[Rule]) -> Dict[Any, Tuple[Rule, str, bool]]:
    """{function object a TorchFunctionMode sees: (rule, spelling, in-place)} for the rules' spellings.

    Module patterns need no entry: ``nn.Softplus.forward`` calls ``F.softplus``,
    which the mode sees. Method names become ``Tensor`` methods.
    """
    table: Dict[Any, Tuple[Rule, str, bool]] = {}
    for rule in rules:
        if rule.kind != "output":  # kind "recompute" needs the graph (which uses keep h): FX only
            continue
        for inplace, patterns in ((False, rule.patterns), (True, rule.inplace)):
            for pattern in patterns:
                if isinstance(pattern, type):
                    continue
                func = getattr(torch.Tensor, pattern) if isinstance(pattern, str) else pattern
                table.setdefault(func, (rule, pattern_name(pattern), inplace))
    return table


def saved_tensors_hooks_in_effect() -> Optional[Tuple[Any, Any]]:
    """The innermost ``torch.autograd.graph.saved_tensors_hooks`` (pack, unpack) now in effect, or None.

    Non-reentrant ``torch.utils.checkpoint`` pushes a new pair for its region (and
    another while it recomputes the region in backward), so a pair other than the
    one in effect when forward began tells code run inside a checkpointed region.

    >>> with torch.autograd.graph.saved_tensors_hooks(pack, unpack):    # doctest: +SKIP
    ...     saved_tensors_hooks_in_effect() == (pack, unpack)
    True
    """
    return torch._C._autograd._top_saved_tensors_default_hooks(True)


def in_checkpoint() -> bool:
    """Whether a non-reentrant ``torch.utils.checkpoint`` region is running (its hooks are in effect)."""
    hooks = saved_tensors_hooks_in_effect()
    return hooks is not None and getattr(hooks[0], "__module__", "") == "torch.utils.checkpoint"


CHECKPOINTED = (
    "in a checkpointed region (torch.utils.checkpoint, or saved-tensor hooks entered in forward): native, "
    "as its recompute in backward is native and must save the same tensors"
)


def _call_site() -> Tuple[str, Any]:
    """(``file:line`` of the first frame outside torch and graph_rewrite, the innermost caller's frame).

    The site is where the model's code makes the call (``self.act(h)`` rather than
    inside ``nn.Softplus.forward``); the module path is searched from the innermost
    frame, so that it names the ``nn.Softplus`` itself.
    """
    inner = frame = sys._getframe(3)  # past __torch_function__ and _record/_left_alone
    while frame is not None and frame.f_code.co_filename.startswith((_TORCH_DIR, _OWN_DIR)):
        frame = frame.f_back
    site = "<unknown>" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"
    return site, inner


def _output_nodes() -> Tuple[type, ...]:
    """The autograd node types of the lean ops that keep their output."""
    from ..ops import activations, output_derived

    functions = (activations._Softplus, activations._Sigmoid, activations._LogSigmoid,
                 output_derived._Hardtanh, output_derived._LeakyReLU)
    return tuple(f._backward_cls for f in functions)


_OUTPUT_NODES = _output_nodes()
_MUTATORS: Dict[Any, bool] = {}  # function -> whether it changes its first argument in place


def _is_mutator(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    return inplace_name(name) or name == "__setitem__" or (name.startswith("__i") and name.endswith("__"))


def _keep_before_change(t: Any) -> None:
    """Before ``t`` is changed in place: if it is (a view of) a lean op's output, make that op's
    node keep a copy of what it saved, as it is now.

    The lean op kept its output, which native never did: native kept the input, which the
    change leaves alone. A copy of the output (the input's size: native's bytes, no more)
    gives backward the values native would use. A saved tensor with hooks skips the version
    check; one saved under a ``saved_tensors_hooks`` context has hooks already (and its unpack
    would return the changed tensor unchecked): the node then keeps the copy itself.
    """
    if not isinstance(t, Tensor):
        return
    for cand in (t, t._base):
        node = getattr(cand, "grad_fn", None)
        if isinstance(node, _OUTPUT_NODES) and not getattr(node, "_graph_rewrite_copied", False):
            node._graph_rewrite_copied = True
            try:  # the output is saved first; a hook makes it a copy, as it is now
                node._raw_saved_tensors[0].register_hooks(torch.Tensor.clone, _same)
            except RuntimeError:  # saved under a saved_tensors_hooks context: the op's backward reads this copy
                node.output_copy = cand.detach().clone()


def _same(t: Tensor) -> Tensor:
    return t


def _before_change(func: Any, args: tuple, kwargs: Optional[dict]) -> None:
    """Protect the lean outputs that ``func(*args, **kwargs)`` is about to change in place."""
    mutator = _MUTATORS.get(func)
    if mutator is None:
        mutator = _MUTATORS[func] = _is_mutator(func)
    if args and (mutator or (kwargs is not None and _changes_its_input(func, args, kwargs))):
        _keep_before_change(args[0])
    out = kwargs.get("out") if kwargs else None
    for t in out if isinstance(out, (tuple, list)) else (out,):
        _keep_before_change(t)


_SIGNATURES: Dict[Any, Optional[inspect.Signature]] = {}


def _changes_its_input(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether an activation call runs in place: ``inplace=True``, by keyword or by position
    (``nn.Hardtanh(inplace=True)`` calls ``F.hardtanh(x, min_val, max_val, True)``)."""
    if kwargs.get("inplace") is True:
        return True
    if func not in _SIGNATURES:
        try:
            _SIGNATURES[func] = inspect.signature(func)
        except (TypeError, ValueError):
            _SIGNATURES[func] = None
    sig = _SIGNATURES[func]
    if sig is None or "inplace" not in sig.parameters:
        return False
    try:
        return sig.bind(*args, **kwargs).arguments.get("inplace") is True
    except TypeError:
        return False


_NORM_NODES = {"layer_norm": "NativeLayerNormBackward0", "group_norm": "NativeGroupNormBackward0",
               "batch_norm": "NativeBatchNormBackward0"}


def _norm_inputs(node: Any, made: Optional[tuple], kind: str) -> Optional[Tuple[Tensor, list, float]]:
    """(z, the norm's other arguments, eps) to make a norm's output again, read from its autograd
    ``node`` (which keeps them: no new bytes) and what the mode remembered of the call (``made``).

    layer_norm: ``[weight, bias, normalized_shape]``; group_norm: ``[weight, bias, None, None,
    groups]``; batch_norm: ``[weight, bias, running_mean, running_var]``. None where the output is
    not that norm's, a saved tensor was changed in place since, or the bias is gone.
    """
    if made is None or made[0] != kind or type(node).__name__ != _NORM_NODES[kind]:
        return None
    _, eps, bias_ref = made
    bias = None if bias_ref is None else bias_ref()
    if bias_ref is not None and bias is None:
        return None
    try:
        z, weight = node._saved_input, node._saved_weight
        if kind == "layer_norm":
            return z, [weight, node._saved_bias, list(node._saved_normalized_shape)], eps
        if kind == "group_norm":
            return z, [weight, bias, None, None, node._saved_group], eps
        return z, [weight, bias, node._saved_running_mean, node._saved_running_var], eps
    except RuntimeError:  # changed in place since: native raises in backward, if it gets there
        return None


def _read_consumer(name: str, args: tuple, kwargs: dict, addmm: bool = False) -> Optional[Tuple[Any, tuple]]:
    """(h, the op's arguments after ``act``) of a consumer call, or None where the op cannot serve it."""
    if addmm:
        # torch.addmm(bias, h.view(-1, k), weight): Hugging Face's Conv1D. h is the view's base.
        if len(args) != 3 or kwargs or not all(isinstance(a, Tensor) for a in args) \
                or args[0].dim() != 1 or args[1].dim() != 2:
            return None
        bias, rows, weight = args
        h = rows._base
        if h is None or not h.is_contiguous() or rows.shape != (h.numel() // max(h.shape[-1], 1), h.shape[-1]) \
                or rows.stride() != (h.shape[-1], 1) or rows.storage_offset() != h.storage_offset():
            return None
        return h, (weight, bias, True)
    if name == "linear":
        a = dict(zip(("input", "weight", "bias"), args), **kwargs)  # F.linear has no inspectable signature
        if set(a) - {"input", "weight", "bias"} or not isinstance(a.get("weight"), Tensor):
            return None
        return a.get("input"), (a["weight"], a.get("bias"))
    if name == "conv":
        a = dict(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args), **kwargs)
        weight = a.get("weight")
        if not isinstance(weight, Tensor) or len(a) > 7:
            return None
        n = weight.dim() - 2
        lists = []
        for key, default in (("stride", 1), ("padding", 0), ("dilation", 1)):
            v = a.get(key, default)
            v = [v] * n if isinstance(v, int) else list(v) if isinstance(v, (list, tuple)) else None
            if v is None or len(v) != n or not all(isinstance(i, int) for i in v):
                return None  # padding="same": the native call
            lists.append(v)
        groups = a.get("groups", 1)
        if not isinstance(groups, int):
            return None
        return a.get("input"), (weight, a.get("bias"), *lists, groups)
    if kwargs or len(args) != 2 or not all(isinstance(a, Tensor) for a in args):  # mul: out=, or a scalar
        return None
    return args[0], (args[1],)


class LeanFunctionMode(TorchFunctionMode):
    """Sends activation calls to the lean ops while active; everything else passes through untouched.

    A call is rewritten only when it would save something for backward (grad mode
    on, a floating-point input that requires grad); otherwise the native function
    runs, which computes the same values. In-place spellings, non-float inputs
    and arguments the lean op cannot serve stay native and are reported.

    Calls made under saved-tensor hooks other than those in effect when the mode was
    entered stay native: inside ``torch.utils.checkpoint`` (non-reentrant) forward runs
    under the mode but the recompute in backward does not, and checkpoint hands the
    recomputed saved tensors to forward's nodes by position. The reentrant form runs
    its region under ``no_grad``, where nothing is rewritten either. A mode entered
    inside the region (a module's own forward called there) is entered again by the
    recompute and rewrites the same calls both times.

    ``owner`` is the module whose forward enters the mode: call sites are reported
    with the path of the innermost module of ``owner``'s tree that made them,
    prefixed with ``prefix`` (the owner's path in the optimized model).
    """

    def __init__(self, rules: Sequence[Rule], report: RewriteReport, owner: nn.Module, prefix: str = "") -> None:
        super().__init__()
        self.rules = tuple(rules)
        self.table = runtime_table(rules)
        self.consumers = _consumer_table(rules)
        self.table.update({f: (None, spelling, False) for f, (_, spelling, _) in self.consumers.items()})
        self.activations = _activation_table(rules)
        self.norms = {r.name: r for r in rules if isinstance(r, Norm)}
        self.table.update({f: ("activation", pattern_name(f), False) for f in self.activations})
        if self.norms or any(r.name == "layer_norm" for r in rules):
            self.table.update({f: ("norm", pattern_name(f), False) for f in _NORM_CALLS})
        # Norm outputs seen: tensor -> (kind, weak refs to what recomputes it, ...); entries die with it.
        self._made = WeakIdKeyDictionary()
        self.report, self.owner, self.prefix = report, owner, prefix
        # (site, spelling, outcome): each recorded once, also across copies of the report.
        self._seen = {(r.site, r.original, "replaced") for r in report.replaced if r.site}
        self._seen |= {(r.site, r.original, r.reason) for r in report.left_alone if r.site}
        self._paths: Optional[Dict[int, str]] = None
        self._entry_hooks: List[Optional[Tuple[Any, Any]]] = []  # saved-tensor hooks at each (nested) entry
        self.told = False  # whether the first forward's "nothing saves" check ran

    def __enter__(self):
        self._entry_hooks.append(saved_tensors_hooks_in_effect())
        # The lean ops take their Python kernels here: _keep_before_change works on their nodes.
        cpp.python_only(+1)
        return super().__enter__()

    def __exit__(self, *exc):
        self._entry_hooks.pop()
        cpp.python_only(-1)
        return super().__exit__(*exc)

    # Rules travel by name (op packets do not pickle); the mode is rebuilt without its caches.
    def __getstate__(self) -> Dict[str, Any]:
        return {"rules": [r.name for r in self.rules], "report": self.report, "owner": self.owner,
                "prefix": self.prefix}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(rules_for(state["rules"]), state["report"], state["owner"], state["prefix"])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        entry = self.table.get(func)
        if entry is None:  # nearly every call: as little Python as possible
            if kwargs or _MUTATORS.get(func) is not False:
                _before_change(func, args, kwargs)
            return func(*args, **kwargs) if kwargs else func(*args)
        kwargs = kwargs or {}
        rule, spelling, inplace = entry
        if rule is None or rule == "norm" or rule == "activation":
            if kwargs:  # out=, inplace=True: protect a lean output first, as for any other call
                _before_change(func, args, kwargs)
        if rule is None:
            return self._consumer(func, args, kwargs)
        if rule == "norm":
            return self._norm(func, args, kwargs)
        if rule == "activation":
            return self._activation(func, args, kwargs)
        # In place (sigmoid_, F.hardtanh(x, a, b, True)) on what may be a lean output: it keeps a copy first.
        _before_change(func, args, kwargs)
        if inplace:
            self._left_alone(spelling, "in-place: rewriting would drop the mutation of its input")
            return func(*args, **kwargs)
        try:
            x, params = self._read_args(rule, args, kwargs)
        except ValueError as e:
            self._left_alone(spelling, str(e))
            return func(*args, **kwargs)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return func(*args, **kwargs)  # no graph: nothing is saved, native gives the same values
        if (x.grad_fn is None or (x._base is not None and x._base.grad_fn is None)) \
                and rule.name not in NATIVE_KEEPS_OUTPUT:
            # A leaf (the model's input, a weight) or a view of one: the caller holds it anyway, so
            # keeping the output instead would add bytes, not free them.
            self._left_alone(spelling, "its input is a leaf tensor (an input or a weight) or a view of one, held by the caller anyway")
            return func(*args, **kwargs)
        if self._under_other_hooks():
            self._left_alone(spelling, CHECKPOINTED)
            return func(*args, **kwargs)
        if rule.name == "softplus" and softplus_needs_branch_mask(x.dtype, float(params.get("threshold", 20.0))):
            # The lean op would keep a branch mask beside the output; with no later use keeping the
            # output (which this front end cannot see), that is more than native's input alone.
            self._left_alone(spelling, "keeping the output needs a branch mask too at this dtype and threshold, "
                                       "which could hold more than native where no later use keeps the output")
            return func(*args, **kwargs)
        self._record(rule, spelling, params)
        return rule.op(x, *params.values())

    def _under_other_hooks(self) -> bool:
        """Whether saved-tensor hooks other than those at the mode's entry are in effect (a checkpointed region)."""
        return bool(self._entry_hooks) and saved_tensors_hooks_in_effect() != self._entry_hooks[-1]

    def _consumer(self, func, args: tuple, kwargs: dict):
        """A Linear, convolution or product whose input h is a fresh output the mode can make again
        (an activation's, a LayerNorm's, a lean op's): the recompute op, which keeps what made h
        (kept by that node anyway), not h. Anything else runs natively."""
        consumer, spelling, acts = self.consumers[func]
        if not torch.is_grad_enabled() or self._under_other_hooks():  # checkpointed: unpacking would be wrong
            return func(*args, **kwargs)
        native = func in _NATIVE_CONSUMERS.get(consumer.name, ())
        try:
            call = (args[0], ()) if native and args else \
                _read_consumer(consumer.name, args, kwargs, addmm=func is torch.addmm)
        except (TypeError, ValueError):
            call = None
        found = None
        if call is not None:
            h, rest = call
            found = self._producer(h, consumer.name, acts, gated=consumer.gated)
            if found is None and consumer.name == "mul" and isinstance(rest[0], Tensor):
                h, rest = rest[0], (h,)  # other * act(x)
                found = self._producer(h, consumer.name, acts, gated=False)
        if found is None or (consumer.name == "mul" and rest[0] is h):
            return func(*args, **kwargs)
        x, act, act_arg, extra, detail = found
        if consumer.name == "linear" and len(rest) == 3:  # addmm: (weight, bias, True)
            rest, extra = rest[:2], {**extra, "addmm": True}
        self._record(consumer, spelling, {"act_arg": act_arg} if act_arg else {}, kind="recompute", detail=detail,
                     op=f"{spelling} (native, keeps x)" if native else "")
        if native:
            return call_keeping_input(func, args, kwargs, x, h, act, act_arg, **extra)
        return consumer.op(x, h, act, *rest, act_arg=act_arg, **extra)

    def _producer(self, h: Any, consumer: str, acts: frozenset,
                  gated: bool) -> Optional[Tuple[Tensor, str, float, Dict[str, Any], str]]:
        """(x, act, act_arg, the op's other keywords, a description) when ``h`` is a fresh output
        the consumer's op can recompute from tensors its maker keeps anyway; else None."""
        if not (isinstance(h, Tensor) and h._version == 0 and h._base is None and h.grad_fn is not None):
            return None
        node = h.grad_fn
        found = _recomputable(node)
        if found is not None:
            name, act, act_arg = found
            if name not in acts:
                return None
            try:
                x = node._saved_self
            except RuntimeError:  # its input changed in place since: native raises in backward
                return None
            return x, act, act_arg, {}, f"recomputes {act} from its input"
        lean = _norm_node(h)
        if lean is not None:  # after norm_act or a cheap module: the consumer asks that node for h
            act, act_arg = getattr(lean, "act", "identity"), getattr(lean, "act_arg", 0.0)
            return h, act, act_arg, {}, "recomputes " + (f"{act}(norm)" if act != "identity" else "the module")
        if consumer != "linear":
            return None
        if "layer_norm" in acts:
            read = _norm_inputs(node, self._made.get(h), "layer_norm")
            if read is not None:
                z, (w, b, shape), eps = read
                return z, "layer_norm", eps, {"norm_shape": shape, "norm_weight": w, "norm_bias": b}, \
                    "recomputes layer_norm from its input"
        if gated and getattr(node, "_forward_cls", None) is _RecomputeMul and node.norm is None:
            x, other = node.saved_tensors[:2]  # act(x) * other: keep both, not the product
            return x, node.act, node.act_arg, {"gate": other}, f"recomputes {node.act}(x) * gate"
        return None

    def _norm(self, func, args: tuple, kwargs: dict):
        """A norm runs natively; its output is remembered (weakly) with what recomputes it."""
        out = func(*args, **kwargs)
        if not (torch.is_grad_enabled() and isinstance(out, Tensor) and out.requires_grad):
            return out
        kind, sig = _NORM_CALLS[func]
        try:
            a = sig.bind(*args, **kwargs).arguments
        except TypeError:
            return out
        eps, bias = a.get("eps", 1e-5), a.get("bias")
        if isinstance(eps, (int, float)) and not isinstance(eps, bool) and (bias is None or isinstance(bias, Tensor)):
            # What its autograd node does not keep: eps, and the bias (weakly: a parameter, usually).
            self._made[out] = (kind, float(eps), None if bias is None else weakref.ref(bias))
        return out

    def _activation(self, func, args: tuple, kwargs: dict):
        """GELU, SiLU, ... on a fresh BatchNorm or GroupNorm output: ``norm_act``, which keeps the
        norm's input (kept by the norm anyway), not its output. Anything else runs natively."""
        rule, sig = self.activations[func]
        h = args[0] if args else kwargs.get("input")
        made = self._made.get(h) if isinstance(h, Tensor) else None
        if made is None or made[0] not in self.norms or not torch.is_grad_enabled() or self._under_other_hooks() \
                or h._version != 0 or h._base is not None:
            return func(*args, **kwargs)
        try:
            a = sig.bind(*args, **kwargs)
            a.apply_defaults()
            if a.arguments.pop("inplace") is not False:
                _keep_before_change(h)
                return func(*args, **kwargs)
            act, act_arg = rule.encode(**{k: a.arguments[k] for k in rule.params})[:2]
        except (TypeError, ValueError):
            return func(*args, **kwargs)
        read = _norm_inputs(h.grad_fn, made, made[0])
        if read is None:
            return func(*args, **kwargs)
        z, tensors, eps = read
        kind, groups = made[0], (tensors.pop() if made[0] == "group_norm" else 0)
        norm = self.norms[kind]
        self._record(norm, pattern_name(func), {"act_arg": act_arg} if act_arg else {}, kind="norm",
                     detail=f"recomputes {kind}(z)")
        return norm.op(h, z, act, *tensors, eps, act_arg, groups)

    @staticmethod
    def _read_args(rule: Rule, args: tuple, kwargs: dict) -> Tuple[Tensor, Dict[str, float]]:
        kwargs = dict(kwargs)
        if kwargs.pop("inplace", False) is not False:  # F.relu6(x, inplace=True): its input may be read later
            raise ValueError("in place: nothing here tells whether its input has other uses")
        x, params = rule.bind(args, kwargs)
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
            raise ValueError(f"input is not a floating-point tensor ({getattr(x, 'dtype', type(x).__name__)})")
        return x, params

    def _record(self, rule: Any, spelling: str, params: Dict[str, float], kind: str = "output",
                detail: str = "", op: str = "") -> None:
        site, frame = _call_site()
        key = (site, spelling, "replaced")
        if key in self._seen:
            return
        self._seen.add(key)
        op = op or {"output": lambda: lean_op_name(rule), "norm": lambda: "graph_rewrite.norm_act"}.get(
            kind, lambda: f"graph_rewrite.recompute_{rule.name}")()
        self.report.replaced.append(
            Replaced("-", self._module_path(frame), spelling, op, params, site=site, kind=kind, detail=detail)
        )

    def _left_alone(self, spelling: str, reason: str) -> None:
        site, frame = _call_site()
        key = (site, spelling, reason)
        if key in self._seen:
            return
        self._seen.add(key)
        self.report.left_alone.append(LeftAlone("-", self._module_path(frame), spelling, reason, site=site))

    def _module_path(self, frame) -> str:
        """The path of the innermost module of the owner's tree running in ``frame`` or a caller of it.

        Reads frame locals, which is slow, so it runs once per call site.
        """
        if self._paths is None:
            self._paths = {id(m): n for n, m in self.owner.named_modules()}
        while frame is not None:
            path = self._paths.get(id(frame.f_locals.get("self")))
            if path is not None:
                return ".".join(p for p in (self.prefix, path) if p) or "<root>"
            frame = frame.f_back
        return self.prefix or "<root>"


# Dynamo cannot trace the mode (its __torch_function__ reads names and call sites): traced, every
# call in it broke the graph and the resumed frames recompiled until the limit, slower than eager
# (tiny HF LLaMA, CPU: 3.0x native's step). Not traced, the module runs eagerly, as under optimize()
# alone; `backend="graph_rewrite"` is the compiled path for such models.
@torch.compiler.disable
def _forward_under_mode(module: nn.Module, mode: LeanFunctionMode, inner: Any, /, *args, **kwargs):
    """``forward`` of a module that runs its own code under ``mode`` while autograd records.

    Set on the optimized copy's instance as a ``functools.partial`` (never on the class,
    which the user's model shares): a partial of a module-level function pickles and
    deep-copies. Under ``torch.compile`` it runs eagerly (a graph break around the module).
    Its subclass :class:`_ModeForward` gives it the signature of the forward it runs.
    """
    forward = inner if inner is not None else type(module).forward.__get__(module)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)  # nothing will be saved: no mode, no cost
    with mode:
        out = forward(*args, **kwargs)
    if not mode.told and not mode._entry_hooks:  # the outermost entry: its call sites are all recorded now
        mode.told = True
        mode.report.warn_if_nothing_saves(type(module).__name__, stacklevel=4)
    return out


class _ModeForward(functools.partial):
    """``functools.partial(_forward_under_mode, module, mode, inner)`` with the signature of the
    forward it runs: callers that read ``inspect.signature(model.forward)`` (Hugging Face's
    ``Trainer`` keeps the dataset columns it names) see the model's own parameters."""

    @property
    def __signature__(self) -> inspect.Signature:
        module, _, inner = self.args[:3]
        return inspect.signature(inner if inner is not None else type(module).forward.__get__(module))


class _RefuseScript:
    """``__prepare_scriptable__`` of a module that relies on the runtime mode: scripting it would
    compile the class's native forward and silently drop the rewrite."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self):
        raise TypeError(
            f"graph_rewrite: {self.path or 'the model'} runs its own eager code under graph_rewrite's runtime "
            "front end (torch.fx could not trace it), which TorchScript cannot compile. Script the original "
            "model and pass the ScriptModule to graph_rewrite.optimize(), or make the module traceable by FX."
        )


def run_under_mode(module: nn.Module, rules: Sequence[Rule], report: RewriteReport, path: str = "") -> None:
    """Make ``module`` (an optimized copy, never the user's) run its forward under a :class:`LeanFunctionMode`.

    The forward it had (the class's, or one set on the instance such as FX's
    guarded forward) runs inside the mode. ``torch.jit.script`` of the module
    raises a ``TypeError`` saying what to do instead.

    >>> run_under_mode(copy_of_model, RULES, report)     # doctest: +SKIP
    """
    mode = LeanFunctionMode(rules, report, module, path)
    module.forward = _ModeForward(_forward_under_mode, module, mode, module.__dict__.get("forward"))
    module.__prepare_scriptable__ = _RefuseScript(path)
