"""Every rule kind in the runtime front end (code FX cannot trace), call by call, exactly.

A consumer (Linear, Conv, mul) of a fresh output keeps what made it; an activation on a fresh
BatchNorm/GroupNorm output keeps the norm's input. Expectations are native PyTorch on the same
model: outputs, gradients and running statistics bit for bit, held bytes measured both ways.
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graph_rewrite
from graph_rewrite.memory import saved_bytes

warnings.filterwarnings("ignore", module="graph_rewrite")


def _no_trace(x):
    """A data-dependent branch: FX can trace neither the module that calls it nor its caller."""
    return x.sum() > 1e30


class Untraceable(nn.Module):
    """``body`` under a root FX cannot trace; ``body`` cannot be traced on its own either
    (each calls :func:`_no_trace`), so the runtime front end runs every call."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        if _no_trace(x):
            return x
        return self.body(x)


class GroupNormBlock(nn.Module):  # diffusers' ResnetBlock2D: GroupNorm -> SiLU -> Conv, twice
    def __init__(self):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(4, 16), nn.Conv2d(16, 16, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(4, 16, affine=False), nn.Conv2d(16, 16, 3, padding=1, bias=False)

    def forward(self, x):
        if _no_trace(x):
            return x
        h = self.c1(F.silu(self.n1(x * 2.0)))  # a fresh input, held by GroupNorm's node only
        return x + self.c2(F.silu(self.n2(h)))


class BatchNormBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.c = nn.BatchNorm2d(16), nn.Conv2d(16, 16, 1)

    def forward(self, x):
        if _no_trace(x):
            return x
        return self.c(nn.functional.hardswish(self.bn(x)))


class LayerNormLinear(nn.Module):  # a transformer's LayerNorm -> q, k, v
    def __init__(self):
        super().__init__()
        self.ln, self.q, self.k = nn.LayerNorm(16), nn.Linear(16, 16), nn.Linear(16, 8, bias=False)

    def forward(self, x):
        if _no_trace(x):
            return x
        t = x.flatten(2).transpose(1, 2)
        h = self.ln(t * 2.0)  # its input is held by LayerNorm's node only (under saved_bytes' hooks, an alias)
        q = self.q(h).sum(-1)
        k = self.k(h).sum(-1)  # another call site
        return q + k + h.sum(-1)  # the sum keeps nothing


class GatedMLP(nn.Module):  # LLaMA's MLP written inline: down(silu(gate(x)) * up(x))
    def __init__(self):
        super().__init__()
        self.g, self.u, self.d = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        if _no_trace(x):
            return x
        t = x.flatten(2).transpose(1, 2)
        return self.d(self.u(t) * F.silu(self.g(t)))  # the activation second: mul is read both ways


class Conv1DMLP(nn.Module):
    """Hugging Face's Conv1D (GPT-2): torch.addmm(bias, h.view(-1, k), weight), weight laid out (k, n).
    The second weight is column-major (a transposed parameter): native's weight gradient then
    takes another matrix-product order, which the lean op must follow."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(16, 32) / 4), nn.Parameter(torch.randn(32))
        self.w2, self.b2 = nn.Parameter(torch.randn(16, 32) / 6), nn.Parameter(torch.randn(16))
        self.w3, self.b3 = nn.Parameter(torch.randn(32, 8) / 6), nn.Parameter(torch.randn(8))

    def forward(self, x):
        if _no_trace(x):
            return x
        t = x.flatten(2).transpose(1, 2).reshape(-1, 16)
        h = F.gelu(torch.addmm(self.b1, t, self.w1).view(x.shape[0], -1, 32))
        a = torch.addmm(self.b2, h.view(-1, 32), self.w2.t())  # column-major weight
        b = torch.addmm(self.b3, h.view(-1, 32), self.w3)
        return a.sum(-1) + b.sum(-1)


BODIES = {"group_norm": GroupNormBlock, "batch_norm": BatchNormBlock, "layer_norm": LayerNormLinear,
          "gated": GatedMLP, "addmm": Conv1DMLP}
EXPECTED = {  # what the report lists, by lean op
    "group_norm": {"graph_rewrite.norm_act": 2, "graph_rewrite.recompute_conv": 2},
    "batch_norm": {"graph_rewrite.norm_act": 1, "graph_rewrite.recompute_conv": 1},
    "layer_norm": {"graph_rewrite.recompute_linear": 2},
    "gated": {"graph_rewrite.recompute_mul": 1, "graph_rewrite.recompute_linear": 1},
    "addmm": {"graph_rewrite.recompute_linear": 2},
}
# Bytes no longer held, float64, batch 2 x 16 x 4 x 4: per freed tensor 2*16*16*8 (or 2*16*32*8 for the MLP).
FREED = {"group_norm": 4 * 4096, "batch_norm": 2 * 4096, "layer_norm": 4096, "gated": 2 * 8192, "addmm": 8192}


def _step(model, x, autocast=False):
    """(output, x's gradient, parameter gradients, buffers) of one step; under CPU bfloat16 autocast if asked."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    (y.float() if autocast else y).pow(2).sum().backward()
    out = (y.detach(), x.grad.clone(), [p.grad.clone() for p in model.parameters()],
           [b.clone() for b in model.buffers()])
    model.zero_grad(set_to_none=True)
    x.grad = None
    return out


@pytest.mark.parametrize("name", list(BODIES))
def test_runtime_front_end_applies_every_kind_exactly(name):
    torch.manual_seed(0)
    model = Untraceable(BODIES[name]()).double().train()
    lean = graph_rewrite.optimize(model)
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64, requires_grad=True)
    exclude = [*model.parameters(), *model.buffers(), x]
    before, _ = saved_bytes(lambda: model(x), exclude=exclude)
    after, _ = saved_bytes(lambda: lean(x), exclude=exclude)
    assert all(r.node == "-" for r in lean.rewrite_report.replaced)  # by the runtime front end, not FX
    twin = copy.deepcopy(model)  # as many BatchNorm updates as lean so far; one step each from here
    assert before - after == FREED[name], (before, after)
    assert lean.rewrite_report.counts() == EXPECTED[name]
    a, b = _step(twin, x), _step(lean, x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(p, q) for p, q in zip(a[2], b[2]))
    assert all(torch.equal(p, q) for p, q in zip(a[3], b[3]))


@pytest.mark.parametrize("name", list(BODIES))
def test_runtime_kinds_gradcheck_and_gradgradcheck(name):
    torch.manual_seed(0)
    lean = graph_rewrite.optimize(Untraceable(BODIES[name]()).double().eval())
    x = torch.randn(1, 16, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lean, (x,))
    assert torch.autograd.gradgradcheck(lean, (x,))


class NormOutputUsedTwice(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.n, self.c, self.how = nn.GroupNorm(4, 16), nn.Conv2d(16, 16, 1), how

    def forward(self, x):
        if _no_trace(x):
            return x
        h = self.n(x)
        if self.how == "inplace":
            return self.c(F.silu(h, inplace=True))  # native: silu_ changes h
        a = F.silu(h)
        if self.how == "kept":
            return self.c(a) * h  # h kept by the product anyway
        return self.c(a) + h


@pytest.mark.parametrize("how", ["inplace", "kept", "added"])
def test_norm_outputs_with_other_uses_stay_exact_and_never_cost_more(how):
    torch.manual_seed(0)
    model = Untraceable(NormOutputUsedTwice(how)).double()
    lean = graph_rewrite.optimize(model)
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64, requires_grad=True)
    exclude = [*model.parameters(), x]
    before, _ = saved_bytes(lambda: model(x), exclude=exclude)
    after, _ = saved_bytes(lambda: lean(x), exclude=exclude)
    assert after <= before
    if how == "inplace":
        assert "graph_rewrite.norm_act" not in lean.rewrite_report.counts()
    a, b = _step(model, x), _step(lean, x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(p, q) for p, q in zip(a[2], b[2]))


def test_a_consumer_written_with_out_still_protects_a_lean_output():
    # torch.mul(a, b, out=y) where y is a lean ReLU6 output (torch.mul is a consumer the mode
    # reads now): the op must keep a copy of y first, as for any other call with out=.
    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            if _no_trace(x):
                return x
            y = F.relu6(self.fc(x))
            z = y * 1.0
            with torch.no_grad():  # an out= write into a tensor that requires grad needs no_grad
                torch.mul(x, x, out=y)
            return z + y

    torch.manual_seed(0)
    model = Untraceable(Body()).double()
    lean = graph_rewrite.optimize(model)
    x = 4 * torch.randn(4, 8, dtype=torch.float64)  # some above 6
    grads = []
    for m in (model, lean):
        m(x).sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
        m.zero_grad(set_to_none=True)
    assert all(torch.equal(p, q) for p, q in zip(*grads))
    assert lean.rewrite_report.counts() == {"graph_rewrite.relu6": 1}


def test_fx_group_norm_then_activation_is_the_norm_kind():
    torch.manual_seed(0)
    class Traceable(GroupNormBlock):
        def forward(self, x):
            h = self.c1(F.silu(self.n1(x)))
            return x + self.c2(F.silu(self.n2(h)))

    model = Traceable().double()
    lean = graph_rewrite.optimize(model)
    assert lean.rewrite_report.tracing == "whole model"
    assert lean.rewrite_report.counts() == EXPECTED["group_norm"]
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64, requires_grad=True)
    before, _ = saved_bytes(lambda: model(x), exclude=[*model.parameters(), x])
    after, _ = saved_bytes(lambda: lean(x), exclude=[*model.parameters(), x])
    assert before - after == FREED["group_norm"]
    a, b = _step(model, x), _step(lean, x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(p, q) for p, q in zip(a[2], b[2]))
