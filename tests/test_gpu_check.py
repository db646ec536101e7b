"""tools/gpu_check.sh, the one prepared GPU check: on a machine without a usable CUDA device it stops
at once with one line and a non-zero status, before installing or running anything."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run for real")
def test_without_a_gpu_it_fails_fast_and_clearly(tmp_path):
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYTHON": sys.executable})
    assert proc.returncode == 3 and time.monotonic() - start < 60
    err = proc.stderr.strip()
    assert err.startswith("gpu_check: no usable CUDA device here") and "\n" not in err
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == {"cuda": False, "steps": []}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.json"]  # nothing installed or run


def test_usage_is_one_line(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.strip() == "usage: bash tools/gpu_check.sh OUT_DIR"
