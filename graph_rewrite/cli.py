"""Command line: optimize a model, show what changed, verify it.

    graph-rewrite efficientnet_b0 --shape 2,3,224,224 --show-graph
    python -m graph_rewrite mypkg.models:build --weights ckpt.pt --ops softplus
    graph-rewrite resnet50 --pretrained      # default weights from the torch hub cache, no download
    graph-rewrite model.pt --shape 8,3,64,64 --out model_lean.pt   # a TorchScript archive

Exit status 0 when verification passed, 1 when a check failed, 2 for bad input.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import sys
import textwrap
import time
import warnings
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["main", "build_model", "load_archive", "load_weights", "hub_checkpoint", "fit_tables"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Steps:
    """Progress on ``stream`` (stderr): a ``tqdm`` bar on a terminal, plain lines elsewhere.

    ``steps(label)`` starts the step ``label`` (the first call) or finishes the running
    step and starts ``label``; ``close()`` ends the display. When ``stream`` is not a
    TTY (a log file, a pipe, CI) or ``tqdm`` is missing, each step is one line,
    ``graph-rewrite: [2/3] tracing and rewriting (1.2s)``, with no carriage returns.
    """

    def __init__(self, total: int, stream=None) -> None:
        self.total, self.done, self.started = total, 0, False
        self.stream = sys.stderr if stream is None else stream
        self.t0 = time.perf_counter()
        self.bar = None
        isatty = getattr(self.stream, "isatty", None)
        if isatty is not None and isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, file=self.stream, leave=False, dynamic_ncols=True,
                                bar_format="{desc:<28} {bar} {n_fmt}/{total_fmt} [{elapsed}]")

    def __call__(self, label: str) -> None:
        if self.started:
            self.done = min(self.done + 1, self.total)
        self.started = True
        if self.bar is not None:
            self.bar.set_description_str(label, refresh=False)
            self.bar.update(self.done - self.bar.n)
            self.bar.refresh()  # a step is seconds long: show each one, whatever tqdm's rate limit
        else:
            step = f"[{min(self.done + 1, self.total)}/{self.total}] " if self.done < self.total else ""
            self.stream.write(f"graph-rewrite: {step}{label} ({time.perf_counter() - self.t0:.1f}s)\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def build_model(spec: str, pretrained: bool = False) -> nn.Module:
    """A torchvision model name (built with ``weights=None``: never a download) or ``package.module:factory``.

    ``pretrained=True`` (torchvision names only) builds the model with its default
    weights, read from the torch hub cache, ``torch.hub.get_dir()/checkpoints/<file
    name of the weights URL>``, where ``torchvision`` itself would have left them.
    Nothing is downloaded: if the file is not there, a ``ValueError`` says where it is
    expected and the URL to fetch it from on a machine with network.

    >>> build_model("resnet18")                      # doctest: +SKIP
    >>> build_model("resnet18", pretrained=True)     # doctest: +SKIP
    >>> build_model("mypkg.models:make_net")         # doctest: +SKIP
    """
    if ":" in spec:
        if pretrained:
            raise ValueError(f"--pretrained takes a torchvision model name; for {spec!r} use --weights PATH")
        module_name, _, attr = spec.partition(":")
        try:
            factory: Callable[[], nn.Module] = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import {spec!r}: {e}") from None
        model = factory()
    else:
        try:
            import torchvision
        except ImportError:
            raise ValueError(f"{spec!r} looks like a torchvision name, but torchvision is not installed") from None
        if spec not in torchvision.models.list_models():
            raise ValueError(f"unknown model {spec!r}: give a torchvision name or package.module:factory")
        if pretrained:
            weights, path = hub_checkpoint(spec)
            with _weights_from_file(weights, path):
                try:
                    try:  # builders drop the backbone weights when given weights; say so anyway
                        model = torchvision.models.get_model(spec, weights=weights, weights_backbone=None)
                    except TypeError:
                        model = torchvision.models.get_model(spec, weights=weights)
                except RuntimeError as e:  # load_state_dict's message: missing or unexpected keys
                    if "state_dict" not in str(e):
                        raise
                    raise ValueError(f"{path} does not fit {spec}: {str(e).splitlines()[0]}") from None
        else:
            try:  # detection and segmentation builders also download a backbone unless told not to
                model = torchvision.models.get_model(spec, weights=None, weights_backbone=None)
            except TypeError:
                model = torchvision.models.get_model(spec, weights=None)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def is_archive(spec: str) -> bool:
    """Whether ``spec`` names a TorchScript archive (an existing file, or a path ending in .pt/.pth/.zip)."""
    import os

    return os.path.isfile(spec) or spec.endswith((".pt", ".pth", ".zip"))


def load_archive(path: str) -> torch.jit.ScriptModule:
    """``torch.jit.load(path)`` on CPU, with a ``ValueError`` that says what is wrong.

    >>> load_archive("model.pt")                     # doctest: +SKIP
    """
    import os

    if not os.path.isfile(path):
        raise ValueError(f"no TorchScript archive at {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
            return torch.jit.load(path, map_location="cpu")
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path} is not a TorchScript archive torch.jit.load can read ({type(e).__name__}: {first})") from None


def hub_checkpoint(name: str):
    """(the default weights enum of torchvision model ``name``, the path its file has in the hub cache).

    Raises ``ValueError`` when the file is not there (saying where it should be and
    where to get it) or the model has no weights. Reads nothing and downloads nothing.
    """
    import os
    from urllib.parse import urlparse

    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError) as e:
        raise ValueError(f"torchvision has no pretrained weights for {name}: {e}") from None
    if name.startswith("quantized_"):
        # get_model(quantized_*) builds the float, quantization-ready model (quantize=False
        # is the default), which takes the float model's weights, not the int8 ones.
        import inspect

        from torchvision.models import WeightsEnum

        ann = inspect.signature(torchvision.models.get_model_builder(name)).parameters["weights"].annotation
        floats = [t for t in _flatten_args(ann) if isinstance(t, type) and issubclass(t, WeightsEnum)
                  and "Quantized" not in t.__name__]
        if floats:
            enum = floats[0]
    weights = getattr(enum, "DEFAULT", None)
    if weights is None:
        raise ValueError(f"torchvision lists no default weights for {name}")
    url = weights.url
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    if not os.path.isfile(path):
        raise ValueError(
            f"--pretrained: no weights file for {name} in the torch hub cache (graph-rewrite never downloads).\n"
            f"  expected: {path}\n"
            f"  ({weights!r}; fetch it on a machine with network from {url})\n"
            "  choices: place that file at the path above (the hub cache is $TORCH_HOME/hub, "
            "default ~/.cache/torch/hub), or pass --weights PATH with a local state_dict file"
        )
    return weights, path


def _flatten_args(ann):
    from typing import get_args

    out = []
    for t in get_args(ann) or (ann,):
        out += _flatten_args(t) if get_args(t) else [t]
    return out


class _weights_from_file:
    """While building, ``weights.get_state_dict()`` reads ``path`` with ``torch.load`` instead of its URL.

    The builder then does everything else it does for pretrained weights (architecture
    settings from the weights' meta, key renames), and no download can happen. Only
    this weights enum class is touched, and only inside the ``with``.
    """

    def __init__(self, weights, path: str) -> None:
        self.cls, self.path = type(weights), path

    def __enter__(self) -> None:
        path = self.path

        def get_state_dict(_self, *args, **kwargs):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"cannot read weights from {path}: {e}") from None

        self.had = "get_state_dict" in self.cls.__dict__
        self.old = self.cls.__dict__.get("get_state_dict")
        type.__setattr__(self.cls, "get_state_dict", get_state_dict)

    def __exit__(self, *exc) -> None:
        if self.had:
            type.__setattr__(self.cls, "get_state_dict", self.old)
        else:
            type.__delattr__(self.cls, "get_state_dict")


def load_weights(model: nn.Module, path: str) -> None:
    """Load a local state_dict file into ``model``, strictly.

    Also accepted: a state_dict nested under "state_dict" or "model" (training
    checkpoints), and keys prefixed "module." (DataParallel/DDP) or "_orig_mod."
    (torch.compile) when the model's own keys have no such prefix.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"no weights file at {path}") from None
    except Exception as e:
        raise ValueError(f"cannot read weights from {path}: {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict")
    own = model.state_dict()
    for prefix in ("module.", "_orig_mod."):
        if state and all(isinstance(k, str) and k.startswith(prefix) for k in state) \
                and not any(k.startswith(prefix) for k in own):
            state = {k[len(prefix):]: v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit the model: {str(e).splitlines()[0]}") from None


def _shape(text: str) -> List[int]:
    """``"2,3,224,224"`` or ``"2x3x224x224"`` -> ``[2, 3, 224, 224]``; anything else is an argparse error.

    Every dimension must be a non-negative integer: ``2,3,x,64``, ``2,,3`` and ``2,3,``
    are refused, not read as ``2,3,64``.
    """
    parts = re.split(r"[,x]", text.strip())
    if not text.strip() or not all(re.fullmatch(r"\d+", p.strip()) for p in parts):
        raise argparse.ArgumentTypeError(
            f"bad shape {text!r}: give non-negative integers separated by ',' or 'x', e.g. 2,3,224,224")
    return [int(p) for p in parts]


def _ops_help() -> str:
    """The --ops help, from the rules table: each kind with its rule names."""
    from .rules import KINDS, RULES

    kinds = "; ".join(f"kind {k}: " + ", ".join(r.name for r in RULES if r.kind == k) for k in KINDS)
    return f"rules to apply, by name or kind (default: all). {kinds}"


def _op(text: str) -> str:
    from .rules import KINDS, RULES

    if text not in KINDS and text not in {r.name for r in RULES}:
        raise argparse.ArgumentTypeError(
            f"unknown rule {text!r}: choose a kind ({', '.join(KINDS)}) or a rule name "
            f"({', '.join(r.name for r in RULES)})")
    return text


def fit_tables(text: str, width: int) -> str:
    """Cut the rows of the plain-text tables in ``text`` to ``width`` columns.

    A table is found by its rule line (runs of ``-`` separated by spaces, as
    ``tabulate`` draws it under the header). Its header and rows that are wider than
    ``width`` lose the end of their last columns (the detail), marked with ``…``; other
    long lines (notes) are wrapped. ``width <= 0`` leaves ``text`` as it is.
    """
    if width <= 0:
        return text
    lines = text.split("\n")
    rows = set()
    for i, line in enumerate(lines):
        if not re.fullmatch(r"-+(  +-+)*", line):
            continue
        gaps = [m.start() for m in re.finditer(r"  +", line)]  # where each column gap begins
        rows.update((i - 1, i))
        j = i + 1
        while j < len(lines) and lines[j].strip() and all(lines[j][g:g + 2].strip() == "" for g in gaps):
            rows.add(j)
            j += 1
    out = []
    for i, line in enumerate(lines):
        if len(line) <= width:
            out.append(line)
        elif i in rows:
            out.append(line[: max(width - 1, 1)].rstrip() + "…")
        else:
            out.extend(textwrap.wrap(line, width=width, subsequent_indent="  ", break_on_hyphens=False) or [""])
    return "\n".join(out)


def _width(arg: Optional[int]) -> int:
    """--width, or the terminal's width when stdout is a terminal (or $COLUMNS is set); 0: no limit."""
    if arg is not None:
        return arg
    if os.environ.get("COLUMNS") or sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graph-rewrite", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="torchvision model name (e.g. efficientnet_b0), package.module:factory, "
                                 "or the path of a TorchScript archive (torch.jit.save)")
    p.add_argument("--shape", type=_shape, default=[2, 3, 224, 224], help="input shape (default 2,3,224,224)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--ops", nargs="+", type=_op, default=None, metavar="RULE", help=_ops_help())
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", metavar="PATH", help="a local state_dict file to load first (no downloads)")
    w.add_argument("--pretrained", action="store_true",
                   help="torchvision's default weights, read from the torch hub cache "
                        "($TORCH_HOME/hub/checkpoints); never downloaded")
    p.add_argument("--mode", choices=["train", "eval"], default="train", help="model mode while verifying")
    p.add_argument("--show-graph", action="store_true", help="print the rewritten regions of the graph")
    p.add_argument("--time", type=int, default=0, metavar="N", help="also time N forward+backward iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="PATH", help="save the rewritten TorchScript archive here (archive input only)")
    p.add_argument("--width", type=int, default=None, metavar="N",
                   help="cut table rows to N columns (default: the terminal's width when printing to one, "
                        "else no limit; 0: no limit)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from .transform import optimize
    from .printout import graph_diff
    from .verification import verify

    steps = Steps(3)
    width = _width(args.width)
    try:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but CUDA is not available here")
        archive = is_archive(args.model)
        if args.out and not archive:
            raise ValueError("--out saves a TorchScript archive: give the path of one (torch.jit.save) as the model")
        if archive and args.pretrained:
            raise ValueError("--pretrained takes a torchvision model name, not a TorchScript archive")
        steps(f"{'loading' if archive else 'building'} {args.model}")
        model = load_archive(args.model) if archive else build_model(args.model, pretrained=args.pretrained)
        if args.weights:
            load_weights(model, args.weights)
        model = model.to(device=args.device, dtype=DTYPES[args.dtype]).train(args.mode == "train")
        steps("tracing and rewriting")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lean = optimize(model, ops=args.ops)
        steps("verifying")
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.shape, generator=gen).to(device=args.device, dtype=DTYPES[args.dtype])
        report = verify(model, lean, x, seed=args.seed, time_iters=args.time)
        if args.out:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                torch.jit.save(lean, args.out)
        steps("done")
    except (ValueError, TypeError) as e:
        steps.close()
        print(f"graph-rewrite: error: {e}", file=sys.stderr)
        return 2
    steps.close()
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(fit_tables(str(lean.rewrite_report), width))
    if args.show_graph:
        print()
        print(graph_diff(model, lean, table=False))
    print()
    print(fit_tables(str(report), width))
    return 0 if report.ok else 1
