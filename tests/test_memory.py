"""The memory figure: bytes autograd still holds when forward ends, the same every time."""
import torch
import torch.nn as nn

import graph_rewrite
from graph_rewrite.memory import saved_bytes

N = 64 * 1024  # float32 elements: 256 KiB per tensor


def _branchy(x):
    """exp keeps its output ``a``; a side branch keeps a sigmoid output, then is dropped."""
    a = x.exp()
    b = a.sin()  # saves a again: the same storage, counted once
    for k in range(3):
        side = torch.sigmoid(b * (k + 2))  # sigmoid keeps its output...
        _ = float(side.detach().mean())
        del side  # ...until the branch is dropped: freed, its address free for reuse
    return b


def test_storages_freed_before_forward_ends_do_not_count():
    x = torch.randn(N, requires_grad=True)
    n, out = saved_bytes(lambda: _branchy(x), exclude=[x])
    assert n == 4 * N  # a only; the three sigmoid outputs were freed
    n, out = saved_bytes(lambda: _branchy(x), exclude=[x], include_outputs=True)
    assert n == 2 * 4 * N  # a and the output b


def test_excluded_and_view_storages_count_once_or_not_at_all():
    w = torch.randn(N, requires_grad=True)
    x = torch.randn(N, requires_grad=True)
    # mul saves both operands; w is excluded; the view of y saves y's storage once.
    n, _ = saved_bytes(lambda: ((x * 2) * w).view(-1, 2).exp(), exclude=[w, x])
    assert n == 4 * N * 2  # x*2 (kept by the mul) and the exp output


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(256, 256)

    def forward(self, x):
        h = self.lin(x)
        for _ in range(4):  # a statistic from a branch that is dropped, as in real models' logging
            side = torch.sigmoid(h * 1.5)
            scale = side.detach().mean()
            del side
        return torch.nn.functional.softplus(h) * scale


def test_a_model_against_itself_saves_exactly_nothing_every_time():
    model = Branchy()
    x = torch.randn(64, 256)
    figures = {graph_rewrite.verify(model, model, x).activation_bytes for _ in range(5)}
    assert len(figures) == 1
    ((before, after),) = figures
    assert before == after > 0


def test_autocast_weight_copies_can_be_left_out():
    # Under autocast the Linear keeps bfloat16 copies of its input and weight; GELU keeps the
    # Linear's output. Casts of excluded tensors (weights, inputs) go with them on request.
    lin = nn.Linear(256, 256)
    x = torch.randn(64, 256, requires_grad=True)
    figures = []
    for exclude_casts in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            n, _ = saved_bytes(lambda: torch.nn.functional.gelu(lin(x)), exclude=[*lin.parameters(), x],
                               exclude_casts=exclude_casts)
        figures.append(n)
    two = 2  # bytes per bfloat16 element
    assert figures == [64 * 256 * two * 2 + 256 * 256 * two, 64 * 256 * two]
