"""Injected fault: a learner rank's process is SIGKILLed mid-job. The job restarts the whole learner group (a
collective group cannot lose one member) in its placement bundles, reloads the newest checkpoint — model,
optimizer, RL-Extra anchors and statistics, data position — replays the steps since, and completes; MLflow
holds every step once. A second death with no restart left fails with one line naming the limit."""

from __future__ import annotations

import os
import signal

import pytest

from tests.helpers import compose_cfg, tiny_job_overrides

pytestmark = pytest.mark.slow


def _kill_process_of(ray, actor) -> int:
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    return pid


def test_dead_learner_restarts_group_from_checkpoint(
    ray_session, toy_model_path, cache_dir, tmp_path, monkeypatch, capfd
):
    from mlflow.tracking import MlflowClient

    from orchestrator.train import Job

    ray = ray_session
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out_dir = tmp_path / "out"
    overrides = [o for o in tiny_job_overrides(cache_dir, out_dir, steps=5) if o != "schedule=rl"] + [
        "learner.world_size=2",
        "learner.micro_batch_size=8",
        "trainer.checkpoint_every=2",
        "trainer.max_learner_restarts=1",
        "schedule=rl_extra",
        "schedule.m=2",
        "schedule.n=2",
        "schedule.beta_mode=schedule",
        "schedule.selection=top_elements",
        "learner.lr=1e-3",
    ]
    job = Job(compose_cfg(overrides), str(out_dir))
    try:
        job.setup()
        killed = {}
        run_step = job.rollout_and_learn

        def rl_step_with_fault(step: int) -> dict:
            if step == 4 and "pid" not in killed:  # one step into cycle 2; the newest checkpoint is rl_step_2
                killed["pid"] = _kill_process_of(ray, job.groups.learners[1])
            return run_step(step)

        job.rollout_and_learn = rl_step_with_fault
        summary = job.run()
        assert summary["rl_steps"] == 5 and summary["learner_restarts"] == 1
        assert summary["projections_made"] == 2 and summary["virtual_steps"] == 9
        log = capfd.readouterr().out
        assert "learner rank died at rl_step 4" in log and "resumed from" in log and "rl_step_2" in log
        assert ray.get(job.groups.learners[1].__ray_call__.remote(lambda self: os.getpid())) != killed["pid"]

        client = MlflowClient(tracking_uri=f"sqlite:///{out_dir / 'mlflow.db'}")
        run_id = summary["mlflow_run_id"]
        assert [m.step for m in client.get_metric_history(run_id, "rl_step")] == [1, 2, 3, 4, 5]
        exp = client.get_run(run_id).info.experiment_id
        phases = sorted(
            r.info.run_name for r in client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
        )
        assert phases == ["extrapolation-1", "extrapolation-2", "rl-phase-1", "rl-phase-2", "rl-phase-3"]

        # No restart left: the next death ends the job with one clear line.
        _kill_process_of(ray, job.groups.learners[0])
        job.cfg.trainer.total_steps = 6
        with pytest.raises(
            RuntimeError,
            match=r"learner group failed at rl_step \d and no restart is left "
            r"\(trainer.max_learner_restarts=1\)",
        ):
            job.recover_learners(6, RuntimeError("injected"))
    finally:
        job.close()
