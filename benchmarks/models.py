"""The benchmark models: each builder returns (model, example inputs, description).

All weights are random (``weights=None``: nothing is downloaded); every model is in
train mode. Inputs are plain tensors without ``requires_grad``: they are excluded from
activation bytes, like parameters and buffers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Case:
    key: str
    title: str
    build: Callable[[bool], Tuple[nn.Module, Tuple[torch.Tensor, ...], str]]
    time_n: int  # timed repetitions (median) in a full run; 0 = not timed


def _swap_relu_for_softplus(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.Softplus())
        else:
            _swap_relu_for_softplus(child)
    return module


def mlp(quick: bool):
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(1024, 1024), nn.Softplus())])
    return model, (torch.randn(256, 1024),), "4 x (Linear(1024,1024) -> Softplus), batch 256"


def resnet50_softplus(quick: bool):
    import torchvision

    model = _swap_relu_for_softplus(torchvision.models.resnet50(weights=None))
    res = 112 if quick else 224
    return model, (torch.randn(8, 3, res, res),), f"resnet50, every nn.ReLU -> nn.Softplus, batch 8 at {res}x{res}"


def efficientnet_b0(quick: bool):
    import torchvision

    model = torchvision.models.efficientnet_b0(weights=None)
    res = 112 if quick else 224
    return model, (torch.randn(8, 3, res, res),), f"efficientnet_b0 (SiLU + sigmoid squeeze-excite), batch 8 at {res}x{res}"


def swin_v2_t(quick: bool):
    import torchvision

    model = torchvision.models.swin_v2_t(weights=None)
    # swin_v2_t's relative-position tables follow its window size, not the image size:
    # 256 is its native resolution; 128 keeps the windows valid for --quick.
    res = 128 if quick else 256
    return model, (torch.randn(2, 3, res, res),), f"swin_v2_t (GELU; sigmoid in the position-bias MLP), batch 2 at {res}x{res}"


class MambaStyleBlock(nn.Module):
    """The gating/discretisation part of a Mamba block, with softplus on dt.

    in_proj -> (x, z, dt_low); dt = softplus(dt_proj(dt_low)); y = x * dt (the
    dt-weighted input the selective scan consumes, standing in for the scan);
    y = y * sigmoid(z) (output gate); out_proj; residual. No scan kernel: this is
    the part whose memory the activation op decides.
    """

    def __init__(self, d_model: int = 256, expand: int = 2, dt_rank: int = 16) -> None:
        super().__init__()
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank
        self.norm = nn.LayerNorm(d_model)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + dt_rank)
        self.dt_proj = nn.Linear(dt_rank, self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        x, z, dt = self.in_proj(self.norm(u)).split([self.d_inner, self.d_inner, self.dt_rank], dim=-1)
        dt = F.softplus(self.dt_proj(dt))
        y = x * dt
        y = y * torch.sigmoid(z)
        return u + self.out_proj(y)


def mamba_style(quick: bool):
    model = nn.Sequential(*[MambaStyleBlock() for _ in range(2)])
    return model, (torch.randn(8, 512, 256),), "2 x Mamba-style block (d_model 256, d_inner 512, dt_rank 16), batch 8 x 512 tokens"


class VAE(nn.Module):
    """MLP VAE with a softplus std head; the noise is an input (fixed), so runs are deterministic."""

    def __init__(self, d_in: int = 784, hidden: int = 512, latent: int = 64) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mu_head = nn.Linear(hidden, latent)
        self.std_head = nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(
            nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, d_in), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor, eps: torch.Tensor):
        h = self.encoder(x)
        mu = self.mu_head(h)
        std = F.softplus(self.std_head(h))
        z = mu + std * eps
        return self.decoder(z), mu, std


def vae(quick: bool):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(256, 784, generator=g)
    eps = torch.randn(256, 64, generator=g)
    return VAE(), (x, eps), "VAE 784-512-512-(64 mu, softplus std)-512-512-784 + sigmoid, batch 256, fixed noise input"


CASES: List[Case] = [
    Case("mlp", "MLP", mlp, 10),
    Case("resnet50", "resnet50-softplus", resnet50_softplus, 5),
    Case("efficientnet_b0", "efficientnet_b0", efficientnet_b0, 3),
    Case("swin_v2_t", "swin_v2_t", swin_v2_t, 3),
    Case("mamba", "Mamba-style", mamba_style, 7),
    Case("vae", "VAE", vae, 10),
]


def loss_of(out) -> torch.Tensor:
    """A scalar from any model output (tensor or tuple), for timing forward+backward."""
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    return sum(t.float().sum() for t in out)


class LlamaMLP(nn.Module):
    """LLaMA's feed-forward block: ``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, dim: int = 512, hidden: int = 1376) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    # No annotations: torch.jit.script of an FX graph rendered from ``x: torch.Tensor`` fails
    # ("Unknown type name '_torch_Tensor_'"), and the tests script it.
    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
