"""benchmarks/bench_blocks.py runs to its end, where its asserts have compared what it times: the strip labels
with the whole-block ones, the torch counts with numpy's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_blocks.py"


def test_runs_and_prints_both_ratios() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--classes", "3", "--repeat", "1"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[1].startswith("labels (finalize_block)") and lines[1].endswith("x")
    assert lines[2].startswith("class counts") and lines[2].endswith("x")
