"""Hugging Face models whose code FX cannot trace whole: the recompute kind reaches them, exactly.

Tiny configs, random weights, float64, CPU. The expectations are native PyTorch on the
same model: gradients bit for bit, and held bytes measured both ways.
"""
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graph_rewrite
from graph_rewrite.memory import saved_bytes

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", module="graph_rewrite")


def _llama():
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, use_cache=False)
    return transformers.LlamaForCausalLM(config), lambda m, ids: m(input_ids=ids).logits


def _decoder(config, model):
    def build():
        cfg = getattr(transformers, config)(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=4, head_dim=16, use_cache=False)
        return getattr(transformers, model)(cfg), lambda m, ids: m(input_ids=ids).logits
    return build


def _bert():
    config = transformers.BertConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertModel(config), lambda m, ids: m(input_ids=ids).last_hidden_state


def _gpt2():
    config = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, use_cache=False, attn_pdrop=0.0,
                                     resid_pdrop=0.0, embd_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config), lambda m, ids: m(input_ids=ids).logits


def _t5():
    config = transformers.T5Config(vocab_size=256, d_model=64, d_ff=172, num_layers=2, num_heads=4, d_kv=16,
                                   feed_forward_proj="gated-gelu", dropout_rate=0.0, use_cache=False)
    return (transformers.T5ForConditionalGeneration(config),
            lambda m, ids: m(input_ids=ids, decoder_input_ids=ids).logits)


def _mixtral(experts: str = "grouped_mm"):
    def build():
        config = transformers.MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=4, num_local_experts=4,
                                            num_experts_per_tok=2, use_cache=False, experts_implementation=experts)
        return transformers.MixtralForCausalLM(config), lambda m, ids: m(input_ids=ids).logits
    return build


def _assert_same_steps(model, other, x):
    """One forward and backward each on ``x``: outputs, input and parameter gradients bit for bit."""
    steps = []
    for m in (model, other):
        y = m(x)
        y.pow(2).sum().backward()
        steps.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in m.parameters()]))
        m.zero_grad(set_to_none=True)
        x.grad = None
    assert torch.equal(steps[0][0], steps[1][0]) and torch.equal(steps[0][1], steps[1][1])
    assert all(torch.equal(a, b) for a, b in zip(steps[0][2], steps[1][2]))


def _held(model, ids, run):
    n, _ = saved_bytes(lambda: run(model, ids), exclude=[*model.parameters(), *model.buffers(), ids])
    return n


def _grads(model, ids, run):
    y = run(model, ids)
    y.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize("build,least,kinds", [
    # LlamaMLP (unannotated forward) traced on its own: its gated product and down_proj recompute
    # SiLU; the hand-written RMSNorms keep their input only and run again in backward, and the
    # q/k/v and gate/up projections after them keep the norm's input too.
    (_llama, 38.0, {"recompute"}),
    (_decoder("Qwen2Config", "Qwen2ForCausalLM"), 38.0, {"recompute"}),
    (_decoder("GemmaConfig", "GemmaForCausalLM"), 36.0, {"recompute"}),  # (1 + weight), cast after
    # BertIntermediate's GELU and BertOutput's Linear are siblings: the runtime front end links
    # them; LayerNorm -> query/key/value and -> intermediate.dense likewise.
    (_bert, 30.0, {"recompute"}),
    (_gpt2, 55.0, {"recompute"}),  # gelu_new written out: a cheap module; Conv1D is torch.addmm
    (_t5, 40.0, {"recompute"}),  # T5LayerNorm reads self.weight.dtype; gelu_new inside a traced MLP
    (_mixtral("eager"), 32.0, {"recompute"}),  # a Python loop over experts: act(gate) * up, then F.linear
], ids=["llama", "qwen2", "gemma", "bert", "gpt2", "t5", "mixtral_eager"])
def test_recompute_reaches_models_fx_cannot_trace_whole(build, least, kinds):
    torch.manual_seed(0)
    model, run = build()
    model = model.double().train()
    lean = graph_rewrite.optimize(model)
    ids = torch.randint(0, 256, (2, 16))
    before, after = _held(model, ids, run), _held(lean, ids, run)
    assert 100 * (before - after) / before >= least, (before, after)
    assert set(lean.rewrite_report.counts_by_kind()) == kinds
    y0, g0 = _grads(model, ids, run)
    y1, g1 = _grads(lean, ids, run)
    assert torch.equal(y0, y1) and g0.keys() == g1.keys()
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name


class Up(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 32)

    def forward(self, x):
        return F.gelu(self.fc(x))


class Down(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 8)

    def forward(self, h):
        return self.fc(h)


class Siblings(nn.Module):
    """GELU in one module, its Linear in another, under a root FX cannot trace."""

    def __init__(self, act_then):
        super().__init__()
        self.up, self.down, self.act_then = Up(), Down(), act_then

    def forward(self, x):
        if x.sum() > 1e30:  # data-dependent: FX cannot trace the root
            return x
        h = self.up(x)
        if self.act_then == "changed":
            h.mul_(2.0)  # changed after the activation: the Linear must see the new h
        elif self.act_then == "view":
            h = h.view(-1, 32)
        return self.down(h)


@pytest.mark.parametrize("act_then", ["plain", "changed", "view"])
def test_runtime_linear_after_an_activation_in_another_module(act_then):
    torch.manual_seed(0)
    model = Siblings(act_then).double()
    lean = graph_rewrite.optimize(model)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    before, _ = saved_bytes(lambda: model(x), exclude=[*model.parameters(), x])
    after, _ = saved_bytes(lambda: lean(x), exclude=[*model.parameters(), x])
    _assert_same_steps(model, lean, x)
    # The report says what the runtime front end applies of kind "recompute", and what it cannot.
    assert any("applies every kind call by call" in n and "in-place activations, stay native" in n
               for n in lean.rewrite_report.notes)
    recomputed = lean.rewrite_report.counts().get("graph_rewrite.recompute_linear", 0)
    if act_then == "plain":
        assert recomputed == 1 and after < before
    else:  # a changed h or a view of it: the Linear keeps h, as native does
        assert recomputed == 0 and after == before


class HandRMSNorm(nn.Module):
    """LLaMA's spelling: float32 statistics, the weight applied after the cast back."""

    def __init__(self, n, extra=False):
        super().__init__()
        self.weight, self.extra = nn.Parameter(torch.rand(n) + 0.5), extra

    def forward(self, h):
        dtype = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        if self.extra:
            h = torch.exp(h)  # not in the cheap list: the module stays as it is
        return self.weight * h.to(dtype)


class NormThenLinear(nn.Module):
    def __init__(self, extra=False):
        super().__init__()
        self.norm, self.fc = HandRMSNorm(16, extra), nn.Linear(16, 4)

    def forward(self, x):
        if x.sum() > 1e30:  # data-dependent: FX cannot trace the root
            return x
        return self.fc(self.norm(x * 2))


class TraceableNormThenLinear(NormThenLinear):
    def forward(self, x):  # FX traces it whole: the norm is seen as a module by cheap_modules only
        return self.fc(self.norm(x * 2))


@pytest.mark.parametrize("extra", [False, True])
@pytest.mark.parametrize("front_end", ["runtime", "fx"])
def test_hand_written_norm_keeps_its_input_only(extra, front_end):
    import copy
    import pickle

    torch.manual_seed(0)
    model = (NormThenLinear if front_end == "runtime" else TraceableNormThenLinear)(extra).double()
    lean = graph_rewrite.optimize(model)
    assert isinstance(lean, torch.fx.GraphModule) == (front_end == "fx")
    x = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    before, _ = saved_bytes(lambda: model(x), exclude=[*model.parameters(), x])
    after, _ = saved_bytes(lambda: lean(x), exclude=[*model.parameters(), x])
    counts = lean.rewrite_report.counts()
    if extra:
        assert "graph_rewrite.recompute_module" not in counts and after == before
    else:
        # The norm keeps its input only, and the Linear after it keeps that input too, not the norm's output.
        assert counts == {"graph_rewrite.recompute_module": 1, "graph_rewrite.recompute_linear": 1}
        without_linear, _ = saved_bytes(lambda: graph_rewrite.optimize(model, ops=["cheap_norm"])(x),
                                        exclude=[*model.parameters(), x])
        assert after == without_linear - 8 * 16 * 8 < before  # the norm's output, float64
    for twin in (lean, copy.deepcopy(lean), pickle.loads(pickle.dumps(lean))):
        _assert_same_steps(model, twin, x)


class Float64RMSNorm(HandRMSNorm):  # computes in float64: gradcheck needs that
    def forward(self, h):
        dtype = h.dtype
        h = h.to(torch.float64)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(dtype)


def test_recomputed_module_gradcheck_and_gradgradcheck():
    torch.manual_seed(0)
    model = NormThenLinear().double()
    model.norm = Float64RMSNorm(16).double()
    lean = graph_rewrite.optimize(model)
    small = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lean, (small,)) and torch.autograd.gradgradcheck(lean, (small,))
    assert lean.rewrite_report.counts() == {"graph_rewrite.recompute_module": 1, "graph_rewrite.recompute_linear": 1}


class CountingRMSNorm(HandRMSNorm):
    def forward(self, h):
        self.runs = getattr(self, "runs", 0) + 1
        return super().forward(h)


@pytest.mark.parametrize("front_end", ["runtime", "fx"])
def test_a_recomputed_module_runs_once_in_backward_for_itself_and_the_linear_after_it(front_end):
    torch.manual_seed(0)
    model = (NormThenLinear if front_end == "runtime" else TraceableNormThenLinear)()
    model.norm = CountingRMSNorm(16)
    lean = graph_rewrite.optimize(model)
    x = torch.randn(8, 16, requires_grad=True)
    inputs = (x, *model.parameters())
    expected = torch.autograd.grad(model(x).pow(2).sum(), inputs)
    loss = lean(x).pow(2).sum()
    assert lean.rewrite_report.counts() == {"graph_rewrite.recompute_module": 1, "graph_rewrite.recompute_linear": 1}
    norm = lean.get_submodule("norm")
    for again in range(2):  # the second time through the graph kept by retain_graph
        ran = norm.runs
        grads = torch.autograd.grad(loss, inputs, retain_graph=True)
        # The Linear's weight gradient needs the norm's output; the norm's own backward, its graph:
        # one run makes both (two before, the first without a graph). After a first backward the
        # second pass runs it twice again.
        assert norm.runs - ran == (1 if again == 0 else 2)
        assert all(torch.equal(g, e) for g, e in zip(grads, expected))


def test_cheap_norm_is_one_rule_a_user_can_leave_out():
    model = NormThenLinear().double()
    without = [r.name for r in graph_rewrite.RULES if r.name != "cheap_norm"]
    assert graph_rewrite.optimize(model, ops=without).rewrite_report.counts() == {}
    assert graph_rewrite.optimize(model, ops=["cheap_norm"]).rewrite_report.counts() == {
        "graph_rewrite.recompute_module": 1}  # "linear" not chosen: the Linear after it stays native


@pytest.mark.parametrize("name,least", [("efficientnet_b0", 50.0), ("mobilenetv3_large_100", 25.0)])
def test_timm_batchnorm_act_sees_through_its_identity(name, least):
    # timm's BatchNormAct2d: F.batch_norm -> self.drop (nn.Identity) -> in-place SiLU / Hardswish.
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, drop_rate=0.0, drop_path_rate=0.0).double().train()
    lean = graph_rewrite.optimize(model)
    assert "norm" in lean.rewrite_report.counts_by_kind()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    exclude = [*model.parameters(), *model.buffers(), x]
    before, _ = saved_bytes(lambda: model(x), exclude=exclude)
    after, _ = saved_bytes(lambda: lean(x), exclude=exclude)
    assert 100 * (before - after) / before >= least, (before, after)
    _assert_same_steps(model, lean, x)
    # BatchNorm's running statistics: one step on a twin of the model and one on its copy, alike.
    import copy

    twin = copy.deepcopy(model)
    lean_of_twin = graph_rewrite.optimize(twin)
    model(x).sum().backward()
    lean_of_twin(x).sum().backward()
    pairs = list(zip(model.buffers(), twin.buffers()))
    assert pairs and all(torch.equal(a, b) for a, b in pairs)


class NewGELU(nn.Module):  # GPT-2's gelu_new, as transformers writes it
    def forward(self, input):
        return 0.5 * input * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (input + 0.044715 * torch.pow(input, 3.0))))


class QuickGELU(nn.Module):
    def forward(self, input):
        return input * torch.sigmoid(1.702 * input)


class FastGELU(nn.Module):
    def forward(self, input):
        return 0.5 * input * (1.0 + torch.tanh(input * 0.7978845608 * (1.0 + 0.044715 * input * input)))


class Scaled(nn.Module):  # keeps nothing natively: keeping its input would cost bytes
    def forward(self, input):
        return torch.tanh(input * 2.0) + 1.0


class ActBetweenLinears(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(8, 32), act, nn.Linear(32, 8)

    def forward(self, x):
        if x.sum() > 1e30:  # data-dependent: FX cannot trace the root
            return x
        return self.down(self.act(self.up(x)))


@pytest.mark.parametrize("act,rewritten", [(NewGELU, True), (QuickGELU, True), (FastGELU, True), (Scaled, False)])
def test_hand_written_activation_keeps_its_input_only(act, rewritten):
    torch.manual_seed(0)
    model = ActBetweenLinears(act()).double()
    lean = graph_rewrite.optimize(model)
    x = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    before, _ = saved_bytes(lambda: model(x), exclude=[*model.parameters(), x])
    after, _ = saved_bytes(lambda: lean(x), exclude=[*model.parameters(), x])
    counts = lean.rewrite_report.counts()
    if rewritten:
        # The activation keeps up(x) only, and the Linear after it keeps that too: one 8 x 32 tensor.
        assert counts == {"graph_rewrite.recompute_module": 1, "graph_rewrite.recompute_linear": 1}
        assert after == 8 * 32 * 8 < before
    else:
        assert "graph_rewrite.recompute_module" not in counts and after == before
    _assert_same_steps(model, lean, x)
    small = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lean, (small,)) and torch.autograd.gradgradcheck(lean, (small,))


class Residual(nn.Module):
    """h + fc(norm(h)): h reaches the gradient by the residual and by the norm's two reads of it."""

    def __init__(self, norm):
        super().__init__()
        self.norm, self.fc = norm, nn.Linear(16, 16)

    def forward(self, x):
        if x.sum() > 1e30:  # data-dependent: FX cannot trace the root
            return x
        h = x * 2
        return h + self.fc(self.norm(h))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recomputed_module_adds_gradients_in_natives_order(dtype):
    # In float32 the norm's x.to(float32) is x itself: x * rsqrt(...) and x.pow(2) both read x, and
    # their gradients meet the residual's in x's gradient. Summed inside first: a rounding off.
    torch.manual_seed(0)
    model = Residual(HandRMSNorm(16)).to(dtype)
    lean = graph_rewrite.optimize(model)
    x = torch.randn(64, 16, dtype=dtype, requires_grad=True)
    _assert_same_steps(model, lean, x)
    assert lean.rewrite_report.counts()["graph_rewrite.recompute_module"] == 1


@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_float32_gradients_bitwise(build):
    torch.manual_seed(0)
    model, run = build()
    model.train()
    lean = graph_rewrite.optimize(model)
    ids = torch.randint(0, 256, (2, 16))
    y0, g0 = _grads(model, ids, run)
    y1, g1 = _grads(lean, ids, run)
    assert torch.equal(y0, y1) and g0.keys() == g1.keys()
    assert [n for n in g0 if not torch.equal(g0[n], g1[n])] == []


def test_mixture_of_experts_grouped_mm_keeps_the_gate_not_the_product():
    # transformers' default experts call torch._grouped_mm (float32/bfloat16 only) on act(gate) * up:
    # it runs natively, its saved input made again in backward from gate and up.
    torch.manual_seed(0)
    model, run = _mixtral()()
    model.train()
    lean = graph_rewrite.optimize(model)
    ids = torch.randint(0, 256, (2, 16))
    before, after = _held(model, ids, run), _held(lean, ids, run)
    assert 100 * (before - after) / before >= 33.0, (before, after)
    assert lean.rewrite_report.counts()["torch._grouped_mm (native, keeps x)"] == 2  # one site per layer
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y0, g0 = _grads(model, ids, run)
            y1, g1 = _grads(lean, ids, run)
        assert torch.equal(y0, y1) and g0.keys() == g1.keys()
        assert [n for n in g0 if not torch.equal(g0[n], g1[n])] == []


def _unet():
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                  layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    t = torch.tensor([3, 7])
    return model, lambda m, x: m(x, t).sample


def _twin_steps(model, lean, x, run, autocast):
    """Outputs, parameter gradients and buffers after one step each of a twin of ``model`` and of ``lean``."""
    import copy

    steps = []
    for m in (copy.deepcopy(model), lean):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = run(m, x)
        y.float().pow(2).sum().backward()
        steps.append((y.detach(), [p.grad.clone() for p in m.parameters()], [b.clone() for b in m.buffers()]))
        m.zero_grad(set_to_none=True)
    (y0, g0, b0), (y1, g1, b1) = steps
    assert torch.equal(y0, y1)
    assert [i for i, (a, b) in enumerate(zip(g0, g1)) if not torch.equal(a, b)] == []
    assert all(torch.equal(a, b) for a, b in zip(b0, b1))


@pytest.mark.parametrize("dtype,autocast,least", [(torch.float64, False, 44.0), (torch.float32, True, 35.0)],
                         ids=["float64", "bfloat16-autocast"])
def test_diffusers_unet_group_norm_then_silu(dtype, autocast, least):
    # ResnetBlock2D: GroupNorm -> SiLU -> Conv, under a root FX cannot trace: the runtime front end's
    # norm kind (norm_act keeps GroupNorm's input) and its consumers. Under autocast too.
    torch.manual_seed(0)
    model, run = _unet()
    model = model.to(dtype).train()
    lean = graph_rewrite.optimize(model)
    x = torch.randn(2, 3, 16, 16, dtype=dtype)
    exclude = [*model.parameters(), *model.buffers(), x]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        before, _ = saved_bytes(lambda: run(model, x), exclude=exclude)
        after, _ = saved_bytes(lambda: run(lean, x), exclude=exclude)
    assert 100 * (before - after) / before >= least, (before, after)
    assert set(lean.rewrite_report.counts_by_kind()) == {"norm", "recompute"}
    _twin_steps(model, lean, x, run, autocast)


def test_timm_norm_kind_under_autocast():
    # BatchNorm -> SiLU under CPU bfloat16 autocast: norm_act keeps the input BatchNorm's kernel got.
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False, drop_rate=0.0, drop_path_rate=0.0).train()
    lean = graph_rewrite.optimize(model)
    x = torch.randn(2, 3, 64, 64)
    exclude = [*model.parameters(), *model.buffers(), x]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before, _ = saved_bytes(lambda: model(x), exclude=exclude)
        after, _ = saved_bytes(lambda: lean(x), exclude=exclude)
    assert 100 * (before - after) / before >= 20.0, (before, after)
    _twin_steps(model, lean, x, lambda m, x: m(x), autocast=True)
