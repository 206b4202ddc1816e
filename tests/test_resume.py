"""Kill-and-resume: a job killed mid-cycle and started again with the same command ends with the same weights
as one that never stopped, continues the same MLflow run, and logs every step once.

The RL-Extra state that must survive is exercised on purpose: least-squares velocity (running sums per
element), top-element selection (the previous cycle's displacement), and a checkpoint taken one step into a
cycle (anchor + partial trend)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import small_job_overrides

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _command(cache_dir, tmp_path, out: Path, db: Path) -> list[str]:
    overrides = [
        o
        for o in small_job_overrides(cache_dir, tmp_path, steps=7)
        if not o.startswith(("trainer.output_dir", "tracking.tracking_uri"))
    ]
    return [
        sys.executable,
        "-m",
        "orchestrator.train",
        *overrides,
        f"trainer.output_dir={out}",
        f"tracking.tracking_uri=sqlite:///{db}",
        f"hydra.run.dir={out}/hydra",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=2",
        "trainer.keep_checkpoints=0",
        "schedule=rl_extra",
        "schedule.m=3",
        "schedule.n=3",
        "schedule.beta_mode=schedule",
        "schedule.velocity=least_squares",
        "schedule.selection=top_elements",
        "schedule.selection_fraction=0.5",
        "cluster.num_cpus=4",
    ]


def _env():
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


def _run(cmd, log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, log.read_text()[-4000:]


def _weights(hf_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_killed_mid_cycle_and_resumed_equals_uninterrupted(toy_model_path, cache_dir, tmp_path):
    import json

    from mlflow.tracking import MlflowClient

    ref_out, ref_db = tmp_path / "ref", tmp_path / "ref.db"
    _run(_command(cache_dir, tmp_path, ref_out, ref_db), tmp_path / "ref.log")

    out, db = tmp_path / "killed", tmp_path / "killed.db"
    cmd = _command(cache_dir, tmp_path, out, db)
    marker = out / "checkpoints" / "rl_step_4" / "rlextra_state.json"  # one step into cycle 2 (steps 4-6)
    with open(tmp_path / "first.log", "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 600
            while not marker.exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            assert marker.exists(), (tmp_path / "first.log").read_text()[-4000:]
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
            proc.wait()
    assert not (out / "summary.json").exists(), "the job finished before it was killed: nothing was tested"
    assert not (out / "checkpoints" / "rl_step_6").exists()

    _run(cmd, tmp_path / "second.log")  # the same command again
    summary = json.loads((out / "summary.json").read_text())
    ref = json.loads((ref_out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 4 and ref["resumed_from_step"] is None
    assert summary["virtual_steps"] == ref["virtual_steps"] == 13  # 7 real + 2 projections of 3
    assert summary["projections_made"] == ref["projections_made"] == 2

    got, want = _weights(Path(summary["final_checkpoint"])), _weights(Path(ref["final_checkpoint"]))
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] == want[name]).all(), f"{name} differs after kill-and-resume"

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run_id = summary["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "rl_step")] == [1, 2, 3, 4, 5, 6, 7], "each step once"
    exp = client.get_run(run_id).info.experiment_id
    assert len(client.search_runs([exp], filter_string="tags.rlextra.kind = 'job'")) == 1, "one job run, continued"
    phases = [r.info.run_name for r in client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")]
    assert sorted(phases) == ["extrapolation-1", "extrapolation-2", "rl-phase-1", "rl-phase-2", "rl-phase-3"]
