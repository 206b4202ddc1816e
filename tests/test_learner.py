"""LearnerActor group on real DeepSpeed: a 2-rank ZeRO-3 step equals the same step in plain torch.

The reference computes the policy loss on the whole batch in one process, backpropagates, and takes a
torch AdamW step. The DeepSpeed group splits the batch over two ranks, micro-batches each shard with
gradient accumulation, and steps. Loss, gradient norm and the updated (gathered) weights must agree.
"""

from __future__ import annotations

import pytest
import torch

from actors.learner import LearnerSpec, forward_response_logits, response_logits_to_logp
from actors.weight_sync import from_transport
from orchestrator.algorithms import policy_loss
from orchestrator.batches import shard_batch
from orchestrator.config import AlgoConfig, LearnerConfig
from orchestrator.messages import TrainBatch
from tests.helpers import behaviour_logp, random_batch, start_learner_group, stop_learner_group

pytestmark = pytest.mark.slow


def _reference_step(model_path: str, batch: TrainBatch, spec: LearnerSpec, passes: int = 1, lr: float | None = None):
    """`passes` AdamW steps on the whole batch in plain torch, every one at `lr` (default: the configured lr) with
    the batch's fixed behaviour log-probs as old_logp; the first pass's loss, gradient norm and gradients, and the
    final weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=spec.learner.lr if lr is None else lr,
        betas=spec.learner.betas,
        eps=1e-8,
        weight_decay=spec.learner.weight_decay,
    )
    first = None
    for _ in range(passes):
        opt.zero_grad()
        logits = forward_response_logits(model, batch)
        logp, _ = response_logits_to_logp(logits, batch.responses, batch.temperature)
        loss, _ = policy_loss(
            spec.algo.loss,
            logp,
            batch.old_logp,
            batch.advantages,
            batch.response_mask,
            clip_low=spec.algo.clip_low,
            clip_high=spec.algo.clip_high,
            agg=spec.algo.loss_agg,
        )
        loss.backward()
        if first is None:
            grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()
            first = (loss.item(), grad_norm, {n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
    loss, grad_norm, grads = first
    return loss, grad_norm, {n: p.detach().clone() for n, p in model.named_parameters()}, grads


def _initial_weights(model_path: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("agg", ["seq-mean-token-mean"])
def test_two_rank_zero3_step_equals_plain_torch(ray_session, toy_model_path, agg):
    ray = ray_session
    spec = LearnerSpec(
        toy_model_path,
        LearnerConfig(
            world_size=2, zero_stage=3, dtype="fp32", lr=1e-3, grad_clip=0.0, micro_batch_size=4, num_threads=1
        ),
        AlgoConfig(loss_agg=agg),
        samples_per_rank=8,
        seed=0,
    )
    batch = random_batch(toy_model_path)
    batch.old_logp = behaviour_logp(toy_model_path, batch)
    ref_loss, ref_norm, ref_weights, ref_grads = _reference_step(toy_model_path, batch, spec)

    actors = start_learner_group(ray, spec)
    try:
        metrics = ray.get([a.train_step.remote(s) for a, s in zip(actors, shard_batch(batch, 2))])
        exported = ray.get([a.export_weights.remote(1.0) for a in actors])
    finally:
        stop_learner_group(ray, actors)

    assert exported[1] is None and exported[0], "rank 0 returns the gathered weights, other ranks None"
    loss = sum(m.loss for m in metrics) / 2  # equal shards: the mean of shard seq-means is the batch seq-mean
    assert loss == pytest.approx(ref_loss, rel=1e-4, abs=1e-6)
    assert metrics[0].grad_norm == pytest.approx(ref_norm, rel=1e-3)
    assert metrics[0].clip_frac > 0, "the perturbed behaviour log-probs should clip some tokens"
    weights = {name: from_transport(*t) for bucket in exported[0] for name, t in bucket}
    assert set(weights) == set(ref_weights)
    initial = _initial_weights(toy_model_path)
    for name, ref in ref_weights.items():
        assert weights[name].shape == ref.shape
        # Adam's first step is lr * g / (|g| + eps): where |g| is near eps (1e-8) any rounding difference in
        # the all-reduced gradient swings the update anywhere in [-lr, lr]. Compare exactly where the gradient
        # is well above eps, and elsewhere check only Adam's bound |update| <= lr.
        stable = ref_grads[name].abs() > 1e-6
        torch.testing.assert_close(weights[name][stable], ref[stable], rtol=1e-4, atol=2e-5, msg=f"{name} differs")
        assert ((weights[name] - initial[name]).abs() <= spec.learner.lr * 1.001).all()
        assert stable.float().mean() > 0.5, f"{name}: too few well-conditioned elements to compare"


def test_gradient_checkpointing_takes_the_same_step(ray_session, toy_model_path):
    """learner.gradient_checkpointing recomputes activations in the backward pass: same loss, same update."""
    ray = ray_session
    batch = random_batch(toy_model_path, batch=8)
    batch.old_logp = behaviour_logp(toy_model_path, batch)

    def weights(actor) -> dict:
        exported = ray.get(actor.export_weights.remote(64.0))
        return {n: from_transport(*t).clone() for bucket in exported for n, t in bucket}

    results = []
    for checkpointing in (False, True):
        learner = LearnerConfig(micro_batch_size=4, lr=1e-3, gradient_checkpointing=checkpointing)
        spec = LearnerSpec(toy_model_path, learner, AlgoConfig(), samples_per_rank=8, seed=0)
        actors = start_learner_group(ray, spec)
        try:
            before = weights(actors[0])
            metrics = ray.get(actors[0].train_step.remote(batch))
            results.append((metrics, before, weights(actors[0])))
        finally:
            stop_learner_group(ray, actors)
    (plain, before, w_plain), (recomputed, _, w_recomputed) = results
    step = max((w_plain[n] - before[n]).abs().max().item() for n in before)
    differ = max((w_plain[n] - w_recomputed[n]).abs().max().item() for n in before)
    assert recomputed.loss == pytest.approx(plain.loss, rel=1e-6)
    assert step > 5e-4 and differ < 1e-6, f"update {step:.2e}, difference with checkpointing {differ:.2e}"


def test_updates_per_batch_takes_that_many_passes_at_the_steps_lr(ray_session, toy_model_path):
    """trainer.updates_per_batch=3 on a learner rank (ZeRO-2, micro-batched): three AdamW steps on the same batch,
    each against the fixed behaviour log-probs, all at the learning rate of the step (warm-up held), which then
    advances once — plain torch's three steps at warm-up's first rate give the same weights. A shard of the wrong
    size is refused before any pass."""
    ray = ray_session
    warmup, passes = 4, 3
    spec = LearnerSpec(
        toy_model_path,
        LearnerConfig(zero_stage=2, dtype="fp32", lr=1e-3, grad_clip=0.0, micro_batch_size=4, warmup_steps=warmup),
        AlgoConfig(),
        samples_per_rank=8,
        seed=0,
    )
    batch = random_batch(toy_model_path, batch=8)
    batch.old_logp = behaviour_logp(toy_model_path, batch)
    ref_loss, _, ref_weights, ref_grads = _reference_step(toy_model_path, batch, spec, passes, lr=1e-3 / warmup)
    _, _, one_pass, _ = _reference_step(toy_model_path, batch, spec, 1, lr=1e-3 / warmup)

    actors = start_learner_group(ray, spec)
    try:
        with pytest.raises(Exception, match="expected 8 samples, got 4"):
            ray.get(actors[0].train_step.remote(random_batch(toy_model_path, batch=4), False, passes))
        metrics = ray.get(actors[0].train_step.remote(batch, False, passes))
        exported = ray.get(actors[0].export_weights.remote(64.0))
    finally:
        stop_learner_group(ray, actors)

    assert metrics.lr == pytest.approx(1e-3 * 2 / warmup), "the schedule advances once per call, not per pass"
    assert metrics.loss != pytest.approx(ref_loss, rel=1e-3), "metrics are the last pass's, not the first's"
    assert metrics.clip_frac > 0
    weights = {name: from_transport(*t) for bucket in exported for name, t in bucket}
    moved_beyond_one_pass = 0.0
    for name, ref in ref_weights.items():
        stable = ref_grads[name].abs() > 1e-6  # where Adam's first step is not dominated by eps (see above)
        torch.testing.assert_close(weights[name][stable], ref[stable], rtol=1e-4, atol=2e-5, msg=f"{name} differs")
        assert stable.float().mean() > 0.5, f"{name}: too few well-conditioned elements to compare"
        moved_beyond_one_pass = max(moved_beyond_one_pass, (ref - one_pass[name]).abs().max().item())
    assert moved_beyond_one_pass > 1e-4, "three passes should move the weights well past one pass"
