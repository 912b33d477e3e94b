"""Kind "recompute" under CPU bfloat16 autocast: native's values and gradients bit for bit, less held.

Under autocast a consumer runs the native layer (autocast casts its inputs and caches the
weights' casts) inside saved-tensor hooks that keep no copy of its input h; backward makes h
again from what made it, under the forward's autocast state. The expectations are native
PyTorch under the same autocast.
"""
import copy
import warnings

import pytest
import torch

import graph_rewrite
from graph_rewrite.memory import saved_bytes

from test_runtime_kinds import BODIES, Untraceable, _step

warnings.filterwarnings("ignore", module="graph_rewrite")
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("name", list(BODIES))
def test_consumers_under_autocast_are_exact_and_hold_less(name):
    torch.manual_seed(0)
    model = Untraceable(BODIES[name]()).train()
    lean = graph_rewrite.optimize(model)
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    exclude = [*model.parameters(), *model.buffers(), x]
    with torch.autocast(**BF16):
        before, _ = saved_bytes(lambda: model(x), exclude=exclude)
        after, _ = saved_bytes(lambda: lean(x), exclude=exclude)
    assert after < before, (before, after)
    twin = copy.deepcopy(model)
    a, b = _step(twin, x, autocast=True), _step(lean, x, autocast=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(p, q) for p, q in zip(a[2], b[2]))
    assert all(torch.equal(p, q) for p, q in zip(a[3], b[3]))


def test_outer_saved_tensor_hooks_still_keep_what_is_kept():
    # A user's hooks around forward (offloading, say: pack copies, unpack copies back). What the
    # consumers keep goes through them too: no tensor that their unpack returned during forward
    # (the runtime front end reads a norm's saved input) is still alive when forward returns.
    import gc
    import weakref

    torch.manual_seed(0)
    model = Untraceable(BODIES["layer_norm"]())
    lean = graph_rewrite.optimize(model)
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    results = []
    for m in (model, lean):
        returned = []

        def pack(t):
            return t.clone()

        def unpack(t):
            out = t.clone()
            returned.append(weakref.ref(out))
            return out

        with torch.autocast(**BF16), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            y = m(x)
        gc.collect()
        alive = sum(r() is not None for r in returned)
        grads = torch.autograd.grad(y.float().sum(), [x, *m.parameters()])
        results.append((alive, grads))
    assert results[0][0] == results[1][0] == 0
    assert all(torch.equal(p, q) for p, q in zip(results[0][1], results[1][1]))


def test_hugging_face_llama_under_autocast():
    transformers = pytest.importorskip("transformers")
    from test_families import _llama

    torch.manual_seed(0)
    model, run = _llama()
    model.train()
    lean = graph_rewrite.optimize(model)
    ids = torch.randint(0, 256, (2, 16))
    exclude = [*model.parameters(), *model.buffers(), ids]
    with torch.autocast(**BF16):
        before, ref = saved_bytes(lambda: run(model, ids), exclude=exclude)
        after, got = saved_bytes(lambda: run(lean, ids), exclude=exclude)
    assert 100 * (before - after) / before >= 20.0, (before, after)
    assert torch.equal(ref, got)
    params = [p for p in model.parameters() if p.requires_grad]
    g0 = torch.autograd.grad(ref.float().pow(2).sum(), params, allow_unused=True)
    g1 = torch.autograd.grad(got.float().pow(2).sum(), params, allow_unused=True)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g0, g1))
