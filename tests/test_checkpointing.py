"""Activation checkpointing stays checkpointed, and ``verify`` fails a model that holds more than native.

FX records the calls ``torch.utils.checkpoint`` makes, not the checkpoint: traced, a
checkpointed region keeps every activation in it. A module whose code checkpoints
runs its own code under the runtime front end, which keeps the checkpoint and leaves
the calls inside it native (the recompute in backward is native code).
"""
import functools
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import graph_rewrite
from graph_rewrite.memory import saved_bytes

KEPT = "torch.utils.checkpoint in forward: kept checkpointed"  # why a module was left to the runtime front end
NATIVE_INSIDE = "in a checkpointed region"  # why the runtime front end left a call native


def optimize_quietly(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return graph_rewrite.optimize(model)


def held(model, *inputs):
    """Bytes autograd holds after ``model``'s forward, without parameters, buffers and inputs."""
    n, _ = saved_bytes(lambda: model(*inputs), exclude=[*model.parameters(), *model.buffers(), *inputs])
    return n


def grads(model, *inputs, weights_seed=0):
    """Gradients of the inputs that require grad and of every parameter, of a fixed projection of the output."""
    out = model(*inputs)
    out = getattr(out, "logits", out)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(weights_seed), dtype=out.dtype)
    targets = [t for t in inputs if t.requires_grad] + list(model.parameters())
    # .backward(), not autograd.grad: reentrant checkpoint supports only the former.
    (out * w).sum().backward()
    found = [t.grad for t in targets]
    for t in targets:
        t.grad = None
    return found


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for g, h in zip(a, b):
        assert torch.equal(g, h), float((g - h).abs().max())


def blocks(n=4, d=256, act=nn.GELU):
    return nn.ModuleList(nn.Sequential(nn.Linear(d, d), act(), nn.Linear(d, d)) for _ in range(n))


SPELLINGS = {
    "checkpoint": lambda block, x: checkpoint(block, x, use_reentrant=False),
    "partial": functools.partial(checkpoint, use_reentrant=False),  # Hugging Face's spelling
    "reentrant": lambda block, x: checkpoint(block, x, use_reentrant=True),
}


class Checkpointed(nn.Module):
    """Blocks each run through ``torch.utils.checkpoint``; FX traces this forward whole."""

    def __init__(self, spelling="checkpoint", act=nn.GELU, d=256):
        super().__init__()
        self.blocks, self.spelling = blocks(act=act, d=d), spelling

    def forward(self, x):
        if self.spelling == "sequential":
            return checkpoint_sequential(nn.Sequential(*self.blocks), 2, x, use_reentrant=False)
        for block in self.blocks:
            x = SPELLINGS[self.spelling](block, x)
        return x


class Unchecked(nn.Module):
    """:class:`Checkpointed`'s blocks without checkpoint: what inlining the checkpoint made of it."""

    def __init__(self, model: Checkpointed):
        super().__init__()
        self.blocks = model.blocks

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("spelling", ["checkpoint", "partial", "reentrant", "sequential"])
def test_torch_checkpoint_stays_checkpointed(spelling):
    torch.manual_seed(0)
    model = Checkpointed(spelling).double()
    x = torch.randn(64, 256, dtype=torch.float64, requires_grad=True)
    lean = optimize_quietly(model)
    native, optimized = held(model, x), held(lean, x)
    assert optimized <= native, (native, optimized)  # inlined: 4 blocks' activations, 2.3x native here
    assert_bitwise(grads(model, x), grads(lean, x))
    report = lean.rewrite_report
    assert report.tracing.startswith("root not traced")
    assert [(u.module, KEPT in u.reason) for u in report.uncovered] == [("", True)]
    assert "kept checkpointed" in str(report)


def test_torch_compile_backend_keeps_the_checkpoint():
    # Dynamo captures a checkpoint as one higher-order op with its region as a subgraph;
    # the backend rewrites the outer graph only, so the region stays checkpointed and native.
    torch.manual_seed(0)
    model = Checkpointed(act=nn.Softplus, d=64).double()
    x = torch.randn(16, 64, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(model, backend="graph_rewrite")
    assert held(compiled, x) <= held(model, x)
    assert_bitwise(grads(model, x), grads(compiled, x))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = blocks(n=2, d=32, act=nn.Softplus)

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return x


def test_the_module_that_checkpoints_is_left_to_the_runtime_front_end():
    # The root stays traced, its LeakyReLU rewritten; the encoder, whose code calls
    # checkpoint, runs its own code. The blocks it checkpoints are not blamed.
    torch.manual_seed(0)
    # LeakyReLU outside: its lean op gives native's bits (softplus' differs by a rounding).
    model = nn.Sequential(nn.Linear(32, 32), nn.LeakyReLU(), Encoder(), nn.Linear(32, 4)).double()
    x = torch.randn(8, 32, dtype=torch.float64, requires_grad=True)
    lean = optimize_quietly(model)
    report = lean.rewrite_report
    assert isinstance(lean, torch.fx.GraphModule) and report.tracing.startswith("partial")
    assert [u.module for u in report.uncovered] == ["2"] and KEPT in report.uncovered[0].reason
    assert held(lean, x) <= held(model, x)
    assert_bitwise(grads(model, x), grads(lean, x))
    assert [r.where for r in report.replaced] == ["1"]  # the activation outside the checkpoint
    # One record per call site: both blocks' softplus run at the same line.
    assert [(r.where, r.reason[:len(NATIVE_INSIDE)]) for r in report.left_alone] == [("2.blocks.0.1", NATIVE_INSIDE)]


class UntraceableRoot(nn.Module):
    """A forward FX cannot trace (a size as a Python int), with checkpointed blocks around ``act``."""

    def __init__(self, act):
        super().__init__()
        self.blocks = blocks(n=2, d=32, act=act)
        self.act = nn.LeakyReLU()  # its lean op gives native's bits: gradients compare bitwise

    def forward(self, x):
        for _ in range(x.size(0) // x.size(0)):
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        return self.act(x)  # outside the checkpoint: rewritten


@pytest.mark.parametrize("act", [nn.Softplus, nn.LogSigmoid, nn.LeakyReLU])
def test_runtime_front_end_leaves_checkpointed_regions_native(act):
    # Checkpoint recomputes the region in backward without the runtime mode and hands
    # the recomputed saved tensors to forward's nodes by position: a lean op in forward
    # got native's input in place of its output (softplus, logsigmoid: CheckpointError).
    torch.manual_seed(0)
    model = UntraceableRoot(act).double()
    x = torch.randn(8, 32, dtype=torch.float64, requires_grad=True)
    lean = optimize_quietly(model)
    assert lean.rewrite_report.tracing.startswith("root not traced")
    assert_bitwise(grads(model, x), grads(lean, x))
    assert held(lean, x) <= held(model, x)
    report = lean.rewrite_report
    assert [r.where for r in report.replaced] == ["act"]
    assert report.left_alone and all(r.reason.startswith(NATIVE_INSIDE) for r in report.left_alone)
    assert graph_rewrite.verify(model, lean, x).ok


def tiny_timm(name):
    timm = pytest.importorskip("timm")
    if name == "vit":  # the flag on the root
        return timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    return timm.create_model(name, pretrained=False, num_classes=10)  # convnext_atto: on each stage


@pytest.mark.parametrize("name, uncovered", [("vit", [""]), ("convnext_atto", [f"stages.{i}" for i in range(4)])])
def test_timm_grad_checkpointing(name, uncovered):
    # timm's ViT runs its blocks without checkpoint when attn_mask is not None, which FX's
    # Proxy for the omitted mask is: traced, it held 6.0x native's bytes (convnext_atto 4.5x).
    torch.manual_seed(0)
    model = tiny_timm(name).train()
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    lean = optimize_quietly(model)
    native, optimized = held(model, x), held(lean, x)
    assert optimized <= native, (native, optimized)
    report = lean.rewrite_report
    assert [u.module for u in report.uncovered] == uncovered
    assert all("grad_checkpointing is on" in u.reason for u in report.uncovered)
    assert graph_rewrite.verify(model, lean, x).ok


@pytest.mark.parametrize("name", ["vit", "convnext_atto"])
def test_timm_grad_checkpointing_switched_on_after_optimize(name):
    # The graph cannot checkpoint: lean.set_grad_checkpointing(True) changed nothing it ran, and
    # the copy held what it held before: 5.5x the checkpointed model's bytes (ViT), 3.7x (convnext_atto).
    torch.manual_seed(0)
    model = tiny_timm(name).train()
    x = torch.randn(2, 3, 32, 32)
    lean = optimize_quietly(model)
    unchecked = held(lean, x)
    model.set_grad_checkpointing(True)
    lean.set_grad_checkpointing(True)
    native, optimized = held(model, x), held(lean, x)
    assert optimized <= native < unchecked, (native, optimized, unchecked)
    assert_bitwise(grads(model, x), grads(lean, x))
    lean.set_grad_checkpointing(False)  # the graph again
    assert held(lean, x) == unchecked


def test_hugging_face_gradient_checkpointing():
    # A tiny LLaMA whose MLP activation the runtime front end rewrites (sqrtsoftplus calls
    # F.softplus) inside the checkpointed decoder layers: its backward raised CheckpointError.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, hidden_act="sqrtsoftplus")
    model = transformers.LlamaForCausalLM(config).double().train()
    model.gradient_checkpointing_enable()
    ids = torch.randint(0, 128, (2, 16))
    lean = optimize_quietly(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: use_cache is off under checkpointing
        native, optimized = held(model, ids), held(lean, ids)
        assert optimized <= native, (native, optimized)
        assert_bitwise(grads(model, ids), grads(lean, ids))
    assert any(r.reason.startswith(NATIVE_INSIDE) for r in lean.rewrite_report.left_alone)


def test_verify_fails_a_model_that_drops_checkpointing():
    torch.manual_seed(0)
    model = Checkpointed(d=64)
    x = torch.randn(16, 64)
    report = graph_rewrite.verify(model, Unchecked(model), x)
    assert not report.ok
    assert [c.name for c in report.failed] == ["activation memory"]  # same outputs and gradients
    before, after = report.activation_bytes
    assert after > before
    check = report.failed[0]
    assert check.worst_error == (after - before) / before  # 2.0: three times the original's bytes
    assert f"{before} B" in check.detail and f"{after} B" in check.detail
    assert "activation memory" in str(report)


def test_verify_memory_check_has_no_noise():
    # The same model against itself, and the optimized checkpointed model: equal figures, passed.
    torch.manual_seed(0)
    model = Checkpointed(d=64)
    x = torch.randn(16, 64)
    for other in (model, optimize_quietly(model)):
        report = graph_rewrite.verify(model, other, x)
        assert report.ok, str(report)
        assert report.activation_bytes[0] == report.activation_bytes[1]


def test_verify_memory_check_allows_not_one_byte_more():
    from graph_rewrite.verification import _compare_memory

    assert _compare_memory(1000, 1000).ok and _compare_memory(1000, 999).ok
    check = _compare_memory(1000, 1001)
    assert not check.ok and check.detail == "original holds 1000 B, optimized 1001 B (1 B more)"
