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
from orchestrator.train import shard_batch
from tests.test_learner import _behaviour_logp, _random_batch, _start_group, _stop_group

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
    spec = LearnerSpec(model_path=toy_model_path, world_size=2, zero_stage=stage, dtype=dtype, lr=lr,
                       micro_batch_size=8, samples_per_rank=8, num_threads=1, loss_agg="seq-mean-token-mean")
    batch = _random_batch(toy_model_path)
    batch.old_logp = _behaviour_logp(toy_model_path, batch)
    actors = _start_group(ray, spec)
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
        assert stats[0].displacement_norm == pytest.approx(expected_sq ** 0.5, rel=1e-4 if dtype == "fp32" else 0.05)

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

        # rollback restores the pre-projection weights of that projection
        ray.get([a.extra_project.remote(BETA) for a in actors])
        ray.get([a.extra_rollback.remote() for a in actors])
        restored = _full(ray, actors)
        for name in after_step:
            torch.testing.assert_close(restored[name], after_step[name], rtol=0, atol=0, msg=f"{name} not restored")
    finally:
        _stop_group(ray, actors)
