"""The fused Triton backward: when it is taken, and its exactness (interpreter subprocess).

The kernel cases live in ``triton_interpreter_cases.py`` and run in a child process
with ``TRITON_INTERPRET=1``: Triton reads that variable when kernels are defined, and
setting it here would change every later Triton use in this process (torch.compile).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from graph_rewrite.ops import activations, triton_kernels

ROOT = Path(__file__).resolve().parents[1]
triton_missing = pytest.mark.skipif(not triton_kernels.available(), reason="triton is not installed")


@triton_missing
def test_kernels_in_the_interpreter_match_the_composite():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    cases = Path(__file__).with_name("triton_interpreter_cases.py")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", "-p", "no:warnings", str(cases)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 30 and "skipped" not in proc.stdout, tail


def test_interpreter_variable_did_not_leak():
    assert os.environ.get("TRITON_INTERPRET") != "1"


def test_cpu_tensors_take_the_composite(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("fused kernel called for CPU tensors")

    monkeypatch.setattr(triton_kernels, "softplus_backward", boom)
    monkeypatch.setattr(triton_kernels, "logsigmoid_backward", boom)
    x = torch.randn(64, requires_grad=True)
    torch.ops.graph_rewrite.softplus(x, 1.0, 20.0).sum().backward()
    torch.ops.graph_rewrite.logsigmoid(x).sum().backward()
    assert not triton_kernels.applies(torch.ones(3), torch.ones(3))


def test_eligibility_rules():
    y, g = torch.rand(4, 5), torch.randn(4, 5)
    assert triton_kernels.eligible(g, y)
    assert triton_kernels.eligible(g, y, torch.zeros(4, 5, dtype=torch.bool))
    assert not triton_kernels.eligible(g.t(), y.t())  # not contiguous
    assert not triton_kernels.eligible(g.double(), y)  # dtypes differ
    assert not triton_kernels.eligible(g[:2], y[:2, :4].contiguous())  # shapes differ
    assert not triton_kernels.eligible(g[0].expand(4, 5), y)  # a broadcast view
    assert not triton_kernels.eligible(g, y, torch.zeros(4, 5))  # mask not bool
    assert not triton_kernels.eligible(g.int(), y.int())  # not a float dtype


def test_tracers_and_modes_take_the_composite():
    from torch._subclasses.fake_tensor import FakeTensorMode

    y, g = torch.rand(8), torch.randn(8)
    with FakeTensorMode() as mode:
        fy, fg = mode.from_tensor(y), mode.from_tensor(g)
        assert not triton_kernels.eligible(fg, fy)  # FakeTensor, and a mode on the stack
    from torch.utils._python_dispatch import TorchDispatchMode

    class Noop(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Noop():
        assert not triton_kernels.eligible(g, y)


def test_torch_compile_on_cpu_still_traces_the_composite(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("fused kernel reached from a compiled graph on CPU")

    monkeypatch.setattr(triton_kernels, "softplus_backward", boom)
    torch._dynamo.reset()

    def f(t):
        return torch.ops.graph_rewrite.softplus(t, 2.0, 1.0) * torch.ops.graph_rewrite.logsigmoid(t)

    x = torch.randn(257, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(x).sum().backward()
    (F.softplus(x2, 2.0, 1.0) * F.logsigmoid(x2)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch._dynamo.reset()


@pytest.mark.skipif(not (torch.cuda.is_available() and triton_kernels.available()), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_cuda_kernel_matches_the_composite(dtype):
    """On a GPU: the compiled kernel against the composite on the same device (1 ulp)."""
    x = (torch.randn(1 << 16, dtype=torch.float64) * 30).to(dtype).cuda()
    for beta, threshold in ((1.0, 20.0), (3.0, 1.0)):
        y = F.softplus(x, beta, threshold)
        g = torch.randn_like(y)
        mask = activations._softplus_linear_branch(x, beta, threshold) \
            if activations.softplus_needs_branch_mask(dtype, threshold) else None
        with torch.no_grad():
            got = triton_kernels.softplus_backward(g, y, beta, mask)
            t = torch.mul(activations._opmath(y), -beta).expm1_().mul_(g).neg_()  # the composite, spelled out
            want = (torch.where(mask, activations._opmath(g), t) if mask is not None else t).to(dtype)
        d = (got.double() - want.double()).abs()
        ulp = torch.finfo(dtype).eps * want.double().abs().clamp_min(torch.finfo(dtype).smallest_normal)
        assert (d <= 2 * ulp).all()


def test_a_failing_launch_falls_back_to_the_composite_once_and_for_all(monkeypatch):
    monkeypatch.setattr(triton_kernels, "_failed", None)
    monkeypatch.setattr(triton_kernels, "applies", lambda *a: True)

    def broken(*a, **k):
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(triton_kernels, "softplus_backward", broken)
    y, g = torch.rand(8), torch.randn(8)
    with pytest.warns(RuntimeWarning, match="no kernel image"):
        assert triton_kernels.try_softplus_backward(g, y, 1.0, None) is None
    assert not triton_kernels.available()  # later calls take the composite without trying
    monkeypatch.setattr(triton_kernels, "applies", lambda g, y, m=None: triton_kernels.available())
    assert triton_kernels.try_logsigmoid_backward(g, y) is None
