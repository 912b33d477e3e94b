"""The rules table: which activation spellings map to which lean op, and how to read their arguments.

A new activation is one :class:`Rule` in :data:`RULES`. Patterns follow
``torch.ao.quantization``'s matcher: a module *type* matches ``call_module``
nodes, a *callable* matches ``call_function`` nodes, and a *string* matches
``call_method`` nodes.

Example::

    >>> from graph_rewrite.rules import RULES
    >>> [r.name for r in RULES if r.kind == "output"]
    ['softplus', 'sigmoid', 'logsigmoid', 'spellings', 'hardtanh', 'relu6', 'leaky_relu']

Kinds of rule (``rule.kind``):

* ``"output"`` (:class:`Rule`): the activation becomes a lean op that keeps its output.
* ``"recompute"``: an activation that stays native (:class:`Recomputable`: GELU, SiLU,
  Hardswish, ..., and LayerNorm) and the layers after it (:class:`Consumer`: Linear, Conv,
  mul) that keep the activation's input instead of its output and recompute the output in
  backward.
  A :class:`CheapModule` (hand-written RMSNorm, tanh-GELU) keeps its input only and runs again in backward.
* ``"norm"`` (:class:`Norm`): a BatchNorm or GroupNorm whose output only feeds a recomputable
  activation; the activation (and its consumers) keep the norm's input instead, and recompute
  the norm's output in backward.
"""
from __future__ import annotations

import functools
import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

from . import ops as _ops  # noqa: F401  (registers torch.ops.graph_rewrite.*)

Pattern = Union[type, Callable[..., Any], str]

__all__ = ["Rule", "Recomputable", "Consumer", "Norm", "CheapModule", "RULES", "KINDS", "Pattern", "is_match", "pattern_name",
           "rules_for", "has_hooks", "module_call_input"]


@dataclass(frozen=True)
class Rule:
    """One activation the pass can rewrite.

    name:       what ``optimize(model, ops=[...])`` calls it.
    op:         the lean op packet inserted in the graph.
    params:     the op's arguments after the input, with their defaults, in the
                op's order; call sites are bound against ``("input", *params)``.
    patterns:   spellings that are rewritten.
    inplace:    spellings that are found but left native (they mutate their input).
    check:      raises ``ValueError`` for argument values the lean op cannot serve.
    jit_ops:    TorchScript node kinds that are rewritten; their schema arguments
                named like ``params`` are read as the op's parameters (constants only).
    jit_inplace: TorchScript node kinds that are found but left native.
    """

    name: str
    kind: ClassVar[str] = "output"
    op: Any
    params: Mapping[str, float] = field(default_factory=dict)
    patterns: Tuple[Pattern, ...] = ()
    inplace: Tuple[Pattern, ...] = ()
    check: Optional[Callable[..., None]] = None
    jit_ops: Tuple[str, ...] = ()
    jit_inplace: Tuple[str, ...] = ()

    @functools.cached_property
    def signature(self) -> inspect.Signature:
        P = inspect.Parameter
        return inspect.Signature(
            [P("input", P.POSITIONAL_OR_KEYWORD)]
            + [P(k, P.POSITIONAL_OR_KEYWORD, default=v) for k, v in self.params.items()]
        )

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Tuple[Any, Dict[str, float]]:
        """(input, the op's parameters as floats) of a call ``f(*args, **kwargs)`` of a spelling.

        Raises ``ValueError`` saying why the lean op cannot serve the call: other
        arguments (``out=``), parameters that are not plain numbers, values ``check`` refuses.

        >>> RULES[0].bind((x, 2), {})          # doctest: +SKIP
        (x, {'beta': 2.0, 'threshold': 20.0})
        """
        if not kwargs and 0 < len(args) <= 1 + len(self.params):  # the common case, without inspect
            values = dict(self.params)
            values.update(zip(self.params, args[1:]))
            x = args[0]
        else:
            try:
                bound = self.signature.bind(*args, **kwargs)
            except TypeError as e:
                raise ValueError(f"unexpected arguments ({e})") from None
            bound.apply_defaults()
            x, values = bound.arguments.pop("input"), dict(bound.arguments)
        for k, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{k} is not a number known when the call is rewritten ({v!r})")
        params = {k: float(v) for k, v in values.items()}
        if self.check is not None:
            self.check(**params)
        return x, params


def _check_softplus(beta: float, threshold: float) -> None:
    if beta == 0 or not math.isfinite(beta):
        raise ValueError(f"beta={beta} (the lean op needs a finite, non-zero beta)")


# ------------------------------------------------------------------ kind "recompute"
@dataclass(frozen=True)
class Recomputable:
    """An activation that stays native; the layers after it recompute it (kind ``"recompute"``).

    name:       what ``optimize(model, ops=[...])`` calls it.
    function:   the out-of-place functional form, put in place of an in-place spelling.
    params:     its arguments after the input, with their defaults, in ``function``'s order.
    patterns:   spellings found (an ``inplace`` argument or attribute is read too).
    encode:     maps the params to ``(ops.recompute.ACTIVATIONS key, act_arg)``, or to
                ``(key, act_arg, {consumer op keyword: value})`` when the recompute needs
                more (LayerNorm's weight); ``ValueError`` for values the ops cannot recompute.
    consumers:  the :class:`Consumer` names that can recompute it (empty: all of them).
    outplace:   whether an in-place spelling may be made out of place: False where native's
                in-place form has another backward (ELU's from its output), not bit for bit.
    """

    name: str
    kind: ClassVar[str] = "recompute"
    function: Callable[..., Any]
    params: Mapping[str, Any] = field(default_factory=dict)
    patterns: Tuple[Pattern, ...] = ()
    encode: Callable[..., Tuple[Any, ...]] = lambda **kw: ("", 0.0)
    consumers: Tuple[str, ...] = ()
    outplace: bool = True


@dataclass(frozen=True)
class Attr:
    """A parameter of a called module (``"fc1.weight"``), put in the graph as a ``get_attr`` node."""

    target: str


@dataclass(frozen=True)
class Consumer:
    """A layer that keeps its input for backward and, after a :class:`Recomputable`, can recompute it instead.

    name:       what ``optimize(model, ops=[...])`` calls it.
    op:         the op inserted: ``op(x, h, act, *read(...), act_arg=..)``.
    patterns:   spellings found.
    read:       ``read(node, h, modules)`` gives the op's arguments after ``act`` (its
                weights as :class:`Attr`), or raises ``ValueError`` saying why not.
    gated:      the op also takes ``gate=u`` for ``act(x) * u`` as its input (LLaMA's MLP).
    """

    name: str
    kind: ClassVar[str] = "recompute"
    op: Any
    patterns: Tuple[Pattern, ...]
    read: Callable[[Node, Node, Mapping[str, nn.Module]], Tuple[Any, ...]]
    gated: bool = False


@dataclass(frozen=True)
class Norm:
    """A normalization before a :class:`Recomputable` activation (kind ``"norm"``).

    BatchNorm and GroupNorm keep their input ``z``; the activation after them keeps the norm's output.
    With this rule the activation becomes ``op`` (``graph_rewrite.norm_act``), which keeps
    ``z`` and recomputes the output in backward, and so do the activation's consumers.

    name:       what ``optimize(model, ops=[...])`` calls it.
    op:         the op put in place of the activation: ``op(h, z, act, *read(...)[1], act_arg)``.
    patterns:   spellings found.
    read:       ``read(node, modules)`` gives ``(z, the op's arguments after act)`` (tensors
                as :class:`Attr`), or raises ``ValueError`` saying why not.
    """

    name: str
    kind: ClassVar[str] = "norm"
    op: Any
    patterns: Tuple[Pattern, ...]
    read: Callable[[Node, Mapping[str, nn.Module]], Tuple[Node, Tuple[Any, ...]]]


@dataclass(frozen=True)
class CheapModule:
    """A submodule made of cheap ops on its one input and its parameters, with a row reduction
    (kind ``"recompute"``): hand-written RMSNorm. It keeps its input only and runs the same ops
    again in backward (``graph_rewrite.recompute_module``), where native keeps every intermediate.

    A hand-written activation (GPT-2's tanh-GELU, QuickGELU) is the same kind of module without
    the reduction: native keeps its input and several intermediates; this keeps the input only.

    name:       what ``optimize(model, ops=[...])`` calls it.
    methods:    the ``Tensor`` methods its graph may call.
    functions:  the functions its graph may call.
    reductions: at least one of these must be among them (what makes it a norm); empty: none needed.
    saves_input: the graph must pass its input straight to an op that saves it (``x * h``,
                ``x.pow(3)``): native keeps the input already, so keeping it costs nothing.
    """

    name: str
    kind: ClassVar[str] = "recompute"
    methods: frozenset
    functions: frozenset
    reductions: frozenset = frozenset()
    saves_input: bool = False


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks that a plain function call would skip."""
    return any(getattr(module, d, None) for d in _HOOK_DICTS)


def module_call_input(node: Node, modules: Mapping[str, nn.Module]) -> Tuple[nn.Module, Any]:
    """(the module, its one argument) of a ``call_module`` node that a function call may replace;
    ``ValueError`` says why not (hooks would be skipped, more than one argument)."""
    module = modules[node.target]
    if has_hooks(module):
        raise ValueError("the module has hooks, which a function call would skip")
    if len(node.args) + len(node.kwargs) != 1:
        raise ValueError("called with more than one argument")
    return module, node.args[0] if node.args else next(iter(node.kwargs.values()))


def _bind(node: Node, names: Sequence[str], defaults: Mapping[str, Any]) -> Dict[str, Any]:
    P = inspect.Parameter
    sig = inspect.Signature([P(n, P.POSITIONAL_OR_KEYWORD, default=defaults.get(n, P.empty)) for n in names])
    try:
        bound = sig.bind(*node.args, **node.kwargs)
    except TypeError as e:
        raise ValueError(f"unexpected arguments ({e})") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def _first_input(node: Node, h: Node) -> None:
    if not node.args or node.args[0] is not h or h in node.args[1:] or h in node.kwargs.values():
        raise ValueError("the activation is not (only) its input")


def _read_linear(node: Node, h: Node, modules) -> Tuple[Any, ...]:
    _first_input(node, h)
    if node.op == "call_module":
        m, _ = module_call_input(node, modules)
        return Attr(f"{node.target}.weight"), None if m.bias is None else Attr(f"{node.target}.bias")
    a = _bind(node, ("input", "weight", "bias"), {"bias": None})
    if not isinstance(a["weight"], Node) or not (a["bias"] is None or isinstance(a["bias"], Node)):
        raise ValueError("weight or bias is not a graph value")
    return a["weight"], a["bias"]


def _tuple(v: Any, n: int, what: str) -> list:
    v = [v] * n if isinstance(v, int) else list(v)
    if len(v) != n or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise ValueError(f"{what} is not {n} integer(s) known at trace time ({v!r})")
    return v


_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


def _read_conv(node: Node, h: Node, modules) -> Tuple[Any, ...]:
    _first_input(node, h)
    if node.op == "call_module":
        m, _ = module_call_input(node, modules)
        if m.padding_mode != "zeros":
            raise ValueError(f"padding_mode={m.padding_mode!r} (it pads before the convolution)")
        n = _CONV_DIMS[type(m)]
        weight = Attr(f"{node.target}.weight")
        bias = None if m.bias is None else Attr(f"{node.target}.bias")
        stride, padding, dilation, groups = m.stride, m.padding, m.dilation, m.groups
    else:
        n = _CONV_DIMS[node.target]
        a = _bind(node, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                  {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
        weight, bias = a["weight"], a["bias"]
        if not isinstance(weight, Node) or not (bias is None or isinstance(bias, Node)):
            raise ValueError("weight or bias is not a graph value")
        stride, padding, dilation, groups = a["stride"], a["padding"], a["dilation"], a["groups"]
    if padding == "valid":
        padding = 0
    if isinstance(padding, str):
        raise ValueError(f"padding={padding!r}")
    if not isinstance(groups, int):
        raise ValueError(f"groups is not an integer known at trace time ({groups!r})")
    return (weight, bias, _tuple(stride, n, "stride"), _tuple(padding, n, "padding"),
            _tuple(dilation, n, "dilation"), groups)


def _read_mul(node: Node, h: Node, modules) -> Tuple[Any, ...]:
    if node.kwargs or len(node.args) != 2:
        raise ValueError("not a call with two operands")
    a, b = node.args
    other = b if a is h else a
    if (a is h) == (b is h) or not isinstance(other, Node):
        raise ValueError("not the activation times another tensor")
    return (other,)


def _read_batch_norm(node: Node, modules) -> Tuple[Node, Tuple[Any, ...]]:
    """(z, (weight, bias, running_mean, running_var, eps)) of a BatchNorm call."""
    if node.op == "call_module":
        m, z = module_call_input(node, modules)
        attr = lambda n: None if getattr(m, n) is None else Attr(f"{node.target}.{n}")  # noqa: E731
        tensors = tuple(attr(n) for n in ("weight", "bias", "running_mean", "running_var"))
        eps = m.eps
    else:
        a = _bind(node, ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
                  {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5})
        z, tensors, eps = a["input"], (a["weight"], a["bias"], a["running_mean"], a["running_var"]), a["eps"]
        if not all(t is None or isinstance(t, Node) for t in tensors):
            raise ValueError("its weights or statistics are not graph values")
    if not isinstance(z, Node):
        raise ValueError("its input is a constant, not a graph value")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ValueError(f"eps is not a number known at trace time ({eps!r})")
    return z, (*tensors, float(eps))


def _read_group_norm(node: Node, modules) -> Tuple[Node, Tuple[Any, ...]]:
    """(z, (weight, bias, None, None, eps, groups)) of a GroupNorm call."""
    if node.op == "call_module":
        m, z = module_call_input(node, modules)
        attr = lambda n: None if getattr(m, n) is None else Attr(f"{node.target}.{n}")  # noqa: E731
        weight, bias, eps, groups = attr("weight"), attr("bias"), m.eps, m.num_groups
    else:
        a = _bind(node, ("input", "num_groups", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5})
        z, groups, weight, bias, eps = a["input"], a["num_groups"], a["weight"], a["bias"], a["eps"]
        if not all(t is None or isinstance(t, Node) for t in (weight, bias)):
            raise ValueError("its weight or bias is not a graph value")
    if not isinstance(z, Node):
        raise ValueError("its input is a constant, not a graph value")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ValueError(f"eps is not a number known at trace time ({eps!r})")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"num_groups is not a positive int known at trace time ({groups!r})")
    return z, (weight, bias, None, None, float(eps), groups)


def _gelu(approximate: str = "none") -> Tuple[str, float]:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate={approximate!r}")
    return ("gelu" if approximate == "none" else "gelu_tanh"), 0.0


def _alpha(name: str) -> Callable[..., Tuple[str, float]]:
    def encode(alpha: float = 1.0) -> Tuple[str, float]:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ValueError(f"alpha is not a number known at trace time ({alpha!r})")
        return name, float(alpha)
    return encode


def _plain(name: str) -> Callable[..., Tuple[str, float]]:
    return lambda: (name, 0.0)


def _layer_norm(normalized_shape: Any = None, weight: Any = None, bias: Any = None,
                eps: float = 1e-5) -> Tuple[str, float, Dict[str, Any]]:
    shape = [normalized_shape] if isinstance(normalized_shape, int) else normalized_shape
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ValueError(f"normalized_shape is not known at trace time ({normalized_shape!r})")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ValueError(f"eps is not a number known at trace time ({eps!r})")
    for name, t in (("weight", weight), ("bias", bias)):
        if not (t is None or isinstance(t, (Node, Attr))):
            raise ValueError(f"{name} is not a graph value ({type(t).__name__})")
    return "layer_norm", float(eps), {"norm_shape": list(shape), "norm_weight": weight, "norm_bias": bias}


def _check_bounds(min_val: float, max_val: float) -> None:
    if not min_val < max_val:
        raise ValueError(f"min_val={min_val}, max_val={max_val} (needs min_val < max_val)")


def _check_slope(negative_slope: float) -> None:
    if not (negative_slope >= 0 and math.isfinite(negative_slope)):
        raise ValueError(f"negative_slope={negative_slope} (the output's sign tells the branch only for a slope >= 0)")


# One entry per activation or consumer. Kind "output" first, then kind "recompute".
RULES: Tuple[Any, ...] = (
    Rule(
        name="softplus",
        op=torch.ops.graph_rewrite.softplus,
        params={"beta": 1.0, "threshold": 20.0},
        patterns=(nn.Softplus, F.softplus),
        check=_check_softplus,
        jit_ops=("aten::softplus",),
    ),
    Rule(
        name="sigmoid",
        op=torch.ops.graph_rewrite.sigmoid,
        # F.sigmoid is a Python function that FX traces into x.sigmoid().
        patterns=(nn.Sigmoid, torch.sigmoid, torch.special.expit, F.sigmoid, "sigmoid"),
        inplace=(torch.sigmoid_, "sigmoid_"),
        # torch.special.expit and F.sigmoid compile to aten::sigmoid too.
        jit_ops=("aten::sigmoid",),
        jit_inplace=("aten::sigmoid_",),
    ),
    Rule(
        name="logsigmoid",
        op=torch.ops.graph_rewrite.logsigmoid,
        patterns=(nn.LogSigmoid, F.logsigmoid),
        jit_ops=("aten::log_sigmoid",),
    ),
    # Hand-written spellings (torch.log(1 + torch.exp(x)), ...): matched as whole
    # subgraphs by graph_rewrite.spellings, not node by node, so no patterns here.
    Rule(name="spellings", op=None),
    Rule("hardtanh", torch.ops.graph_rewrite.hardtanh, {"min_val": -1.0, "max_val": 1.0},
         (nn.Hardtanh, F.hardtanh), check=_check_bounds,
         jit_ops=("aten::hardtanh",), jit_inplace=("aten::hardtanh_",)),
    # F.relu6(x) binds as hardtanh(x, 0, 6); nn.ReLU6 carries min_val/max_val itself.
    Rule("relu6", torch.ops.graph_rewrite.hardtanh, {"min_val": 0.0, "max_val": 6.0}, (nn.ReLU6, F.relu6),
         jit_ops=("aten::relu6",), jit_inplace=("aten::relu6_",)),
    Rule("leaky_relu", torch.ops.graph_rewrite.leaky_relu, {"negative_slope": 0.01},
         (nn.LeakyReLU, F.leaky_relu), check=_check_slope,
         jit_ops=("aten::leaky_relu",), jit_inplace=("aten::leaky_relu_",)),
    Recomputable("gelu", F.gelu, {"approximate": "none"}, (nn.GELU, F.gelu), _gelu),
    Recomputable("silu", F.silu, {}, (nn.SiLU, F.silu), _plain("silu")),
    Recomputable("hardswish", F.hardswish, {}, (nn.Hardswish, F.hardswish), _plain("hardswish")),
    Recomputable("mish", F.mish, {}, (nn.Mish, F.mish), _plain("mish")),
    # In place, native's ELU family takes its gradient from the output: those calls stay native.
    Recomputable("elu", F.elu, {"alpha": 1.0}, (nn.ELU, F.elu), _alpha("elu"), outplace=False),
    Recomputable("celu", F.celu, {"alpha": 1.0}, (nn.CELU, F.celu), _alpha("celu"), outplace=False),
    Recomputable("selu", F.selu, {}, (nn.SELU, F.selu), _plain("selu"), outplace=False),
    # LayerNorm keeps its input; the Linear after it (ViT's MLP, ConvNeXt's pwconv1) can too, and so can
    # the convolution after a LayerNorm2d (layer_norm of a permute, permuted back).
    Recomputable("layer_norm", F.layer_norm, {"normalized_shape": None, "weight": None, "bias": None, "eps": 1e-5},
                 (nn.LayerNorm, F.layer_norm), _layer_norm, consumers=("linear", "conv")),
    Consumer("linear", torch.ops.graph_rewrite.recompute_linear, (nn.Linear, F.linear), _read_linear, gated=True),
    Consumer("conv", torch.ops.graph_rewrite.recompute_conv,
             (nn.Conv1d, nn.Conv2d, nn.Conv3d, F.conv1d, F.conv2d, F.conv3d), _read_conv),
    Consumer("mul", torch.ops.graph_rewrite.recompute_mul, (operator.mul, torch.mul, "mul"), _read_mul),
    Norm("batch_norm", torch.ops.graph_rewrite.norm_act,
         (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, F.batch_norm), _read_batch_norm),
    Norm("group_norm", torch.ops.graph_rewrite.norm_act, (nn.GroupNorm, F.group_norm), _read_group_norm),
    # LLaMA's, Qwen2's, Mistral's, Gemma's RMSNorm: casts, pow, a mean, rsqrt, products.
    CheapModule("cheap_norm",
                methods=frozenset({"to", "float", "half", "bfloat16", "type", "type_as", "pow", "mean", "rsqrt",
                                   "sqrt", "mul", "add", "sub", "div", "neg", "reciprocal"}),
                functions=frozenset({operator.add, operator.mul, operator.sub, operator.truediv, operator.neg,
                                     torch.rsqrt, torch.sqrt, torch.mean, torch.pow, torch.mul, torch.add, getattr}),
                reductions=frozenset({"mean", torch.mean})),
    # GPT-2's and T5's gelu_new (tanh-GELU), FastGELU, QuickGELU (x * sigmoid(1.702 x)) written out.
    CheapModule("cheap_activation",
                methods=frozenset({"mul", "add", "sub", "div", "pow", "tanh", "sigmoid", "erf", "neg"}),
                functions=frozenset({operator.add, operator.mul, operator.sub, operator.truediv, operator.neg,
                                     operator.pow, torch.tanh, torch.sigmoid, torch.erf, torch.pow, torch.mul,
                                     torch.add}),
                saves_input=True),
)

KINDS = ("output", "recompute", "norm")


def rules_for(ops: Optional[Sequence[str]]) -> Tuple[Any, ...]:
    """The rules named in ``ops``, by rule name or kind (all of them for ``None``).

    Unknown names raise ``ValueError``. Kind ``"recompute"`` needs both halves: naming
    only activations (``["gelu"]``) brings every consumer, and naming only consumers
    (``["linear"]``) brings every recomputable activation. Kind ``"norm"`` works on the
    recomputable activations: naming it alone brings kind ``"recompute"`` along.

    >>> [r.name for r in rules_for(["relu6", "gelu"])][:3]
    ['relu6', 'gelu', 'linear']
    """
    if ops is None:
        return RULES
    if isinstance(ops, str):
        ops = [ops]
    known = {r.name: r for r in RULES}
    unknown = [o for o in ops if o not in known and o not in KINDS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; choose from {sorted(known)} or a kind {list(KINDS)}")
    chosen = {}
    for o in ops:
        for r in (r for r in RULES if r.kind == o) if o in KINDS else (known[o],):
            chosen.setdefault(r.name, r)
    picked = tuple(chosen.values())
    if any(isinstance(r, Norm) for r in picked) and not any(isinstance(r, Recomputable) for r in picked):
        picked += tuple(r for r in RULES if isinstance(r, Recomputable))
    for half, other in ((Recomputable, Consumer), (Consumer, Recomputable)):
        if any(isinstance(r, half) for r in picked) and not any(isinstance(r, other) for r in picked):
            picked += tuple(r for r in RULES if isinstance(r, other))
    return picked


def is_match(node: Node, pattern: Pattern, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``node`` is a call of ``pattern`` (module type, callable or method name).

    Module types match exactly, not by ``isinstance``: a subclass may override ``forward``.
    """
    if isinstance(pattern, type):
        return (
            node.op == "call_module"
            and isinstance(node.target, str)
            and type(modules.get(node.target)) is pattern
        )
    if isinstance(pattern, str):
        return node.op == "call_method" and node.target == pattern
    return node.op == "call_function" and node.target is pattern


@functools.lru_cache(maxsize=None)
def pattern_name(pattern: Pattern) -> str:
    """A readable name for a pattern: ``nn.Softplus``, ``F.softplus``, ``Tensor.sigmoid``."""
    if isinstance(pattern, str):
        return f"Tensor.{pattern}"
    if isinstance(pattern, type):
        return f"nn.{pattern.__name__}" if pattern.__module__.startswith("torch.nn") else pattern.__qualname__
    namespaces = (("F", F), ("torch", torch), ("torch.special", torch.special), ("Tensor", torch.Tensor))
    for prefix, namespace in namespaces:
        for name in dir(namespace):
            if getattr(namespace, name, None) is pattern:
                return f"{prefix}.{name}"
    return getattr(pattern, "__qualname__", repr(pattern))
