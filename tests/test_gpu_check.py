"""bench/gpu_check.py on CPU (the tiny model, gloo): the same script the GPU machine runs, so CI exercises every path
it takes there — DeepSpeed ZeRO 1/2/3 in bf16 without Ray, the in-place projection of the master shards with its
correctness checks, and both weight-export paths (the object-store form and a one-rank weight group)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--repeats", "2"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and result["ok"], proc.stdout[-3000:] + proc.stderr[-3000:]
    assert result["metric"] == "copy_over_projection" and result["goal"] == 0.8 and result["value"] > 0
    assert [r["zero_stage"] for r in result["rows"]] == [1, 2, 3]
    for row in result["rows"]:
        assert row["device"] == "cpu" and row["backend"] == "gloo"
        assert all(row["projection_checks"].values()), row["projection_checks"]
        assert row["train_ok"] and row["export_ok"] and row["grad_norm"] > 0
        assert row["export_bytes"] == 2 * result["params"]  # bf16: every parameter exported once (tied head too)
