"""A representative slice of the torchvision zoo (demos/zoo.py runs all of it): optimize, then verify.

Random weights (nothing downloaded), small inputs. Counts are what optimize() finds in
torchvision 0.29; each model family's activation spelling is covered:
nn.Sigmoid in squeeze-excitation blocks (EfficientNet, RegNetY), functional
torch.sigmoid (Swin V2's continuous position bias), a segmentation head (LR-ASPP),
a detection model whose forward FX cannot trace (the fallback), and RAFT.
"""
import warnings

import pytest
import torch

import graph_rewrite

torchvision = pytest.importorskip("torchvision")


def build(name, **kwargs):
    torch.manual_seed(0)
    try:
        return torchvision.models.get_model(name, weights=None, weights_backbone=None, **kwargs)
    except TypeError:
        return torchvision.models.get_model(name, weights=None, **kwargs)


def optimize_quietly(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lean = graph_rewrite.optimize(model)
    return lean, [str(w.message) for w in caught]


def image(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name, shape, counts, spelling", [
    # squeeze-excitation: nn.Sigmoid, one per MBConv block
    # (SiLU's Conv and SE-mul consumers recompute it; the 33 SiLUs after a BatchNorm
    # keep its input instead (norm_act), the 16 after the SE blocks' Conv are made out of place)
    ("efficientnet_b0", (2, 3, 64, 64), {"graph_rewrite.sigmoid": 16, "F.silu (out of place)": 16,
                                         "graph_rewrite.norm_act": 33,
                                         "graph_rewrite.recompute_conv": 32, "graph_rewrite.recompute_mul": 16},
     "nn.Sigmoid"),
    # squeeze-excitation: nn.Sigmoid, one per Y block
    ("regnet_y_400mf", (2, 3, 64, 64), {"graph_rewrite.sigmoid": 16}, "nn.Sigmoid"),
    # 16 * torch.sigmoid(relative_position_bias) in every shifted-window attention block
    # (the Linear after each MLP's GELU recomputes it)
    ("swin_v2_t", (2, 3, 64, 64), {"graph_rewrite.sigmoid": 12, "graph_rewrite.recompute_linear": 12},
     "torch.sigmoid"),
    # the LR-ASPP head's attention branch ends in nn.Sigmoid; the output is a dict
    # (the backbone's Hardswish consumers recompute it, and each Hardswish, after a
    # BatchNorm, keeps BatchNorm's input)
    ("lraspp_mobilenet_v3_large", (2, 3, 64, 64), {"graph_rewrite.sigmoid": 1, "graph_rewrite.norm_act": 20,
                                                   "graph_rewrite.recompute_conv": 15,
                                                   "graph_rewrite.recompute_mul": 5}, "nn.Sigmoid"),
])
def test_traced_models_in_train_mode(name, shape, counts, spelling):
    model = build(name).train()
    lean, caught = optimize_quietly(model)
    report = lean.rewrite_report
    assert report.tracing == "whole model" and not report.uncovered
    # RegNet's lean sigmoids keep what native's keep: optimize() says that nothing frees memory.
    assert [("nothing rewritten in RegNet frees memory" in c) for c in caught] == (
        [True] if name == "regnet_y_400mf" else []), caught
    assert report.counts() == counts
    assert {r.original for r in report.replaced if r.lean_op == "graph_rewrite.sigmoid"} == {spelling}
    # Only LayerNorms whose output goes elsewhere than a Linear (swin's attention) are left alone.
    assert all(a.original == "nn.LayerNorm" and a.reason.startswith("recompute:") for a in report.left_alone)
    v = graph_rewrite.verify(model, lean, image(*shape))
    assert v.ok, str(v)
    names = [c.name for c in v.checks]
    assert "outputs" in names and "parameter gradients" in names and "input gradients" in names
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        assert "buffer updates" in names  # running statistics moved alike in both
    # A sigmoid rewrite saves nothing: native sigmoid keeps its output too. The recompute
    # consumers do.
    if report.counts_by_kind().get("recompute") or report.counts_by_kind().get("norm"):
        assert v.activation_bytes[1] < v.activation_bytes[0]
    else:
        assert v.activation_bytes[0] == v.activation_bytes[1]


def test_detection_model_falls_back_and_verifies_in_eval_mode():
    # Eval mode: the model takes a list of images and returns detections; train mode
    # would need targets (demos/zoo.py does that). box_score_thresh=0 so that an
    # untrained model still returns boxes, and gradients flow through them.
    model = build("fasterrcnn_mobilenet_v3_large_320_fpn", box_score_thresh=0.0).eval()
    lean, caught = optimize_quietly(model)
    report = lean.rewrite_report
    # GeneralizedRCNN.forward iterates over the image list: FX cannot trace the root,
    # so the result is a copy that runs under the runtime front end. Now
    # submodules traced on their own (the MobileNetV3 backbone's blocks) get the
    # recompute rules: their Hardswish consumers recompute it.
    assert report.tracing == "root not traced: runtime front end"
    assert [u.module for u in report.uncovered] == [""]
    assert "Proxy object cannot be iterated" in report.uncovered[0].reason
    assert any("could not trace <root>" in w for w in caught)
    assert set(report.counts_by_kind()) <= {"recompute", "norm"}
    assert not isinstance(lean, torch.fx.GraphModule)
    images = [image(3, 64, 64, seed=1), image(3, 80, 64, seed=2)]
    v = graph_rewrite.verify(model, lean, images)
    assert v.ok, str(v)
    with torch.no_grad():
        out = lean(images)
    assert all(len(o["boxes"]) > 0 for o in out)  # the comparison covered real detections


def test_raft_small_falls_back():
    # RAFT's forward has data-dependent control flow: the root is not traced. Its
    # ConvGRU calls torch.sigmoid in code FX never sees; the runtime front end reaches it.
    model = build("raft_small").train()
    lean, _ = optimize_quietly(model)
    assert lean.rewrite_report.tracing == "root not traced: runtime front end"
    # ConvGRU's forward takes tensors only: traced on its own, its two gates are rewritten in its graph.
    assert lean.rewrite_report.counts() == {"graph_rewrite.sigmoid": 2}
    v = graph_rewrite.verify(model, lean, image(1, 3, 128, 128, seed=1), image(1, 3, 128, 128, seed=2))
    assert v.ok, str(v)
    sites = {(r.where, r.original) for r in lean.rewrite_report.replaced}
    # ConvGRU's gates: one call site each line; the first module to call it is recorded.
    assert sites == {("update_block.recurrent_block.convgru1", "torch.sigmoid")}, sites
    assert v.checks[0].detail.startswith("12/12 leaves")  # one flow field per refinement iteration
