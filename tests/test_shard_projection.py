"""RL-Extra's in-place projection on real DeepSpeed shards (2 ranks), ZeRO 1/2/3, fp32 and bf16.

For each configuration: snapshot the anchor A, take two real steps to W, project with β, and check on the fp32
master weights (the optimizer's, gathered whole by DeepSpeed's own `safe_get_full_fp32_param`) that
- every projected tensor equals A + β (W − A) to fp32 rounding (1e-6, against an effect (β − 1)(W − A) of ~4e-3),
- norm layers are untouched (they stay at W, bit for bit),
- the weights the model computes with (bf16 or fp32) are the projected masters, rounded, bit for bit,
- the next forward pass already uses them (log-probs equal a plain model loaded with them, in the same dtype),
- the next optimizer step starts from the projected masters (it moves them by about one lr, not back to W),
- a rollback restores W exactly.

The monitor test checks on ZeRO-2 and ZeRO-3 shards that the projector's drift share, top-fraction selection and
least-squares projection are the `linearity.trend` functions applied to the gathered full tensors; the strategies
test does the same for the first cycle's halves, the rank-1 strategy (`linearity.rank1`) and the lookahead
reposition.
"""

from __future__ import annotations

import pytest
import torch

from actors.learner import LearnerSpec, forward_response_logits, response_logits_to_logp
from actors.weight_sync import from_transport
from linearity.rank1 import power_iteration, start_vectors
from linearity.trend import TrendAccumulator, drift_partial_sums, drift_share, steady_displacement
from orchestrator.batches import shard_batch
from orchestrator.config import AlgoConfig, LearnerConfig
from tests.helpers import behaviour_logp, random_batch, start_learner_group, stop_learner_group

pytestmark = pytest.mark.slow

BETA = 3.0


def _full(ray, actors) -> dict:
    exported = ray.get([a.export_weights.remote(1.0) for a in actors])[0]
    return {n: from_transport(*t).float() for bucket in exported for n, t in bucket}


def _masters(ray, actors) -> dict:
    return ray.get([a.fp32_master_weights.remote() for a in actors])[0]


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
        anchor = _masters(ray, actors)
        for _ in range(2):
            ray.get([a.train_step.remote(s) for a, s in zip(actors, shard_batch(batch, 2))])
        moved = _masters(ray, actors)
        ray.get([a.extra_begin_phase.remote() for a in actors])
        stats = ray.get([a.extra_project.remote(BETA) for a in actors])
        projected = _masters(ray, actors)
        computed_with = _full(ray, actors)  # the low-precision weights, as the rollout engines receive them
        logp_after = ray.get([a.compute_logp.remote(s) for a, s in zip(actors, shard_batch(batch, 2))])

        # every rank reports the same all-reduced statistics
        assert stats[0] == stats[1] and stats[0].finite and 0 < stats[0].projected_numel < stats[0].total_numel
        assert projected.keys() == moved.keys() == computed_with.keys()
        expected_sq = 0.0
        for name, w in moved.items():
            if "norm" in name:
                torch.testing.assert_close(projected[name], w, rtol=0, atol=0, msg=f"{name} (norm) moved")
            else:
                expected = (anchor[name].double() + BETA * (w.double() - anchor[name].double())).float()
                torch.testing.assert_close(projected[name], expected, rtol=0, atol=1e-6, msg=f"{name} not projected")
                expected_sq += float(((w - anchor[name]).double() ** 2).sum())
            rounded = projected[name].to(torch.bfloat16 if dtype == "bf16" else torch.float32).float()
            assert torch.equal(computed_with[name], rounded), f"{name}: low precision is not the projected master"
        assert stats[0].displacement_norm == pytest.approx(expected_sq**0.5, rel=1e-6)

        # the next forward uses the projected weights: a plain model in the same dtype, loaded with them (and not
        # with the unprojected ones). ZeRO-3 computes bf16 linear layers its own way (matmul, then add): bf16 noise.
        from transformers import AutoModelForCausalLM

        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        plain = AutoModelForCausalLM.from_pretrained(toy_model_path, dtype=torch_dtype).eval()

        def plain_logp(weights: dict) -> torch.Tensor:
            plain.load_state_dict({n: w.to(torch_dtype) for n, w in weights.items()}, strict=False)
            with torch.no_grad():
                logits = forward_response_logits(plain, batch)
            return response_logits_to_logp(logits, batch.responses, batch.temperature)[0][batch.response_mask.bool()]

        tol = 0.05 if (stage, dtype) == (3, "bf16") else 1e-4
        ref = plain_logp(computed_with)
        torch.testing.assert_close(torch.cat(logp_after)[batch.response_mask.bool()], ref, rtol=0, atol=tol)
        assert (plain_logp(moved) - ref).abs().max() > 2 * tol, "the check cannot tell projected from unprojected"

        # the next optimizer step starts from the projected master weights
        ray.get([a.train_step.remote(s) for a, s in zip(actors, shard_batch(batch, 2))])
        after_step = _masters(ray, actors)
        for name in projected:
            assert (after_step[name] - projected[name]).abs().max().item() <= lr * 1.5, name
        gap = max((projected[n] - moved[n]).abs().max().item() for n in moved if "norm" not in n)
        still_away = max((after_step[n] - moved[n]).abs().max().item() for n in moved if "norm" not in n)
        assert gap > 2 * lr, "the projection should have moved the weights by (β − 1) × two Adam steps"
        assert still_away > gap / 2, "weights fell back toward the unprojected values"

        # rollback restores the weights of the phase start
        ray.get([a.extra_begin_phase.remote() for a in actors])
        ray.get([a.extra_project.remote(BETA) for a in actors])
        ray.get([a.extra_rollback.remote() for a in actors])
        restored = _masters(ray, actors)
        for name in after_step:
            torch.testing.assert_close(restored[name], after_step[name], rtol=0, atol=0, msg=f"{name} not restored")
    finally:
        stop_learner_group(ray, actors)


def _run_cycle(ray, actors, batches) -> list[dict]:
    """Snapshot, one training step per batch; the gathered full weights at the anchor and after every step."""
    ray.get([a.extra_snapshot.remote() for a in actors])
    trajectory = [_full(ray, actors)]
    for b in batches:
        ray.get([a.train_step.remote(s) for a, s in zip(actors, shard_batch(b, 2))])
        trajectory.append(_full(ray, actors))
    return trajectory


def _check_top_elements_least_squares(trajectory, previous, projected, beta, eligible) -> int:
    """The projection of a `top_elements` + `least_squares` cycle, recomputed on the gathered full tensors with
    `linearity.trend`: scores `steady_displacement` (0 outside the name globs), one global threshold, and
    `TrendAccumulator.advance_` by (β − 1)·m steps on the selected elements. Returns the selected count."""
    steps = len(trajectory) - 1
    anchor, last = trajectory[0], trajectory[-1]
    scores = {
        n: steady_displacement(last[n].ravel(), anchor[n].ravel(), None if previous is None else previous[n].ravel())
        * (n in eligible)
        for n in anchor
    }
    # The threshold comes from the ranks' gathered score sample; the lowest score that moved is at or above it.
    moved = {n: projected[n].ravel() != last[n].ravel() for n in anchor}
    threshold = min(float(scores[n][moved[n]].min()) for n in anchor if moved[n].any())
    selected = 0
    for name in anchor:
        mask = (scores[name] >= threshold) & (scores[name] > 0)
        trend = TrendAccumulator([anchor[name].ravel()])
        for t, weights in enumerate(trajectory):
            trend.update([weights[name].ravel()], t)
        expected = last[name].ravel().clone()
        trend.advance_([expected], (beta - 1.0) * steps, [mask])
        torch.testing.assert_close(projected[name].ravel(), expected, rtol=0, atol=0, msg=name)
        selected += int(mask.sum())
    return selected


def _drift_share_of(anchor, now, previous, names):
    """`drift_share` of the gathered full tensors (rows in the order of `names`)."""
    return drift_share(
        torch.stack([drift_partial_sums(now[n].ravel(), anchor[n].ravel(), previous[n].ravel()) for n in names])
    )


@pytest.mark.parametrize("stage", [2, 3])
def test_monitor_selection_least_squares_and_optimizer_reset_on_shards(ray_session, toy_model_path, stage):
    """On 2 real ranks the projector's readings are the `linearity.trend` functions applied to the gathered full
    tensors: the top-fraction selection is one global threshold on `steady_displacement` (with and without a
    previous cycle), the least-squares projection is `TrendAccumulator.advance_` of the gathered trajectory, and
    the drift share is `drift_share` of the gathered displacements. Then an optimizer reset makes the next Adam
    step a full-lr sign step."""
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
    beta = 2.0
    try:
        ray.get([a.extra_setup.remote(("*",), None, None, "least_squares", 512) for a in actors])

        # cycle 1: no previous displacement
        traj1 = _run_cycle(ray, actors, batches)
        eligible = [n for n in traj1[0] if "norm" not in n]
        stats = ray.get([a.extra_end_cycle.remote("top_elements", 0.7, 0.2) for a in actors])
        assert stats[0].drift_share != stats[0].drift_share, "no previous cycle: drift share is NaN"
        assert stats[0].steps == 3 and stats[0].selected_numel == stats[1].selected_numel
        assert 0.15 < stats[0].selected_numel / stats[0].eligible_numel < 0.25
        r2 = stats[0].r2_values + stats[1].r2_values
        assert r2 and all(0.0 <= v <= 1.0 for v in r2)

        ray.get([a.extra_begin_phase.remote() for a in actors])
        ray.get([a.extra_project.remote(beta) for a in actors])
        selected = _check_top_elements_least_squares(traj1, None, _full(ray, actors), beta, eligible)
        assert selected == stats[0].selected_numel

        # cycle 2 (from the unprojected weights): the drift share and the consistency with cycle 1
        ray.get([a.extra_rollback.remote() for a in actors])
        traj2 = _run_cycle(ray, actors, batches)
        d1 = {n: traj1[-1][n] - traj1[0][n] for n in traj1[0]}  # the projector's d_prev, in fp32 as it keeps it
        stats = ray.get([a.extra_end_cycle.remote("top_elements", 0.7, 0.2) for a in actors])
        expected = _drift_share_of(traj2[0], traj2[-1], d1, eligible)
        assert stats[0].drift_share == pytest.approx(expected.total, rel=1e-9)
        for name, share in zip(eligible, expected.per_tensor):
            assert stats[0].drift_share_per_tensor[name] == pytest.approx(share, rel=1e-9), name
        assert stats[0].displacement_norm == pytest.approx(expected.now_sq_norm**0.5, rel=1e-9)
        ray.get([a.extra_begin_phase.remote() for a in actors])
        ray.get([a.extra_project.remote(beta) for a in actors])
        selected = _check_top_elements_least_squares(traj2, d1, _full(ray, actors), beta, eligible)
        assert selected == stats[0].selected_numel

        # tensor_drift with threshold −1 keeps every eligible tensor (all drift shares are defined)
        ray.get([a.extra_rollback.remote() for a in actors])
        _run_cycle(ray, actors, batches[:1])
        stats = ray.get([a.extra_end_cycle.remote("tensor_drift", -1.0, 0.1) for a in actors])
        assert stats[0].selected_numel == stats[0].eligible_numel

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


def _matrices(weights: dict) -> list[str]:
    """The name-selected weight matrices in the projector's order (sorted names, norms excluded)."""
    return sorted(n for n, w in weights.items() if "norm" not in n and w.dim() >= 2 and w.shape[0] > 1)


@pytest.mark.parametrize("stage", [2, 3])
def test_rank1_first_cycle_halves_and_lookahead_on_shards(ray_session, toy_model_path, stage):
    """On 2 real ranks:
    - the first cycle's drift share of its halves, cos(W_h − A, W − W_h), is `drift_share` of the gathered tensors;
    - rank1: the sharded power iteration (partial products all-reduced) equals `power_iteration` run on the gathered
      matrices with the same start vectors, and the projection adds (β − 1) σ u vᵀ to every matrix and nothing to
      vectors or norms; a rollback restores the weights exactly;
    - lookahead: fast steps hold the LR schedule; the reposition is S + α (W_fast − S) on every weight (norms too),
      `restore_anchor` returns to S exactly, a rollback to W_fast exactly."""
    ray = ray_session
    spec = LearnerSpec(
        toy_model_path,
        LearnerConfig(world_size=2, zero_stage=stage, dtype="fp32", lr=1e-3, warmup_steps=10, micro_batch_size=8),
        AlgoConfig(loss_agg="seq-mean-token-mean"),
        samples_per_rank=8,
        seed=0,
    )
    batches = []
    for seed in range(2):
        b = random_batch(toy_model_path, seed=seed)
        b.old_logp = behaviour_logp(toy_model_path, b)
        batches.append(b)
    actors = start_learner_group(ray, spec)
    beta, iters = 3.0, 6
    try:
        ray.get([a.extra_setup.remote(("*",), None, None, "two_point", 512, "rank1", 1) for a in actors])
        anchor, half, now = _run_cycle(ray, actors, batches)  # A, W_h (after step 1 = m // 2), W
        eligible = [n for n in anchor if "norm" not in n]
        stats = ray.get([a.extra_end_cycle.remote("names", 0.7, 0.1, iters) for a in actors])
        assert stats[0].drift_share != stats[0].drift_share, "first cycle: no cross-cycle reading"
        d_half = {n: half[n] - anchor[n] for n in anchor}  # what the projector keeps, in fp32
        expected = _drift_share_of(half, now, d_half, eligible)
        assert stats[0].drift_share_halves == pytest.approx(expected.total, rel=1e-9)

        matrices = _matrices(anchor)
        shapes = [tuple(anchor[n].shape) for n in matrices]
        reference = power_iteration(
            lambda: ((i, 0, (now[n] - anchor[n]).ravel()) for i, n in enumerate(matrices)),
            shapes,
            start_vectors(shapes, 17),  # the projector's seed: 0 * 7919 + 17
            iters,
        )
        assert stats[0].rank1_matrices == len(matrices)
        energy = float(reference.sq_norm.sum())
        assert stats[0].rank1_share == pytest.approx(float((reference.sigma**2).sum()) / energy, rel=1e-9)
        ray.get([a.extra_begin_phase.remote() for a in actors])
        ray.get([a.extra_project.remote(beta) for a in actors])
        projected = _full(ray, actors)
        for name in anchor:
            if name not in matrices:
                torch.testing.assert_close(projected[name], now[name], rtol=0, atol=0, msg=f"{name} moved")
                continue
            i = matrices.index(name)
            step = (beta - 1.0) * reference.sigma[i] * torch.outer(reference.u[i], reference.v[i])
            torch.testing.assert_close(projected[name], now[name] + step.float(), rtol=1e-6, atol=1e-9, msg=name)
        ray.get([a.extra_rollback.remote() for a in actors])
        restored = _full(ray, actors)
        for name in now:
            torch.testing.assert_close(restored[name], now[name], rtol=0, atol=0, msg=f"{name} not restored")

        # lookahead (SFPO): anchor = the slow weights S; every weight is repositioned (no exclusion)
        alpha = 0.8
        ray.get([a.extra_setup.remote(("*",), [], None, "two_point", 512, "lookahead", 0) for a in actors])
        lrs = []
        for fast in (True, True, False):
            metrics = ray.get([a.train_step.remote(s, fast) for a, s in zip(actors, shard_batch(batches[0], 2))])
            lrs.append(metrics[0].lr)
        assert lrs[0] == lrs[1] < lrs[2], "fast steps hold the LR schedule; the slow step advances it"
        ray.get([a.extra_snapshot.remote() for a in actors])
        slow = _full(ray, actors)
        for _ in range(2):
            ray.get([a.train_step.remote(s, True) for a, s in zip(actors, shard_batch(batches[1], 2))])
        fast_weights = _full(ray, actors)
        ray.get([a.extra_begin_phase.remote() for a in actors])
        stats = ray.get([a.extra_project.remote(alpha) for a in actors])
        assert stats[0].projected_numel == stats[0].total_numel
        repositioned = _full(ray, actors)
        for name in slow:
            expected = fast_weights[name].lerp(slow[name], 1.0 - alpha)  # S + α (W_fast − S), as project_ computes it
            torch.testing.assert_close(repositioned[name], expected, rtol=0, atol=0, msg=name)
        assert any("norm" in n and not torch.equal(repositioned[n], fast_weights[n]) for n in slow), "norms move too"
        ray.get([a.extra_restore_anchor.remote() for a in actors])
        back = _full(ray, actors)
        ray.get([a.extra_rollback.remote() for a in actors])
        fast_again = _full(ray, actors)
        for name in slow:
            torch.testing.assert_close(back[name], slow[name], rtol=0, atol=0, msg=f"{name} not back at S")
            torch.testing.assert_close(fast_again[name], fast_weights[name], rtol=0, atol=0, msg=name)
    finally:
        stop_learner_group(ray, actors)
