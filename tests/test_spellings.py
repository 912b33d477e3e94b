"""Hand-written spellings: rewritten to the op they spell, listed apart."""
import math
import warnings

import mpmath
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graph_rewrite
from graph_rewrite import optimize
from graph_rewrite.memory import saved_bytes
from graph_rewrite.spellings import SPELLINGS

lean = torch.ops.graph_rewrite


class Block(nn.Module):
    """Linear -> spelling -> Linear: the second Linear keeps the activation's output."""

    def __init__(self, fn, width=256):
        super().__init__()
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)
        self.fn = fn

    def forward(self, x):
        return self.b(self.fn(self.a(x)))


# Written the ways users write them: functions, methods, either operand order, 1 or 1.0.
WRITTEN = [
    ("torch.log(1 + torch.exp(x))", lambda x: torch.log(1 + torch.exp(x)), lean.softplus, "softplus"),
    ("(x.exp() + 1.0).log()", lambda x: (x.exp() + 1.0).log(), lean.softplus, "softplus"),
    ("torch.log1p(torch.exp(x))", lambda x: torch.log1p(torch.exp(x)), lean.softplus, "softplus"),
    ("1 / (1 + torch.exp(-x))", lambda x: 1 / (1 + torch.exp(-x)), lean.sigmoid, "sigmoid"),
    ("1.0 / (torch.exp(-x) + 1)", lambda x: 1.0 / (torch.exp(-x) + 1), lean.sigmoid, "sigmoid"),
    ("-F.softplus(-x)", lambda x: -F.softplus(-x), lean.logsigmoid, "logsigmoid"),
    ("-F.softplus(-x, 1, 20)", lambda x: -F.softplus(-x, 1, 20), lean.logsigmoid, "logsigmoid"),
    ("x * torch.sigmoid(x)", lambda x: x * torch.sigmoid(x), F.silu, None),
    ("torch.sigmoid(x) * x", lambda x: torch.sigmoid(x) * x, F.silu, None),
]
IDS = [w[0] for w in WRITTEN]


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


@pytest.mark.parametrize("text,fn,op,rule", WRITTEN, ids=IDS)
def test_each_spelling_becomes_its_op_and_is_listed_apart(text, fn, op, rule):
    model = Block(fn, 8)
    gm = optimize(model)
    targets = _targets(gm)
    assert op in targets and not {torch.exp, torch.log, torch.log1p, "exp", "log"} & set(targets), gm.code
    report = gm.rewrite_report
    # Kind "recompute" may then rewrite the Linear after a spelled SiLU.
    assert len(report.spellings) == 1 and all(r.kind == "recompute" for r in report.replaced)
    assert report.spellings[0].changes and report.spellings[0].original in {s.name for s in SPELLINGS}
    assert "what changes" in str(report)
    x = torch.randn(16, 8)
    torch.testing.assert_close(gm(x), model(x))  # ordinary inputs: rounding-level differences


def _same_weights(model, gm):
    model.load_state_dict(gm.state_dict())
    return gm


@pytest.mark.parametrize("text,fn,op,rule", WRITTEN, ids=IDS)
def test_verify_passes_on_ordinary_inputs(text, fn, op, rule):
    torch.manual_seed(0)
    model = Block(fn, 32)
    report = graph_rewrite.verify(model, optimize(model), torch.randn(8, 32))
    assert report.ok, str(report)


@pytest.mark.parametrize("text,fn,op,rule", WRITTEN, ids=IDS)
def test_ops_can_turn_them_off(text, fn, op, rule):
    others = [r.name for r in graph_rewrite.RULES if r.name != "spellings"]
    for ops in (others, [rule] if rule else ["softplus"]):
        gm = optimize(Block(fn, 8), ops=ops)
        assert not gm.rewrite_report.spellings and op not in _targets(gm)
    # The spelling's op must be enabled too: "spellings" alone maps only to native ops.
    gm = optimize(Block(fn, 8), ops=["spellings"])
    assert bool(gm.rewrite_report.spellings) == (rule is None)


def test_intermediates_with_other_users_are_left_alone():
    def reuse(x):
        e = torch.exp(x)
        return torch.log(1 + e) + e  # exp(x) is needed anyway

    def reuse_sigmoid(x):
        s = torch.sigmoid(x)
        return x * s + s

    for fn in (reuse, reuse_sigmoid):
        gm = optimize(Block(fn, 8))
        assert not gm.rewrite_report.spellings, gm.code
        x = torch.randn(4, 8)
        torch.testing.assert_close(gm(x), _same_weights(Block(fn, 8), gm)(x), rtol=0, atol=0)


def test_softplus_with_other_arguments_is_not_logsigmoid():
    gm = optimize(Block(lambda x: -F.softplus(-x, beta=2.0), 8))
    assert not gm.rewrite_report.spellings
    # The softplus rule judges the call itself: nothing keeps its output, so it stays native.
    assert [r.original for r in gm.rewrite_report.left_alone if "saves nothing" in r.reason] == ["F.softplus"]


@pytest.mark.parametrize("text,fn,op,rule", [w for w in WRITTEN if w[3] != "logsigmoid" and w[3]], ids=lambda v: v if isinstance(v, str) else "")
def test_finite_gradients_where_the_spelling_overflows(text, fn, op, rule):
    # float32 exp(89) = inf: log(1 + inf) backward is inf * 0 = NaN, 1 / (1 + inf) likewise.
    x = torch.tensor([-89.0, -100.0, -30.0, 0.0, 30.0, 89.0, 100.0], requires_grad=True)
    (g_native,) = torch.autograd.grad(fn(x).sum(), x)
    assert not torch.isfinite(g_native).all()
    rewritten = optimize(Block(fn, 7))
    (g,) = torch.autograd.grad(_only_activation(rewritten, x).sum(), x)
    assert torch.isfinite(g).all()
    native = F.softplus if rule == "softplus" else torch.sigmoid
    expected = torch.autograd.grad(native(x).sum(), x)[0]
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=0)


def _only_activation(gm, t):
    # The rewritten graph between the two Linears, applied to t: run the block with
    # identity weights and no bias.
    with torch.no_grad():
        for lin in (gm.a, gm.b):
            lin.weight.copy_(torch.eye(lin.in_features))
            lin.bias.zero_()
    return gm(t.unsqueeze(0)).squeeze(0)


def test_logsigmoid_spelling_gradient_matches_50_digit_reference():
    x = torch.tensor([-100.0, -30.0, -1.0, 0.0, 1.0, 30.0, 100.0], dtype=torch.float64, requires_grad=True)
    gm = optimize(Block(lambda t: -F.softplus(-t), 7).double())
    (g,) = torch.autograd.grad(_only_activation(gm, x).sum(), x)
    mpmath.mp.dps = 50
    ref = torch.tensor([float(1 / (1 + mpmath.exp(mpmath.mpf(v)))) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(g, ref, rtol=1e-15, atol=0)


@pytest.mark.parametrize("text,fn,op,rule,native_mib,lean_mib", [
    ("torch.log(1 + torch.exp(x))", WRITTEN[0][1], None, None, 0.75, 0.25),
    ("torch.log1p(torch.exp(x))", WRITTEN[2][1], None, None, 0.50, 0.25),
    ("1 / (1 + torch.exp(-x))", WRITTEN[3][1], None, None, 0.75, 0.25),
    ("-F.softplus(-x)", WRITTEN[5][1], None, None, 0.50, 0.25),
    # F.silu, then the Linear after it recomputes it: only the SiLU input is kept.
    ("x * torch.sigmoid(x)", WRITTEN[7][1], None, None, 0.75, 0.25),
], ids=lambda v: v if isinstance(v, str) else "")
def test_memory_on_linear_spelling_linear(text, fn, op, rule, native_mib, lean_mib):
    model = Block(fn)  # 256 x 256 float32 activations: 0.25 MiB each
    rewritten = optimize(model)
    x = torch.randn(256, 256)
    exclude = [x, *model.parameters()]
    before, _ = saved_bytes(lambda: model(x), exclude=exclude)
    after, _ = saved_bytes(lambda: rewritten(x), exclude=exclude)
    assert (before / 2**20, after / 2**20) == (native_mib, lean_mib)


def test_compile_export_and_script_of_a_rewritten_spelling():
    torch.manual_seed(0)
    model = Block(lambda x: torch.log(1 + torch.exp(x)) + 1 / (1 + torch.exp(-x)) + x * torch.sigmoid(x), 8)
    rewritten = optimize(model)
    assert len(rewritten.rewrite_report.spellings) == 3
    x = torch.randn(4, 8)
    expected = rewritten(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(torch.jit.script(rewritten)(x), expected)
        torch.testing.assert_close(torch.compile(rewritten, fullgraph=True, backend="aot_eager")(x), expected)
        ep = torch.export.export(rewritten, (x,))
    torch.testing.assert_close(ep.module()(x), expected)
