"""Every RL-Extra strategy's guards on the live actors: a 2-rank ZeRO-3 learner group, a vLLM rollout engine, and the
`ExtrapolatorActor` run in this process (so a fault can be injected into it).

For extrapolate, rank1 and lookahead:
- validation-margin guard: the real validation runs (the engine samples the validation batch, the verifier scores
  it, the learners compute log-probs), and the injected fault is its verdict: a reward collapse. The phase rolls
  back to the weights of not moving — the phase start (extrapolate, rank1) or the slow weights S (lookahead) — bit
  for bit, leaves the engines' weights alone, and shrinks β;
- NaN guard: a projection that overflows (β = 1e300; lookahead: the ranks' report of non-finite weights, injected)
  is rolled back the same way;
- a candidate identical to not moving (a cycle that did not move the weights) is never kept by the real test.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import actors.extrapolator as extrapolator
from actors.groups import ActorGroups
from actors.weight_sync import from_transport
from linearity.validation import PairedGain
from orchestrator.batches import shard_batch
from orchestrator.config import AlgoConfig, LearnerConfig, RolloutConfig, ScheduleConfig, ToyTaskConfig, check_fields
from orchestrator.messages import SamplingConfig, ValidationBatch
from tests.helpers import behaviour_logp, random_batch, start_learner_group, stop_learner_group

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(ray_session, toy_model_path):
    """(learner handles, rollout handles, validation batch, a training batch)."""
    from transformers import AutoTokenizer

    from actors.learner import LearnerSpec
    from actors.rollout import RolloutActor, RolloutSpec
    from orchestrator.cluster import rollout_actor_env
    from orchestrator.data import PromptEncoder
    from orchestrator.toy_task import make_splits

    ray = ray_session
    spec = LearnerSpec(
        toy_model_path,
        LearnerConfig(world_size=2, zero_stage=3, dtype="fp32", lr=1e-3, micro_batch_size=8, num_threads=1),
        AlgoConfig(loss_agg="seq-mean-token-mean"),
        samples_per_rank=8,
        seed=0,
    )
    learners = start_learner_group(ray, spec)
    rollout = (
        ray.remote(RolloutActor)
        .options(num_cpus=1, runtime_env={"env_vars": rollout_actor_env(1)})
        .remote(RolloutSpec(toy_model_path, RolloutConfig(kv_cache_mb=16), seed=0))
    )
    tok = AutoTokenizer.from_pretrained(toy_model_path)
    rows = make_splits(ToyTaskConfig(op="add", digits=1, num_train=200, num_eval=10), seed=0)["train"][:8]
    encode = PromptEncoder(tok, False, 32)
    validation = ValidationBatch(
        [encode(r["prompt"]) for r in rows],
        [r["answer"] for r in rows],
        SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=5),
        tok.pad_token_id,
    )
    batch = random_batch(toy_model_path)
    batch.old_logp = behaviour_logp(toy_model_path, batch)
    yield learners, [rollout], validation, batch
    stop_learner_group(ray, learners)
    ray.kill(rollout)


def _full(ray, learners) -> dict:
    exported = ray.get([a.export_weights.remote(1.0) for a in learners])[0]
    return {n: from_transport(*t) for bucket in exported for n, t in bucket}


def _assert_same(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name}: not the {what} bit for bit"


def _cycle(ray, learners, rollouts, strategy: str, batch, steps: int = 2) -> tuple[int, dict]:
    """A cycle up to its phase: snapshot, `steps` real steps (lookahead: fast steps), the engines synced to the
    weights of not moving. Returns (the engines' weight version, those weights)."""
    groups = ActorGroups.of(rollouts, learners, ray.get(rollouts[0].get_weight_version.remote()), 64.0, "object_store")
    ray.get([a.extra_snapshot.remote() for a in learners])
    if strategy == "lookahead":  # the engines hold S, the learners move on with the fast steps
        version = groups.sync_weights()["version"]
        baseline = _full(ray, learners)
    for _ in range(steps):
        groups.train_step(shard_batch(batch, 2), fast=strategy == "lookahead")
    if strategy != "lookahead":
        version = groups.sync_weights()["version"]
        baseline = _full(ray, learners)
    return version, baseline


def _schedule(strategy: str, **kw) -> ScheduleConfig:
    lookahead = strategy == "lookahead"
    cfg = ScheduleConfig(
        strategy=strategy,
        m=1 if lookahead else 2,
        selection="names",
        rank1_iters=3,
        validation_prompts=8,
        validation_samples=2,
        **kw,
    )
    check_fields(cfg, "schedule")
    return cfg


def _setup(ray, learners, strategy: str) -> None:
    exclude = [] if strategy == "lookahead" else None
    ray.get([a.extra_setup.remote(("*",), exclude, None, "two_point", 256, strategy, 1) for a in learners])


def test_a_candidate_identical_to_not_moving_is_not_kept(ray_session, live):
    """A cycle that did not move the weights: every β gives the same weights; the real test (engine samples, verifier,
    learner log-probs) sees d ≡ 0 and keeps nothing."""
    ray = ray_session
    learners, rollouts, validation, batch = live
    _setup(ray, learners, "extrapolate")
    actor = extrapolator.ExtrapolatorActor(
        _schedule("extrapolate", beta_mode="adaptive"), validation, "arith", 10.0, 64.0, "object_store"
    )
    version, baseline = _cycle(ray, learners, rollouts, "extrapolate", batch, steps=0)
    record = actor.extrapolate(1, learners, rollouts, version)
    assert record.outcome == "skipped" and "no candidate passed the validation test" in record.reasons[-1]
    assert all(c["gain"] == 0.0 and not c["accepted"] for c in record.candidates.values())
    _assert_same(_full(ray, learners), baseline, "unmoved weights")


@pytest.mark.parametrize("strategy", ["extrapolate", "rank1", "lookahead"])
def test_guards_roll_back_to_the_weights_of_not_moving(ray_session, live, strategy, monkeypatch):
    ray = ray_session
    learners, rollouts, validation, batch = live
    _setup(ray, learners, strategy)
    fixed_beta = None if strategy == "lookahead" else 2.0

    # validation-margin guard: the real validation runs; its verdict (the injected fault) is a reward collapse
    cfg = _schedule(strategy, beta_mode="fixed", beta=fixed_beta, guard_margin=0.05)
    actor = extrapolator.ExtrapolatorActor(cfg, validation, "arith", 10.0, 64.0, "object_store")
    beta_max = actor.policy.beta_max
    version, baseline = _cycle(ray, learners, rollouts, strategy, batch)
    verdicts = []

    def collapse(prompt_index, rewards, base, cand, level):
        verdicts.append((len(rewards), float(rewards.mean()), bool((cand != base).any())))
        return PairedGain(-0.5, -9.0, 8, 2.0, False)

    monkeypatch.setattr(extrapolator, "paired_gain", collapse)
    record = actor.extrapolate(1, learners, rollouts, version)
    monkeypatch.undo()
    assert record.outcome == "rolled_back" and "rolled back" in record.reasons[-1]
    assert verdicts == [(16, record.val_reward_before, True)], "8 prompts × 2 samples scored; the candidate moved"
    assert actor.policy.beta_max < beta_max, "a guard shrinks the next cycle's step"
    assert record.weight_version == version == ray.get(rollouts[0].get_weight_version.remote())
    _assert_same(_full(ray, learners), baseline, "weights of not moving")

    # NaN guard: an overflowing projection (β = 1e300); lookahead's α <= 1 cannot overflow, and DeepSpeed skips a
    # step whose gradients are not finite, so there the fault is injected where the ranks report their projection
    if strategy == "lookahead":
        cfg = _schedule(strategy, beta_mode="fixed")
        real_project = extrapolator.ExtrapolatorActor.project
        monkeypatch.setattr(
            extrapolator.ExtrapolatorActor,
            "project",
            lambda self, beta: dataclasses.replace(real_project(self, beta), finite=False),
        )
    else:
        cfg = _schedule(strategy, beta_mode="fixed", beta=1e300)
    version, baseline = _cycle(ray, learners, rollouts, strategy, batch)
    actor = extrapolator.ExtrapolatorActor(cfg, None, "arith", 10.0, 64.0, "object_store")
    record = actor.extrapolate(2, learners, rollouts, version)
    assert record.outcome == "rolled_back" and "non-finite" in record.reasons[0]
    _assert_same(_full(ray, learners), baseline, "weights of not moving")
