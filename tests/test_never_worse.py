"""Valid programs run as natively: in-place changes after a rewrite, views, out= writes, meta, empty layers.

Each case once crashed or gave other values than native. The expectation is always
native PyTorch on the same model and inputs, in float64: bitwise where the call is
left native or the rule promises it, and to a few ulps for the output-based slopes of
softplus and logsigmoid.
"""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graph_rewrite

warnings.filterwarnings("ignore", module="graph_rewrite")

# Their lean slope is computed from the output: a few ulps from native's, never bitwise.
OUTPUT_BASED = (nn.Softplus, nn.LogSigmoid)


def _grads(model, x, out_fn=lambda y: y.sum()):
    """(outputs, input gradient, parameter gradients) of one forward and backward, grads cleared after."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = model(x)
    out_fn(y).backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return y.detach(), None if x.grad is None else x.grad.clone(), grads


def _assert_same(native, lean, exact=True):
    for a, b in zip(native, lean):
        if isinstance(a, list):
            _assert_same(a, b, exact)
        elif a is None or b is None:
            assert a is None and b is None
        elif exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def _reasons(lean):
    return " | ".join(r.reason for r in lean.rewrite_report.left_alone)


# ------------------------------------------------------------------ output changed in place afterwards
class ChangedAfter(nn.Module):
    """``out = act(linear(x))``, then ``out`` changed in place in one of several ways."""

    def __init__(self, act: nn.Module, how: str, untraceable: bool = False) -> None:
        super().__init__()
        self.fc, self.act, self.how, self.untraceable = nn.Linear(8, 8), act, how, untraceable

    def forward(self, x):
        if self.untraceable and x.sum() > 1e30:  # data-dependent branch: FX cannot trace this forward
            return x
        out = self.act(self.fc(x))
        if self.how == "iadd":
            out += x
        elif self.how == "view":
            out[0].add_(1.0)
        elif self.how == "setitem":
            out[1] = 0.5
        elif self.how == "relu_inplace":
            F.relu(out, inplace=True)
        elif self.how == "method":
            out.mul_(2.0)
        return self.fc(out)  # keeps out: the lean op's output is kept anyway


ACTS = [nn.ReLU6(), nn.Hardtanh(-2.0, 2.0), nn.LeakyReLU(0.1), nn.Softplus(), nn.LogSigmoid()]
HOWS = ["iadd", "view", "relu_inplace", "method"]  # FX traces these; item assignment it cannot


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("act", ACTS, ids=lambda a: type(a).__name__)
def test_fx_leaves_an_activation_whose_output_is_changed_later_native(act, how):
    torch.manual_seed(0)
    model = ChangedAfter(act, how).double()
    lean = graph_rewrite.optimize(model)
    assert lean.rewrite_report.counts() == {}
    assert "changed in place" in _reasons(lean)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    _assert_same(_grads(model, x), _grads(lean, x))


@pytest.mark.parametrize("how", HOWS + ["setitem"])
@pytest.mark.parametrize("act", ACTS, ids=lambda a: type(a).__name__)
def test_runtime_front_end_keeps_what_an_in_place_change_needs(act, how):
    torch.manual_seed(0)
    # float32 for softplus: in float64 its lean op keeps a branch mask, which the runtime front end
    # does not risk (it cannot see whether a later use keeps the output).
    dtype = torch.float32 if isinstance(act, nn.Softplus) else torch.float64
    model = ChangedAfter(act, how, untraceable=True).to(dtype)
    lean = graph_rewrite.optimize(model)
    x = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    native = _grads(model, x)
    got = _grads(lean, x)
    assert sum(lean.rewrite_report.counts().values()) == 1  # rewritten, and still right
    if dtype == torch.float32:  # a few float32 ulps (the slope from the output)
        for a, b in zip(native[1:], got[1:]):
            for p, q in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert torch.equal(native[0], got[0])
    else:
        _assert_same(native, got, exact=not isinstance(act, OUTPUT_BASED))


def test_runtime_front_end_still_saves_where_nothing_changes_the_output():
    model = ChangedAfter(nn.ReLU6(), "none", untraceable=True)
    lean = graph_rewrite.optimize(model)
    x = torch.randn(64, 8, requires_grad=True)
    native_bytes, _ = graph_rewrite.memory.saved_bytes(lambda: model(x))
    lean_bytes, _ = graph_rewrite.memory.saved_bytes(lambda: lean(x))
    assert lean_bytes < native_bytes


def test_sigmoid_spelling_changed_later_behaves_as_native():
    class Spelled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            y = 1 / (1 + torch.exp(-self.fc(x)))
            y += x
            return y

    model = Spelled().double()
    lean = graph_rewrite.optimize(model, ops=["spellings", "sigmoid"])
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    assert lean.rewrite_report.spellings == []
    try:
        native = _grads(model, x)
    except RuntimeError as e:
        with pytest.raises(RuntimeError, match=str(e).split(":")[0]):
            _grads(lean, x)
    else:
        _assert_same(native, _grads(lean, x))


# ------------------------------------------------------------------ recompute consumers
class Block3d(nn.Module):
    """A transformer-style MLP on (batch, tokens, features) whose output is then changed in place."""

    def __init__(self, tail: str) -> None:
        super().__init__()
        self.fc1, self.fc2, self.tail = nn.Linear(8, 16), nn.Linear(16, 8), tail
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.fc2(F.gelu(self.fc1(x)))
        if self.tail == "iadd":
            h += x
        else:
            h = self.relu(h)
        return h


@pytest.mark.parametrize("tail", ["iadd", "relu_inplace"])
def test_recomputing_linear_on_3d_input_may_be_changed_in_place(tail):
    torch.manual_seed(0)
    model = Block3d(tail).double()
    lean = graph_rewrite.optimize(model)
    assert lean.rewrite_report.counts() == {"graph_rewrite.recompute_linear": 1}
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    _assert_same(_grads(model, x), _grads(lean, x))


def test_out_write_into_an_activation_before_its_linear_is_seen():
    class OutWrite(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = F.gelu(x)
            torch.add(h, 1.0, out=h)  # allowed: x needs no grad, so h has no graph yet
            return self.fc(h)

    torch.manual_seed(0)
    model = OutWrite().double()
    lean = graph_rewrite.optimize(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    assert lean.rewrite_report.counts() == {}
    _assert_same(_grads(model, x), _grads(lean, x))


def test_activation_input_changed_after_its_consumer_is_left_native():
    class ChangedInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            z = self.a(x)
            y = self.b(F.gelu(z))
            z.add_(1.0)  # fine natively: z needs no grad, so GELU kept nothing of it
            return y

    model = ChangedInput().double()
    model.a.requires_grad_(False)
    lean = graph_rewrite.optimize(model)
    assert lean.rewrite_report.counts() == {}
    assert "changed in place" in _reasons(lean)
    x = torch.randn(3, 4, dtype=torch.float64)
    _assert_same(_grads(model, x), _grads(lean, x))


def test_two_backward_passes_through_norm_activation_and_linear():
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.fc = nn.BatchNorm1d(8), nn.Linear(8, 3)

        def forward(self, x):
            a = F.silu(self.bn(x))
            return self.fc(a), a.mean()

    torch.manual_seed(0)
    model = Chain().double()
    lean = graph_rewrite.optimize(model)
    assert lean.rewrite_report.counts() == {"graph_rewrite.norm_act": 1, "graph_rewrite.recompute_linear": 1}
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    grads = []
    for m in (model, lean):
        y, aux = m(x)
        aux.backward()  # frees the activation's and BatchNorm's saved tensors
        grads.append(torch.autograd.grad(y.sum(), m.fc.weight)[0])
    assert torch.equal(*grads)


@pytest.mark.parametrize("act", [nn.ELU, nn.CELU, nn.SELU])
def test_in_place_elu_family_keeps_natives_bits(act):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), act(inplace=True), nn.Linear(64, 4)).double()
    lean = graph_rewrite.optimize(model)
    x = torch.randn(512, 16, dtype=torch.float64, requires_grad=True)
    _assert_same(_grads(model, x), _grads(lean, x))


# ------------------------------------------------------------------ devices and shapes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_meta_device_runs_forward_and_backward(dtype):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.Conv2d(4, 4, 1), nn.Softplus(),
                          nn.LogSigmoid(), nn.Hardtanh(), nn.LeakyReLU(), nn.Flatten(), nn.Linear(144, 8), nn.GELU(),
                          nn.Linear(8, 2)).to("meta", dtype)
    lean = graph_rewrite.optimize(model)
    assert sum(lean.rewrite_report.counts().values()) >= 5
    x = torch.randn(2, 3, 8, 8, device="meta", dtype=dtype, requires_grad=True)
    y = lean(x)
    y.sum().backward()
    assert y.shape == model(x).shape and y.dtype == dtype and x.grad.shape == x.shape


@pytest.mark.parametrize("shape", [(2, 4), (2, 3, 4), (0, 4), (4,)])
def test_zero_width_layers(shape):
    torch.manual_seed(0)
    for model in (nn.Sequential(nn.Linear(4, 0), nn.GELU(), nn.Linear(0, 3)),
                  nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 0), nn.SiLU(), nn.Linear(0, 3))):
        model = model.double()
        lean = graph_rewrite.optimize(model)
        assert "graph_rewrite.recompute_linear" in lean.rewrite_report.counts()
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        _assert_same(_grads(model, x), _grads(lean, x))
