"""optimize(): every spelling found, the original untouched, structure and modes kept."""
import copy
import operator
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graph_rewrite
from graph_rewrite import optimize, verify
from graph_rewrite.memory import saved_bytes

lean = torch.ops.graph_rewrite


class Call(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.lin(x))


# (spelling, module or function, lean op packet, expected op args after the input)
SPELLINGS = [
    ("nn.Softplus", nn.Softplus(beta=2.0, threshold=5.0), lean.softplus, (2.0, 5.0)),
    ("F.softplus", lambda x: F.softplus(x), lean.softplus, (1.0, 20.0)),
    ("F.softplus positional", lambda x: F.softplus(x, 3, 1), lean.softplus, (3.0, 1.0)),
    ("F.softplus keywords", lambda x: F.softplus(x, threshold=2.0, beta=0.5), lean.softplus, (0.5, 2.0)),
    ("F.softplus input keyword", lambda x: F.softplus(input=x, beta=2.0), lean.softplus, (2.0, 20.0)),
    ("nn.Sigmoid", nn.Sigmoid(), lean.sigmoid, ()),
    ("torch.sigmoid", lambda x: torch.sigmoid(x), lean.sigmoid, ()),
    ("F.sigmoid", lambda x: F.sigmoid(x), lean.sigmoid, ()),
    ("torch.special.expit", lambda x: torch.special.expit(x), lean.sigmoid, ()),
    ("Tensor.sigmoid", lambda x: x.sigmoid(), lean.sigmoid, ()),
    ("nn.LogSigmoid", nn.LogSigmoid(), lean.logsigmoid, ()),
    ("F.logsigmoid", lambda x: F.logsigmoid(x), lean.logsigmoid, ()),
]


def _lean_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("graph_rewrite.")]


@pytest.mark.parametrize("name,fn,op,args", SPELLINGS, ids=[s[0] for s in SPELLINGS])
def test_every_spelling_is_rewritten(name, fn, op, args):
    model = Call(fn)
    gm = optimize(model)
    nodes = _lean_nodes(gm)
    assert len(nodes) == 1, gm.code
    # The packet, not .default: TorchScript can script only the packet.
    assert nodes[0].target is op
    assert nodes[0].args[1:] == args
    assert len(gm.rewrite_report.replaced) == 1
    x = torch.randn(4, 6, requires_grad=True)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    assert "graph_rewrite" in gm.code


def test_node_names_and_meta_are_kept():
    model = Call(nn.Softplus())
    plain = torch.fx.symbolic_trace(model)
    gm = optimize(model)
    assert [n.name for n in plain.graph.nodes] == [n.name for n in gm.graph.nodes]
    (node,) = _lean_nodes(gm)
    assert node.meta["graph_rewrite"] == {"was": "nn.Softplus", "where": "fn"}


def test_inplace_sigmoid_is_left_alone_with_reason():
    class M(nn.Module):
        def forward(self, x):
            y = x * 2
            y.sigmoid_()
            return torch.sigmoid_(y * 3)

    gm = optimize(M())
    assert not _lean_nodes(gm)
    reasons = [r.reason for r in gm.rewrite_report.left_alone]
    assert len(reasons) == 2 and all("in-place" in r for r in reasons)
    x = torch.randn(5)
    torch.testing.assert_close(gm(x), M()(x))


def test_ops_selects_rules_and_rejects_unknown_names():
    model = nn.Sequential(nn.Linear(4, 4), nn.Softplus(), nn.Sigmoid(), nn.LogSigmoid())
    gm = optimize(model, ops=["softplus"])
    assert [n.target for n in _lean_nodes(gm)] == [lean.softplus]
    assert {n.target for n in _lean_nodes(optimize(model))} == {lean.softplus, lean.sigmoid, lean.logsigmoid}
    with pytest.raises(ValueError, match="unknown op"):
        optimize(model, ops=["relu"])


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="nn.Module"):
        optimize(lambda x: x)
    # A scripted function is not a module (a scripted module is: tests/test_torchscript.py).
    def f(x):
        return torch.sigmoid(x)

    with pytest.raises(TypeError, match="got ScriptFunction"):
        optimize(torch.jit.script(f))


def test_hooked_modules_and_subclasses_are_left_alone():
    calls = []

    class MySigmoid(nn.Sigmoid):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(3, 3), nn.Sigmoid(), MySigmoid())
    model[1].register_forward_hook(lambda *a: calls.append(1))
    gm = optimize(model)
    # The hooked module stays a call; the subclass is not taken for nn.Sigmoid but
    # traced through, so only the torch.sigmoid inside its forward is rewritten.
    (node,) = _lean_nodes(gm)
    assert node.meta["graph_rewrite"] == {"was": "torch.sigmoid", "where": "2"}
    assert [(r.where, "hooks" in r.reason) for r in gm.rewrite_report.left_alone] == [("1", True)]
    x = torch.randn(2, 3)
    torch.testing.assert_close(gm(x), model(x))
    assert len(calls) == 2  # the hook ran for both calls


def test_softplus_beta_it_cannot_serve_is_left_alone():
    gm = optimize(Call(nn.Softplus(beta=0.0)))
    assert not _lean_nodes(gm)
    assert "beta" in gm.rewrite_report.left_alone[0].reason


class Caching(nn.Module):
    """Sets attributes during forward, as some real modules do."""

    def __init__(self, fail=False):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.Softplus()
        self.fail = fail
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        self.last_shape = x.shape
        self.lin.seen = True
        self.register_buffer("cache", torch.zeros(1))  # mutates _buffers in place
        if self.fail and x.sum() > 0:  # data-dependent: FX cannot trace this
            return x
        return self.act(self.lin(x))


def _state(model):
    return [(name, m.training, dict(m.__dict__)) for name, m in model.named_modules()]


def _same_state(before, after):
    assert [(n, t) for n, t, _ in before] == [(n, t) for n, t, _ in after]
    for (_, _, d0), (_, _, d1) in zip(before, after):
        assert d0.keys() == d1.keys()
        for k in d0:
            assert d0[k] is d1[k] or d0[k] == d1[k], k


@pytest.mark.parametrize("fail", [False, True], ids=["traced", "trace fails halfway"])
def test_original_model_is_not_modified(fail):
    model = Caching(fail)
    model.lin.weight.grad = torch.ones_like(model.lin.weight)
    before = _state(model)
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = optimize(model)
    _same_state(before, _state(model))
    assert type(model.act) is nn.Softplus and model.calls == 0 and not hasattr(model.lin, "seen")
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd_before[k])
    assert torch.equal(model.lin.weight.grad, torch.ones_like(model.lin.weight))
    assert torch.equal(torch.get_rng_state(), rng)
    # Parameters are shared, not copied; module objects are not.
    assert result.lin.weight is model.lin.weight
    assert result.lin is not model.lin
    assert not hasattr(result, "last_shape") and "cache" not in dict(result.named_buffers())
    assert "cache" not in model._buffers


def test_state_dict_keys_and_checkpoints_are_identical():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sigmoid())
            self.unused = nn.Linear(2, 2)
            self.scale = nn.Parameter(torch.ones(1))
            self.register_buffer("offset", torch.zeros(1))
            self.register_buffer("scratch", torch.zeros(1), persistent=False)

        def forward(self, x):
            return self.block(x) * self.scale + self.offset + self.scratch

    model = M()
    gm = optimize(model)
    assert list(gm.state_dict()) == list(model.state_dict())
    assert [n for n, _ in gm.named_parameters()] == [n for n, _ in model.named_parameters()]
    ckpt = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in M().state_dict().items()}
    gm.load_state_dict(ckpt)  # a checkpoint of the original loads as is
    assert torch.equal(model.block[0].weight, ckpt["block.0.weight"])  # shared tensors


def test_train_eval_mode_is_kept_and_switches_baked_training_flags():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            # FX bakes self.training into the graph: one graph per mode is needed.
            return torch.sigmoid(F.dropout(self.lin(x), 0.5, self.training))

    model = M().eval()
    gm = optimize(model)
    assert not gm.training and not model.training
    x = torch.randn(4, 8)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    gm.train()
    assert not model.training  # the original's mode is its own
    torch.manual_seed(0)
    a = gm(x)
    torch.manual_seed(0)
    b = model.train()(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a == 0.5).any()  # dropout zeroed something before the sigmoid
    gm.eval()
    torch.testing.assert_close(gm(x), model.eval()(x), rtol=0, atol=0)


def test_untraceable_root_falls_back_to_the_runtime_front_end_with_warning():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.body(x)
            return torch.sigmoid(x)

    model = Root()
    with pytest.warns(UserWarning, match="could not trace <root>.*runtime front end"):
        out = optimize(model)
    assert type(model.body[1]) is nn.Sigmoid and type(out.body[1]) is nn.Sigmoid  # no module swapped
    assert out.rewrite_report.uncovered and out.rewrite_report.uncovered[0].module == ""
    x = torch.rand(3, 4, requires_grad=True)
    torch.testing.assert_close(out(x), model(x), rtol=0, atol=0)
    assert [(r.where, r.original) for r in out.rewrite_report.replaced] == [("body.1", "torch.sigmoid")]
    assert list(out.state_dict()) == list(model.state_dict())


def test_report_prints_a_table():
    gm = optimize(nn.Sequential(nn.Linear(4, 4), nn.Softplus(beta=2.0)))
    text = str(gm.rewrite_report)
    assert "nn.Softplus" in text and "graph_rewrite.softplus" in text and "beta=2" in text
    assert gm.rewrite_report.counts() == {"graph_rewrite.softplus": 1}


def _mlp(n=4, width=1024):
    layers = []
    for _ in range(n):
        layers += [nn.Linear(width, width), nn.Softplus()]
    return nn.Sequential(*layers)


def test_mlp_saves_exactly_one_activation_per_softplus():
    torch.manual_seed(0)
    model = _mlp()
    gm = optimize(model)
    x = torch.randn(256, 1024)
    params = list(model.parameters())
    activation = 256 * 1024 * 4
    # Saved for backward: native keeps x, 4 softplus inputs and 3 outputs (the next
    # Linear's inputs): 8 MiB. Lean keeps x and the 4 outputs: 5 MiB, the floor.
    native, _ = saved_bytes(lambda: model(x), exclude=params)
    ours, _ = saved_bytes(lambda: gm(x), exclude=params)
    assert (native, ours) == (8 * activation, 5 * activation)
    # Held between forward and backward (the output too): one activation less per softplus.
    native, _ = saved_bytes(lambda: model(x), exclude=params, include_outputs=True)
    ours, _ = saved_bytes(lambda: gm(x), exclude=params, include_outputs=True)
    assert native - ours == 4 * activation


def test_training_step_matches_native():
    torch.manual_seed(0)
    model = _mlp(3, 64)
    gm = optimize(model)
    ref = copy.deepcopy(model)
    x = torch.randn(16, 64)
    ref(x).square().sum().backward()
    gm(x).square().sum().backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), gm.named_parameters()):
        # float32 rounding differs at ~1e-7 of the gradient's scale; a missing chain-rule
        # factor or a wrong slope is off by far more.
        assert (q.grad - p.grad).abs().max() <= 1e-5 * p.grad.abs().max(), n


def _compile_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Softplus(beta=2.0, threshold=3.0), nn.Linear(8, 8), nn.Sigmoid(),
                         nn.Linear(8, 8), nn.LogSigmoid())


def _check_same_step(ref_model, fn, x):
    ref_model.zero_grad()
    y_ref = ref_model(x)
    y_ref.sum().backward()
    grads = [p.grad.clone() for p in ref_model.parameters()]
    ref_model.zero_grad()
    y = fn(x)
    y.sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, ref_model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_runs_under_torch_compile_fullgraph():
    model = _compile_model()
    gm = optimize(model)
    torch._dynamo.reset()
    compiled = torch.compile(gm, fullgraph=True)
    _check_same_step(model, compiled, torch.randn(4, 8))


def test_runs_under_torch_export():
    model = _compile_model()
    gm = optimize(model)
    x = torch.randn(4, 8)
    ep = torch.export.export(gm, (x,))
    assert "graph_rewrite.softplus" in str(ep.graph)
    _check_same_step(model, ep.module(), x)


def test_export_decompositions_keep_the_ops_and_the_saving():
    # run_decompositions() retraces below autograd: the ops must stay ops there, not
    # dissolve into the aten ops of their native kernels (which save their inputs).
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(64, 64), nn.Softplus())], nn.Linear(64, 64),
                          nn.LogSigmoid(), nn.Linear(64, 64), nn.Sigmoid())
    x = torch.randn(32, 64)
    ep = torch.export.export(optimize(model), (x,)).run_decompositions()
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert [t for t in targets if "graph_rewrite" in t] == ["graph_rewrite.softplus.default"] * 3 + [
        "graph_rewrite.logsigmoid.default", "graph_rewrite.sigmoid.default"], targets
    exported = ep.module()
    lean, _ = saved_bytes(lambda: exported(x), exclude=list(model.parameters()) + [x])
    native, _ = saved_bytes(lambda: model(x), exclude=list(model.parameters()) + [x])
    # Four activations' inputs fewer (3 softplus + logsigmoid, 8 KiB each), and logsigmoid's buffer.
    assert native - lean == 5 * 32 * 64 * 4, (native, lean)
    _check_same_step(model, exported, x)


def test_runs_under_torch_jit_script():
    model = _compile_model()
    scripted = torch.jit.script(optimize(model))
    assert "graph_rewrite::softplus" in str(scripted.graph)
    _check_same_step(model, scripted, torch.randn(4, 8))


def test_torchvision_sigmoid_models_are_rewritten():
    tv = pytest.importorskip("torchvision")
    model = tv.models.efficientnet_b0(weights=None)
    gm = optimize(model)
    # Issue 12 added the recompute kind (SiLU's consumers keep its input) and the norm kind
    # (SiLU after BatchNorm keeps BatchNorm's input; tests/test_one_tensor.py): 33 SiLUs
    # follow a BatchNorm, the 16 of the squeeze-excitation blocks a Conv.
    assert gm.rewrite_report.counts() == {
        "graph_rewrite.sigmoid": 16, "F.silu (out of place)": 16, "graph_rewrite.norm_act": 33,
        "graph_rewrite.recompute_conv": 32, "graph_rewrite.recompute_mul": 16,
    }
    assert list(gm.state_dict()) == list(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    model.eval(), gm.eval()
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    assert model.training is False


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.lin(x), beta=2.0) * x  # the product keeps the output: keeping it saves the input

    def helper(self):
        return "still here"


class UntypedBody(Body):
    def forward(self, x):  # not annotated: traced too; the guard runs its graph for tensor arguments only
        return torch.sigmoid(self.lin(x))


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.untyped = Body(), UntypedBody()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: the root cannot be traced
            x = x + 1
        assert self.body.helper() == "still here"
        return self.untyped(self.body(x))


def test_untraceable_root_still_traces_tensor_only_submodules():
    model = Detector()
    with pytest.warns(UserWarning, match="root"):
        out = optimize(model)
    assert [(r.where, r.lean_op) for r in out.rewrite_report.replaced] == [("body", "graph_rewrite.softplus"),
                                                                          ("untyped", "graph_rewrite.sigmoid")]
    assert type(out.body) is Body and "forward" not in model.body.__dict__  # class kept, original untouched
    x = torch.randn(3, 4, requires_grad=True)
    y, saved = None, []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = out(x)
    torch.testing.assert_close(y, model(x), rtol=0, atol=0)
    # The lean softplus ran: its input (the Linear's output) is not among the saved tensors.
    lin_out = model.body.lin(x + (1 if x.sum() > 0 else 0))
    assert not any(s.shape == lin_out.shape and torch.equal(s, lin_out) for s in saved)
    assert list(out.state_dict()) == list(model.state_dict())


def test_in_place_buffer_updates_stay_in_the_graph_and_off_the_original():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("count", torch.zeros(1))

        def forward(self, x):
            self.count.add_(1)
            return torch.sigmoid(x + self.count)

    model = Counter()
    gm = optimize(model)
    assert model.count.item() == 0  # tracing (three modes) did not run the update
    x = torch.zeros(2)
    torch.testing.assert_close(gm(x), torch.sigmoid(x + 1))
    assert model.count.item() == 1  # the optimized model updates the shared buffer, once per call


class _MixedDtypeResidual(nn.Module):
    """A float16 residual stream plus a float32 branch, added in place (as under autocast)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        out = self.lin(x).half()
        alias = out
        out += F.softplus(x)  # eager: in place, stays float16, and `alias` sees it
        return out.float() + alias.float()


def test_augmented_assignment_is_traced_in_place_like_eager():
    # FX's Proxy has no __iadd__, so `out += y` used to trace as `out = out + y`: float32
    # here, and `alias` not updated. The GPU run of 2026-11-26 found it under CUDA autocast.
    torch.manual_seed(0)
    model, x = _MixedDtypeResidual(), torch.randn(4, 8)
    lean = optimize(model)
    assert lean.rewrite_report.tracing == "whole model"
    assert any(n.target is operator.iadd for n in lean.graph.nodes)
    assert torch.equal(lean(x), model(x))


class _ContextInForward(nn.Module):
    def __init__(self, context):
        super().__init__()
        self.lin, self.scale, self.context = nn.Linear(8, 8), nn.Linear(8, 8), context

    def forward(self, x):
        if self.context == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = self.lin(x)
            return F.softplus(h.float())
        with torch.no_grad():
            s = self.scale(x)
        return F.softplus(self.lin(x)) * s


@pytest.mark.parametrize("context", ["autocast", "no_grad"])
def test_forward_that_changes_grad_mode_or_autocast_is_not_traced(context):
    # An FX graph records the calls inside `with torch.autocast(...)` / `torch.no_grad()`
    # but not the context: they would run in float32, or with gradients. Such a forward
    # runs under the runtime front end, which keeps its code.
    torch.manual_seed(0)
    model, x = _ContextInForward(context), torch.randn(4, 8, requires_grad=True)
    with pytest.warns(UserWarning, match="grad mode or autocast changed inside forward"):
        lean = optimize(model)
    assert lean.rewrite_report.tracing.startswith("root not traced")
    report = verify(model, lean, x)
    assert report.ok, str(report)
    out = lean(x)
    assert out.dtype == model(x).dtype
    out.sum().backward()
    if context == "no_grad":
        assert lean.scale.weight.grad is None  # traced, the branch would have had gradients
    assert lean.rewrite_report.replaced  # the runtime front end still rewrote the softplus


def test_optimize_says_when_nothing_it_rewrote_frees_memory():
    import warnings

    class ReluNet(nn.Module):  # ReLU keeps only its output already: nothing to rewrite
        def __init__(self, branch):
            super().__init__()
            self.fc, self.branch = nn.Linear(4, 4), branch

        def forward(self, x):
            if self.branch and x.sum() > 1e30:  # FX cannot trace this: the runtime front end runs it
                return x
            return torch.relu(self.fc(x))

    for branch in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lean = graph_rewrite.optimize(ReluNet(branch))
            for _ in range(2):  # the runtime front end tells after the first forward, once
                lean(torch.randn(2, 4, requires_grad=True))
        told = [str(w.message) for w in caught if "frees memory" in str(w.message)]
        assert len(told) == 1 and "nothing rewritten in ReluNet frees memory" in told[0], told
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph_rewrite.optimize(nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4)))
    assert not [w for w in caught if "frees memory" in str(w.message)]


class _ScaledSoftplus(nn.Module):
    """Branches on ``torch.is_tensor`` of an argument, as diffusers' UNet2DModel does on its timestep."""

    def forward(self, x, scale):
        if torch.is_tensor(scale):
            return F.softplus(x) * scale
        return F.softplus(x) * 2.0


class _CallsScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.inner = _ScaledSoftplus()

    def forward(self, x, scale):
        return self.inner(self.lin(x), scale)


def test_a_branch_on_torch_is_tensor_of_an_argument_is_not_traced_away():
    # FX's stand-in for an argument is no tensor: the trace took the branch for numbers and
    # returned softplus(x) * 2 for every scale.
    torch.manual_seed(0)
    model = _CallsScaled()
    x, scale = torch.randn(3, 4), torch.tensor(3.0)
    is_tensor = torch.is_tensor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimize(model)
    assert torch.is_tensor is is_tensor  # the tracer's stand-in is gone, also after a failed trace
    assert torch.equal(opt(x, scale), model(x, scale))
    assert torch.equal(opt(x, 2.0), model(x, 2.0))


def _assert_same_step(model, lean, *args, **kwargs):
    """The call gives native's outputs and parameter gradients, bit for bit (None where unused)."""
    ys = [net(*args, **kwargs) for net in (model, lean)]
    outs = [y if isinstance(y, tuple) else (y,) for y in ys]
    assert all(torch.equal(a, b) for a, b in zip(outs[1], outs[0])), (args, kwargs)
    params = list(model.parameters())
    g0, g1 = (torch.autograd.grad(sum(t.square().sum() for t in out), params, allow_unused=True) for out in outs)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g1, g0)), (args, kwargs)


class _MaskedBlock(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.norm, self.qkv = nn.LayerNorm(d), nn.Linear(d, 3 * d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, mask=None):
        q, k, v = self.qkv(self.norm(x)).chunk(3, -1)
        scores = q @ k.transpose(-1, -2)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        x = x + scores.softmax(-1) @ v
        return x + self.fc2(F.gelu(self.fc1(x)))


class _OptionalArguments(nn.Module):
    """A mask and labels that default to None, tested with ``is None`` as most models do."""

    def __init__(self, d=16):
        super().__init__()
        self.blocks = nn.ModuleList([_MaskedBlock(d), _MaskedBlock(d)])
        self.head = nn.Linear(d, 5)

    def forward(self, x, mask=None, *, labels=None):
        for block in self.blocks:
            x = block(x, mask)
        logits = self.head(x)
        if labels is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def test_an_argument_left_to_its_none_default_takes_the_models_own_path():
    # FX traces `mask` as a stand-in, for which `mask is not None` holds: the graph is the path
    # of a given mask. lean(x) failed in masked_fill; with labels left out, in cross_entropy.
    torch.manual_seed(0)
    model = _OptionalArguments()
    lean = optimize(model)
    x, labels = torch.randn(2, 6, 16), torch.randint(0, 5, (2, 6))
    mask = torch.rand(2, 6, 6) > 0.4
    mask[..., 0] = True
    calls = [((x,), {}), ((x, mask), {}), ((x,), {"mask": mask}), ((x, None), {"labels": labels}),
             ((x, mask), {"labels": labels})]
    for copy_of_lean in (lean, copy.deepcopy(lean), pickle.loads(pickle.dumps(lean))):
        for args, kwargs in calls:
            nets = (model, copy_of_lean)  # a deep or pickled copy has parameters of its own
            (native_bytes, y0), (lean_bytes, y1) = (
                saved_bytes(lambda: net(*args, **kwargs), exclude=net.parameters()) for net in nets)
            assert torch.equal(y1, y0), (args, kwargs)
            g0, g1 = (torch.autograd.grad(y.sum(), list(net.parameters())) for y, net in zip((y0, y1), nets))
            assert all(torch.equal(a, b) for a, b in zip(g1, g0)), (args, kwargs)
            assert lean_bytes < native_bytes, (args, kwargs, lean_bytes, native_bytes)
    assert any("forward(mask=None, labels=None)" in note for note in lean.rewrite_report.notes)


def test_timm_vit_called_without_a_mask_runs_a_graph_traced_without_one():
    # timm's ViT: forward(x, attn_mask=None, is_causal=False) tests `attn_mask is not None or
    # is_causal`. The graph for lean(x) is traced with the mask None and the flag False; a mask
    # given takes the graph traced with one. Neither runs the runtime front end (no call sites).
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=5, drop_rate=0.0, drop_path_rate=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lean = optimize(model)
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 1, 17, 17) > 0.3
    mask[..., 0] = True
    for args in ((x,), (x, mask)):
        _assert_same_step(model, lean, *args)
    assert lean.rewrite_report.replaced and not [r for r in lean.rewrite_report.replaced if r.site]


class _ReadsKwargs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x, **kwargs):
        h = F.gelu(self.a(x))
        if kwargs.get("mask") is not None:  # a Proxy's .get() is never None
            h = h * kwargs["mask"]
        return self.b(h)


class _IgnoresKwargs(_ReadsKwargs):
    def forward(self, x, **kwargs):
        return self.b(F.gelu(self.a(x)))


def test_forward_that_reads_kwargs_runs_under_the_runtime_front_end():
    # Traced, lean(x) raised KeyError: 'mask' (the graph had taken the path of a given mask).
    torch.manual_seed(0)
    model, x, mask = _ReadsKwargs(), torch.randn(3, 4), torch.rand(8)
    with pytest.warns(UserWarning, match=r"forward reads \*\*kwargs"):
        lean = optimize(model)
    assert not isinstance(lean, graph_rewrite.RewrittenModule)
    assert torch.equal(lean(x), model(x)) and torch.equal(lean(x, mask=mask), model(x, mask=mask))
    assert lean.rewrite_report.replaced  # the runtime front end rewrote the Linear after the GELU
    unread = optimize(_IgnoresKwargs())
    assert isinstance(unread, graph_rewrite.RewrittenModule)  # kwargs the graph never reads: still traced


class _Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x, return_features: bool = False):
        h = self.fc2(F.gelu(self.fc1(x)))
        if return_features:  # `if` on a Proxy stops a trace; on the default False it does not
            return h
        return self.head(F.silu(h))


def test_a_flag_tested_with_if_gets_a_graph_for_its_default():
    # The path of a given flag cannot be traced; the copy had run all of its calls under the
    # runtime front end. Now lean(x) runs a graph traced with the flag False, and
    # lean(x, return_features=True) the model's own forward under the runtime front end.
    torch.manual_seed(0)
    model, x = _Flagged(), torch.randn(4, 8)
    lean = optimize(model)
    assert isinstance(lean, graph_rewrite.RewrittenModule)
    assert any("return_features=False" in note for note in lean.rewrite_report.notes)
    for kwargs in ({}, {"return_features": False}, {"return_features": True}):
        _assert_same_step(model, lean, x, **kwargs)
        assert bool([r for r in lean.rewrite_report.replaced if r.site]) == bool(kwargs.get("return_features"))
    # torch.export runs a GraphModule's graph, not its forward: FX's check of the flag stays in it.
    exported = torch.export.export(lean, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))
    with pytest.raises(AssertionError, match="return_features has been specialized"):
        torch.export.export(lean, (x,), {"return_features": True})
    with pytest.raises(TypeError, match="picks its graph by the arguments"):
        torch.jit.script(lean)  # it would compile the defaults' graph alone


def test_export_of_a_copy_with_optional_arguments_says_which_graph_it_runs():
    # torch.export runs a GraphModule's graph, not its forward: given a call without the mask,
    # the graph traced with one fails at its check instead of at masked_fill (or somewhere worse).
    torch.manual_seed(0)
    model = _OptionalArguments()
    lean = optimize(model)
    x, mask = torch.randn(2, 6, 16), torch.rand(2, 6, 6) > 0.4
    mask[..., 0] = True
    exported = torch.export.export(lean, (x, mask), {"labels": torch.randint(0, 5, (2, 6))})
    assert exported.module() is not None
    with pytest.raises(AssertionError, match="mask was given when this graph was traced"):
        torch.export.export(lean, (x,))


class _ScaledByArgument(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x, scale: float = 1.0):
        h = F.silu(self.a(x)) * scale  # FX cannot tell the number from a tensor
        return self.b(h), h * scale


def test_an_activation_times_a_number_argument_stays_exact():
    # The recompute rules took `scale` for a tensor: lean(x) raised "Expected a value of type
    # 'Tensor' for argument 'other'" (and 'Optional[Tensor]' for the Linear's gate).
    torch.manual_seed(0)
    model = _ScaledByArgument()
    lean = optimize(model)
    x = torch.randn(4, 8)
    for args in ((x,), (x, 2.5), (x, 3), (x, torch.tensor(0.5))):
        _assert_same_step(model, lean, *args)


class _TakesMode(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x, mode: str = "gelu"):
        h = self.a(x)
        return self.b(F.gelu(h) if mode == "gelu" else F.silu(h))  # a branch on a string: not traced


def test_runtime_front_end_passes_keyword_arguments_named_like_its_own():
    # The runtime front end's forward took (module, mode, inner, *args, **kwargs): a model's own
    # mode= keyword raised "got multiple values for argument 'mode'".
    torch.manual_seed(0)
    model = _TakesMode()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lean = optimize(model)
    x = torch.randn(4, 8)
    for kwargs in ({}, {"mode": "gelu"}, {"mode": "silu"}):
        assert torch.equal(lean(x, **kwargs), model(x, **kwargs)), kwargs
