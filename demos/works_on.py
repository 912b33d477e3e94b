"""Third-party models, built from their configs with random weights: what ``optimize()`` reaches.

    python demos/works_on.py                 # prints the table (about a minute on 2 CPU cores)
    python demos/works_on.py --out demos/WORKS_ON.md

For each model (train mode, tiny config, nothing downloaded): how it was traced, how
many softplus/sigmoid/logsigmoid calls one forward makes natively and how many run
as lean ops after ``optimize`` (counted below autograd with a ``TorchDispatchMode``),
``verify``'s verdict, and the bytes autograd holds when forward ends, before and
after. For Hugging Face's Mamba it also measures ``torch.compile(backend=
"graph_rewrite")``, which runs the model's compile-time code path. A second table
covers the model families of ``benchmarks/families.py`` (every rule kind; its own
measurement, reused): LLaMA-style, Mixtral, GPT-2, BERT, T5, Whisper, ViT, timm and
diffusers models (``--no-families`` leaves it out).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import warnings
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import graph_rewrite
from graph_rewrite.memory import saved_bytes

NATIVE = {"aten.softplus.default", "aten.sigmoid.default", "aten.log_sigmoid_forward.default"}


class CountOps(TorchDispatchMode):
    """Activation kernels that run below autograd: native aten ones and graph_rewrite ones."""

    def __init__(self) -> None:
        super().__init__()
        self.native = self.lean = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.native += name in NATIVE
        # Activation ops only: the recompute consumers replace Linear/Conv/mul calls.
        self.lean += name.startswith("graph_rewrite.") and not name.startswith("graph_rewrite.recompute_")
        return func(*args, **(kwargs or {}))


class RNN(nn.Module):
    """Hand-written recurrent cell: sigmoid gates, a softplus input gate, a logsigmoid head."""

    def __init__(self, d: int = 16, h: int = 32, new_zeros: bool = False) -> None:
        super().__init__()
        self.h, self.new_zeros = h, new_zeros
        self.inp, self.rec, self.out = nn.Linear(d, 3 * h), nn.Linear(h, 3 * h), nn.Linear(h, 4)

    def forward(self, x):
        state = x.new_zeros(x.shape[0], self.h) if self.new_zeros else torch.zeros(x.shape[0], self.h)
        for t in range(x.size(1)):
            i, f, c = (self.inp(x[:, t]) + self.rec(state)).chunk(3, dim=-1)
            state = torch.sigmoid(f) * state + F.softplus(i) * torch.tanh(c)
        return F.logsigmoid(self.out(state))


def _hf(name: str, **cfg) -> Callable[[], Tuple[nn.Module, tuple]]:
    def build():
        import transformers

        transformers.logging.set_verbosity_error()
        config = getattr(transformers, f"{name}Config")(vocab_size=128, use_cache=False, **cfg)
        model = getattr(transformers, f"{name}ForCausalLM")(config)
        return model, (torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)),)
    return build


def _mambapy(pscan: bool):
    def build():
        from mambapy.mamba import Mamba, MambaConfig

        return Mamba(MambaConfig(d_model=32, n_layers=2, d_state=8, pscan=pscan)), (torch.randn(2, 16, 32),)
    return build


def _timm_naflexvit():
    from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg

    cfg = NaFlexVitCfg(patch_size=8, embed_dim=32, depth=2, num_heads=2, attn_gated=True)
    return NaFlexVit(cfg, img_size=32, num_classes=10), (torch.randn(2, 3, 32, 32),)


MODELS: Dict[str, Callable[[], Tuple[nn.Module, tuple]]] = {
    "HF MambaForCausalLM": _hf("Mamba", hidden_size=32, state_size=8, num_hidden_layers=2),
    "HF FalconMambaForCausalLM": _hf("FalconMamba", hidden_size=32, state_size=8, num_hidden_layers=2),
    "HF Mamba2ForCausalLM": _hf("Mamba2", hidden_size=64, state_size=8, num_hidden_layers=2, num_heads=4,
                                head_dim=32, n_groups=1, chunk_size=8),
    "HF Qwen3NextForCausalLM": _hf("Qwen3Next", hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                   linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=16,
                                   linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "HF DogeForCausalLM": _hf("Doge", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1),
    "HF BambaForCausalLM": _hf("Bamba", hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, mamba_n_heads=4, mamba_d_head=32,
                               mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=8,
                               attn_layer_indices=[1]),
    "HF JambaForCausalLM": _hf("Jamba", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, mamba_d_state=8, num_experts=2,
                               attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                               expert_layer_offset=1, use_mamba_kernels=False),
    "mambapy Mamba (pscan)": _mambapy(True),
    "mambapy Mamba (sequential scan)": _mambapy(False),
    "timm NaFlexVit (gated attention)": _timm_naflexvit,
    "RNN (torch.zeros(x.shape[0], H))": lambda: (RNN(), (torch.randn(4, 8, 16),)),
    "RNN (for t in range(x.size(1)))": lambda: (RNN(new_zeros=True), (torch.randn(4, 8, 16),)),
}


def _count(model: nn.Module, inputs: tuple) -> CountOps:
    with CountOps() as ops:
        model(*[t.requires_grad_() if t.is_floating_point() else t for t in (i.clone() for i in inputs)])
    return ops


def build_and_optimize(name: str) -> Tuple[nn.Module, nn.Module, tuple]:
    """(the model in train mode, ``optimize(model)``, its inputs), seeded; warnings silenced."""
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lean = graph_rewrite.optimize(model)
    return model, lean, inputs


def measure(name: str) -> Dict[str, object]:
    model, lean, inputs = build_and_optimize(name)
    native, ops = _count(model, inputs), _count(lean, inputs)
    report = graph_rewrite.verify(model, lean, *inputs)
    return {"model": name, "tracing": lean.rewrite_report.tracing, "calls": native.native,
            "lean": ops.lean, "left native": ops.native, "verify": "PASSED" if report.ok else "FAILED",
            "bytes": report.activation_bytes}


def compile_caveat() -> List[str]:
    """HF Mamba: eager optimize() against torch.compile(backend="graph_rewrite") (compile-time code path)."""
    torch.manual_seed(0)
    model, (ids,) = MODELS["HF MambaForCausalLM"]()
    model.train()
    exclude = list(model.parameters()) + list(model.buffers())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lean = graph_rewrite.optimize(model)
        rows = [("eager, native", saved_bytes(lambda: model(ids).logits, exclude, True)[0]),
                ("eager, graph_rewrite.optimize", saved_bytes(lambda: lean(ids).logits, exclude, True)[0])]
        for backend in ("eager", "graph_rewrite"):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend=backend)
            compiled(ids)
            rows.append((f'torch.compile(backend="{backend}")',
                         saved_bytes(lambda: compiled(ids).logits, exclude, True)[0]))
    lines = ["| HF MambaForCausalLM, batch 2 x 16 tokens | bytes held after forward (with logits) |", "|---|---|"]
    return lines + [f"| {k} | {v:,} |" for k, v in rows]


def families_table() -> List[str]:
    """The tiny model families of benchmarks/families.py, measured as that script measures them."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import families

    rows = []
    for key in families.MODELS:
        if key in families.WIDE:
            continue
        try:
            rows.append(families.measure(key))
        except Exception as e:  # a row, not a crash
            rows.append([key, f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"] + [""] * 8)
        print("| " + " | ".join(rows[-1]) + " |", flush=True)
    return ["## Model families: every rule kind", "",
            "Tiny configs, random weights, train mode, float32 unless said; held bytes include the outputs "
            "(`benchmarks/families.py` measures the same way and says more).", "",
            families.table(families.HEADER, rows)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="also write the markdown here")
    p.add_argument("--models", help="semicolon-separated subset of the names")
    p.add_argument("--no-families", action="store_true", help="leave out the model-families table")
    args = p.parse_args(argv)
    names = args.models.split(";") if args.models else list(MODELS)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"Measured {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, CPU ({platform.processor() or platform.machine()}), "
             f"torch {torch.__version__}, git {commit or 'unknown'}, `python demos/works_on.py`.", "",
             "| model | traced | activation calls | run as lean ops | left native | verify | held bytes before | after | saved |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        try:
            r = measure(name)
        except Exception as e:  # say so in the table: a model that cannot be built here is a finding too
            lines.append(f"| {name} | error: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | | | | | | |")
            print(lines[-1], flush=True)
            continue
        before, after = r["bytes"]
        lines.append(f"| {name} | {r['tracing']} | {r['calls']} | {r['lean']} | {r['left native']} | {r['verify']} "
                     f"| {before:,} | {after:,} | {before - after:,} |")
        print(lines[-1], flush=True)
    lines += ["", *compile_caveat()]
    if not args.no_families:
        lines += ["", *families_table()]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
