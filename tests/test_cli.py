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


# --------------------------------------------------------------------------- pretrained weights, no network
def _hub_file(tmp_path, monkeypatch, name):
    """Point the torch hub cache at tmp_path and return the path --pretrained expects for ``name``."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import torchvision

    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]


def _no_network(monkeypatch):
    import torch.hub

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    import torchvision.models._api as api

    monkeypatch.setattr(api, "load_state_dict_from_url", refuse)


def test_pretrained_reads_the_hub_cache_file(tmp_path, monkeypatch, capsys):
    torchvision = pytest.importorskip("torchvision")
    _no_network(monkeypatch)
    path = _hub_file(tmp_path, monkeypatch, "resnet18")
    assert path.name == "resnet18-f37072fd.pth"
    torch.manual_seed(3)
    state = {k: (v + 0.5 if v.is_floating_point() else v) for k, v in torchvision.models.resnet18().state_dict().items()}
    path.parent.mkdir(parents=True)
    torch.save(state, path)

    model = build_model("resnet18", pretrained=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # The enum's own get_state_dict (the URL) is back after the build.
    assert "get_state_dict" not in torchvision.models.ResNet18_Weights.__dict__
    # The quantization-ready model takes the float weights from the same file.
    q = build_model("quantized_resnet18", pretrained=True)
    assert torch.equal(q.conv1.weight, state["conv1.weight"])

    assert main(["resnet18", "--pretrained", "--shape", "2,3,32,32"]) == 0
    assert "graph_rewrite.verify: PASSED" in capsys.readouterr().out


def test_pretrained_without_the_file_says_where_and_how(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torchvision")
    _no_network(monkeypatch)
    path = _hub_file(tmp_path, monkeypatch, "efficientnet_b0")
    assert main(["efficientnet_b0", "--pretrained", "--shape", "1,3,32,32"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err  # where the file is expected
    assert "https://download.pytorch.org/models/" + path.name in err  # where to fetch it
    assert "--weights PATH" in err and "never downloads" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="use --weights PATH"):
        build_model("tests.test_cli:small_net", pretrained=True)
    with pytest.raises(SystemExit):  # one source of weights at a time
        main(["resnet18", "--pretrained", "--weights", "w.pt"])


def test_pretrained_file_that_does_not_fit(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    _no_network(monkeypatch)
    path = _hub_file(tmp_path, monkeypatch, "resnet18")
    path.parent.mkdir(parents=True)
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match="does not fit resnet18"):
        build_model("resnet18", pretrained=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights"):
        build_model("resnet18", pretrained=True)


def test_weights_file_with_wrapper_prefixes(tmp_path):
    state = small_net().state_dict()
    torch.save({"model": {"module." + k: v + 1 for k, v in state.items()}}, tmp_path / "ddp.pt")
    target = small_net()
    load_weights(target, str(tmp_path / "ddp.pt"))
    assert all(torch.equal(target.state_dict()[k], v + 1) for k, v in state.items())
    torch.save({"_orig_mod." + k: v - 1 for k, v in state.items()}, tmp_path / "compiled.pt")
    load_weights(target, str(tmp_path / "compiled.pt"))
    assert all(torch.equal(target.state_dict()[k], v - 1) for k, v in state.items())


# --------------------------------------------------------------------------- arguments, progress, width
@pytest.mark.parametrize("shape", ["4,x,6", "4,,6", "4,6,", "x", "4,-6", "4.0,6", ""])
def test_a_malformed_shape_is_an_argparse_error(shape, capsys):
    # Before, "4,x,6" and "4,,6" were read as 4,6 and the run went on with another shape.
    with pytest.raises(SystemExit) as e:
        main(["tests.test_cli:small_net", "--shape", shape])
    assert e.value.code == 2
    assert "bad shape" in capsys.readouterr().err


def test_shape_spellings():
    from graph_rewrite.cli import _shape

    assert _shape("2,3,224,224") == _shape("2x3x224x224") == _shape(" 2, 3,224,224 ") == [2, 3, 224, 224]


def test_ops_help_and_choices_come_from_the_rules_table(capsys):
    from graph_rewrite.cli import _parser
    from graph_rewrite.rules import KINDS, RULES

    text = " ".join(_parser().format_help().split())  # argparse wraps the help text
    for r in RULES:
        assert r.name in text
    for k in KINDS:
        assert f"kind {k}:" in text
    with pytest.raises(SystemExit) as e:
        main(["tests.test_cli:small_net", "--shape", "4,6", "--ops", "softplus", "no_such_rule"])
    assert e.value.code == 2 and "unknown rule 'no_such_rule'" in capsys.readouterr().err


def test_tables_fit_the_width(capsys):
    assert main(["tests.test_cli:small_net", "--shape", "4,6", "--width", "60"]) == 0
    out = capsys.readouterr().out
    assert all(len(line) <= 60 for line in out.splitlines())
    assert "…" in out and "graph_rewrite.verify: PASSED" in out
    assert main(["tests.test_cli:small_net", "--shape", "4,6", "--width", "0"]) == 0
    assert "…" not in capsys.readouterr().out


def test_fit_tables_cuts_rows_and_wraps_prose():
    from graph_rewrite.cli import fit_tables

    text = "\n".join(["title", "a    b", "---  ------", "1    " + "x" * 50, "2    y", "note: " + "word " * 20])
    lines = fit_tables(text, 30).splitlines()
    assert lines[:3] == ["title", "a    b", "---  ------"]
    assert lines[3] == "1    " + "x" * 24 + "…" and lines[4] == "2    y"
    assert all(len(line) <= 30 for line in lines) and "…" not in "".join(lines[5:])
    assert " ".join(lines[5:]).split() == ("note: " + "word " * 20).split()
    assert fit_tables(text, 0) == text


def test_progress_is_plain_lines_off_a_terminal_and_a_bar_on_one():
    import io

    from graph_rewrite.cli import Steps

    log = io.StringIO()
    steps = Steps(2, stream=log)
    steps("building")
    steps("verifying")
    steps("done")
    steps.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [line.split(" (")[0] for line in lines] == [
        "graph-rewrite: [1/2] building", "graph-rewrite: [2/2] verifying", "graph-rewrite: done"]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    steps = Steps(2, stream=term)
    assert steps.bar is not None  # tqdm
    steps("building")
    steps("verifying")
    steps("done")
    assert "2/2" in term.getvalue() and "verifying" in term.getvalue()
    steps.close()
