"""The optimized model keeps working with the rest of PyTorch."""
import copy
import os
import pickle
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import graph_rewrite
from graph_rewrite.memory import saved_bytes

MiB = 2**20


def _mlp(n=4, width=1024):
    return nn.Sequential(*[m for _ in range(n) for m in (nn.Linear(width, width), nn.Softplus())])


class Net(nn.Module):
    """Softplus, sigmoid, logsigmoid, dropout read from self.training, and an unused submodule."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.spare = nn.Linear(2, 2)

    def forward(self, x):
        h = F.softplus(self.a(x), beta=2.0, threshold=3.0)  # b keeps h: keeping it saves a's output
        h = F.dropout(torch.sigmoid(self.b(h)), 0.25, self.training)
        return F.logsigmoid(self.c(h))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, x, seed=0, owner=None):
    """One forward/backward; grads by name from ``owner`` (the module holding the parameters)."""
    owner = model if owner is None else owner
    owner.zero_grad()
    torch.manual_seed(seed)
    y = model(x)
    y.square().sum().backward()
    return y.detach(), _grads(owner)


def _assert_same(a, b, scale_tol=1e-5):
    (ya, ga), (yb, gb) = a, b
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys()
    for k in ga:  # relative to each gradient's scale: rounding differs, a wrong formula does not
        assert (ga[k] - gb[k]).abs().max() <= scale_tol * ga[k].abs().max().clamp_min(1e-30), k


def test_compile_keeps_no_more_than_eager_lean_and_less_than_compiled_native():
    torch.manual_seed(0)
    model = _mlp()
    lean = graph_rewrite.optimize(model)
    x = torch.randn(256, 1024)
    params = list(model.parameters())
    torch._dynamo.reset()
    compiled_native = torch.compile(model)
    compiled_lean = torch.compile(lean, fullgraph=True)
    figures = {}
    for name, fn in [("native", model), ("lean", lean), ("compiled native", compiled_native), ("compiled lean", compiled_lean)]:
        fn(x)  # compile outside the measurement
        figures[name] = saved_bytes(lambda: fn(x), exclude=params)[0] / MiB
    assert figures["compiled lean"] <= figures["lean"] < figures["compiled native"], figures
    assert figures == {"native": 8.0, "lean": 5.0, "compiled native": 8.0, "compiled lean": 5.0}
    _assert_same(_step(model, x), _step(compiled_lean, x, owner=lean))


def test_torchscript_trains_saves_and_loads_in_a_new_process(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    scripted = torch.jit.script(graph_rewrite.optimize(model))
    x = torch.randn(5, 8)
    _assert_same(_step(model, x), _step(scripted, x))
    path = tmp_path / "net.pt"
    torch.jit.save(scripted, str(path))
    torch.save(x, tmp_path / "x.pt")
    expected = scripted(x)
    code = f"""
        import torch, graph_rewrite
        m = torch.jit.load({str(path)!r})
        x = torch.load({str(tmp_path / 'x.pt')!r})
        y = m(x)
        y.sum().backward()
        torch.save(y.detach(), {str(tmp_path / 'y.pt')!r})
        print("graph_rewrite::softplus" in str(m.graph))
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected.detach(), rtol=0, atol=0)


def test_scripted_model_goes_to_the_torchscript_front_end():
    # Once refused with a TypeError; tests/test_torchscript.py covers the front end itself.
    scripted = torch.jit.script(Net())
    lean = graph_rewrite.optimize(scripted)
    assert isinstance(lean, torch.jit.ScriptModule)
    assert lean.rewrite_report.counts() == {
        "graph_rewrite.softplus": 1, "graph_rewrite.sigmoid": 1, "graph_rewrite.logsigmoid": 1}


def test_whole_module_torch_save_loads_in_a_new_process(tmp_path):
    torch.manual_seed(0)
    model = Net()
    lean = graph_rewrite.optimize(model)
    torch.save(lean, tmp_path / "lean.pt")
    x = torch.randn(5, 8)
    torch.save(x, tmp_path / "x.pt")
    lean.eval()
    expected = lean(x)
    # No explicit `import graph_rewrite`: unpickling imports it, which registers the ops.
    code = f"""
        import torch
        m = torch.load({str(tmp_path / 'lean.pt')!r}, weights_only=False)
        assert type(m).__name__ == "Net" and m.training, (type(m), m.training)
        assert sorted(m.state_dict()) == {sorted(model.state_dict())!r}
        assert "graph_rewrite.softplus" in m.code
        m.eval()
        torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})).detach(), {str(tmp_path / 'y.pt')!r})
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_structure_modes_and_report(how):
    model = Net()
    lean = graph_rewrite.optimize(model)
    twin = copy.deepcopy(lean) if how == "deepcopy" else pickle.loads(pickle.dumps(lean))
    assert list(twin.state_dict()) == list(model.state_dict())  # the unused submodule too
    assert twin.a.weight is not model.a.weight and torch.equal(twin.a.weight, model.a.weight)
    assert twin.rewrite_report.counts() == lean.rewrite_report.counts()
    x = torch.randn(5, 8)
    _assert_same(_step(model, x, seed=3), _step(twin, x, seed=3))  # train mode: same dropout masks
    twin.eval(), model.eval()
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)  # the eval graph: no dropout
    assert lean.training  # the original optimized module is untouched


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    blocks = nn.ModuleList([nn.Sequential(nn.Linear(32, 32), nn.Softplus(), nn.Linear(32, 32), nn.Sigmoid()) for _ in range(3)])
    lean_blocks = [graph_rewrite.optimize(b) for b in blocks]
    x = torch.randn(8, 32, requires_grad=True)

    def run(bs, ckpt):
        for p in blocks.parameters():
            p.grad = None
        h = x
        for b in bs:
            h = checkpoint(b, h, use_reentrant=False) if ckpt else b(h)
        h.sum().backward()
        return h.detach(), _grads(blocks)

    _assert_same(run(blocks, False), run(lean_blocks, True))


def test_cpu_bfloat16_autocast():
    # CPU autocast keeps softplus in bfloat16, natively and for the lean op: same values,
    # same dtype, and the softplus inputs are no longer kept.
    torch.manual_seed(0)
    model = _mlp(4, 256)
    lean = graph_rewrite.optimize(model)
    x = torch.randn(64, 256)
    params = list(model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        n_native, y_native = saved_bytes(lambda: model(x), exclude=params)
        n_lean, y_lean = saved_bytes(lambda: lean(x), exclude=params)
    assert y_lean.dtype == y_native.dtype == torch.bfloat16
    torch.testing.assert_close(y_lean, y_native, rtol=0, atol=0)
    assert n_native - n_lean == 3 * 64 * 256 * 2  # 4 inputs dropped, the last output kept
    g_native = torch.autograd.grad(y_native.float().sum(), params)
    g_lean = torch.autograd.grad(y_lean.float().sum(), params)
    for a, b in zip(g_native, g_lean):
        assert (a - b).abs().max() <= 2e-2 * a.abs().max()  # bfloat16 rounding


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DIST_WORKER = r"""
import os, sys, torch, torch.distributed as dist, torch.nn as nn
import graph_rewrite
rank, world, port, mode, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


class Looped(nn.Module):
    # range() over a size: FX cannot trace it, so the runtime front end rewrites it.
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 1)

    def forward(self, x):
        h = self.a(x)
        for _ in range(x.size(1) // 16):
            h = torch.nn.functional.softplus(h)
        return self.b(torch.sigmoid(h))


torch.manual_seed(0)
if mode.endswith("runtime"):
    model = Looped()
else:
    model = nn.Sequential(nn.Linear(16, 32), nn.Softplus(), nn.Linear(32, 32), nn.Sigmoid(), nn.Linear(32, 1))
import warnings
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    lean = graph_rewrite.optimize(model)
x = torch.randn(8, 16, generator=torch.Generator().manual_seed(100 + rank))  # different data per rank
result = {}
for name, m in [("native", model), ("lean", lean)]:
    for p in model.parameters():
        p.grad = None
    if mode.startswith("ddp"):
        wrapped = nn.parallel.DistributedDataParallel(m)
        wrapped(x).square().sum().backward()
        result[name] = {n: p.grad.clone() for n, p in m.named_parameters()}
    else:
        import copy
        from torch.distributed.fsdp import fully_shard
        m = copy.deepcopy(m)  # fully_shard turns parameters into DTensors in place: shard a copy
        fully_shard(m)
        m(x).square().sum().backward()
        result[name] = {n: p.grad.full_tensor().clone() for n, p in m.named_parameters()}
    if name == "lean":
        result["rewritten"] = sorted(r.lean_op for r in m.rewrite_report.replaced)
if rank == 0:
    torch.save(result, out)
# Both ranks leave together, then skip C++ static destructors: gloo's and DDP's
# background threads can still be joinable at interpreter exit, and destroying them
# aborts ("terminate called without an active exception") after the work is done.
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "ddp-runtime", "fsdp2-runtime"])
def test_distributed_gloo_two_processes(tmp_path, mode):
    script = tmp_path / "worker.py"
    script.write_text(_DIST_WORKER)
    out, port = tmp_path / "grads.pt", str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", port, mode, str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    errs = [p.communicate(timeout=180)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(errs)
    result = torch.load(out)
    assert result.pop("rewritten") == ["graph_rewrite.sigmoid", "graph_rewrite.softplus"]
    assert result["native"].keys() == result["lean"].keys()
    for k, g in result["native"].items():
        assert (result["lean"][k] - g).abs().max() <= 1e-5 * g.abs().max(), k
