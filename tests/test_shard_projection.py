"""RL-Extra's in-place projection on real DeepSpeed shards (2 ranks), ZeRO 1/2/3, fp32 and bf16.

For each configuration: snapshot the anchor A, take a real step to W, project with β, and check that
- the gathered weights equal the fp32 computation A + β (W − A) on every projected tensor,
- norm layers are untouched (they stay at W),
- the next forward pass already uses the projected weights (log-probs equal a plain model loaded with them),
- the next optimizer step starts from the projected weights (it moves them by about one lr, not back to W),
- a rollback restores W exactly.
"""

from __future__ import annotations

import pytest
import torch

from actors.learner import LearnerSpec, forward_response_logits, response_logits_to_logp
from actors.rollout import from_transport
from orchestrator.batches import shard_batch
from orchestrator.config import AlgoConfig, LearnerConfig
from tests.helpers import behaviour_logp, random_batch, start_learner_group, stop_learner_group

pytestmark = pytest.mark.slow

BETA = 3.0


def _full(ray, actors) -> dict:
    exported = ray.get([a.export_weights.remote(1.0) for a in actors])[0]
    return {n: from_transport(*t).float() for bucket in exported for n, t in bucket}


@pytest.mark.parametrize(
    "stage, dtype",
    [(3, "fp32"), (2, "fp32"), (1, "fp32"), (3, "bf16"), (2, "bf16"), (1, "bf16")],
)
def test_projection_on_shards(ray_session, toy_model_path, stage, dtype):
    ray = ray_session
    lr = 1e-3
    spec = LearnerSpec(
        toy_model_path,
        LearnerConfig(world_size=2, zero_stage=stage, dtype=dtype, lr=lr, micro_batch_size=8, num_threads=1),
        AlgoConfig(loss_agg="seq-mean-token-mean"),
        samples_per_rank=8,
        seed=0,
    )
    batch = random_batch(toy_model_path)
    batch.old_logp = behaviour_logp(toy_model_path, batch)
    actors = start_learner_group(ray, spec)
    try:
        infos = ray.get([a.extra_setup.remote() for a in actors])  # each rank names the params it holds a slice of
        skipped = {n for i in infos for n in i["skipped"]}
        assert skipped and all("norm" in n for n in skipped)
        assert not any("norm" in n for i in infos for n in i["selected"])
        ray.get([a.extra_snapshot.remote() for a in actors])
        anchor = _full(ray, actors)
        for _ in range(2):
            ray.get([a.train_step.remote(s) for a, s in zip(actors, shard_batch(batch, 2))])
        moved = _full(ray, actors)
        ray.get([a.extra_begin_phase.remote() for a in actors])
        stats = ray.get([a.extra_project.remote(BETA) for a in actors])
        projected = _full(ray, actors)
        logp_after = ray.get([a.compute_logp.remote(s) for a, s in zip(actors, shard_batch(batch, 2))])

        # every rank reports the same all-reduced statistics
        assert stats[0] == stats[1] and stats[0].finite and 0 < stats[0].projected_numel < stats[0].total_numel
        # bf16 weights carry rounding of ~2^-8 relative; the projection amplifies the displacement by β
        tol = 1e-6 if dtype == "fp32" else 3e-2
        expected_sq = 0.0
        for name, w in moved.items():
            if "norm" in name:
                torch.testing.assert_close(projected[name], w, rtol=0, atol=0, msg=f"{name} (norm) moved")
            else:
                expected = anchor[name] + BETA * (w - anchor[name])
                torch.testing.assert_close(projected[name], expected, rtol=tol, atol=tol, msg=f"{name} not projected")
                expected_sq += float(((w - anchor[name]).double() ** 2).sum())
        assert stats[0].displacement_norm == pytest.approx(expected_sq**0.5, rel=1e-4 if dtype == "fp32" else 0.05)

        # the next forward uses the projected weights
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(toy_model_path, dtype=torch.float32).eval()
        plain.load_state_dict(projected, strict=False)
        with torch.no_grad():
            ref = response_logits_to_logp(forward_response_logits(plain, batch), batch.responses, batch.temperature)[0]
        got = torch.cat(logp_after)
        mask = batch.response_mask.bool()
        torch.testing.assert_close(got[mask], ref[mask], rtol=0, atol=1e-4 if dtype == "fp32" else 0.1)

        # the next optimizer step starts from the projected master weights
        ray.get([a.train_step.remote(s) for a, s in zip(actors, shard_batch(batch, 2))])
        after_step = _full(ray, actors)
        for name in projected:
            step = (after_step[name] - projected[name]).abs().max().item()
            assert step <= lr * 1.5 + (0 if dtype == "fp32" else 0.02 * projected[name].abs().max().item()), name
        gap = max((projected[n] - moved[n]).abs().max().item() for n in moved if "norm" not in n)
        still_away = max((after_step[n] - moved[n]).abs().max().item() for n in moved if "norm" not in n)
        assert gap > 2 * lr, "the projection should have moved the weights by (β − 1) × two Adam steps"
        assert still_away > gap / 2, "weights fell back toward the unprojected values"

        # rollback restores the weights of the phase start
        ray.get([a.extra_begin_phase.remote() for a in actors])
        ray.get([a.extra_project.remote(BETA) for a in actors])
        ray.get([a.extra_rollback.remote() for a in actors])
        restored = _full(ray, actors)
        for name in after_step:
            torch.testing.assert_close(restored[name], after_step[name], rtol=0, atol=0, msg=f"{name} not restored")
    finally:
        stop_learner_group(ray, actors)


def _cos(a: dict, b: dict, names) -> float:
    dot = sum(float((a[n].double() * b[n].double()).sum()) for n in names)
    na = sum(float((a[n].double() ** 2).sum()) for n in names)
    nb = sum(float((b[n].double() ** 2).sum()) for n in names)
    return dot / (na * nb) ** 0.5


@pytest.mark.parametrize("stage", [2, 3])
def test_monitor_selection_least_squares_and_optimizer_reset_on_shards(ray_session, toy_model_path, stage):
    """On 2 real ranks: the top-fraction selection is one global threshold, the least-squares projection equals
    a per-element polyfit of the gathered trajectory, the drift share equals the gathered cosine, and an
    optimizer reset makes the next Adam step a full-lr sign step."""
    import numpy as np

    ray = ray_session
    lr = 1e-3
    spec = LearnerSpec(
        toy_model_path,
        LearnerConfig(world_size=2, zero_stage=stage, dtype="fp32", lr=lr, micro_batch_size=8, num_threads=1),
        AlgoConfig(loss_agg="seq-mean-token-mean"),
        samples_per_rank=8,
        seed=0,
    )
    batches = []
    for seed in range(3):
        b = random_batch(toy_model_path, seed=seed)
        b.old_logp = behaviour_logp(toy_model_path, b)
        batches.append(b)
    actors = start_learner_group(ray, spec)
    try:
        ray.get([a.extra_setup.remote(("*",), None, None, "least_squares", 512) for a in actors])
        ray.get([a.extra_snapshot.remote() for a in actors])
        traj = [_full(ray, actors)]
        for b in batches:
            ray.get([a.train_step.remote(s) for a, s in zip(actors, shard_batch(b, 2))])
            traj.append(_full(ray, actors))
        eligible = [n for n in traj[0] if "norm" not in n]

        stats = ray.get([a.extra_end_cycle.remote("top_elements", 0.7, 0.2) for a in actors])
        assert stats[0].drift_share != stats[0].drift_share, "no previous cycle: drift share is NaN"
        assert stats[0].steps == 3 and stats[0].selected_numel == stats[1].selected_numel
        assert 0.15 < stats[0].selected_numel / stats[0].eligible_numel < 0.25
        r2 = stats[0].r2_values + stats[1].r2_values
        assert r2 and all(0.0 <= v <= 1.0 for v in r2)

        beta = 2.0
        ray.get([a.extra_begin_phase.remote() for a in actors])
        ray.get([a.extra_project.remote(beta) for a in actors])
        projected = _full(ray, actors)
        t = np.arange(4.0)
        moved_scores, still_scores = [], []
        for name in traj[0]:
            ys = np.stack([traj[k][name].double().numpy().ravel() for k in range(4)])  # (4, numel)
            slope = ((t - t.mean())[:, None] * (ys - ys.mean(0))).sum(0) / ((t - t.mean()) ** 2).sum()
            last, new = ys[-1], projected[name].double().numpy().ravel()
            moved = new != last
            if "norm" in name:
                assert not moved.any(), f"{name} (norm) moved"
                continue
            expected = last + (beta - 1.0) * 3 * slope
            np.testing.assert_allclose(new[moved], expected[moved], rtol=1e-5, atol=1e-7, err_msg=name)
            score = np.abs(last - ys[0])
            moved_scores.append(score[moved])
            still_scores.append(score[~moved])
        assert np.concatenate(moved_scores).min() >= np.concatenate(still_scores).max() * (1 - 1e-6), (
            "one global threshold: every projected element moved more than every unprojected one"
        )

        # cycle 2 (from the unprojected weights): drift share = cosine of the two gathered displacements
        ray.get([a.extra_rollback.remote() for a in actors])
        ray.get([a.extra_snapshot.remote() for a in actors])
        start = _full(ray, actors)
        for b in batches:
            ray.get([a.train_step.remote(s) for a, s in zip(actors, shard_batch(b, 2))])
        end = _full(ray, actors)
        d1 = {n: traj[-1][n] - traj[0][n] for n in eligible}
        d2 = {n: end[n] - start[n] for n in eligible}
        stats = ray.get([a.extra_end_cycle.remote("tensor_drift", -1.0, 0.1) for a in actors])
        assert stats[0].drift_share == pytest.approx(_cos(d1, d2, eligible), rel=1e-6)
        name = eligible[0]
        assert stats[0].drift_share_per_tensor[name] == pytest.approx(_cos(d1, d2, [name]), rel=1e-6)
        assert stats[0].selected_numel == stats[0].eligible_numel  # threshold −1: every eligible tensor

        # reset: the next Adam step is a fresh one (|Δ| ≈ lr wherever the gradient is non-zero)
        assert min(ray.get([a.extra_reset_optimizer.remote() for a in actors])) > 0
        before = _full(ray, actors)
        ray.get([a.train_step.remote(s) for a, s in zip(actors, shard_batch(batches[0], 2))])
        after = _full(ray, actors)
        steps = torch.cat([(after[n] - before[n]).abs().ravel() for n in eligible])
        steps = steps[steps > 0]
        assert steps.max() <= lr * 1.01 and steps.median() > 0.9 * lr
    finally:
        stop_learner_group(ray, actors)
