"""The command line: graph-rewrite / python -m graph_rewrite."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from graph_rewrite.cli import build_model, load_weights, main


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Softplus(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 2))


def test_factory_model_runs_and_prints_the_three_parts(capsys):
    rc = main(["tests.test_cli:small_net", "--shape", "4,6", "--show-graph"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "2 node(s) rewritten" in out  # the rewrite table
    assert "+    _1 = torch.ops.graph_rewrite.softplus(_0, 1.0, 20.0)" in out  # the graph diff
    assert "graph_rewrite.verify: PASSED" in out and "not measured" in out  # the verification table


def test_python_dash_m_and_exit_status_for_bad_input():
    ok = subprocess.run([sys.executable, "-m", "graph_rewrite", "tests.test_cli:small_net", "--shape", "3,6"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "graph_rewrite", "tests.test_cli:small_net", "--shape", "3,5"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "rejected the inputs" in bad.stderr and "Traceback" not in bad.stderr


def test_failing_verification_exits_1(monkeypatch, capsys):
    import graph_rewrite.cli as cli
    import graph_rewrite.transform as opt

    real = opt.optimize

    def broken(model, ops=None):  # a rewrite with a wrong forward
        lean = real(model, ops=ops)
        lean.get_submodule("2").weight = nn.Parameter(lean.get_submodule("2").weight * 2)
        return lean

    monkeypatch.setattr(opt, "optimize", broken)
    assert cli.main(["tests.test_cli:small_net", "--shape", "4,6"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_unknown_model_and_torchvision_names(capsys):
    assert main(["no_such_model", "--shape", "1,3,8,8"]) == 2
    assert "unknown model" in capsys.readouterr().err
    pytest.importorskip("torchvision")
    assert type(build_model("resnet18")).__name__ == "ResNet"


def test_weights_file_is_loaded_strictly(tmp_path):
    model = small_net()
    state = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    target = small_net()
    load_weights(target, str(tmp_path / "w.pt"))
    assert all(torch.equal(v, state[k]) for k, v in target.state_dict().items())
    torch.save({"nope": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not fit"):
        load_weights(target, str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="no weights file"):
        load_weights(target, str(tmp_path / "missing.pt"))
