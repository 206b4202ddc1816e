"""Injected fault: a learner rank's process is SIGKILLed mid-job, in the last step, after its optimizer step. The job
restarts the whole learner group (a collective group cannot lose one member) in its placement bundles, reloads the
newest checkpoint (one step into cycle 2) — model, optimizer, RL-Extra anchors and statistics, data position —
replays the steps since, the cycle's projection included, and completes: its final weights equal, bit for bit, the
ones the first attempt had reached when it was killed, i.e. what an uninterrupted run ends with (no projection follows
the last step); MLflow holds every step once. A second death with no restart left fails with one line naming the
limit."""

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


def _masters(ray, learners) -> dict:
    return ray.get([learner.fp32_master_weights.remote() for learner in learners])[0]


def test_dead_learner_restarts_group_from_checkpoint(
    ray_session, toy_model_path, cache_dir, tmp_path, monkeypatch, capfd
):
    import torch
    from mlflow.tracking import MlflowClient

    from orchestrator.train import Job

    ray = ray_session
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out_dir = tmp_path / "out"
    overrides = [o for o in tiny_job_overrides(cache_dir, out_dir, steps=5) if o != "schedule=rl"] + [
        "learner.world_size=2",
        "learner.micro_batch_size=8",
        "trainer.checkpoint_every=3",  # one step into cycle 2 (steps 3-4): anchor and the cycle-1 displacement
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
        groups, current, uninterrupted, killed = job.groups, {}, {}, {}
        run_step, train_step = job.rollout_and_learn, groups.train_step

        def rl_step(step: int) -> dict:
            current["step"] = step
            return run_step(step)

        def train_step_then_fault(shards, **kwargs):
            metrics = train_step(shards, **kwargs)
            if current["step"] == 5 and not killed:  # the last update is done: what an uninterrupted run ends with
                uninterrupted.update(_masters(ray, groups.learners))
                killed["pid"] = _kill_process_of(ray, groups.learners[1])  # the weight sync after it fails
            return metrics

        job.rollout_and_learn, groups.train_step = rl_step, train_step_then_fault
        summary = job.run()
        assert summary["rl_steps"] == 5 and summary["learner_restarts"] == 1
        assert summary["projections_made"] == 2 and summary["virtual_steps"] == 9
        log = capfd.readouterr().out
        assert "learner rank died at rl_step 5" in log and "resumed from" in log and "rl_step_3" in log
        assert ray.get(groups.learners[1].__ray_call__.remote(lambda self: os.getpid())) != killed["pid"]

        final = _masters(ray, groups.learners)  # after replaying steps 4 and 5 and the projection between them
        assert final.keys() == uninterrupted.keys()
        for name in final:
            assert torch.equal(final[name], uninterrupted[name]), f"{name} differs from the uninterrupted run's"

        client = MlflowClient(tracking_uri=f"sqlite:///{out_dir / 'mlflow.db'}")
        run_id = summary["mlflow_run_id"]
        assert [m.step for m in client.get_metric_history(run_id, "rl_step")] == [1, 2, 3, 4, 5]
        exp = client.get_run(run_id).info.experiment_id
        phases = sorted(
            r.info.run_name for r in client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
        )
        assert phases == ["extrapolation-1", "extrapolation-2", "rl-phase-1", "rl-phase-2", "rl-phase-3"]

        # No restart left: the next death ends the job with one clear line.
        _kill_process_of(ray, groups.learners[0])
        job.cfg.trainer.total_steps = 6
        with pytest.raises(
            RuntimeError,
            match=r"learner group failed at rl_step \d and no restart is left "
            r"\(trainer.max_learner_restarts=1\)",
        ):
            job.recover_learners(6, RuntimeError("injected"))
    finally:
        job.close()
