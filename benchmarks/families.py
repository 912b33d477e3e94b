"""What optimize() removes on the model families people train; writes benchmarks/FAMILIES.md.

    python benchmarks/families.py                 # every model, then step times (about 5 minutes on 2 cores)
    python benchmarks/families.py --models llama,bert --no-time --out /tmp/f.md

Tiny configs, random weights (nothing is downloaded), train mode, float32, CPU. *Held* is
what autograd keeps when forward returns, outputs included, inputs and weights excluded
(``graph_rewrite.memory.saved_bytes``, what ``verify`` reports). A model whose library is
not installed gets a row saying so.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import graph_rewrite  # noqa: E402
from graph_rewrite.memory import saved_bytes  # noqa: E402
from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)

V = 256


def _hf(config: str, model: str, pick: str = "logits", tokens: int = 32,
        **kw) -> Callable[[], Tuple[Any, Callable, str]]:
    def build():
        import transformers

        m = getattr(transformers, model)(getattr(transformers, config)(vocab_size=V, **kw))
        ids = torch.randint(0, V, (2, tokens))
        call = (lambda mod: getattr(mod(input_ids=ids, decoder_input_ids=ids), pick)) if "T5" in model else \
            (lambda mod: getattr(mod(input_ids=ids), pick))
        width = f", hidden {kw['hidden_size']}, {kw['num_hidden_layers']} layers" if kw.get("hidden_size", 64) != 64 else ""
        return m, call, f"{model}{width}, 2 x {tokens} tokens"
    return build


def _timm(name: str, size: int, **kw) -> Callable[[], Tuple[Any, Callable, str]]:
    def build():
        import timm

        m = timm.create_model(name, pretrained=False, drop_rate=0.0, drop_path_rate=0.0, **kw)
        x = torch.randn(2, 3, size, size)
        return m, (lambda mod: mod(x)), f"timm {name}, 2 x 3 x {size} x {size}"
    return build


def _unet(size: int = 32, channels: Tuple[int, int] = (32, 64)) -> Callable[[], Tuple[Any, Callable, str]]:
    def build():
        import diffusers

        m = diffusers.UNet2DModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
                                  block_out_channels=channels, norm_num_groups=8,
                                  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D"))
        x, t = torch.randn(2, 3, size, size), torch.tensor([10, 500])
        width = f", channels {channels[0]}/{channels[1]}" if channels != (32, 64) else ""
        return m, (lambda mod: mod(x, t).sample), f"diffusers UNet2DModel{width}, 2 x 3 x {size} x {size}"
    return build


def _unet_cond() -> Tuple[Any, Callable, str]:
    import diffusers

    m = diffusers.UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                       block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
                                       attention_head_dim=8,
                                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 8, 32)
    return m, (lambda mod: mod(x, t, encoder_hidden_states=text).sample), \
        "diffusers UNet2DConditionModel, 2 x 4 x 16 x 16, 8 text tokens"


def _whisper() -> Tuple[Any, Callable, str]:
    import transformers

    config = transformers.WhisperConfig(vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2,
                                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256,
                                        decoder_ffn_dim=256, num_mel_bins=16, max_source_positions=32,
                                        max_target_positions=32, dropout=0.0, use_cache=False, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    m = transformers.WhisperForConditionalGeneration(config)
    feats, ids = torch.randn(2, 16, 64), torch.randint(0, V, (2, 16))
    return m, (lambda mod: mod(input_features=feats, decoder_input_ids=ids).logits), \
        "WhisperForConditionalGeneration, 2 x 16 mel x 64 frames, 16 tokens"


def _vae() -> Tuple[Any, Callable, str]:
    import diffusers

    m = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                                norm_num_groups=8, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    x = torch.randn(2, 3, 32, 32)
    return m, (lambda mod: mod(x).sample), "diffusers AutoencoderKL, 2 x 3 x 32 x 32"


SMALL = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             use_cache=False)
MODELS: Dict[str, Callable[[], Tuple[Any, Callable, str]]] = {
    "llama": _hf("LlamaConfig", "LlamaForCausalLM", **SMALL),
    "qwen2": _hf("Qwen2Config", "Qwen2ForCausalLM", **SMALL),
    "mistral": _hf("MistralConfig", "MistralForCausalLM", **SMALL),
    "gemma": _hf("GemmaConfig", "GemmaForCausalLM", head_dim=16, **SMALL),
    "mixtral": _hf("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2, **SMALL),
    "mixtral_eager": _hf("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2,
                         experts_implementation="eager", **SMALL),
    "gpt2": _hf("GPT2Config", "GPT2LMHeadModel", n_embd=64, n_layer=2, n_head=4, use_cache=False, attn_pdrop=0.0,
                resid_pdrop=0.0, embd_pdrop=0.0),
    "bert": _hf("BertConfig", "BertModel", pick="last_hidden_state", hidden_size=64, intermediate_size=256,
                num_hidden_layers=2, num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "t5": _hf("T5Config", "T5ForConditionalGeneration", d_model=64, d_ff=172, num_layers=2, num_heads=4, d_kv=16,
              feed_forward_proj="gated-gelu", dropout_rate=0.0, use_cache=False),
    "vit": _hf("ViTConfig", "ViTModel", pick="last_hidden_state", hidden_size=64, intermediate_size=256,
               num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0),
    "timm_efficientnet_b0": _timm("efficientnet_b0", 64),
    "timm_mobilenetv3_large_100": _timm("mobilenetv3_large_100", 64),
    "timm_convnext_atto": _timm("convnext_atto", 64),
    "timm_vit_small": _timm("vit_small_patch16_224", 64, img_size=64),
    "whisper": _whisper,
    "unet2d": _unet(),
    "unet2d_condition": _unet_cond,
    "autoencoder_kl": _vae,
    # Wider, for the step time: on the tiny models the per-call cost of the runtime front end shows.
    "llama_h512": _hf("LlamaConfig", "LlamaForCausalLM", tokens=256, hidden_size=512, intermediate_size=1376,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, use_cache=False),
    "unet2d_64": _unet(64, (64, 128)),
}
TIMED = ["llama", "bert", "timm_efficientnet_b0", "unet2d", "llama_h512", "unet2d_64"]
WIDE = {"llama_h512", "unet2d_64"}  # not tiny: for the step time
HEADER = ["model", "what", "front end", "rewritten (call sites by kind)", "held native (B)", "held optimized (B)",
          "removed", "removed, CPU bfloat16 autocast", "same, weight copies not counted", "verify (float32)"]


def _vit_input(build):
    # HF ViT takes pixel_values, not input_ids.
    def wrapped():
        m, _, _ = build()
        x = torch.randn(2, 3, 32, 32)
        return m, (lambda mod: mod(pixel_values=x).last_hidden_state), "ViTModel, 2 x 3 x 32 x 32"
    return wrapped


MODELS["vit"] = _vit_input(MODELS["vit"])


def held(model, call, autocast: bool = False, exclude_casts: bool = False) -> int:
    exclude = [*model.parameters(), *model.buffers()]
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        n, _ = saved_bytes(lambda: call(model), exclude=exclude, include_outputs=True, exclude_casts=exclude_casts)
    return n


def build_optimized(key: str) -> Tuple[Any, Any, Callable, str]:
    """(model in train mode, its optimized copy, call, description), seeded."""
    torch.manual_seed(0)
    model, call, what = MODELS[key]()
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, graph_rewrite.optimize(model), call, what


def measure(key: str) -> List[str]:
    model, lean, call, what = build_optimized(key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before, after = held(model, call), held(lean, call)
        kinds = lean.rewrite_report.counts_by_kind()
        torch.manual_seed(0)
        ok = _verify(model, lean, call)
        bf16 = _percent(held(model, call, autocast=True), held(lean, call, autocast=True))
        bf16_activations = _percent(held(model, call, True, exclude_casts=True), held(lean, call, True, exclude_casts=True))
    rewritten = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "nothing"
    return [key, what, lean.rewrite_report.tracing, rewritten, f"{before:,}", f"{after:,}", _percent(before, after),
            bf16, bf16_activations, ok]


def _percent(before: int, after: int) -> str:
    return f"{100 * (before - after) / before:.1f}%" if before else "—"


def _verify(model, lean, call) -> str:
    class Call(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self):
            return call(self.inner)

    report = graph_rewrite.verify(Call(model), Call(lean))
    return "PASSED" if report.ok else "FAILED: " + ", ".join(c.name for c in report.failed)


def step_ratio(key: str, pairs: int) -> List[str]:
    model, lean, call, what = build_optimized(key)

    def step(m) -> float:
        t = time.perf_counter()
        call(m).float().sum().backward()
        return time.perf_counter() - t

    for m in (model, lean, model, lean):  # warm-up
        step(m)
    ratios = []
    for i in range(pairs):  # interleaved, alternating order
        order = (model, lean) if i % 2 == 0 else (lean, model)
        t = {id(m): step(m) for m in order}
        ratios.append(t[id(lean)] / t[id(model)])
        model.zero_grad(set_to_none=True)
    ratios.sort()
    return [key, what, f"{statistics.median(ratios):.3f}", f"{ratios[0]:.3f} – {ratios[-1]:.3f}", str(pairs)]


def table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "FAMILIES.md"))
    ap.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--no-time", action="store_true", help="skip the step-time pairs")
    ap.add_argument("--pairs", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # one thread: a shared 2-core machine stalls with more
    keys = args.models.split(",") if args.models else list(MODELS)
    rows = []
    for key in keys:
        print(f"measuring {key} ...", file=sys.stderr, flush=True)
        try:
            rows.append(measure(key))
        except ImportError as e:
            rows.append([key, f"skipped: {e.name} is not installed", "", "", "", "", "", "", "", ""])
        except Exception as e:  # a row, not a crash: say what failed
            rows.append([key, f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}", "", "", "", "", "", "", "",
                         ""])
    timed = []
    if not args.no_time:
        for key in [k for k in TIMED if k in keys]:
            print(f"timing {key} ...", file=sys.stderr, flush=True)
            timed.append(step_ratio(key, args.pairs))
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "graph_rewrite"], capture_output=True,
                           text=True).stdout.strip()
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import transformers  # noqa: F401  (versions in the header; optional)

    versions = []
    for name in ("torch", "transformers", "timm", "diffusers"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            versions.append(f"{name} not installed")
    text = [
        "# optimize() on the model families (benchmarks/families.py)", "",
        f"{when}, {cpu_name()} CPU ({os.cpu_count()} cores, 1 torch thread), {', '.join(versions)}; "
        f"graph_rewrite at {commit}{' + uncommitted changes' if dirty else ''}. Tiny configs, random weights, "
        "train mode, float32. *Held*: bytes autograd keeps when forward returns, outputs included, weights and "
        "inputs excluded. *Front end*: how `optimize()` reached the model (`whole model`: one FX graph; "
        "`root not traced: runtime front end`: the model's own code under the runtime front end, with submodules "
        "traced on their own). *CPU bfloat16 autocast*: the same under `torch.autocast(\"cpu\", torch.bfloat16)`; "
        "autograd then also holds autocast's bfloat16 copies of the weights, the same bytes both ways, which the "
        "last column leaves out (`saved_bytes(..., exclude_casts=True)`): on these tiny models they are a large "
        "share of the total. The lossless headroom of each model is not measured here.", "",
        table(HEADER, rows), "",
    ]
    if timed:
        text += ["## Step time", "",
                 f"One forward and backward (sum of the output), optimized / native, {args.pairs} interleaved pairs in "
                 "alternating order after 2 warm-up steps each; median and range of the per-pair ratios.", "",
                 table(["model", "what", "median", "range", "pairs"], timed), ""]
    with open(args.out, "w") as f:
        f.write("\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
