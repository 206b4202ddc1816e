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
    min_tokens: int = 0  # EOS masked before this many tokens (RolloutConfig.min_tokens)


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

    @classmethod
    def from_rollout(cls, result: RolloutResult, advantages, pad_id: int, temperature: float) -> TrainBatch:
        """Pad a RolloutResult into this layout: prompts left-padded, responses right-padded; `old_logp` from the
        behaviour log-probs. advantages: float[B] or float[B, R] (broadcast over each response's tokens)."""
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
        adv = torch.as_tensor(advantages, dtype=torch.float32)
        if adv.dim() == 1:
            adv = adv[:, None].expand(B, R).clone()
        adv = adv[:, :R] * rmask
        return cls(prompts, responses, attn, rmask, old_logp, adv, temperature)

    def __len__(self) -> int:
        return self.responses.shape[0]

    def split(self, parts: int) -> list[TrainBatch]:
        """`parts` contiguous pieces whose sizes differ by at most one, in order (needs len >= parts)."""
        if len(self) < parts:
            raise ValueError(f"cannot split {len(self)} samples into {parts} non-empty parts")
        bounds = [i * len(self) // parts for i in range(parts + 1)]
        return [self.slice(s, e) for s, e in zip(bounds[:-1], bounds[1:])]

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
    optimizer_steps: int = 0  # the rank's optimizer steps so far (DeepSpeed's global_steps: checkpointed with it)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ValidationBatch:
    """The fixed prompts (a slice of the train split, never the held-out eval split) that score projections, and how
    to sample and pad them; each phase samples them with `sampling.seed + cycle`."""

    prompt_ids: list[list[int]]
    answers: list[str]
    sampling: SamplingConfig
    pad_id: int
