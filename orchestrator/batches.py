"""One RL step's data: a scored rollout, padded into the learners' batch layout, its shards, and its metrics."""

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


def build_train_batch(
    result: RolloutResult, advantages_per_sample, pad_id: int, temperature: float, device="cpu"
) -> TrainBatch:
    """Pad a RolloutResult into verl's layout: prompts left-padded, responses right-padded.

    advantages_per_sample: float[B] or float[B, R] (broadcast over each response's tokens).
    """
    import torch

    B = len(result.response_ids)
    P = max(len(p) for p in result.prompt_ids)
    R = max(1, max(len(r) for r in result.response_ids))
    # Padded rows as Python lists, one tensor per field: one conversion instead of four small tensors a sample.
    prompts = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in result.prompt_ids], dtype=torch.long)
    responses = torch.tensor([list(r) + [pad_id] * (R - len(r)) for r in result.response_ids], dtype=torch.long)
    prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in result.prompt_ids], dtype=torch.long)
    rmask = torch.tensor([[1.0] * len(r) + [0.0] * (R - len(r)) for r in result.response_ids], dtype=torch.float32)
    attn = torch.cat([prompt_mask, rmask.long()], dim=1)
    old_logp = torch.tensor([list(lp) + [0.0] * (R - len(lp)) for lp in result.logprobs], dtype=torch.float32)
    adv = torch.as_tensor(advantages_per_sample, dtype=torch.float32)
    if adv.dim() == 1:
        adv = adv[:, None].expand(B, R).clone()
    adv = adv[:, :R] * rmask
    return TrainBatch(prompts, responses, attn, rmask, old_logp, adv, temperature)


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
    }
