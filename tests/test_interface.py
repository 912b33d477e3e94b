"""The optimized copy keeps the model's interface: it saves and loads, has the same
signature, class, methods and attributes, and says so when a hook could never run."""
import io
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
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
    model = Dropped().eval()
    lean = graph_rewrite.optimize(model)
    assert "stochastic_depth" in lean.code
    x = torch.randn(4, 8)
    torch.save(lean, tmp_path / "lean.pt")
    torch.save(x, tmp_path / "x.pt")
    code = f"""
        import torch, graph_rewrite
        m = torch.load({str(tmp_path / 'lean.pt')!r}, weights_only=False)
        assert "graph_rewrite.softplus" in m.code, m.code
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
