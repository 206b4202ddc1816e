"""Kill-and-resume: a job killed mid-cycle and started again with the same command ends with the same weights
as one that never stopped, continues the same MLflow run, and logs every step once.

The RL-Extra state that must survive is exercised on purpose, for every strategy: extrapolate with least-squares
velocity (running sums per element) and top-element selection (the previous cycle's displacement), rank1 with
least-squares velocity (and the power iteration's warm start), both checkpointed one step into a cycle (anchor +
partial trend); lookahead (SFPO) checkpointed between two of its steps (the entropy switch's window, α)."""

from __future__ import annotations

import contextlib
import json
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


STRATEGIES = {
    "extrapolate": [
        "schedule.m=3",
        "schedule.n=3",
        "schedule.beta_mode=schedule",
        "schedule.velocity=least_squares",
        "schedule.selection=top_elements",
        "schedule.selection_fraction=0.5",
    ],
    "rank1": [
        "schedule.strategy=rank1",
        "schedule.m=3",
        "schedule.n=3",
        "schedule.beta_mode=schedule",
        "schedule.velocity=least_squares",
        "schedule.rank1_iters=3",
    ],
    "lookahead": [
        "schedule.strategy=lookahead",
        "schedule.m=1",
        "schedule.beta_mode=fixed",
        "schedule.lookahead_steps=2",
        "schedule.entropy_window=3",
        # the window is checkpointed and restored, but never switches off: a z-score within 3 values is at most
        # sqrt(2) < 1.5, so every step repositions whatever the entropies are
        "schedule.entropy_z=1.5",
    ],
}


def _command(cache_dir, tmp_path, out: Path, db: Path, strategy: str) -> list[str]:
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
        *STRATEGIES[strategy],
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


def _spawn(cmd, log_file) -> subprocess.Popen:
    """The job in a session of its own, so that `_kill` reaches every process it starts."""
    return subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
    )


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the job's session: the driver and every Ray process it started (none left is fine)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _start_and_kill_after(cmd, checkpoint: Path, log: Path) -> None:
    """Run `cmd` until `checkpoint` holds its RL-Extra state, then SIGKILL the job and every process it started."""
    marker = checkpoint / "rlextra_state.json"  # m = 3: rl_step_4 is one step into cycle 2 (steps 4-6)
    with open(log, "w") as f:
        proc = _spawn(cmd, f)
        try:
            deadline = time.time() + 600
            while not marker.exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            assert marker.exists(), log.read_text()[-4000:]
        finally:
            _kill(proc)


def _weights(hf_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_killed_mid_cycle_and_resumed_equals_uninterrupted(toy_model_path, cache_dir, tmp_path, strategy):
    from mlflow.tracking import MlflowClient

    # The uninterrupted reference runs beside the job that is killed (each starts a Ray of its own): their set-up,
    # most of a 7-step job's time, overlaps.
    ref_out, ref_db = tmp_path / "ref", tmp_path / "ref.db"
    with open(tmp_path / "ref.log", "w") as ref_log:
        ref = _spawn(_command(cache_dir, tmp_path, ref_out, ref_db, strategy), ref_log)
        try:
            out, db = tmp_path / "killed", tmp_path / "killed.db"
            cmd = _command(cache_dir, tmp_path, out, db, strategy)
            _start_and_kill_after(cmd, out / "checkpoints" / "rl_step_4", tmp_path / "first.log")
            assert ref.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-4000:]
        finally:
            _kill(ref)
    assert not (out / "summary.json").exists(), "the job finished before it was killed: nothing was tested"
    assert not (out / "checkpoints" / "rl_step_6").exists()

    _run(cmd, tmp_path / "second.log")  # the same command again
    summary = json.loads((out / "summary.json").read_text())
    ref = json.loads((ref_out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 4 and ref["resumed_from_step"] is None
    lookahead = strategy == "lookahead"
    made = ref["projections_made"]
    assert summary["projections_made"] == made and made == (7 if lookahead else 2), "every phase moved"
    assert summary["virtual_steps"] == ref["virtual_steps"] == (7 if lookahead else 13)  # + 2 projections of 3
    assert _same_but_time(summary, ref), "the phases decided the same"

    got, want = _weights(Path(summary["final_checkpoint"])), _weights(Path(ref["final_checkpoint"]))
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] == want[name]).all(), f"{name} differs after kill-and-resume"

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run_id = summary["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "rl_step")] == [1, 2, 3, 4, 5, 6, 7], "each step once"
    passes = 3 if lookahead else 1  # lookahead: 2 fast steps and the slow one a batch
    optimizer_steps = [m.value for m in client.get_metric_history(run_id, "train/optimizer_steps")]
    assert optimizer_steps == [passes * k for k in range(1, 8)], "the optimizer's step count resumes with it"
    exp = client.get_run(run_id).info.experiment_id
    assert len(client.search_runs([exp], filter_string="tags.rlextra.kind = 'job'")) == 1, "one job run, continued"
    phases = [r.info.run_name for r in client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")]
    cycles = 7 if lookahead else 3
    expected = [f"extrapolation-{k}" for k in range(1, made + 1)] + [f"rl-phase-{k}" for k in range(1, cycles + 1)]
    assert sorted(phases) == sorted(expected)


def _same_but_time(a: dict, b: dict) -> bool:
    """The phase records of two runs agree in everything but wall time and weight versions (a resumed job re-syncs
    its engines once more)."""
    skip = ("time_s", "weight_version")
    strip = [[{k: v for k, v in r.items() if k not in skip} for r in s["extrapolations"]] for s in (a, b)]
    return json.dumps(strip[0], sort_keys=True) == json.dumps(strip[1], sort_keys=True)
