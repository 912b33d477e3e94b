"""The runtime front end: code torch.fx cannot trace is rewritten as it runs."""
import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

import graph_rewrite
from demos.works_on import NATIVE, CountOps

def optimize_quietly(model, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lean = graph_rewrite.optimize(model, **kw)
    return lean, [str(w.message) for w in caught]


class RNN(nn.Module):
    """A hand-written recurrent loop: ``torch.zeros(x.shape[0], H)`` for the state, or
    ``x.new_zeros`` (which FX traces) and then ``range(x.size(1))``, which it cannot."""

    def __init__(self, d=8, h=16, new_zeros=False):
        super().__init__()
        self.h, self.new_zeros = h, new_zeros
        self.inp, self.rec = nn.Linear(d, 3 * h), nn.Linear(h, 3 * h)
        self.out = nn.Linear(h, 2)

    def forward(self, x):
        if self.new_zeros:
            state = x.new_zeros(x.shape[0], self.h)
        else:
            state = torch.zeros(x.shape[0], self.h, dtype=x.dtype)
        for t in range(x.size(1)):
            i, f, c = (self.inp(x[:, t]) + self.rec(state)).chunk(3, dim=-1)
            state = torch.sigmoid(f) * state + F.softplus(i, beta=2.0) * torch.tanh(c)
        return F.logsigmoid(self.out(state))


class Gate(nn.Module):
    """Traceable on its own; used inside a root FX cannot trace."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.act = nn.Softplus()

    def forward(self, x, scale=None):  # not annotated: the FX fallback leaves it alone
        return self.act(self.lin(x)) * (1 if scale is None else scale)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.head = nn.Linear(8, 8)

    def forward(self, x):
        h = self.gate(x)
        if h.sum() > 0:  # data-dependent: FX cannot trace the root
            h = x.sigmoid() * h
        return F.logsigmoid(self.head(h))


def test_untraceable_root_runs_under_the_runtime_front_end():
    torch.manual_seed(0)
    model = Branchy()
    lean, caught = optimize_quietly(model)
    assert type(lean) is Branchy and lean is not model
    assert any("could not trace <root>" in w and "runtime front end" in w for w in caught)
    assert "co_varnames" not in caught[0] and "swapped" not in caught[0]
    x = torch.randn(4, 8).abs()  # h.sum() > 0 takes the branch
    with CountOps() as native:
        y_native = model(x.requires_grad_())
    with CountOps() as ops:
        y = lean(x)
    assert (native.native, native.lean) == (3, 0)
    assert (ops.native, ops.lean) == (0, 3)
    torch.testing.assert_close(y, y_native, rtol=0, atol=0)
    rows = {(r.where, r.original, r.lean_op) for r in lean.rewrite_report.replaced}
    assert rows == {("gate.act", "F.softplus", "graph_rewrite.softplus"),
                    ("<root>", "Tensor.sigmoid", "graph_rewrite.sigmoid"),
                    ("<root>", "F.logsigmoid", "graph_rewrite.logsigmoid")}
    sites = {r.original: r.site for r in lean.rewrite_report.replaced}
    assert sites["Tensor.sigmoid"].endswith(f"test_runtime.py:{Branchy.forward.__code__.co_firstlineno + 3}")
    assert "call site" in str(lean.rewrite_report)
    assert list(lean.state_dict()) == list(model.state_dict())


def test_the_original_and_global_torch_are_untouched():
    model = Branchy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lean, _ = optimize_quietly(model)
    x = torch.randn(4, 8).abs()
    lean(x.requires_grad_()).sum().backward()
    assert "forward" not in model.__dict__ and "forward" not in model.gate.__dict__
    assert torch._C._len_torch_function_stack() == 0  # no mode left active
    with CountOps() as ops:
        model(x)
        F.softplus(x)
    assert (ops.native, ops.lean) == (4, 0)
    assert F.softplus is torch._C._nn.softplus and torch.sigmoid.__name__ == "sigmoid"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("new_zeros,fx_message", [(False, "zeros() takes 1 positional argument"),
                                                  (True, "cannot be interpreted as an integer")])
def test_rnn_loops_are_reached_and_save_exactly_the_softplus_and_logsigmoid_inputs(new_zeros, fx_message):
    torch.manual_seed(0)
    model = RNN(new_zeros=new_zeros)
    lean, caught = optimize_quietly(model)
    reason = lean.rewrite_report.uncovered[0].reason
    assert fx_message in reason and "tensor size" in reason  # FX's message, and what causes it
    x = torch.randn(4, 5, 8)
    report = graph_rewrite.verify(model, lean, x, reference64=True)
    assert report.ok, str(report)
    # Native softplus keeps its input, i: a view of the chunked 4x48 sum, so the whole
    # sum's storage (768 B), which nothing else keeps (sigmoid and tanh keep their outputs).
    # Native logsigmoid (CPU) keeps its 4x2 input and a same-sized buffer. The lean ops keep
    # their outputs, which the next mul and the caller keep anyway.
    inputs = 5 * (4 * 48 * 4) + 2 * (4 * 2 * 4)
    before, after = report.activation_bytes
    assert before - after == inputs
    with CountOps() as ops:
        lean(x.requires_grad_())
    assert ops.native == 0 and ops.lean == 5 * 2 + 1  # sigmoid and softplus per step, logsigmoid


def test_inplace_and_non_float_calls_are_left_alone_and_reported():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, steps):
            h = self.lin(x)
            for _ in range(int(steps)):  # an int from a tensor: FX cannot trace this
                h = h * 2
            h.sigmoid_()
            return h + torch.sigmoid(steps).float()  # an integer tensor: native sigmoid

    model = M()
    lean, _ = optimize_quietly(model)
    x, steps = torch.randn(3, 4), torch.tensor(2)
    torch.testing.assert_close(lean(x, steps), model(x, steps), rtol=0, atol=0)
    reasons = {r.original: r.reason for r in lean.rewrite_report.left_alone}
    assert "in-place" in reasons["Tensor.sigmoid_"]
    assert "floating-point" in reasons["torch.sigmoid"]
    assert not lean.rewrite_report.replaced


def test_no_grad_runs_native_without_the_mode():
    lean, _ = optimize_quietly(Branchy())
    x = torch.randn(4, 8).abs()
    with torch.no_grad(), CountOps() as ops:
        lean(x)
    assert (ops.native, ops.lean) == (3, 0)
    assert not lean.rewrite_report.replaced  # nothing was rewritten, nothing is claimed


def test_user_modes_and_hooks_keep_working():
    seen = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    model = Branchy()
    lean, _ = optimize_quietly(model)
    calls = []
    lean.gate.act.register_forward_hook(lambda *a: calls.append("act"))
    lean.head.register_forward_pre_hook(lambda *a: calls.append("head"))
    x = torch.randn(4, 8).abs().requires_grad_()
    with Spy():
        y = lean(x)
    assert calls == ["act", "head"]
    assert "softplus" in seen  # the user's mode, below ours, sees the calls and the lean ops
    torch.testing.assert_close(y, model(x), rtol=0, atol=0)
    with Spy():  # inside the user's mode, ours is entered and left again
        lean(x)
        assert torch._C._len_torch_function_stack() == 1


def test_deepcopy_pickle_and_torch_save_keep_the_rewrite():
    model = Branchy()
    lean, _ = optimize_quietly(model)
    x = torch.randn(4, 8).abs().requires_grad_()
    lean(x)
    buf = io.BytesIO()
    torch.save(lean, buf)
    buf.seek(0)
    copies = [copy.deepcopy(lean), pickle.loads(pickle.dumps(lean)), torch.load(buf, weights_only=False)]
    for c in copies:
        assert c.gate.lin.weight is not lean.gate.lin.weight
        with CountOps() as ops:
            y = c(x)
        assert (ops.native, ops.lean) == (0, 3)
        torch.testing.assert_close(y, model(x), rtol=0, atol=0)
        assert len(c.rewrite_report.replaced) == 3  # its own record, copied


def test_torch_jit_script_refuses_with_what_to_do():
    lean, _ = optimize_quietly(Branchy())
    with pytest.raises(TypeError, match="runtime front end.*Script the original"):
        torch.jit.script(lean)


def test_torch_compile_export_and_checkpoint_compose():
    torch.manual_seed(0)
    model = RNN()
    lean, _ = optimize_quietly(model)
    x = torch.randn(2, 3, 8)
    ref = model(x)
    grads = torch.autograd.grad(ref.sum(), list(model.parameters()))

    compiled = torch.compile(lean, backend="eager")
    y = compiled(x)
    torch.testing.assert_close(y, ref)
    for g, h in zip(grads, torch.autograd.grad(y.sum(), list(model.parameters()))):
        torch.testing.assert_close(h, g)

    exported = torch.export.export(lean, (x,), strict=False)
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"graph_rewrite.softplus.default", "graph_rewrite.sigmoid.default",
            "graph_rewrite.logsigmoid.default"} <= ops
    assert not ops & NATIVE
    torch.testing.assert_close(exported.module()(x), ref)

    y = checkpoint(lean, x, use_reentrant=False)
    for g, h in zip(grads, torch.autograd.grad(y.sum(), list(model.parameters()))):
        torch.testing.assert_close(h, g)


def test_torch_compile_runs_the_mode_eagerly_without_graph_breaks_or_recompiles():
    # Traced by Dynamo, the mode broke the graph at every call in it and recompiled until the limit.
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = RNN()
    lean, _ = optimize_quietly(model)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lean, backend="eager")
    x = torch.randn(2, 3, 8)
    for _ in range(3):  # (no counting mode around these calls: Dynamo leaves frames run under a mode alone)
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    assert not counters["graph_break"] and not counters["recompiles"], dict(counters)
    with CountOps() as ops:  # the rewrite still runs
        compiled(x)
    assert ops.lean > 0 and ops.native == 0
    torch._dynamo.reset()


def test_partly_traced_model_runs_only_the_untraceable_module_under_the_mode():
    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.Softplus()

        def forward(self, x):
            return self.act(x) if x.sum() > 0 else x

    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), Picky())
    lean, caught = optimize_quietly(model)
    assert isinstance(lean, torch.fx.GraphModule) and "partial" in lean.rewrite_report.tracing
    assert [u.module for u in lean.rewrite_report.uncovered] == ["2"]
    x = torch.rand(3, 4, requires_grad=True)
    with CountOps() as ops:
        torch.testing.assert_close(lean(x), model(x), rtol=0, atol=0)
    assert (ops.native, ops.lean) == (2, 2)  # the original's two calls are the native ones
    (site,) = [r for r in lean.rewrite_report.replaced if r.site]
    assert (site.where, site.original) == ("2.act", "F.softplus")
    # The rest is an FX graph with the lean sigmoid; the module FX could not enter is a call,
    # with its own nn.Softplus in place (the mode reaches it, nothing is swapped).
    assert [n.target for n in lean.graph.nodes if str(n.target).startswith("graph_rewrite.")] == \
        [torch.ops.graph_rewrite.sigmoid]
    assert type(getattr(lean, "2").act) is nn.Softplus
    assert lean.rewrite_report.counts() == {"graph_rewrite.sigmoid": 1, "graph_rewrite.softplus": 1}


def test_bad_input_gets_a_clear_error():
    with pytest.raises(TypeError, match="nn.Module"):
        graph_rewrite.optimize(F.softplus)

    class Raises(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            h = F.softplus(self.lin(x))
            raise RuntimeError("the model's own error")

    model = Raises()
    lean, caught = optimize_quietly(model)
    assert any("the model's own error" in w for w in caught)  # FX's trace ran into it: said in the warning
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="the model's own error"):
        lean(x)
    assert torch._C._len_torch_function_stack() == 0  # the mode was left on the way out
    with pytest.raises(ValueError, match="original model rejected the inputs: RuntimeError: the model's own error"):
        graph_rewrite.verify(model, lean, x)
