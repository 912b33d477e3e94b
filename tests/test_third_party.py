"""optimize() on third-party models it cannot trace whole: Hugging Face, mambapy, timm.

Built from tiny configs with random weights (demos/works_on.py has the builders); nothing is downloaded.
"""
import warnings

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode

import graph_rewrite
from demos.works_on import MODELS, CountOps, build_and_optimize

pytest.importorskip("transformers")
pytest.importorskip("mambapy")
pytest.importorskip("timm")


class InputsKept(TorchFunctionMode):
    """Observes the native model: the storages that native softplus and logsigmoid keep for backward.

    Native softplus keeps its input; native logsigmoid (CPU) keeps its input and a buffer of
    the same size. Counted once per storage, as the memory figure counts.
    """

    def __init__(self):
        super().__init__()
        self.kept = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        x = args[0] if args else None
        if func in (torch.nn.functional.softplus, torch.nn.functional.logsigmoid) and x.requires_grad:
            ref = StorageWeakRef(x.untyped_storage())
            self.kept[ref.cdata] = x.untyped_storage().nbytes()
            if func is torch.nn.functional.logsigmoid:
                self.kept[("buffer", ref.cdata)] = x.numel() * x.element_size()
        return out


@pytest.mark.parametrize("name", ["HF MambaForCausalLM", "mambapy Mamba (pscan)", "mambapy Mamba (sequential scan)",
                                  "HF Qwen3NextForCausalLM", "timm NaFlexVit (gated attention)"])
def test_every_activation_call_is_reached_and_only_the_native_inputs_are_dropped(name):
    model, lean, inputs = build_and_optimize(name)
    feed = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    with CountOps() as native, InputsKept() as kept:
        model(*feed)
    with CountOps() as ops:
        lean(*feed)
    assert native.native > 0
    assert (ops.native, ops.lean) == (0, native.native)
    report = graph_rewrite.verify(model, lean, *inputs)
    assert report.ok, str(report)
    before, after = report.activation_bytes
    if any(r.kind == "recompute" for r in lean.rewrite_report.replaced):
        # Issue 12's consumers (Qwen3-Next's gated MLP) drop more than the activations' inputs.
        assert before - after > sum(kept.kept.values())
    else:
        assert before - after == sum(kept.kept.values())
    assert lean.rewrite_report.replaced and all(r.site or r.node != "-" for r in lean.rewrite_report.replaced)


def test_hf_mamba_report_names_the_mixer_and_the_source_line():
    import transformers

    torch.manual_seed(0)
    model, (ids,) = MODELS["HF MambaForCausalLM"]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lean = graph_rewrite.optimize(model)
    lean(ids).logits.sum().backward()
    (rec,) = [r for r in lean.rewrite_report.replaced if r.kind == "output"]  # the RMSNorms are kind recompute
    assert rec.where == "backbone.layers.0.mixer" and rec.original == "F.softplus"
    path, line = rec.site.rsplit(":", 1)
    assert path.endswith("modeling_mamba.py") and "softplus" in open(path).readlines()[int(line) - 1]
    assert "decorator" in lean.rewrite_report.uncovered[0].reason
    assert isinstance(lean, transformers.MambaForCausalLM)  # the user's class, its generate() included


def test_compile_backend_rewrites_dynamo_graphs_eagerly_and_with_inductor():
    torch.manual_seed(0)
    model, (ids,) = MODELS["HF MambaForCausalLM"]()
    params = list(model.parameters())
    ref = model(ids).logits
    grads = torch.autograd.grad(ref.sum(), params)
    for options in ({}, {"inductor": True}):
        torch._dynamo.reset()
        report = graph_rewrite.RewriteReport()
        compiled = torch.compile(model, backend="graph_rewrite", options={**options, "report": report})
        out = compiled(ids).logits
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        for g, h in zip(grads, torch.autograd.grad(out.sum(), params)):
            torch.testing.assert_close(h, g, rtol=1e-3, atol=1e-5)
        assert report.counts().get("graph_rewrite.softplus", 0) >= 1, str(report)
    with pytest.raises(Exception, match="unknown option"):
        torch._dynamo.reset()
        torch.compile(model, backend="graph_rewrite", options={"inductr": True})(ids)
