"""Injected faults: a rollout actor's process is SIGKILLed mid-job; the job restarts it in its bundle, re-syncs it
to the current weight version and completes.

One real job (Ray + 2 vLLM engines + DeepSpeed + MLflow), 4 RL steps: the fault is injected before step 3's
rollout (the generate path restarts the engine), then once more right before a weight sync (the sync path), and a
third time with no restart left (a clear error). The surviving engine is the reference: after a restart both
engines must give the same seeded samples and log-probs, and those must differ from the weights at version 0
(a fresh engine that missed the re-sync would not match). A pickled copy of the groups (what another actor holds)
replaces a dead engine, and the original adopts that replacement instead of starting a second one.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from tests.helpers import compose_cfg, tiny_job_overrides


def _kill_process_of(ray, actor) -> int:
    """SIGKILL the worker process behind `actor` (the fault); returns its PID."""
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    return pid


def _sample(ray, actor, prompts, sampling):
    return ray.get(actor.generate.remote(prompts, sampling))


@pytest.mark.slow
def test_dead_rollout_actor_is_restarted_and_resynced(
    ray_session, toy_model_path, cache_dir, tmp_path, monkeypatch, capfd
):
    from mlflow.tracking import MlflowClient

    from orchestrator.train import Job

    ray = ray_session
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out_dir = tmp_path / "out"
    overrides = tiny_job_overrides(cache_dir, out_dir, steps=4) + [
        "rollout.num_actors=2",
        "cluster.max_rollout_restarts=2",
        "learner.lr=1e-3",
    ]
    job = Job(compose_cfg(overrides), str(out_dir))
    try:
        job.setup()
        groups = job.groups
        probe = [job.encode(job.train_ds[i]["prompt"]) for i in range(8)]
        seeded = job.sampling(2, seed=123)  # same seed, same weights: same tokens on any engine
        at_v0 = _sample(ray, groups.rollouts[1], probe, seeded)

        killed = {}
        run_step = job.rollout_and_learn

        def rl_step_with_fault(step: int) -> dict:
            if step == 3:  # after two real steps and syncs: engine 0 dies before step 3's rollout
                killed["pid"] = _kill_process_of(ray, groups.rollouts[0])
            return run_step(step)

        job.rollout_and_learn = rl_step_with_fault
        summary = job.run()

        # The job completed every step at the expected versions, with one restart, logged.
        assert summary["rl_steps"] == 4
        assert groups.rollout_restarts == 1 and groups.weight_version == 4
        log = capfd.readouterr().out
        assert "cluster: rollout actor 0 died (ActorDiedError); restarting it" in log
        assert "cluster: rollout actor 0 is back at weight version 2" in log
        assert ray.get(groups.rollouts[0].ping.remote()) != killed["pid"]
        client = MlflowClient(tracking_uri=f"sqlite:///{out_dir / 'mlflow.db'}")
        versions = [m.value for m in client.get_metric_history(summary["mlflow_run_id"], "perf/weight_version")]
        assert versions == [1.0, 2.0, 3.0, 4.0]

        # The restarted engine serves the current weights: same sampled tokens and log-probs as the survivor.
        a, b = (_sample(ray, r, probe, seeded) for r in groups.rollouts)
        assert a.weight_version == b.weight_version == 4
        assert a.response_ids == b.response_ids
        assert max(abs(x - y) for la, lb in zip(a.logprobs, b.logprobs) for x, y in zip(la, lb)) < 1e-4
        moved = max(abs(x - y) for la, lb in zip(b.logprobs, at_v0.logprobs) for x, y in zip(la, lb))
        assert moved > 1e-3 or b.response_ids != at_v0.response_ids, (
            "training changed the policy (else the check is void)"
        )

        # A death found by a weight sync: the new engine gets that sync's weights and version.
        _kill_process_of(ray, groups.rollouts[0])
        sync = groups.sync_weights(job.cfg.rollout.bucket_mb)
        assert sync["version"] == 5 and groups.rollout_restarts == 2
        assert ray.get([r.get_weight_version.remote() for r in groups.rollouts]) == [5, 5]
        assert groups.generate(probe, seeded).weight_version == 5

        # No restart left: the next death fails with one line naming the limit.
        _kill_process_of(ray, groups.rollouts[0])
        with pytest.raises(
            RuntimeError, match=r"rollout actor 0 died and no restart is left \(cluster.max_rollout_restarts=2"
        ):
            groups.generate(probe, seeded)
    finally:
        job.close()


def _weights(ray, learner) -> dict:
    from actors.weight_sync import from_transport

    buckets = ray.get(learner.export_weights.remote(64.0))
    return {name: from_transport(*t).clone() for bucket in buckets for name, t in bucket}


@pytest.mark.slow
def test_engine_dying_during_an_extrapolation_phase(ray_session, cache_dir, tmp_path, monkeypatch, capfd):
    from orchestrator.train import Job

    ray = ray_session
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out_dir = tmp_path / "out"
    overrides = tiny_job_overrides(cache_dir, out_dir, steps=4) + [
        "schedule=rl_extra",
        "schedule.beta_mode=adaptive",  # the phase starts with a validation rollout: it meets the dead engine
        "schedule.m=2",
        "schedule.n=2",
        "schedule.validation_prompts=8",
        "rollout.num_actors=2",
        "cluster.max_rollout_restarts=1",
        "learner.lr=1e-3",
    ]
    job = Job(compose_cfg(overrides), str(out_dir))
    seen = {}
    start_schedule = job.start_schedule

    def schedule_with_fault():
        extra = start_schedule()
        run_phase = extra.run_phase

        def phase_with_fault():
            if extra.cycle == 1:
                seen["before"] = _weights(ray, job.groups.learners[0])
                seen["killed"] = _kill_process_of(ray, job.groups.rollouts[0])
                record = run_phase()
                seen["after"] = _weights(ray, job.groups.learners[0])
                return record
            return run_phase()

        extra.run_phase = phase_with_fault
        return extra

    job.start_schedule = schedule_with_fault
    try:
        job.setup()
        summary = job.run()
        groups = job.groups
        first = summary["extrapolations"][0]
        assert summary["rl_steps"] == 4 and groups.rollout_restarts == 1
        assert first["outcome"] == "skipped" and "a rollout engine died during the phase" in first["reasons"][0]
        assert seen["before"].keys() == seen["after"].keys()
        for name, tensor in seen["before"].items():
            assert torch.equal(tensor, seen["after"][name]), f"{name}: not restored to the phase-start weights"
        assert ray.get(groups.rollouts[0].ping.remote()) != seen["killed"]
        log = capfd.readouterr().out
        assert "cluster: rollout actor 0 died" in log and "cycle 1 (rl_step 2): skipped" in log
        # both engines serve the final weights at the final version
        probe = [job.encode(job.train_ds[i]["prompt"]) for i in range(4)]
        a, b = (_sample(ray, r, probe, job.sampling(2, seed=7)) for r in groups.rollouts)
        assert a.weight_version == b.weight_version == groups.weight_version and a.response_ids == b.response_ids
    finally:
        job.close()
