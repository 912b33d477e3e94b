"""The demos run as the README shows them (small sizes) and still print what they promise."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(script, *args, torch_home):
    env = dict(os.environ, TORCH_HOME=str(torch_home))  # an empty hub cache unless the test fills it
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "demos", script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def line_with(out, start):
    lines = [ln for ln in out.splitlines() if ln.startswith(start)]
    assert lines, f"no line starting with {start!r} in:\n{out}"
    return lines[0]


def test_seed_softplus(tmp_path):
    out = run_demo("seed_softplus.py", "--n", "400", "--no-compile", torch_home=tmp_path)
    assert "160,000 elements" in out
    assert "1.00 x" in line_with(out, "no grad")
    assert "2.00 x" in line_with(out, "native F.softplus")  # x kept for backward
    assert "2.00 x" in line_with(out, "TorchScript")  # the seed's "Nope"
    assert "1.00 x" in line_with(out, "graph_rewrite lean op")  # y only, like no grad
    assert "skipped (--no-compile)" in line_with(out, "torch.compile")
    if not torch.cuda.is_available():
        assert "not measured" in line_with(out, "native F.softplus")


def test_seed_sigmoid(tmp_path):
    out = run_demo("seed_sigmoid.py", torch_home=tmp_path)
    assert "graph_rewrite.verify: FAILED: input gradients, parameter gradients" in out
    assert "graph_rewrite.verify: PASSED" in out
    assert line_with(out, "graph_rewrite lean op").endswith("x.grad = [0.28746969, 0.18495615, 0.08606823]  matches")
    assert line_with(out, "documentation's Function").endswith("WRONG")
    assert "verify caught the missing dy; the lean op passes" in out


def test_efficientnet_pretrained_from_the_hub_cache_and_untrained(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    # Without a weights file: untrained, and a note says where the file would go.
    out = run_demo("efficientnet.py", "--size", "32", torch_home=tmp_path)
    expected = os.path.join(str(tmp_path), "hub", "checkpoints", "efficientnet_b0_rwightman-7f5810bc.pth")
    assert out.startswith("efficientnet_b0, untrained (random weights)")
    assert expected in out
    # With a state_dict saved under the hub cache's file name: loaded from there.
    torch.manual_seed(1)
    os.makedirs(os.path.dirname(expected))
    torch.save(torchvision.models.efficientnet_b0().state_dict(), expected)
    out = run_demo("efficientnet.py", "--size", "32", torch_home=tmp_path)
    assert out.startswith("efficientnet_b0 with torchvision's pretrained weights, read from the torch hub cache")
    assert "+    features_1_0_block_1_scale_activation = torch.ops.graph_rewrite.sigmoid(" in out  # the diff
    # 16 sigmoids; also 32 Conv and 16 mul consumers recomputing SiLU, 33 SiLUs
    # after a BatchNorm that keep its input (norm_act), 16 others made out of place
    assert "113 node(s) rewritten:" in out
    assert "torch.ops.graph_rewrite.recompute_conv(" in out and "torch.ops.graph_rewrite.norm_act(" in out
    assert "graph_rewrite.verify: PASSED" in out and "147 buffers updated alike" in out


def test_resnet50_softplus_table_and_png(tmp_path):
    png = tmp_path / "m.png"
    out = run_demo("resnet50_softplus.py", "--batches", "2,4", "--size", "32", "--png", str(png), torch_home=tmp_path)
    assert "48 node(s) rewritten {'graph_rewrite.softplus': 48}" in out  # the 49th feeds the pool
    assert line_with(out, "verify at batch 2: PASSED")
    rows = [ln.split() for ln in out.splitlines() if ln.split()[:1] in (["2"], ["4"])]
    assert len(rows) == 2
    for batch, native, lean, saved, pct, _ in rows:
        assert float(lean) < float(native) and 25 < float(pct.rstrip("%")) < 40
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and b"IDAT" in data and data.endswith(b"IEND\xaeB`\x82")
