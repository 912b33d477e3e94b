"""verify() and graph_diff(): correct rewrites pass, planted bugs fail, the user's state is untouched."""
import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graph_rewrite import optimize
from graph_rewrite.printout import graph_diff
from graph_rewrite.verification import VerificationReport, verify

torchvision = pytest.importorskip("torchvision")


def _check(report: VerificationReport, name: str):
    return next(c for c in report.checks if c.name == name)


def _mlp(act=nn.Softplus, width=1024, depth=4):
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), act())])


@pytest.fixture(scope="module")
def efficientnet():
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(weights=None).train()
    return model, optimize(model)


# --------------------------------------------------------------------------- correct rewrites pass
def test_softplus_mlp_passes_and_saves_four_activations():
    batch = 16
    model = _mlp()
    report = verify(model, optimize(model), torch.randn(batch, 1024))
    assert report.ok, str(report)
    act = batch * 1024 * 4  # one float32 activation
    # Native: each softplus keeps its input h_i, each next Linear its output s_i, and
    # s_4 is the output. Lean: softplus keeps s_i, the very tensor the Linear keeps.
    assert report.activation_bytes == (8 * act, 4 * act)
    assert report.activation_saving == 4 * act
    assert "MiB" in str(report)


def test_sigmoid_reports_no_saving_honestly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Sigmoid(), nn.Linear(64, 8))
    report = verify(model, optimize(model), torch.randn(8, 64))
    assert report.ok, str(report)
    before, after = report.activation_bytes
    assert before == after > 0
    assert "no saving: native sigmoid already saves its output" in str(report)


def test_dropout_in_train_mode_draws_the_same_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Softplus(), nn.Dropout(0.5), nn.Linear(64, 4)).train()
    x = torch.randn(16, 32)
    assert verify(model, optimize(model), x).ok
    assert verify(model, optimize(model), x, seed=123).ok


def test_model_without_parameters_compares_outputs_and_input_grads():
    model = nn.Softplus(beta=2.0)
    report = verify(model, optimize(model), torch.randn(3, 5))
    assert report.ok
    assert _check(report, "input gradients").worst_error is not None
    assert _check(report, "parameter gradients").worst_error is None  # skipped
    assert any("no trainable parameters" in n for n in report.notes)
    assert "no trainable parameters" in str(report)


def test_efficientnet_b0_train_mode_passes(efficientnet):
    # Deep net, BatchNorm batch statistics, stochastic depth, SE sigmoids.
    model, lean = efficientnet
    report = verify(model, lean, torch.randn(2, 3, 64, 64))
    assert report.ok, str(report)
    assert _check(report, "buffer updates").ok


def test_resnet18_softplus_train_mode_rounding_noise_passes():
    # The lean softplus backward (1 - exp(-y)) rounds differently from native
    # (sigmoid(x)); through 17 softplus and 20 BatchNorms the float32 gradients differ
    # at rounding level. Measured against the model's gradient scale, that passes.
    def to_softplus(m):
        for name, child in m.named_children():
            setattr(m, name, nn.Softplus()) if isinstance(child, nn.ReLU) else to_softplus(child)

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).train()
    to_softplus(model)
    report = verify(model, optimize(model), torch.randn(2, 3, 64, 64))
    assert report.ok, str(report)
    assert report.activation_bytes[1] < report.activation_bytes[0]


def test_conv_bias_before_batchnorm_is_noise_not_failure():
    # The bias's true gradient is 0 (BatchNorm subtracts the mean), so its computed
    # gradient is pure rounding noise; an element-wise relative check would flag it.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, bias=True), nn.BatchNorm2d(16), nn.Softplus(),
        nn.Conv2d(16, 16, 3, bias=True), nn.BatchNorm2d(16), nn.Softplus(),
        nn.Flatten(), nn.LazyLinear(10),
    ).train()
    model(torch.randn(4, 3, 16, 16))  # materialise the lazy layer
    report = verify(model, optimize(model), torch.randn(4, 3, 16, 16))
    assert report.ok, str(report)
    assert _check(report, "parameter gradients").worst_error > 0  # there was noise to tolerate


# --------------------------------------------------------------------------- planted bugs fail
class _SigmoidFn(torch.autograd.Function):
    forget_dy = False

    @staticmethod
    def forward(ctx, x):
        y = torch.sigmoid(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return y * (1 - y) if _SigmoidFn.forget_dy else dy * y * (1 - y)


class _HandSigmoid(nn.Module):
    def forward(self, x):
        return _SigmoidFn.apply(x)


class _Square(nn.Module):
    def forward(self, x):
        return x * x


@pytest.mark.parametrize("head", ["linear", "square"])
@pytest.mark.parametrize("forget_dy", [False, True], ids=["correct_backward", "mxnet_docs_bug"])
def test_backward_that_forgets_the_incoming_gradient_fails(head, forget_dy, monkeypatch):
    # MXNet's docs once wrote sigmoid's backward as y*(1-y), without dy. After a
    # Linear or a square, dy != 1, so the gradients must come out wrong.
    monkeypatch.setattr(_SigmoidFn, "forget_dy", forget_dy)
    torch.manual_seed(0)
    tail = nn.Linear(16, 4) if head == "linear" else _Square()
    model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), tail)
    planted = nn.Sequential(nn.Linear(8, 16), _HandSigmoid(), tail)
    planted.load_state_dict(model.state_dict())
    report = verify(model, planted, torch.randn(5, 8))
    assert _check(report, "outputs").ok  # the forward is right
    if not forget_dy:
        assert report.ok, str(report)
        return
    assert not report.ok
    params = _check(report, "parameter gradients")
    assert not params.ok and params.where in ("0.weight", "0.bias")
    assert params.worst_error > 1e-2
    inputs = _check(report, "input gradients")
    assert not inputs.ok and inputs.where == "inputs[0]"
    text = str(report)
    assert "FAILED" in text and params.where in text


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_aware_defaults_pass_a_correct_rewrite_and_fail_the_bug(dtype, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Softplus(), nn.Linear(32, 32), nn.Sigmoid(), nn.Linear(32, 4)).to(dtype)
    x = torch.randn(8, 16, dtype=dtype)
    report = verify(model, optimize(model), x)
    assert report.ok, str(report)
    monkeypatch.setattr(_SigmoidFn, "forget_dy", True)
    planted = nn.Sequential(*model[:3], _HandSigmoid(), model[4])
    report = verify(model, planted, x)
    assert not _check(report, "parameter gradients").ok, str(report)


def test_wrong_forward_fails():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Softplus(), nn.Linear(16, 4))
    wrong = nn.Sequential(nn.Linear(8, 16), nn.Softplus(beta=2.0), nn.Linear(16, 4))
    wrong.load_state_dict(model.state_dict())
    report = verify(model, wrong, torch.randn(5, 8))
    assert not report.ok
    outputs = _check(report, "outputs")
    assert not outputs.ok and outputs.where == "out"
    assert outputs.worst_error > outputs.tolerance


def test_reference64_passes_for_a_correct_rewrite_and_fails_for_the_bug(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Softplus(), nn.Linear(64, 64), nn.Sigmoid(), nn.Linear(64, 4))
    x = torch.randn(8, 32)
    report = verify(model, optimize(model), x, reference64=True)
    assert report.ok and _check(report, "gradients vs float64").ok
    assert next(model.parameters()).dtype == torch.float32  # the float64 copy is a copy

    monkeypatch.setattr(_SigmoidFn, "forget_dy", True)
    planted = nn.Sequential(model[0], model[1], model[2], _HandSigmoid(), model[4])
    report = verify(model, planted, x, reference64=True)
    assert not _check(report, "gradients vs float64").ok


def test_tolerances_can_be_overridden():
    class Scaled(nn.Module):
        def __init__(self, lin, factor):
            super().__init__()
            self.lin, self.factor = lin, factor

        def forward(self, x):
            return F.softplus(self.lin(x)) * self.factor

    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    off = Scaled(lin, 1 + 1e-4)
    assert not verify(Scaled(lin, 1.0), off, x).ok
    assert verify(Scaled(lin, 1.0), off, x, rtol=1e-3, atol=1e-5, grad_tol=1e-3).ok



def test_cuda_float32_gradients_get_float16s_tolerance_only_where_tf32_may_apply():
    # On an H100, resnet50 with softplus: lean vs native 1.2e-3 of the largest gradient
    # with cuDNN's default TF32, 1.9e-6 without (benchmarks/GPU.md). Fake CUDA tensors
    # stand in for the device here; the GPU run checks the real thing.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from graph_rewrite import verification as V

    if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
        pytest.skip("TF32 matmuls allowed in this process (torch's default is not)")
    with FakeTensorMode():
        on_gpu = torch.empty(3, device="cuda")
    convnet, mlp = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Softplus()), nn.Sequential(nn.Linear(3, 3), nn.Softplus())
    # Only the cuDNN flag is toggled: setting cuBLAS's turns its fp32_precision from
    # "none" (inherit) to "ieee", which restoring the flag does not undo.
    cudnn = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert V._tf32_allowed(convnet) and not V._tf32_allowed(mlp)  # cuBLAS TF32 is off by default
        assert V._grad_tolerance("w", {"w": on_gpu}, {}, tf32=True) == V.GRAD_TOLERANCES[torch.float16]
        assert V._grad_tolerance("w", {"w": on_gpu}, {}, tf32=False) == V.GRAD_TOLERANCES[torch.float32]
        assert V._grad_tolerance("w", {"w": torch.empty(3)}, {}, tf32=True) == V.GRAD_TOLERANCES[torch.float32]
        assert V._grad_tolerance("w", {"w": on_gpu.double()}, {}, tf32=True) == V.GRAD_TOLERANCES[torch.float64]
        torch.backends.cudnn.allow_tf32 = False
        assert not V._tf32_allowed(convnet)
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn

class _NanGrad(nn.Module):
    """softplus(lin(x)) + sqrt(|x[:, 0]|) + asin(x[:, 1]): where x[i, 0] == 0 the gradient
    is NaN (inf * sign(0)), where x[i, 1] == 1 it is inf; `bug` adds a NaN elsewhere."""

    def __init__(self, lin: nn.Linear, bug: bool = False) -> None:
        super().__init__()
        self.lin, self.bug = lin, bug

    def forward(self, x):
        y = F.softplus(self.lin(x)) + x[:, :1].abs().sqrt() + x[:, 1:2].asin()
        if self.bug:
            y = y + (x[2, 2] - x[2, 2].detach()) * float("nan")
        return y


def test_nan_and_inf_gradients_in_both_models_agree_and_in_one_fail():
    # Native models produce these (FCOS's loss: NaN gradients for its target boxes);
    # the same inf/NaN in the same place is agreement, not an infinite error.
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    x = torch.rand(3, 4) * 0.5
    x[0, :2] = torch.tensor([0.0, 1.0])
    model = _NanGrad(lin)
    grads = torch.autograd.grad(model(x.requires_grad_()).sum(), x)[0]
    assert grads[0, 0].isnan() and grads[0, 1].isinf() and grads[1:].isfinite().all()  # the premise
    x = x.detach()
    report = verify(model, optimize(model), x)
    assert report.ok, str(report)
    assert _check(report, "input gradients").worst_error < 1e-6  # an inf does not hide errors by scaling
    report = verify(model, _NanGrad(lin, bug=True), x)
    assert not _check(report, "input gradients").ok
    assert _check(report, "input gradients").worst_error == float("inf")


def test_complex_gradient_nan_in_one_part_does_not_hide_the_other():
    from graph_rewrite.verification import _grad_errors

    nan = float("nan")
    ref = {"w": torch.tensor([complex(nan, 1.0), 1 + 0j])}
    assert _grad_errors(ref, {"w": torch.tensor([complex(nan, 1.0), 1 + 0j])})[0]["w"] == 0.0
    assert _grad_errors(ref, {"w": torch.tensor([complex(nan, 500.0), 1 + 0j])})[0]["w"] == 499.0


def test_finite_error_next_to_an_inf_gradient_is_not_scaled_away():
    class Off(_NanGrad):
        def forward(self, x):
            return super().forward(x) * (1 + 1e-2 * (x[1:2] - x[1:2].detach()).sum())

    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    x = torch.rand(3, 4) * 0.5
    x[0, :2] = torch.tensor([0.0, 1.0])
    report = verify(_NanGrad(lin), Off(lin), x)
    check = _check(report, "input gradients")
    assert not check.ok and 0 < check.worst_error < float("inf"), str(report)


# --------------------------------------------------------------------------- nested outputs
class _Detector(nn.Module):
    """Returns what detection models return: a list of dicts (here with a tuple inside too)."""

    def __init__(self, boxes_scale=1.0, labels_fn=torch.argmax):
        super().__init__()
        self.head = nn.Linear(6, 4)
        self.boxes_scale, self.labels_fn = boxes_scale, labels_fn

    def forward(self, x):
        h = self.head(x)
        return [{"boxes": h * self.boxes_scale, "scores": torch.sigmoid(h), "labels": self.labels_fn(h, -1),
                 "extra": (F.softplus(h), 7)}]


def test_nested_outputs_pass_and_a_wrong_leaf_is_named():
    model = _Detector()
    x = torch.randn(3, 6)
    report = verify(model, optimize(model), x)
    assert report.ok, str(report)
    assert "5/5 leaves" in _check(report, "outputs").detail  # boxes, scores, labels, extra[0], extra[1]

    wrong = _Detector(boxes_scale=1.01)
    wrong.load_state_dict(model.state_dict())
    report = verify(model, wrong, x)
    outputs = _check(report, "outputs")
    assert not outputs.ok and outputs.where == "out[0]['boxes']"
    assert "out[0]['boxes']" in str(report)


def test_integer_outputs_compare_exactly():
    model = _Detector()
    wrong = _Detector(labels_fn=torch.argmin)
    wrong.load_state_dict(model.state_dict())
    report = verify(model, wrong, torch.randn(3, 6))
    outputs = _check(report, "outputs")
    assert not outputs.ok and outputs.where == "out[0]['labels']"
    assert _check(report, "parameter gradients").ok  # the float leaves are right


# --------------------------------------------------------------------------- the user's state
class _Counter(nn.Module):
    """Reads a buffer its own forward increments: needs buffers restored between the runs."""

    def __init__(self, lin, count):
        super().__init__()
        self.lin = lin
        self.register_buffer("count", count)

    def forward(self, x):
        self.count.add_(1)
        return torch.sigmoid(self.lin(x)) * self.count


def test_shared_buffers_are_restored_between_the_two_runs():
    lin, count = nn.Linear(4, 4), torch.zeros(())
    original, twin = _Counter(lin, count), _Counter(lin, count)  # share tensors, like optimize()
    report = verify(original, twin, torch.randn(3, 4))
    assert report.ok, str(report)
    assert count.item() == 0


def test_user_models_tensors_grads_flags_and_rng_are_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Softplus(), nn.Dropout(0.3),
        nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.Sigmoid(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    ).train()
    model[5].eval()  # mixed flags must come back as they were
    lean = optimize(model)
    model[0].weight.grad = torch.full_like(model[0].weight, 0.25)
    known_grad = model[0].weight.grad
    x = torch.randn(2, 3, 8, 8)
    x_before = x.clone()

    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    flags = [m.training for m in model.modules()] + [m.training for m in lean.modules()]
    rng = torch.get_rng_state()

    report = verify(model, lean, x, reference64=True, time_iters=1)
    assert report.ok, str(report)

    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(x, x_before) and not x.requires_grad
    for k, v in model.state_dict().items():  # incl. running_mean, num_batches_tracked
        assert torch.equal(v, tensors[k]), k
    assert lean.state_dict().keys() == model.state_dict().keys()
    for n, p in model.named_parameters():
        if grads[n] is None:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, grads[n]), n
    assert model[0].weight.grad is known_grad
    assert [m.training for m in model.modules()] + [m.training for m in lean.modules()] == flags
    assert int(model[1].num_batches_tracked) == 0


# --------------------------------------------------------------------------- clear errors
def test_mismatched_parameter_names_raise_value_error_naming_them():
    a = nn.Sequential(nn.Linear(4, 4), nn.Softplus())
    b = nn.Sequential(nn.Softplus(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"0\.weight.*1\.weight"):
        verify(a, b, torch.randn(2, 4))


def test_inputs_the_model_rejects_raise_value_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Softplus())
    with pytest.raises(ValueError, match="original model rejected the inputs"):
        verify(model, optimize(model), torch.randn(2, 7))


def test_non_module_raises_type_error():
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="nn.Module"):
        verify(model, lambda x: x, torch.randn(1, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        graph_diff(model, "not a model")


def test_no_float_output_raises_value_error():
    class ArgMax(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x).argmax(-1)

    model = ArgMax()
    with pytest.raises(ValueError, match="no floating-point output"):
        verify(model, optimize(model), torch.randn(2, 4))


def test_different_train_eval_modes_raise_value_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout())
    lean = optimize(model)
    model.eval()
    with pytest.raises(ValueError, match="train/eval"):
        verify(model, lean, torch.randn(2, 4))


# --------------------------------------------------------------------------- the report
def test_report_to_dict_is_json_and_cuda_figures_are_not_measured_on_cpu():
    model = _Detector()
    wrong = nn.Sequential()  # no parameters, different names: caught before running
    with pytest.raises(ValueError):
        verify(model, wrong, torch.randn(3, 6))

    report = verify(model, optimize(model), torch.randn(3, 6), time_iters=2)
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["ok"] is True and d["activation_bytes"] == list(report.activation_bytes)
    assert {c["name"] for c in d["checks"]} >= {"outputs", "input gradients", "parameter gradients"}
    assert report.time_s is not None and all(t > 0 for t in report.time_s) and report.time_ratio > 0
    if not any(t.is_cuda for t in model.parameters()):
        assert report.peak_cuda_bytes is None and report.cuda_bytes_after_forward is None
        assert "not measured" in str(report)

    # A failure with an infinite error (a shape change) still gives strict JSON.
    class Shorter(_Detector):
        def forward(self, x):
            out = super().forward(x)
            out[0]["boxes"] = out[0]["boxes"][:, :2]
            return out

    shorter = Shorter()
    shorter.load_state_dict(model.state_dict())
    report = verify(model, shorter, torch.randn(3, 6))
    assert not report.ok
    json.dumps(report.to_dict(), allow_nan=False)


# --------------------------------------------------------------------------- graph printouts
def test_graph_diff_shows_the_replaced_calls():
    model = _mlp(width=8, depth=2)
    text = graph_diff(model, optimize(model))
    minus = [l for l in text.splitlines() if l.startswith("-") and not l.startswith("---")]
    plus = [l for l in text.splitlines() if l.startswith("+") and not l.startswith("+++")]
    assert len(minus) == len(plus) == 2
    assert all('getattr(self, "' in l for l in minus)
    assert all("torch.ops.graph_rewrite.softplus" in l for l in plus)
    assert "nn.Softplus" in text and "beta=1, threshold=20" in text


def test_graph_diff_of_a_big_model_shows_only_changed_regions(efficientnet):
    model, _ = efficientnet
    lean = optimize(model, ops=["sigmoid"])  # 16 changes in ~300 lines (the recompute kind rewrites ~100)
    text = graph_diff(model, lean)
    full = len(lean.code.splitlines())  # ~255 lines
    diff, _, table = text.partition("node(s) rewritten:")
    assert len(diff.splitlines()) < full / 2
    assert len(text.splitlines()) < full
    assert diff.count("\n+    ") == 16 and "torch.ops.graph_rewrite.sigmoid" in diff
    assert table.count("nn.Sigmoid") == 16


def test_graph_diff_falls_back_to_the_table_when_the_original_cannot_be_traced():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.Sigmoid()

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: FX cannot trace this
                return self.act(x)
            return self.act(-x)

    model = Branchy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lean = optimize(model)
    assert "no node was rewritten" in graph_diff(model, lean)  # call sites are recorded as they run
    lean(torch.ones(3, requires_grad=True))
    text = graph_diff(model, lean)
    assert "no code diff" in text and "runtime front end" in text
    assert "torch.sigmoid" in text and "graph_rewrite.sigmoid" in text and "test_verify.py:" in text


class _Cache:
    """Like a Hugging Face DynamicCache: a plain class holding tensors, equal only to itself."""

    def __init__(self, keys):
        self.layers = [{"keys": k} for k in keys]


class _CachingModel(nn.Module):
    def __init__(self, shift=0.0):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.shift = shift

    def forward(self, x):
        h = self.lin(x)
        return {"logits": torch.sigmoid(h), "cache": _Cache([h + self.shift, h * 2])}


def test_plain_objects_in_outputs_are_compared_by_their_tensors():
    model = _CachingModel()
    report = verify(model, optimize(model), torch.randn(3, 4))
    assert report.ok, str(report)
    other = _CachingModel(shift=1.0)
    other.load_state_dict(model.state_dict())
    report = verify(model, other, torch.randn(3, 4))
    assert not report.ok
    assert report.failed[0].where == "out['cache'].layers[0]['keys']"
