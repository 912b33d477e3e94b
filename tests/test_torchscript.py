"""optimize() on TorchScript modules: scripted, traced and loaded."""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graph_rewrite
from graph_rewrite.frontends.torchscript import ScriptRewriteError
from demos.torchscript_memory import kept  # bytes saved by one call after warm-up calls

# torch.jit.script/trace/save/load warn that TorchScript is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

NATIVE = ("aten::softplus", "aten::sigmoid(", "aten::log_sigmoid")
LEAN = ("graph_rewrite::softplus", "graph_rewrite::sigmoid", "graph_rewrite::logsigmoid")


def _ir(m):
    return str(m.inlined_graph)


def _grads_and_outputs(model, x, iters=4):
    """Output and gradients (input, then parameters by name) of ``iters`` calls; the last call's.

    Several calls: the profiling executor runs its optimized graph from the second call on.
    """
    params = dict(model.named_parameters())
    for _ in range(iters):
        xx = x.clone().requires_grad_(True)
        y = model(xx)
        grads = torch.autograd.grad(y.square().sum(), [xx, *params.values()])
    return y.detach(), dict(zip(["x", *params], grads))


def _assert_same(a, b, tol=1e-5):
    (ya, ga), (yb, gb) = a, b
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys()
    for k in ga:
        assert (ga[k] - gb[k]).abs().max() <= tol * ga[k].abs().max().clamp_min(1e-30), k


class Spellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.act = nn.Softplus(beta=0.5, threshold=4.0)

    def forward(self, x):
        h = F.softplus(self.a(x))
        h = torch.sigmoid(self.b(h)) + h.sigmoid()
        return F.logsigmoid(self.c(self.act(h)))


# --------------------------------------------------------------------------- the three sources
def test_scripted_model_every_call_is_rewritten_and_computes_the_same():
    torch.manual_seed(0)
    model = Spellings()
    scripted = torch.jit.script(model)
    lean = graph_rewrite.optimize(scripted)
    assert isinstance(lean, torch.jit.ScriptModule)
    ir = _ir(lean)
    assert not any(op in ir for op in NATIVE), ir
    assert lean.rewrite_report.counts() == {
        "graph_rewrite.softplus": 2, "graph_rewrite.sigmoid": 2, "graph_rewrite.logsigmoid": 1}
    x = torch.randn(5, 8)
    _assert_same(_grads_and_outputs(model, x), _grads_and_outputs(lean, x))


def test_traced_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Softplus(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 2), nn.LogSigmoid())
    x = torch.randn(4, 6)
    traced = torch.jit.trace(model, x)
    lean = graph_rewrite.optimize(traced)
    assert all(op in _ir(lean) for op in LEAN) and not any(op in _ir(lean) for op in NATIVE)
    assert len(lean.rewrite_report.replaced) == 3
    _assert_same(_grads_and_outputs(model, x), _grads_and_outputs(lean, x))


def test_loaded_model(tmp_path):
    torch.manual_seed(0)
    model = Spellings()
    torch.jit.save(torch.jit.script(model), str(tmp_path / "m.pt"))
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    lean = graph_rewrite.optimize(loaded)
    assert len(lean.rewrite_report.replaced) == 5
    x = torch.randn(3, 8)
    _assert_same(_grads_and_outputs(model, x), _grads_and_outputs(lean, x))


# --------------------------------------------------------------------------- spellings
class SoftplusDefault(nn.Module):
    def forward(self, x):
        return F.softplus(x * 4)


class SoftplusFloats(nn.Module):
    def forward(self, x):
        return F.softplus(x * 4, 2.0, 3.0)


class SoftplusInts(nn.Module):
    def forward(self, x):
        return F.softplus(x * 4, beta=2, threshold=5)  # ints: the op takes float


@pytest.mark.parametrize("module, args", [
    (SoftplusDefault, {"beta": 1.0, "threshold": 20.0}),
    (SoftplusFloats, {"beta": 2.0, "threshold": 3.0}),
    (SoftplusInts, {"beta": 2.0, "threshold": 5.0}),
])
def test_functional_softplus_default_and_explicit_beta_threshold(module, args):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), module())
    lean = graph_rewrite.optimize(torch.jit.script(model))
    [r] = lean.rewrite_report.replaced
    assert (r.original, r.lean_op, r.args) == ("aten::softplus", "graph_rewrite.softplus", args)
    assert "aten::softplus" not in _ir(lean)
    x = torch.randn(16, 8)  # x * 4 crosses the thresholds both ways
    # Several calls with backward: the profiling executor's optimized graph runs too.
    _assert_same(_grads_and_outputs(model, x, iters=5), _grads_and_outputs(lean, x, iters=5))


class SigmoidCalls(nn.Module):
    def forward(self, x):
        return torch.sigmoid(x) * x.sigmoid()


def test_tensor_sigmoid_and_torch_sigmoid():
    lean = graph_rewrite.optimize(torch.jit.script(SigmoidCalls()))
    assert [r.original for r in lean.rewrite_report.replaced] == ["aten::sigmoid", "aten::sigmoid"]
    assert _ir(lean).count("graph_rewrite::sigmoid") == 2
    x = torch.randn(7)
    _assert_same(_grads_and_outputs(SigmoidCalls(), x), _grads_and_outputs(lean, x))


class LogSigmoidCall(nn.Module):
    def forward(self, x):
        return F.logsigmoid(x * 3)


def test_functional_logsigmoid():
    lean = graph_rewrite.optimize(torch.jit.script(LogSigmoidCall()))
    assert lean.rewrite_report.counts() == {"graph_rewrite.logsigmoid": 1}
    x = torch.randn(64) * 10
    _assert_same(_grads_and_outputs(LogSigmoidCall(), x), _grads_and_outputs(lean, x))


class Sub(nn.Module):
    def forward(self, x):
        return F.sigmoid(x)  # a Python function: a prim::CallFunction in the graph


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.sub = Sub()

    def forward(self, x):
        return self.sub(x) + 1


def test_calls_through_functions_and_submodules_are_rewritten():
    lean = graph_rewrite.optimize(torch.jit.script(Nested()))
    assert "graph_rewrite::sigmoid" in _ir(lean) and "aten::sigmoid(" not in _ir(lean)
    [r] = lean.rewrite_report.replaced
    assert r.where == "torch.nn.functional.sigmoid"


# --------------------------------------------------------------------------- mutation and dtypes
class MutatesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        s = F.softplus(y)  # reads y before the mutation below
        y.mul_(2.0)
        t = torch.sigmoid(y)  # reads y after it
        y.sigmoid_()  # in place: stays native
        return s + t + y


def test_in_place_op_on_the_activation_input_keeps_order():
    torch.manual_seed(0)
    model = MutatesInput()
    lean = graph_rewrite.optimize(torch.jit.script(model))
    assert lean.rewrite_report.counts() == {"graph_rewrite.softplus": 1, "graph_rewrite.sigmoid": 1}
    [left] = lean.rewrite_report.left_alone
    assert left.original == "aten::sigmoid_" and "in-place" in left.reason
    x = torch.randn(5, 8)
    with torch.no_grad():  # the reference: the eager model, by hand
        y = model.lin(x)
        expected = F.softplus(y) + torch.sigmoid(2 * y) + torch.sigmoid(2 * y)
    for _ in range(3):
        torch.testing.assert_close(lean(x), expected, rtol=0, atol=0)


class IntSigmoid(nn.Module):
    def forward(self, x):
        return torch.sigmoid(x) + torch.sigmoid(x.long())


def test_call_on_an_integer_tensor_is_left_alone():
    lean = graph_rewrite.optimize(torch.jit.script(IntSigmoid()))
    assert len(lean.rewrite_report.replaced) == 1
    [left] = lean.rewrite_report.left_alone
    assert left.original == "aten::sigmoid" and "int64" in left.reason
    x = torch.tensor([-2.5, 0.0, 3.0])
    torch.testing.assert_close(lean(x), torch.sigmoid(x) + torch.sigmoid(torch.tensor([-2.0, 0.0, 3.0])))


def test_ops_selects_rules():
    lean = graph_rewrite.optimize(torch.jit.script(Spellings()), ops=["sigmoid"])
    assert lean.rewrite_report.counts() == {"graph_rewrite.sigmoid": 2}
    assert "aten::softplus" in _ir(lean) and "aten::log_sigmoid" in _ir(lean)


# --------------------------------------------------------------------------- the original, the result
def test_original_is_unchanged_and_still_native():
    torch.manual_seed(0)
    scripted = torch.jit.script(Spellings())
    before = {n: (str(m.graph), str(m.inlined_graph), m.code) for n, m in scripted.named_modules()}
    lean = graph_rewrite.optimize(scripted)
    x = torch.randn(3, 8)
    for _ in range(3):
        lean(x).sum().backward()
    after = {n: (str(m.graph), str(m.inlined_graph), m.code) for n, m in scripted.named_modules()}
    assert after == before
    assert all(op in _ir(scripted) for op in NATIVE) and "graph_rewrite" not in _ir(scripted)
    scripted(x)
    assert "graph_rewrite" not in str(torch.jit.last_executed_optimized_graph())


def test_result_shares_parameters_keeps_state_dict_keys_and_trains():
    torch.manual_seed(0)
    scripted = torch.jit.script(Spellings())
    lean = graph_rewrite.optimize(scripted)
    assert list(lean.state_dict()) == list(scripted.state_dict())
    assert lean.a.weight is scripted.a.weight
    opt = torch.optim.SGD(lean.parameters(), lr=0.1)
    x, target = torch.randn(16, 8), torch.randn(16, 4)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (lean(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_print_report_and_graph_diff():
    scripted = torch.jit.script(Spellings())
    lean = graph_rewrite.optimize(scripted)
    text = str(lean.rewrite_report)
    assert "5 node(s) rewritten" in text and "aten::log_sigmoid" in text
    diff = graph_rewrite.graph_diff(scripted, lean)
    minus = [l for l in diff.splitlines() if l.startswith("-") and not l.startswith("---")]
    plus = [l for l in diff.splitlines() if l.startswith("+") and not l.startswith("+++")]
    assert any("aten::log_sigmoid" in l for l in minus) and any("graph_rewrite::logsigmoid" in l for l in plus)
    assert not any("graph_rewrite" in l for l in minus)


def test_verify_passes_on_scripted_models():
    torch.manual_seed(0)
    scripted = torch.jit.script(Spellings())
    report = graph_rewrite.verify(scripted, graph_rewrite.optimize(scripted), torch.randn(4, 8))
    assert report.ok, str(report)
    before, after = report.activation_bytes
    assert after < before


# --------------------------------------------------------------------------- memory
MiB = 2**20


@pytest.mark.parametrize("case", ["logsigmoid mlp", "softplus convnet"])
def test_memory_after_warmup_is_saved_and_no_more_than_the_fx_rewrite(case):
    torch.manual_seed(0)
    if case == "logsigmoid mlp":
        batch, width = 32, 256
        model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(width, width), nn.LogSigmoid())])
        x = torch.randn(batch, width)
        one = batch * width * 4
        lean_expected = 4 * one  # the four outputs (three are the next Linear's inputs)
        script = torch.jit.script(model)
    else:
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Softplus(), nn.Conv2d(8, 8, 3, padding=1), nn.Softplus())
        x = torch.randn(2, 3, 16, 16)
        one = 2 * 8 * 16 * 16 * 4
        lean_expected = 2 * one  # the two softplus outputs; native also keeps both conv outputs
        script = torch.jit.trace(model, x)
    params = list(model.parameters())
    lean = graph_rewrite.optimize(script)
    native_bytes = kept(script, x, params, warmup=3)
    lean_bytes = kept(lean, x, params, warmup=3)
    fx_bytes = kept(graph_rewrite.optimize(model), x, params, warmup=3)
    assert lean_bytes == lean_expected
    assert lean_bytes <= fx_bytes
    assert lean_bytes < native_bytes


def test_verify_measures_after_the_profiling_executor_warmed_up():
    # Softplus MLP: the first call of the scripted model keeps every softplus input and the
    # Linear inputs (8 tensors with the output); its optimized graph, from the 2nd call on,
    # keeps the 4 outputs, like the rewrite. verify must report the latter.
    torch.manual_seed(0)
    batch, width = 16, 64
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(width, width), nn.Softplus())])
    script = torch.jit.script(model)
    report = graph_rewrite.verify(script, graph_rewrite.optimize(script), torch.randn(batch, width))
    assert report.ok, str(report)
    one = batch * width * 4
    assert report.activation_bytes == (4 * one, 4 * one)


def test_softplus_mlp_is_not_worse_than_torchscripts_own_autodiff():
    # TorchScript's autodiff formula for softplus already keeps the output once the profiling
    # executor has built a differentiable graph: there the rewrite keeps the same bytes.
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(128, 128), nn.Softplus())])
    x = torch.randn(16, 128)
    script = torch.jit.script(model)
    lean = graph_rewrite.optimize(script)
    params = list(model.parameters())
    assert kept(lean, x, params, warmup=3) <= kept(script, x, params, warmup=3)
    assert kept(lean, x, params, warmup=3) == 4 * 16 * 128 * 4


# --------------------------------------------------------------------------- save, load, errors
def test_save_and_load_in_a_new_process(tmp_path):
    torch.manual_seed(0)
    lean = graph_rewrite.optimize(torch.jit.script(Spellings()))
    path, xp, yp = tmp_path / "lean.pt", tmp_path / "x.pt", tmp_path / "y.pt"
    torch.jit.save(lean, str(path))
    x = torch.randn(5, 8)
    torch.save(x, xp)
    expected = lean(x).detach()
    code = f"""
        import torch, graph_rewrite
        m = torch.jit.load({str(path)!r})
        x = torch.load({str(xp)!r})
        for _ in range(3):
            y = m(x.requires_grad_())
            y.sum().backward()
        torch.save(y.detach(), {str(yp)!r})
        print(sorted(m.state_dict()) == {sorted(lean.state_dict())!r}, "graph_rewrite::logsigmoid" in str(m.inlined_graph))
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]
    torch.testing.assert_close(torch.load(yp), expected, rtol=0, atol=0)
    # Without `import graph_rewrite` the ops are unknown: loading fails and names the op.
    bare = subprocess.run([sys.executable, "-c", f"import torch; torch.jit.load({str(path)!r})"],
                          capture_output=True, text=True, timeout=120)
    assert bare.returncode != 0
    assert "graph_rewrite" in bare.stderr


class CallsPython(nn.Module):
    @torch.jit.ignore
    def helper(self, x):
        return x

    def forward(self, x):
        return torch.sigmoid(self.helper(x))


class Forks(nn.Module):
    def forward(self, x):
        return torch.jit.wait(torch.jit.fork(torch.sigmoid, x))


def test_fork_closures_are_rewritten():
    lean = graph_rewrite.optimize(torch.jit.script(Forks()))
    [r] = lean.rewrite_report.replaced
    assert "closure" in r.where and "graph_rewrite::sigmoid" in str(lean.graph)
    x = torch.randn(6)
    torch.testing.assert_close(lean(x), torch.sigmoid(x), rtol=0, atol=0)


def test_a_module_torch_jit_save_refuses_raises_and_stays_intact():
    scripted = torch.jit.script(CallsPython())
    before = str(scripted.inlined_graph)
    with pytest.raises(ScriptRewriteError, match="cannot be copied with torch.jit.save"):
        graph_rewrite.optimize(scripted)
    assert str(scripted.inlined_graph) == before
    x = torch.randn(3)
    torch.testing.assert_close(scripted(x), torch.sigmoid(x))


def test_cli_takes_an_archive_and_writes_the_rewritten_one(tmp_path, capsys):
    from graph_rewrite.cli import main

    torch.manual_seed(0)
    src, out = tmp_path / "net.pt", tmp_path / "lean.pt"
    torch.jit.save(torch.jit.script(Spellings()), str(src))
    assert main([str(src), "--shape", "4,8", "--show-graph", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "5 node(s) rewritten" in printed and "graph_rewrite.verify: PASSED" in printed
    assert "+++ optimized (inlined_graph)" in printed
    assert all(op in _ir(torch.jit.load(str(out))) for op in LEAN)
    assert main(["tests.test_cli:small_net", "--shape", "4,6", "--out", str(tmp_path / "x.pt")]) == 2
    assert "--out" in capsys.readouterr().err
