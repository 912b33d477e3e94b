"""The optimized copy keeps the model's interface: it saves and loads, has the same
signature, class, methods and attributes, and says so when a hook could never run."""
import copy
import inspect
import io
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune
import torchvision
from torch.fx import _symbolic_trace

import graph_rewrite


@pytest.fixture(autouse=True)
def fx_wrap_table():
    """Drops entries a failing test left in FX's table of wrapped functions (see
    ``torch.fx.wrap``): one whose name is missing from its namespace breaks every later trace."""
    before = set(_symbolic_trace._wrapped_fns_to_patch)
    yield
    for key, namespace in list(_symbolic_trace._wrapped_fns_to_patch.items()):
        if key not in before and key[1] not in namespace:
            del _symbolic_trace._wrapped_fns_to_patch[key]


class Dropped(nn.Module):
    """Softplus, then torchvision's stochastic depth: a function FX keeps as a call (``torch.fx.wrap``)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.Softplus()
        self.drop = torchvision.ops.StochasticDepth(0.5, "row")

    def forward(self, x):
        return x + self.drop(self.act(self.fc(x)))


def _softplus_mlp():
    return nn.Sequential(nn.Linear(8, 8), nn.Softplus(), nn.Linear(8, 2))


# ----------------------------------------------------------------- pickle and torch.save
def test_torch_save_round_trip_of_efficientnet():
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(num_classes=10).eval()
    lean = graph_rewrite.optimize(model)
    buf = io.BytesIO()
    torch.save(lean, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert type(back).__name__ == "EfficientNet"
    assert back.rewrite_report.counts() == lean.rewrite_report.counts()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
    back.train()  # the training graph, with the wrapped stochastic_depth, was rebuilt too
    assert "stochastic_depth" in back.code
    back(x).sum().backward()


def test_torch_save_loads_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    # Classes a fresh process can import: torch's and torchvision's.
    model = nn.Sequential(nn.Linear(8, 8), nn.Softplus(), torchvision.ops.StochasticDepth(0.5, "row")).eval()
    lean = graph_rewrite.optimize(model)
    assert "stochastic_depth" in lean.code
    x = torch.randn(4, 8)
    torch.save(lean, tmp_path / "lean.pt")
    torch.save(x, tmp_path / "x.pt")
    code = f"""
        import torch, graph_rewrite
        m = torch.load({str(tmp_path / 'lean.pt')!r}, weights_only=False)
        assert "graph_rewrite.softplus" in m.code, m.code
        assert isinstance(m, torch.nn.Sequential) and isinstance(m, graph_rewrite.RewrittenModule)
        torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})).detach(), {str(tmp_path / 'y.pt')!r})
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), model(x).detach(), rtol=0, atol=0)


def test_a_failed_load_leaves_later_optimize_calls_alone():
    data = pickle.dumps(graph_rewrite.optimize(Dropped()))
    # Corrupt the pickle: blank out the line that imports the wrapped function (same length,
    # so the pickle still parses); the load then fails inside the generated code.
    line = b"from torchvision.ops.stochastic_depth import stochastic_depth as torchvision_ops_stochastic_depth_stochastic_depth"
    data = data.replace(line, b"#" + b" " * (len(line) - 1))
    with pytest.raises(Exception):
        pickle.loads(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "FX could not trace" warning
        lean = graph_rewrite.optimize(_softplus_mlp())
    assert isinstance(lean, graph_rewrite.RewrittenModule)
    assert lean.rewrite_report.counts() == {"graph_rewrite.softplus": 1}


# ----------------------------------------------------------------- class, methods and attributes
def test_fx_copy_of_a_timm_model_keeps_its_class_methods_and_attributes():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", num_classes=10).eval()
    lean = graph_rewrite.optimize(model)
    assert isinstance(lean, graph_rewrite.RewrittenModule)  # the root traced: the FX front end
    assert isinstance(lean, timm.models.efficientnet.EfficientNet)
    assert type(lean).__name__ == "EfficientNet"
    assert lean.num_classes == 10 and lean.num_features == model.num_features
    assert lean.pretrained_cfg == model.pretrained_cfg
    x = torch.randn(2, 3, 64, 64)
    features = lean.forward_features(x)  # the class's eager code, on the copy's shared submodules
    torch.testing.assert_close(features, model.forward_features(x), rtol=0, atol=0)
    torch.testing.assert_close(lean.forward_head(features), model.forward_head(features), rtol=0, atol=0)
    torch.testing.assert_close(lean(x), model(x), rtol=0, atol=0)
    assert lean.get_classifier() is lean.classifier and lean.classifier is not model.classifier
    lean.set_grad_checkpointing(True)
    assert lean.grad_checkpointing and not model.grad_checkpointing
    lean.reset_classifier(5)
    assert lean(x).shape == (2, 5) and model(x).shape == (2, 10)


def test_fx_copy_of_a_torchvision_model_keeps_its_class_through_copies():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    lean = graph_rewrite.optimize(model)
    x = torch.randn(2, 3, 64, 64)
    buf = io.BytesIO()
    torch.save(lean, buf)
    buf.seek(0)
    for twin in (lean, copy.deepcopy(lean), pickle.loads(pickle.dumps(lean)), torch.load(buf, weights_only=False)):
        assert isinstance(twin, torchvision.models.MobileNetV3) and isinstance(twin, graph_rewrite.RewrittenModule)
        assert type(twin).__name__ == "MobileNetV3"
        assert "graph_rewrite" in twin.code  # forward is still the rewritten graph
        torch.testing.assert_close(twin._forward_impl(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(twin(x), model(x), rtol=1e-6, atol=1e-6)
        assert twin.train() is twin and twin.training and twin.features[0][1].training
        twin.eval()


def test_fx_copy_of_a_sequential_is_a_sequential():
    model = _softplus_mlp()
    lean = graph_rewrite.optimize(model)
    assert isinstance(lean, nn.Sequential) and len(lean) == 3
    assert type(lean[1]) is nn.Softplus and lean[1] is not model[1]
    assert "graph_rewrite.softplus" in lean.code


def test_the_user_class_is_left_as_it_was():
    model = torchvision.models.resnet18(num_classes=10)
    methods = dict(vars(torchvision.models.ResNet))
    graph_rewrite.optimize(model)
    assert dict(vars(torchvision.models.ResNet)) == methods
    assert type(model) is torchvision.models.ResNet


def test_a_copy_whose_class_cannot_be_imported_still_loads():
    class Local(nn.Module):  # no importable name: pickle cannot rebuild the class
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(8, 8), nn.Softplus()

        def forward(self, x):
            return self.act(self.fc(x))

    model = Local()
    lean = graph_rewrite.optimize(model)
    assert isinstance(lean, Local)
    with pytest.warns(UserWarning, match="cannot be imported"):
        back = pickle.loads(pickle.dumps(lean))
    assert type(back).__name__ == "Local" and not isinstance(back, Local)
    x = torch.randn(3, 8)
    torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)


# ----------------------------------------------------------------- signature
class Starred(nn.Module):
    """``*xs`` before a keyword-only parameter: FX's placeholders come the other way round."""

    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(8, 8), nn.Softplus()

    def forward(self, *xs: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.act(self.fc(xs[0] + xs[1])) * scale


class PositionalOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(8, 8), nn.Softplus()

    def forward(self, x, /, y, *, scale=2.0):
        return self.act(self.fc(x - y)) * scale


def test_fx_copy_keeps_starred_and_keyword_only_parameters():
    torch.manual_seed(0)
    model = Starred()
    lean = graph_rewrite.optimize(model)
    assert isinstance(lean, graph_rewrite.RewrittenModule)
    assert "graph_rewrite.softplus" in lean.code
    assert inspect.signature(lean.forward) == inspect.signature(model.forward)
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(lean(a, b), model(a, b), rtol=0, atol=0)
    torch.testing.assert_close(lean(a, b, scale=3.0), model(a, b, scale=3.0), rtol=0, atol=0)
    torch.testing.assert_close(lean(a, b, a), model(a, b, a), rtol=0, atol=0)  # a third xs, not scale
    for twin in (copy.deepcopy(lean), pickle.loads(pickle.dumps(lean))):
        assert inspect.signature(twin.forward) == inspect.signature(model.forward)
        torch.testing.assert_close(twin(a, b, scale=3.0), model(a, b, scale=3.0), rtol=0, atol=0)


def test_fx_copy_keeps_positional_only_parameters():
    model = PositionalOnly()
    lean = graph_rewrite.optimize(model)
    assert "graph_rewrite.softplus" in lean.code
    assert inspect.signature(lean.forward) == inspect.signature(model.forward)
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(lean(x, y=y), model(x, y=y), rtol=0, atol=0)
    with pytest.raises(TypeError):
        lean(x, y, 3.0)  # scale is keyword-only, as in the model
    with pytest.raises(TypeError):
        lean(x=x, y=y)  # x is positional-only


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config)


def test_runtime_copy_of_a_hugging_face_model_keeps_its_signature():
    model = _tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FX cannot trace the root: the runtime front end
        lean = graph_rewrite.optimize(model)
    assert type(lean) is type(model)
    signature = inspect.signature(lean.forward)
    assert signature == inspect.signature(model.forward)
    # What transformers' Trainer reads to choose the dataset columns it keeps.
    assert {"input_ids", "attention_mask", "labels"} <= set(signature.parameters)
    ids = torch.randint(0, 128, (2, 6))
    torch.testing.assert_close(lean(input_ids=ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss)
    for twin in (copy.deepcopy(lean), pickle.loads(pickle.dumps(lean))):
        assert inspect.signature(twin.forward) == signature


# ----------------------------------------------------------------- hooks registered after optimize()
_REGISTER = ["register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
             "register_full_backward_pre_hook"]


@pytest.mark.parametrize("register", _REGISTER)
def test_a_hook_on_a_module_rewritten_into_an_op_is_refused(register):
    model = _softplus_mlp()
    lean = graph_rewrite.optimize(model)
    assert "graph_rewrite.softplus" in lean.code and "self.1(" not in lean.code.replace(" ", "")
    with pytest.raises(RuntimeError, match=r"'1'.*rewritten into graph_rewrite\.softplus.*never run.*before"):
        getattr(lean[1], register)(lambda *a: None)
    assert type(lean[1]) is nn.Softplus  # its class is left alone
    getattr(model[1], register)(lambda *a: None)  # the user's module takes hooks as before


def test_a_hook_on_a_consumer_rewritten_into_a_recompute_op_is_refused():
    lean = graph_rewrite.optimize(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2)))
    assert "recompute_linear" in lean.code
    with pytest.raises(RuntimeError, match=r"'2'.*graph_rewrite\.recompute_linear"):
        lean[2].register_forward_hook(lambda *a: None)


def test_hooks_on_modules_the_graph_still_calls_run():
    torch.manual_seed(0)
    model = _softplus_mlp()
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append("before optimize"))
    lean = graph_rewrite.optimize(model)
    lean[2].register_forward_pre_hook(lambda *a: calls.append("pre"))
    lean[2].register_forward_hook(lambda *a: calls.append("forward"))
    lean[0].register_full_backward_hook(lambda *a: calls.append("backward"))
    x = torch.randn(3, 8, requires_grad=True)
    lean(x).sum().backward()
    assert calls == ["before optimize", "pre", "forward", "backward"]


def test_the_refusal_survives_copies():
    lean = graph_rewrite.optimize(_softplus_mlp())
    for twin in (copy.deepcopy(lean), pickle.loads(pickle.dumps(lean))):
        with pytest.raises(RuntimeError, match="rewritten into graph_rewrite.softplus"):
            twin[1].register_forward_hook(lambda *a: None)
        twin[0].register_forward_hook(lambda *a: None)


def _nested(depth: int = 4) -> nn.Module:
    inner = nn.Sequential(nn.Linear(8, 8), nn.Softplus())
    for _ in range(depth - 1):
        inner = nn.Sequential(inner, nn.Linear(8, 8))
    return inner


def _module_getattr_calls(module: nn.Module, x: torch.Tensor, monkeypatch) -> int:
    """How often ``nn.Module.__getattr__`` runs in one forward of ``module``."""
    calls = []
    original = nn.Module.__getattr__

    def counting(self, name):
        calls.append(name)
        return original(self, name)

    with monkeypatch.context() as patch:
        patch.setattr(nn.Module, "__getattr__", counting)
        module(x)
    return len(calls)


def test_the_copy_finds_its_submodules_without_module_getattr(monkeypatch):
    # FX's code reads `getattr(getattr(self, "0"), "0")`: one Module.__getattr__ call, in Python,
    # per step of each submodule's path, on every forward. The copy's code reads `_modules`.
    torch.manual_seed(0)
    model, x = _nested(), torch.randn(3, 8)
    lean = graph_rewrite.optimize(model)
    native = _module_getattr_calls(model, x, monkeypatch)  # Linear.forward's weight and bias
    assert native == 2 * 4
    for twin in (lean, copy.deepcopy(lean), pickle.loads(pickle.dumps(lean))):
        assert _module_getattr_calls(twin, x, monkeypatch) == native
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    lean.eval()  # another graph: compiled again, the same way
    assert _module_getattr_calls(lean, x, monkeypatch) == native


def test_submodules_replaced_or_pruned_after_optimize_run_as_such():
    torch.manual_seed(0)
    model, x = _nested(), torch.randn(3, 8)
    lean = graph_rewrite.optimize(model)
    lean[1] = nn.Linear(8, 8)  # the code looks each path up on every call
    torch.nn.utils.prune.l1_unstructured(lean[0][0][0][0], "weight", amount=0.5)
    pruned = lean[0][0][0][0]
    first = nn.functional.linear(x, pruned.weight_orig * pruned.weight_mask, pruned.bias)
    expected = lean[1](model[0][1](model[0][0][1](nn.functional.softplus(first))))
    assert (pruned.weight == 0).sum() == 32
    torch.testing.assert_close(lean(x), expected, rtol=0, atol=0)


def test_a_model_class_with_its_own_getattr_still_has_it_called():
    class Wrapper(nn.Module):  # as PEFT's wrappers: unknown names go on to the wrapped model
        def __init__(self):
            super().__init__()
            self.asked = []
            self.model = _nested(2)

        def forward(self, x):
            return self.model(x)

        def __getattr__(self, name):
            if name != "asked":
                self.asked.append(name)
            return super().__getattr__(name)

    torch.manual_seed(0)
    model, x = Wrapper(), torch.randn(3, 8)
    lean = graph_rewrite.optimize(model)
    asked = []
    for m in (model, lean):
        m.asked.clear()
        m(x)
        asked.append(list(m.asked))
    torch.testing.assert_close(lean(x), model(x), rtol=0, atol=0)
    # FX's code reads `self.model` once per submodule it calls under it; each read asks the class.
    assert asked == [["model"], ["model"] * 2]


def test_torch_jit_script_leaves_the_copy_as_it_was():
    torch.manual_seed(0)
    model, x = _nested(), torch.randn(3, 8)
    lean = graph_rewrite.optimize(model)
    code, modules = lean.code, dict(lean._modules)
    scripted = torch.jit.script(lean)
    torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)
    assert lean.code == code and dict(lean._modules) == modules and type(lean).forward.__code__
    assert "graph_rewrite::softplus" in str(scripted.inlined_graph)


def test_a_wrapper_put_in_after_optimize_is_refused_not_skipped():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    torch.manual_seed(0)
    model, x = _nested(2), torch.randn(3, 8)
    lean = graph_rewrite.optimize(model)
    apply_activation_checkpointing(lean, check_fn=lambda m: m is lean[0])
    # The graph calls lean[0]'s modules itself: the wrapper's checkpoint would never run.
    with pytest.raises(RuntimeError, match=r"'0\.0'.*submodule '0' is now a CheckpointWrapper.*before optimize"):
        lean(x)


class _Picky(nn.Module):
    def forward(self, x):
        if x.shape[0] != 3:  # control flow on a size: FX leaves the module a call
            raise KeyError("batch")
        return x


def test_a_key_error_of_the_model_itself_is_raised_as_it_is():
    model = nn.Sequential(nn.Linear(8, 8), nn.Softplus(), _Picky())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lean = graph_rewrite.optimize(model)
    lean(torch.randn(3, 8))
    with pytest.raises(KeyError, match="batch"):
        lean(torch.randn(4, 8))


def test_a_hook_on_a_container_traced_through_is_refused():
    torch.manual_seed(0)
    model, x = _nested(3), torch.randn(3, 8)
    lean = graph_rewrite.optimize(model)
    # The graph calls lean[0][0][0] and the Linears, never lean[0] or lean[0][0]: their hooks would not run.
    for container in (lean[0], lean[0][0]):
        with pytest.raises(RuntimeError, match=r"module '0(\.0)?' is traced through.*register_forward_pre_hook"):
            container.register_forward_pre_hook(lambda *a: None)
    calls = []
    lean[0][1].register_forward_hook(lambda *a: calls.append("called by the graph"))
    model[0].register_forward_hook(lambda *a: calls.append("the user's model"))
    lean(x), model(x)
    assert calls == ["called by the graph", "the user's model"]
    twin = copy.deepcopy(lean)
    with pytest.raises(RuntimeError, match="traced through"):
        twin[0].register_forward_hook(lambda *a: None)


def test_a_container_hooked_before_optimize_stays_a_call_and_its_hook_runs():
    torch.manual_seed(0)
    model, x = _nested(3), torch.randn(3, 8)
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append("hook"))
    lean = graph_rewrite.optimize(model)
    torch.testing.assert_close(lean(x), model(x), rtol=0, atol=0)
    assert calls == ["hook", "hook"]
