"""benchmarks/gpu.py --quick: the one-command GPU report runs, and says what it did not measure."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
NO_CUDA = "not measured (no CUDA device)"


def _table(text: str, heading: str):
    """(header, data rows) of the first markdown table after ``heading``, as lists of cells."""
    rows = []
    for line in text.split(heading, 1)[1].splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[0], rows[2:]  # the |---| line skipped


def test_quick_run_writes_every_section(tmp_path):
    out = tmp_path / "GPU.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for heading in ("# GPU figures", "## 1. Fused backward kernel", "## 2. verify", "## 3. Autocast",
                    "## 4. Step time", "## What was not measured"):
        assert heading in text, heading
    assert "Run incomplete" not in text
    assert torch.__version__ in text and "git commit" in text and "triton" in text
    head, rows = _table(text, "## 2. verify")
    mlp = next(r for r in rows if r[0] == "mlp")
    assert mlp[head.index("verify")] == "PASSED"
    act = head.index("activation MiB before")
    assert float(mlp[act]) > float(mlp[act + 1])  # the lean model keeps less
    # A diffusers UNet2DModel inside the script's wrapper: its forward branches on torch.is_tensor(timestep).
    unet = next(r for r in rows if r[0] == "unet2d")
    assert unet[head.index("verify")] == "PASSED" and float(unet[act]) > float(unet[act + 1]), unet
    cuda_cols = [i for i, h in enumerate(head) if "CUDA" in h]
    assert len(cuda_cols) == 2
    if not torch.cuda.is_available():
        assert "CPU-only run" in text.splitlines()[0]
        for r in rows:
            if not r[1].startswith("skipped"):
                # every CUDA cell of the row: the two headed ones and their after/saving neighbours
                for i in cuda_cols:
                    assert r[i:i + 3] == [NO_CUDA] * 3, r
        _, kernel_rows = _table(text, "## 1. Fused backward kernel")
        assert all(r[2] == NO_CUDA for r in kernel_rows)
        assert re.search(r"fused softplus backward \| " + re.escape(NO_CUDA), text)


def test_a_run_that_stops_early_leaves_its_finished_sections(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu
    finally:
        sys.path.remove(str(SCRIPT.parent))
    path = tmp_path / "GPU.md"
    rep = gpu.Report(str(path), "# header", ["kernel", "verify"])
    rep.add("kernel", "## 1. done")
    text = path.read_text()
    assert "## 1. done" in text and "Run incomplete" in text and "verify" in text.split("Run incomplete")[1]
    rep.done = True
    rep.add("verify", "## 2. done")
    assert "Run incomplete" not in path.read_text()
