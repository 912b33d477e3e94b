"""The torchvision zoo: every model in ``torchvision.models.list_models()``, optimized and verified.

    python demos/zoo.py                                   # all models, writes demos/ZOO.md
    python demos/zoo.py --models efficientnet_b0,raft_small --out /tmp/zoo.md
    python demos/zoo.py --results /tmp/zoo.jsonl          # keep results; a rerun skips models already there

Each model runs in its own subprocess (a crash or an out-of-memory kill costs one row,
not the run), is built with ``weights=None`` (and ``weights_backbone=None``: nothing is
downloaded), optimized with ``graph_rewrite.optimize`` and checked with
``graph_rewrite.verify`` (one forward + backward of the original and of the optimized
model). Inputs, per family (the smallest of a few candidates that the model accepts,
tried in that order with a forward under ``no_grad``):

* classification: batch 2 at 64x64, else 96, 128, 224, 299 (ViT and MaxViT
  need exactly 224, Inception v3 in train mode 299 for its aux head); batch 1 for the
  four largest (vit_h_14, vit_l_16, vit_l_32, regnet_y_128gf: 0.3 to 0.6 G parameters);
* quantization: the builders' default ``quantize=False``, i.e. the float,
  quantization-ready model (QuantStub/DeQuantStub, FloatFunctional adds). An int8
  model converted by ``quantize=True`` has no gradients, so there is nothing to train
  or verify; inputs as classification;
* segmentation: batch 2 at 64x64 (the output dict is compared leaf by leaf);
* video: batch 1, 3 channels, 4 frames at 64x64, else 8 at 112, 16 at 112, 16 at 224
  (MViT needs exactly 16 x 224 x 224, S3D at least that);
* optical flow: a pair of images, batch 1 at 64x64, else 128 (RAFT returns the
  flow of every refinement iteration; all of them are compared);
* detection: train mode with synthetic targets (one box per image, label 1, plus a
  box-shaped mask for Mask R-CNN and 17 visible keypoints for Keypoint R-CNN), two
  3x64x64 images. The targets are bound to the model (``model(images, targets)`` inside
  a wrapper), not passed to verify as inputs: verify differentiates every float input,
  and training never differentiates its labels. The model's own transform resizes the images (to 800 px for the R-CNNs,
  RetinaNet and FCOS, 320 for the *_320 and SSDlite, 300 for SSD). Train mode because
  that is where activation memory matters: the output is the loss dict, so backward
  runs through the backbone, the RPN/heads and the losses. (Eval mode would compare
  post-processed detections whose boxes come from detached proposals, and an
  untrained model may detect nothing at all.)

All models are in train mode (eval is used only where no train-mode input works,
and the table says so). Weights are random, seeded.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MiB = 2.0**20

FAMILY_MODULES = ("quantization", "detection", "segmentation", "video", "optical_flow")

# Models that accept only one input size: skip the probing of smaller ones.
FIXED_SIZE = {
    "maxvit_t": 224,
    "vit_b_16": 224, "vit_b_32": 224, "vit_l_16": 224, "vit_l_32": 224, "vit_h_14": 224,
    "inception_v3": 299, "quantized_inception_v3": 299,
}
# The largest models (0.3 to 0.6 G parameters): batch 1, to keep the memory of a run
# (model, clones of the parameters, two sets of gradients) near 10 GiB.
BATCH_ONE = {"vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf"}
FIXED_VIDEO = {"mvit_v1_b": (16, 224), "mvit_v2_s": (16, 224), "s3d": (16, 224)}

IMAGE_SIZES = (64, 96, 128, 224, 299)
VIDEO_SIZES = ((4, 64), (8, 112), (16, 112), (16, 224))
FLOW_SIZES = (64, 128)


# --------------------------------------------------------------------------- one model (child process)
def family_of(name: str) -> str:
    import torchvision.models as M

    for mod in FAMILY_MODULES:
        if name in M.list_models(getattr(M, mod)):
            return mod.replace("_", " ")
    return "classification"


def _detection_targets(name: str, n: int, size: int):
    import torch

    targets = []
    for _ in range(n):
        t = {"boxes": torch.tensor([[8.0, 10.0, 40.0, 50.0]]), "labels": torch.tensor([1])}
        if name.startswith("maskrcnn"):
            masks = torch.zeros(1, size, size, dtype=torch.uint8)
            masks[:, 10:50, 8:40] = 1
            t["masks"] = masks
        if name.startswith("keypointrcnn"):
            kp = torch.ones(1, 17, 3)
            kp[0, :, 0] = torch.linspace(10, 38, 17)
            kp[0, :, 1] = torch.linspace(12, 48, 17)
            t["keypoints"] = kp
        targets.append(t)
    return targets


def _candidates(name: str, family: str):
    """(description, inputs) pairs to try, smallest first."""
    import torch

    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if family == "detection":
        imgs = [rand(3, 64, 64), rand(3, 64, 64)]
        yield "2 images 3x64x64, fixed targets", (imgs, _detection_targets(name, 2, 64))
    elif family == "video":
        for t, s in ([FIXED_VIDEO[name]] if name in FIXED_VIDEO else VIDEO_SIZES):
            yield f"1x3x{t}x{s}x{s}", (rand(1, 3, t, s, s),)
    elif family == "optical flow":
        for s in FLOW_SIZES:
            yield f"2 x 1x3x{s}x{s}", (rand(1, 3, s, s), rand(1, 3, s, s))
    else:
        n = 1 if name in BATCH_ONE else 2
        for s in ([FIXED_SIZE[name]] if name in FIXED_SIZE else IMAGE_SIZES):
            yield f"{n}x3x{s}x{s}", (rand(n, 3, s, s),)


def _first_line(e: BaseException, limit: int = 400) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else ''}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def choose_inputs(model, name: str, family: str) -> Tuple[str, Tuple[Any, ...], str]:
    """(input description, inputs, mode): the first candidate the model accepts, train mode first."""
    import copy

    import torch

    state = copy.deepcopy(model.state_dict())  # a probe in train mode moves BatchNorm statistics
    errors = []
    try:
        for mode in ("train", "eval"):
            model.train(mode == "train")
            for desc, inputs in _candidates(name, family):
                try:
                    with torch.no_grad():
                        model(*inputs)
                    return desc, inputs, mode
                except Exception as e:  # noqa: BLE001 - any rejection means: try the next size
                    errors.append(f"{mode} {desc}: {_first_line(e, 200)}")
        raise ValueError("no candidate input was accepted: " + "; ".join(errors))
    finally:
        model.load_state_dict(state)


class TrainStep(nn.Module):
    """``forward(images) = model(images, targets)`` with fixed targets, for a detection model in train mode.

    verify() differentiates every float input; targets are labels, which training
    never differentiates, so they are bound here instead of passed as inputs.
    """

    def __init__(self, model: nn.Module, targets) -> None:
        super().__init__()
        self.model = model
        self.targets = targets
        self.training = model.training

    def forward(self, images):
        return self.model(images, self.targets)


def run_one(name: str) -> Dict[str, Any]:
    import torch

    import graph_rewrite
    from graph_rewrite.cli import build_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rec: Dict[str, Any] = {"model": name, "family": family_of(name)}
    stage = "build"
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = build_model(name)
        rec["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
        stage = "choosing an input"
        desc, inputs, mode = choose_inputs(model, name, rec["family"])
        rec.update(input=desc, mode=mode)
        model.train(mode == "train")
        stage = "optimize"
        t1 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lean = graph_rewrite.optimize(model)
        rec["optimize_s"] = time.perf_counter() - t1
        report = lean.rewrite_report
        rec.update(
            tracing=report.tracing,
            counts={k.replace("graph_rewrite.", ""): v for k, v in sorted(report.counts().items())},
            left_alone=[f"{r.where or '<root>'}: {r.original} ({r.reason})" for r in report.left_alone],
            uncovered=[f"{u.module or '<root>'}: {u.reason}" for u in report.uncovered],
            warnings=sorted({str(w.message)[:300] for w in caught if "graph_rewrite" in str(w.message)}),
        )
        stage = "verify"
        t2 = time.perf_counter()
        if rec["family"] == "detection" and mode == "train":
            images, targets = inputs
            v = graph_rewrite.verify(TrainStep(model, targets), TrainStep(lean, targets), images)
        else:
            v = graph_rewrite.verify(model, lean, *inputs)
        rec["verify_s"] = time.perf_counter() - t2
        checks = {c.name: c for c in v.checks}
        grad_checks = [c for c in v.checks if "gradients" in c.name or c.name == "backward"]
        rec.update(
            ok=v.ok,
            outputs_ok=checks["outputs"].ok if "outputs" in checks else None,
            buffers_ok=checks["buffer updates"].ok if "buffer updates" in checks else None,
            gradients_ok=all(c.ok for c in grad_checks) if grad_checks else None,
            activation_bytes=list(v.activation_bytes),
            failed=[f"{c.name}: {c.detail}" for c in v.failed],
            notes=list(v.notes),
        )
        if not v.ok:
            rec["error"] = "verify failed: " + " | ".join(rec["failed"])
            rec["report"] = str(v)
    except MemoryError as e:
        rec.update(ok=False, error=f"{stage}: MemoryError: {e}")
    except Exception as e:  # noqa: BLE001 - every failure becomes a row with its reason
        rec.update(ok=False, error=f"{stage}: {_first_line(e)}", traceback=traceback.format_exc()[-3000:])
    rec["seconds"] = time.perf_counter() - t0
    return rec


# --------------------------------------------------------------------------- the table
def _mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / MiB:.2f}"


def _yes(flag: Optional[bool]) -> str:
    return "-" if flag is None else ("ok" if flag else "**FAILED**")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _tracing(rec: Dict[str, Any]) -> str:
    t = rec.get("tracing")
    if t is None:
        return "-"
    if t == "whole model":
        return "traced"
    if t.startswith("root not traced"):
        return "runtime front end (root not traced)"
    return t.replace("partial", "traced, partial")


def _what_it_shows(results) -> str:
    """One paragraph from the results: how many models hold less, by how much, and which hold the same."""
    measured = [r for r in results if r.get("ok") and r.get("activation_bytes") and r["activation_bytes"][0]]
    shares = sorted(((1 - r["activation_bytes"][1] / r["activation_bytes"][0]) * 100, r["model"]) for r in measured)
    saving = [(p, m) for p, m in shares if p > 0]
    same = [m for p, m in shares if p == 0]
    more = [m for p, m in shares if p < 0]
    if not saving:
        return "What this shows about torchvision: no model holds less after the rewrite."
    median = saving[len(saving) // 2][0]
    text = (f"What this shows about torchvision: {len(saving)} of the {len(measured)} models verified hold less "
            f"after forward (median {median:.1f}% among them, most {saving[-1][0]:.1f}% on {saving[-1][1]}); "
            f"{len(same)} hold the same")
    resnets = [m for m in same if m.startswith(("resnet", "wide_resnet", "resnext"))]
    if resnets:
        text += f", the ResNets among them ({len(resnets)}: ReLU already keeps only its output)"
    if more:
        text += f"; {len(more)} hold more: {', '.join(more)}"
    return text + "."


def table_rows(results: Sequence[Dict[str, Any]]) -> List[str]:
    head = ("| model | family | mode | input | tracing | rewritten | outputs | buffers | gradients "
            "| activation MiB before | after | saving | seconds | result |")
    rows = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for r in results:
        counts = r.get("counts")
        rewritten = "-" if counts is None else (", ".join(f"{k} {v}" for k, v in counts.items()) or "0")
        ab = r.get("activation_bytes")
        before, after = (ab if ab else (None, None))
        if not ab or not before:
            saving = "-"
        elif before == after:
            saving = "0"
        else:
            saving = f"{100.0 * (before - after) / before:.1f}%"
        result = "pass" if r.get("ok") else "**FAIL**: " + _cell(r.get("error", "unknown"))
        if r.get("ok") and r.get("uncovered"):
            result += f" ({len(r['uncovered'])} module(s) not traced, see below)"
        rows.append(
            f"| {r['model']} | {r.get('family', '-')} | {r.get('mode', '-')} | {_cell(r.get('input', '-'))} "
            f"| {_tracing(r)} | {rewritten} | {_yes(r.get('outputs_ok'))} | {_yes(r.get('buffers_ok'))} "
            f"| {_yes(r.get('gradients_ok'))} | {_mib(before)} | {_mib(after)} | {saving} "
            f"| {r.get('seconds', 0):.1f} | {result} |"
        )
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} CPU cores{mem}, no GPU used ({platform.system()} {platform.release()})"


def _summary(results: List[Dict[str, Any]]) -> List[str]:
    """Per family: run, pass, traced whole / fallback, models with rewrites."""
    fams: Dict[str, List[Dict[str, Any]]] = {}
    for r in results:
        fams.setdefault(r.get("family", "-"), []).append(r)
    lines = ["## Summary", "", "| family | models | pass | traced whole | partly traced | root not traced "
             "| with rewrites | nodes rewritten |", "|---|---|---|---|---|---|---|---|"]
    for fam, rs in sorted(fams.items(), key=lambda kv: -len(kv[1])):
        ops: Dict[str, int] = {}
        for r in rs:
            for k, v in (r.get("counts") or {}).items():
                ops[k] = ops.get(k, 0) + v
        lines.append(
            f"| {fam} | {len(rs)} | {sum(1 for r in rs if r.get('ok'))} "
            f"| {sum(1 for r in rs if r.get('tracing') == 'whole model')} "
            f"| {sum(1 for r in rs if str(r.get('tracing', '')).startswith('partial'))} "
            f"| {sum(1 for r in rs if str(r.get('tracing', '')).startswith('root not traced'))} "
            f"| {sum(1 for r in rs if r.get('counts'))} "
            f"| {', '.join(f'{k} {v}' for k, v in sorted(ops.items())) or '0'} |")
    return lines


def git_state() -> str:
    """The commit the run used, and whether graph_rewrite/ differed from it."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "graph_rewrite")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return (head or "unknown") + (" with uncommitted changes in graph_rewrite/" if dirty else "")


def write_markdown(path: str, results: List[Dict[str, Any]], names: Sequence[str], started: str,
                   total_s: float, command: str, date: Optional[str] = None) -> str:
    import torch
    import torchvision

    done = {r["model"] for r in results}
    n_pass = sum(1 for r in results if r.get("ok"))
    stamps = sorted(r["finished_at"] for r in results if r.get("finished_at"))
    when = date or (f"{stamps[0][:16].replace('T', ' ')} to {stamps[-1][:16].replace('T', ' ')}" if stamps else started)
    model_s = sum(r.get("seconds", 0.0) for r in results)
    lines = [
        "# graph_rewrite on the torchvision zoo",
        "",
        f"- date: {when}; {model_s / 60:.0f} min in the models' rows, "
        f"{total_s / 60:.0f} min wall time with process start-up",
        f"- graph_rewrite: git {', '.join(sorted({r.get('git', 'not recorded') for r in results}))}",
        f"- machine: {machine()}",
        f"- python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}",
        f"- command: `{command}`",
        f"- models: {len(names)} of the {len(torchvision.models.list_models())} that "
        f"`torchvision.models.list_models()` lists, {len(done)} run, "
        f"**{n_pass} pass**, {len(results) - n_pass} fail" + (f", {len(names) - len(done)} not run yet" if len(done) < len(names) else ""),
        "",
        "Each model: built with `weights=None` (random weights, seeded; nothing downloaded), "
        "`graph_rewrite.optimize(model)`, then `graph_rewrite.verify(model, lean, *inputs)`: "
        "one forward + backward of each, outputs compared leaf by leaf, buffer updates "
        "(BatchNorm statistics), gradients of the inputs and of every parameter. "
        "*Activation MiB* is what autograd holds for backward when forward ends, plus the outputs "
        "(parameters, buffers and inputs excluded); *saving* is the share of it the rewrite removes. "
        "*Rewritten* counts FX nodes per lean op (call sites the runtime front end rewrites in code "
        "FX cannot trace are recorded as they run and are not counted here): kind `output` "
        "(softplus, logsigmoid, hardtanh/ReLU6, leaky_relu keep their output; a sigmoid rewrite "
        "saves nothing, native sigmoid keeps its output too), kind `recompute` (`recompute_*`: "
        "the Conv, Linear or mul after a GELU, SiLU, Hardswish or LayerNorm keeps that one's input and "
        "recomputes it in backward) and kind `norm` (`norm_act`: the activation after a BatchNorm "
        "keeps BatchNorm's input and recomputes its output in backward). ReLU already keeps only its "
        "output: ResNets save nothing. "
        "*Seconds* is the whole row (build, input probe, optimize, verify).",
        "",
        "Inputs and modes (see `demos/zoo.py`): classification batch 2 (1 for vit_h_14, vit_l_16, "
        "vit_l_32 and regnet_y_128gf) at the smallest of 64/96/128/224/299 px that the model accepts; video batch 1 (4x64x64 up to 16x224x224); "
        "optical flow a pair of 1x3xHxW images; detection in train mode with fixed synthetic targets "
        "(two 64x64 images that the model's transform resizes, one box each; the targets are bound to "
        "the model, not differentiated), so the output is the "
        "loss dict and backward covers the whole model; quantized names are the float, "
        "quantization-ready models (`quantize=False`), since an int8 model has no gradients.",
        "",
        "*Activation MiB* counts what autograd still holds when forward ends "
        "(`graph_rewrite.memory.saved_bytes`: every storage saved for backward and alive when the "
        "forward returns, each once, tracked by weak reference, so storages of graph branches freed "
        "during forward, such as the detection models' post-processing, do not count, and the same "
        "model measured twice gives the same figure). *Seconds* are wall time on a "
        "2-core machine shared with other work, so they vary by 2x or more between similar models.",
        "",
    ]
    lines += _summary(results)
    lines += [
        "",
        _what_it_shows(results),
    ]
    lines += ["", "## Every model", ""]
    lines += table_rows(sorted(results, key=lambda r: names.index(r["model"]) if r["model"] in names else 0))
    partial = [r for r in results if r.get("uncovered")]
    if partial:
        lines += ["", "## Modules FX could not trace", "",
                  "Kept as calls; activation modules inside them were swapped, functional calls there stay "
                  "native. Grouped by the reason FX gave (module path, then the error):", ""]
        groups: Dict[str, List[str]] = {}
        for r in partial:
            for u in r["uncovered"]:
                groups.setdefault(u, []).append(r["model"])
        for reason, models in groups.items():
            lines.append(f"- `{_cell(reason)}`: {', '.join(models)}")
    left = [r for r in results if r.get("left_alone")]
    if left:
        lines += ["", "## Matches left alone", ""]
        for r in left:
            lines.append(f"- **{r['model']}**: " + "; ".join(f"`{_cell(x)}`" for x in r["left_alone"][:6]))
    failed = [r for r in results if not r.get("ok")]
    if failed:
        lines += ["", "## Failures", ""]
        for r in failed:
            lines.append(f"- **{r['model']}**: {_cell(r.get('error', 'unknown'))}")
    text = "\n".join(lines) + "\n"
    if path:
        with open(path, "w") as f:
            f.write(text)
    return text


# --------------------------------------------------------------------------- driver
class Progress:
    """``[#####.....] 12/121 efficientnet_b0   3m05s  11 pass 1 fail`` on stderr."""

    def __init__(self, total: int) -> None:
        self.total, self.t0, self.tty = total, time.perf_counter(), sys.stderr.isatty()

    def show(self, done: int, label: str, n_pass: int, n_fail: int) -> None:
        width = 30
        fill = int(width * done / max(1, self.total))
        el = time.perf_counter() - self.t0
        line = (f"[{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} {label:<40} "
                f"{int(el // 60)}m{int(el % 60):02d}s  {n_pass} pass {n_fail} fail")
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()


def run_in_subprocess(name: str, timeout: float) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--result", out]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"model": name, "family": family_of(name), "ok": False, "seconds": time.perf_counter() - t0,
                    "error": f"skipped: did not finish within the time budget of {timeout:.0f} s per model"}
        if os.path.exists(out):
            with open(out) as f:
                return json.load(f)
        why = (f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
               if proc.returncode < 0 else f"exit status {proc.returncode}")
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [""]
        return {"model": name, "family": family_of(name), "ok": False, "seconds": time.perf_counter() - t0,
                "error": f"the model's process died: {why}; {tail[0][:300]}"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help="comma-separated names (default: every torchvision model)")
    p.add_argument("--out", default=os.path.join(HERE, "ZOO.md"), help="markdown file to write ('' for none)")
    p.add_argument("--results", help="JSON-lines file of results: appended to, and models found there are not rerun")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per model (default 1800)")
    p.add_argument("--date", help=argparse.SUPPRESS)  # re-rendering saved results: when they were run
    p.add_argument("--wall-s", type=float, help=argparse.SUPPRESS)  # ... and how long the run took
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one:  # child process: one model, result as JSON
        rec = run_one(args.one)
        with open(args.result, "w") as f:
            json.dump(rec, f)
        return 0

    import torchvision

    everything = torchvision.models.list_models()
    names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models else everything
    unknown = [n for n in names if n not in everything]
    if unknown:
        p.error(f"unknown model(s): {', '.join(unknown)}")
    previous: Dict[str, Dict[str, Any]] = {}
    if args.results and os.path.exists(args.results):
        with open(args.results) as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    previous[rec["model"]] = rec
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    commit = git_state()
    command = "python demos/zoo.py" + (f" --models {args.models}" if args.models else "")
    t0 = time.perf_counter()
    results: List[Dict[str, Any]] = [previous[n] for n in names if n in previous]
    progress = Progress(len(names))
    n_pass = sum(1 for r in results if r.get("ok"))
    for name in names:
        if name in previous:
            continue
        progress.show(len(results), name, n_pass, len(results) - n_pass)
        rec = run_in_subprocess(name, args.timeout)
        rec["finished_at"] = datetime.datetime.now().isoformat(timespec="seconds")
        rec["git"] = commit
        results.append(rec)
        n_pass += bool(rec.get("ok"))
        if args.results:
            with open(args.results, "a") as f:
                f.write(json.dumps(rec) + "\n")
        line = table_rows([rec])[-1]
        if progress.tty:
            sys.stderr.write("\n")
        print(line, flush=True)
        if args.out:
            write_markdown(args.out, results, names, started, time.perf_counter() - t0, command)
    progress.show(len(results), "done", n_pass, len(results) - n_pass)
    if progress.tty:
        sys.stderr.write("\n")
    wall = args.wall_s if args.wall_s is not None else time.perf_counter() - t0
    text = write_markdown(args.out, results, names, started, wall, command, args.date)
    print()
    print(text)
    return 0 if n_pass == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
