"""torch.compile keeps the saving on stacked blocks: the recompute in a consumer's backward is one
opaque op in the joint graph, which the partitioner's common-subexpression pass cannot merge with
forward's activation (merged, that activation is saved for the backward's matmul); after a norm the
recompute stays plain aten calls, so the partitioner remakes the norm's output instead of saving it."""
import pytest
import torch
import torch.nn as nn

import graph_rewrite
from graph_rewrite.memory import saved_bytes


class PreNormMLP(nn.Module):
    """x + fc2(gelu(fc1(ln(x)))): a transformer block's MLP half."""

    def __init__(self, d):
        super().__init__()
        self.ln, self.fc1, self.act, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.ln(x))))


class ConvNeXtLike(nn.Module):
    """ConvNeXt's block: depthwise conv, LayerNorm over channels, MLP, layer scale, residual."""

    def __init__(self, d):
        super().__init__()
        self.dw = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.ln, self.fc1, self.act, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)
        self.scale = nn.Parameter(torch.full((d,), 0.5))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.scale * self.fc2(self.act(self.fc1(self.ln(y))))
        return x + y.permute(0, 3, 1, 2)


def _held(fn, model, x):
    return saved_bytes(lambda: fn(x), exclude=[*model.parameters(), x])[0]


def _grads(fn, model, x):
    model.zero_grad()
    x.grad = None
    fn(x).square().sum().backward()
    return [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("block, shape", [(PreNormMLP, (2, 64, 64)), (ConvNeXtLike, (2, 32, 12, 12))],
                         ids=["pre-norm MLP", "ConvNeXt"])
def test_compile_keeps_the_saving_on_stacked_blocks(block, shape):
    torch.manual_seed(0)
    model = nn.Sequential(*[block(shape[1] if block is ConvNeXtLike else shape[-1]) for _ in range(3)])
    x = torch.randn(*shape, requires_grad=True)
    lean = graph_rewrite.optimize(model)
    eager_saving = _held(model, model, x) - _held(lean, model, x)
    assert eager_saving > 0
    # No cached compile: its key does not cover the ops' Python backward.
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        torch._dynamo.reset()
        compiled = torch.compile(model)
        ref = _grads(compiled, model, x)
        native = _held(compiled, model, x)
        for make in (lambda: torch.compile(lean),
                     lambda: torch.compile(model, backend="graph_rewrite", options={"inductor": True})):
            torch._dynamo.reset()
            fn = make()
            got = _grads(fn, model, x)
            held = _held(fn, model, x)
            assert held <= native - 0.9 * eager_saving, (native, held, eager_saving)
            # float32 rounding (inductor fuses differently around the op): ~1e-7 of the gradient's scale
            for g, r in zip(got, ref):
                assert (g - r).abs().max() <= 1e-5 * r.abs().max()
    torch._dynamo.reset()


def test_compile_keeps_the_saving_after_batch_norm():
    """efficientnet_b0's MBConv blocks (BatchNorm -> SiLU -> convolution, squeeze-excitation): compile
    alone already remakes BatchNorm's output in backward, so the mark is the saving below what
    compile alone holds. An opaque op reading a norm's output forces that output to be saved."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(weights=None, stochastic_depth_prob=0.0).features[2:4].train()
    x = torch.randn(2, 16, 16, 16, requires_grad=True)
    eager_lean = _held(graph_rewrite.optimize(model), model, x)
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        torch._dynamo.reset()
        compiled = torch.compile(model)
        ref = _grads(compiled, model, x)
        native = _held(compiled, model, x)
        assert native > eager_lean
        for make in (lambda: torch.compile(graph_rewrite.optimize(model)),
                     lambda: torch.compile(model, backend="graph_rewrite", options={"inductor": True})):
            torch._dynamo.reset()
            fn = make()
            got = _grads(fn, model, x)
            held = _held(fn, model, x)
            assert held <= native - 0.9 * (native - eager_lean), (native, held, eager_lean)
            # A BatchNorm's bias before another BatchNorm has a gradient that is zero but for rounding:
            # its error reads against the largest gradient's scale.
            top = max(r.abs().max() for r in ref)
            for g, r in zip(got, ref):
                assert (g - r).abs().max() <= 1e-4 * max(r.abs().max(), 1e-3 * top)
    torch._dynamo.reset()


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm, written out: Dynamo inlines it, so the backend sees its ops, not a module."""

    def __init__(self, d):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), 1e-6

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class NormThenTwoLinears(nn.Module):
    """x + q(norm(x)) * k(norm(x)): attention's input projections after the norm."""

    def __init__(self, d):
        super().__init__()
        self.norm, self.q, self.k = RMSNorm(d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = self.norm(x)
        return x + self.q(h) * self.k(h)


@pytest.mark.parametrize("path", ["compile(optimize)", "backend"])
def test_compile_recomputes_hand_written_rmsnorm(path):
    # Native keeps the norm's output for the Linears' weight gradients. optimize() runs the module
    # again from its input (under Dynamo, in a checkpoint); the backend tags the norm's nodes, which
    # Dynamo inlines, for the partitioner to recompute: either way the norm keeps its input only.
    torch.manual_seed(0)
    model = nn.Sequential(*[NormThenTwoLinears(64) for _ in range(3)])
    x = torch.randn(2, 32, 64, requires_grad=True)
    norm_output = x.numel() * x.element_size()
    from torch._dynamo.utils import counters

    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        torch._dynamo.reset()
        compiled = torch.compile(model)
        ref = _grads(compiled, model, x)
        native = _held(compiled, model, x)
        torch._dynamo.reset()
        counters.clear()
        if path == "backend":
            report = graph_rewrite.RewriteReport()
            fn = torch.compile(model, backend="graph_rewrite", options={"inductor": True, "report": report})
        else:
            lean = graph_rewrite.optimize(model)
            report = lean.rewrite_report
            fn = torch.compile(lean)
        got = _grads(fn, model, x)
        held = _held(fn, model, x)
        assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()
    assert report.counts()["graph_rewrite.recompute_module"] == 3
    assert [r.where for r in report.replaced if r.lean_op.endswith("module")] == ["0.norm", "1.norm", "2.norm"]
    assert held <= native - 3 * norm_output, (native, held)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0)  # the same kernels, run again
