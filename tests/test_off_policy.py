"""trainer.off_policy_steps: the engines generate batch t+1 while the learners train on batch t.

What is checked on real jobs (Ray + vLLM + DeepSpeed): which weights sampled each batch the learner saw (the
version, and the behaviour log-probs against a forward pass of the step-0 and step-1 weights), the final weights
against a replay of the recorded batches on a fresh learner rank, the pipeline draining before an RL-Extra
projection, a resume from a checkpoint holding a batch in flight, and that the overlapped job trains."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import compose_cfg, start_learner_group, stop_learner_group, tiny_job_overrides

pytestmark = pytest.mark.slow


def _job_overrides(cache_dir, out_dir, steps: int, off_policy: int) -> list[str]:
    return tiny_job_overrides(cache_dir, out_dir, steps=steps) + [
        f"trainer.off_policy_steps={off_policy}",
        "learner.lr=1e-3",  # one step moves the log-probs far beyond vLLM-vs-learner agreement (2e-5)
        "trainer.save_final=true",
    ]


def _recording_job(cfg, out_dir):
    """A set-up Job whose learner shards are recorded step by step (`job.seen`)."""
    from orchestrator.train import Job

    job = Job(cfg, str(out_dir))
    job.setup()
    job.seen = []
    train_step = job.groups.train_step

    def recorded(shards, **kwargs):
        job.seen.append(shards)
        return train_step(shards, **kwargs)

    job.groups.train_step = recorded
    return job


def _metric(client, run_id: str, name: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)]


def _final_weights(summary) -> dict:
    from pathlib import Path

    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(summary["final_checkpoint"]).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("off_policy, behaviour_versions", [(0, [0, 1]), (1, [0, 0])])
def test_two_steps_match_a_replay_and_the_sampling_weights(
    ray_session, cache_dir, tmp_path, monkeypatch, off_policy, behaviour_versions
):
    """off_policy_steps=1: step 2's batch was sampled by the step-0 weights (version 0, and its behaviour log-probs
    are those of the initial weights, not of the weights after step 1); off_policy_steps=0: by the step-1 weights.
    Either way the job's final weights equal a fresh learner rank trained on the same two batches in order."""
    import torch
    from mlflow.tracking import MlflowClient

    from actors.learner import LearnerSpec
    from actors.weight_sync import from_transport

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_cfg(_job_overrides(cache_dir, tmp_path / "out", steps=2, off_policy=off_policy))
    job = _recording_job(cfg, tmp_path / "out")
    try:
        summary = job.run()
    finally:
        job.close()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    run_id = summary["mlflow_run_id"]
    assert _metric(client, run_id, "perf/behaviour_version") == behaviour_versions
    assert _metric(client, run_id, "train/staleness") == [0, off_policy]
    assert _metric(client, run_id, "perf/weight_version") == [1, 2]

    (batch1,), (batch2,) = job.seen
    learners = start_learner_group(ray_session, LearnerSpec.for_job(job.cfg, job.model_path))
    try:
        (learner,) = learners
        logp_w0 = ray_session.get(learner.compute_logp.remote(batch2))
        ray_session.get(learner.train_step.remote(batch1))
        logp_w1 = ray_session.get(learner.compute_logp.remote(batch2))
        ray_session.get(learner.train_step.remote(batch2))
        buckets = ray_session.get(learner.export_weights.remote())
    finally:
        stop_learner_group(ray_session, learners)

    mask = batch2.response_mask.bool()
    off_w0 = (batch2.old_logp - logp_w0)[mask].abs().max().item()
    off_w1 = (batch2.old_logp - logp_w1)[mask].abs().max().item()
    sampler, other = (off_w0, off_w1) if off_policy else (off_w1, off_w0)
    assert sampler < 1e-4, f"the behaviour log-probs are not those of the weights that should have sampled: {sampler}"
    assert other > 100 * sampler, f"the two weight versions are not told apart: {other} vs {sampler}"

    final = _final_weights(summary)
    replay = {name: from_transport(*t) for bucket in buckets for name, t in bucket}
    assert replay.keys() <= final.keys()
    for name, tensor in replay.items():
        assert torch.equal(final[name], tensor), f"{name}: the job's weights differ from the replay"


def test_pipeline_drains_before_an_rl_extra_projection(ray_session, cache_dir, tmp_path, monkeypatch):
    """m=2: the batch of step 3 is sampled after the projection that ends step 2, from the projected weights
    (version 3), not generated in flight on the weights the projection replaced."""
    from mlflow.tracking import MlflowClient

    from orchestrator.train import run_job

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = [o for o in _job_overrides(cache_dir, tmp_path / "out", steps=4, off_policy=1) if o != "schedule=rl"]
    overrides += [
        "schedule=rl_extra",
        "schedule.m=2",
        "schedule.n=2",
        "schedule.beta_mode=schedule",
        "schedule.selection=names",
        "trainer.save_final=false",
    ]
    summary = run_job(compose_cfg(overrides), str(tmp_path / "out"))
    assert summary["projections_made"] == 1
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    run_id = summary["mlflow_run_id"]
    # versions: 1, 2 after steps 1-2; the projection is 3; 4, 5 after steps 3-4
    assert _metric(client, run_id, "perf/weight_version") == [1, 2, 4, 5]
    assert _metric(client, run_id, "perf/behaviour_version") == [0, 0, 3, 3]
    assert _metric(client, run_id, "train/staleness") == [0, 1, 0, 1]


def test_resume_trains_on_the_saved_batch_in_flight(ray_session, cache_dir, tmp_path, monkeypatch):
    """A checkpoint taken after step 2 holds step 3's batch, sampled by the step-1 weights; a job resumed from it
    trains on that very batch and ends with the same weights as the job that never stopped."""
    import torch

    from orchestrator.checkpoints import IN_FLIGHT_FILE
    from orchestrator.train import run_job

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ref_out = tmp_path / "ref"
    overrides = _job_overrides(cache_dir, ref_out, steps=4, off_policy=1) + [
        "trainer.checkpoint_every=2",
        "trainer.keep_checkpoints=0",
    ]
    ref = run_job(compose_cfg(overrides), str(ref_out))
    saved = ref_out / "checkpoints" / "rl_step_2"
    assert (saved / IN_FLIGHT_FILE).exists()

    out = tmp_path / "resumed"  # the same job, found stopped after its step-2 checkpoint
    shutil.copytree(saved, out / "checkpoints" / "rl_step_2")
    resumed_overrides = [o.replace(str(ref_out), str(out)) for o in overrides if not o.startswith("tracking.track")]
    resumed_overrides.append(f"tracking.tracking_uri=sqlite:///{ref_out / 'mlflow.db'}")  # the same MLflow run
    summary = run_job(compose_cfg(resumed_overrides), str(out))
    assert summary["resumed_from_step"] == 2

    got, want = _final_weights(summary), _final_weights(ref)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs after resuming with a batch in flight"


def test_one_step_off_policy_training_raises_the_reward(ray_session, cache_dir, tmp_path, monkeypatch):
    """The toy task learns under one-step-stale batches: the mean train reward of the last 4 steps is above that
    of the first 4 (the warm start samples the carry-free procedure most of the time; RL shifts it)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.train import run_job

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = tiny_job_overrides(cache_dir, tmp_path / "out", steps=16) + [
        "trainer.off_policy_steps=1",
        "trainer.prompts_per_step=16",
        "trainer.samples_per_prompt=8",
        "learner.micro_batch_size=64",
        "learner.lr=1e-4",
    ]
    summary = run_job(compose_cfg(overrides), str(tmp_path / "out"))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    run_id = summary["mlflow_run_id"]
    assert _metric(client, run_id, "train/staleness") == [0] + [1] * 15
    reward = _metric(client, run_id, "train/reward_mean")
    first, last = sum(reward[:4]) / 4, sum(reward[-4:]) / 4
    assert last > first + 0.1, f"reward did not rise: first 4 steps {first:.3f}, last 4 {last:.3f} ({reward})"
