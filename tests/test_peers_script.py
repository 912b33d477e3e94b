"""benchmarks/peers.py: the side-by-side report runs, and its memory count agrees with saved-tensor hooks."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "peers.py"


def test_llama_mlp_rows_and_the_counting_check(tmp_path):
    out = tmp_path / "PEERS.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--models", "llama_mlp", "--no-time", "--alternatives",
                           "native,checkpoint,sac,optimize", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    rows = {}
    for line in text.split("## llama_mlp", 1)[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and not cells[0].startswith(("alternative", "---")):
            rows[cells[0]] = cells[1:]
    assert len(rows) == 4 and not any("failed" in r[0] for r in rows.values()), rows
    held = {k: float(v[0]) for k, v in rows.items()}
    native, lean = held["native eager"], held["`graph_rewrite.optimize(m)`"]
    # Checkpointing keeps each block's input only; optimize keeps the gated MLP's two inputs, not its four.
    assert held["checkpoint per block"] < lean < native
    assert rows["`graph_rewrite.optimize(m)`"][2] == "0" and rows["checkpoint per block"][2] == "0"
    # The allocator's count and the saved-tensor hooks' agree where no checkpoint hides what it keeps.
    assert re.search(r"llama_mlp: native \+0 B, optimize \+0 B", text), text[:3000]
