"""Small typed records that cross actor boundaries (rollout → controller → learner)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingConfig:
    """How the rollout engine samples. `max_tokens` bounds the response length."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None


@dataclass
class RolloutResult:
    """One batch of generations. Lists are per sample (prompt-major: prompt i's n samples are adjacent).

    `logprobs[i][j]` is the behaviour policy's log-prob of `response_ids[i][j]`, i.e. log_softmax(logits / T)
    (vLLM's `processed_logprobs`), which is what the PPO ratio needs.
    """

    prompt_index: list[int]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    response_text: list[str]
    logprobs: list[list[float]]
    finished: list[bool]  # True when the sample ended with EOS / stop (not cut by max_tokens)
    weight_version: int
    gen_time_s: float = 0.0


@dataclass
class TrainBatch:
    """A learner's shard of one RL step, in verl's layout.

    prompts: long[B, P] left-padded; responses: long[B, R] right-padded; masks and per-token tensors are
    over response positions [B, R]. `attention_mask` is over the concatenation [B, P + R].
    """

    prompts: torch.Tensor
    responses: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    temperature: float = 1.0

    def __len__(self) -> int:
        return self.responses.shape[0]

    def slice(self, start: int, end: int) -> TrainBatch:
        return TrainBatch(
            prompts=self.prompts[start:end],
            responses=self.responses[start:end],
            attention_mask=self.attention_mask[start:end],
            response_mask=self.response_mask[start:end],
            old_logp=self.old_logp[start:end],
            advantages=self.advantages[start:end],
            temperature=self.temperature,
        )


@dataclass
class TrainMetrics:
    """What one learner rank reports for one optimizer step."""

    loss: float
    clip_frac: float
    ppo_kl: float
    entropy: float
    grad_norm: float
    lr: float
    num_tokens: int
    extra: dict = field(default_factory=dict)
