"""One RL step's data: a scored rollout (`TrainBatch.from_rollout` pads it), its shards for the learner ranks, and
its metrics."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from orchestrator.messages import RolloutResult, TrainBatch, TrainMetrics


@dataclass
class ScoredRollout:
    """The samples of RL step `step`, with their rewards and what producing them cost the driver.

    With `trainer.off_policy_steps=1` this is generated while the previous step learns and held by the driver until
    its own step; a checkpoint keeps it (`to_json`) so that a resumed job trains on the very same batch."""

    step: int
    result: RolloutResult  # result.weight_version: the weights that sampled it (the behaviour policy)
    rewards: list[float]
    rollout_s: float  # the driver's wait for the engines
    reward_s: float

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ScoredRollout:
        d = json.loads(text)
        return cls(**{**d, "result": RolloutResult(**d["result"])})


def shard_batch(batch: TrainBatch, world_size: int) -> list[TrainBatch]:
    """Equal contiguous shards, one per learner rank (rank order)."""
    n = len(batch) // world_size
    return [batch.slice(r * n, (r + 1) * n) for r in range(world_size)]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def step_metrics(
    result: RolloutResult, rewards: list[float], per_rank: list[TrainMetrics], n_tokens: int, with_kl_ref: bool
) -> dict:
    """What one RL step reports under train/*: reward and accuracy of its samples, and the learners' loss terms."""
    return {
        "train/reward_mean": sum(rewards) / len(rewards),
        "train/accuracy": sum(1 for r in rewards if r >= 1.0) / len(rewards),
        "train/response_length": n_tokens / len(rewards),
        "train/truncated_frac": 1.0 - sum(result.finished) / len(result.finished),
        "train/loss": mean(x.loss for x in per_rank),
        "train/clip_frac": mean(x.clip_frac for x in per_rank),
        "train/kl_behaviour": mean(x.ppo_kl for x in per_rank),
        "train/entropy": mean(x.entropy for x in per_rank),
        "train/kl_ref": mean(x.extra["kl_ref"] for x in per_rank) if with_kl_ref else None,
        "train/grad_norm": per_rank[0].grad_norm,
        "train/lr": per_rank[0].lr,
        # RL steps × passes (trainer.updates_per_batch; lookahead: K fast + 1 slow), so far
        "train/optimizer_steps": per_rank[0].optimizer_steps,
    }
