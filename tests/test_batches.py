"""The driver's per-step data, without actors: the learners' batch layout, the batch kept in flight across a
checkpoint, and the prompt cursor's order."""

from __future__ import annotations

import random

import torch

from orchestrator.batches import ScoredRollout
from orchestrator.data import PromptCursor
from orchestrator.messages import RolloutResult, TrainBatch


def _result() -> RolloutResult:
    return RolloutResult(
        prompt_index=[0, 0, 1],
        prompt_ids=[[1, 5, 6], [1, 5, 6], [1, 7]],
        response_ids=[[8, 9, 2], [], [10]],
        response_text=["89", "", "x"],
        logprobs=[[-0.1, -0.2, -0.3], [], [-1 / 3]],
        finished=[True, False, True],
        weight_version=4,
        gen_time_s=0.5,
    )


def test_train_batch_layout_left_padded_prompts_right_padded_responses():
    batch = TrainBatch.from_rollout(_result(), torch.tensor([1.0, -1.0, 0.5]), pad_id=0, temperature=0.7)
    assert batch.prompts.tolist() == [[1, 5, 6], [1, 5, 6], [0, 1, 7]]
    assert batch.responses.tolist() == [[8, 9, 2], [0, 0, 0], [10, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0]]
    assert batch.response_mask.tolist() == [[1, 1, 1], [0, 0, 0], [1, 0, 0]]
    assert batch.old_logp.dtype == torch.float32
    assert torch.equal(batch.old_logp[0], torch.tensor([-0.1, -0.2, -0.3], dtype=torch.float32))
    assert batch.old_logp[2, 0] == torch.tensor(-1 / 3, dtype=torch.float32) and batch.old_logp[1].abs().sum() == 0
    assert batch.advantages.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.5, 0.0, 0.0]]
    assert batch.temperature == 0.7


def test_scored_rollout_survives_a_checkpoint_bit_for_bit():
    """The batch in flight goes to rollout_in_flight.json and back: every log-prob float exactly (repr round trip)."""
    rng = random.Random(0)
    result = _result()
    result.logprobs = [[rng.uniform(-20, 0) for _ in r] for r in result.response_ids]
    kept = ScoredRollout(step=7, result=result, rewards=[1.0, 0.0, 0.25], rollout_s=1.5, reward_s=0.01)
    back = ScoredRollout.from_json(kept.to_json())
    assert back == kept and isinstance(back.result, RolloutResult)


def test_prompt_cursor_walks_seeded_epochs_and_resumes_from_a_position():
    size, seed = 11, 3

    def epoch(e):
        order = list(range(size))
        random.Random(f"{seed}-{e}").shuffle(order)
        return order

    cursor = PromptCursor(size, seed)
    drawn = cursor.next(4) + cursor.next(9) + cursor.next(20)  # crosses two epoch boundaries
    assert drawn == (epoch(0) + epoch(1) + epoch(2))[:33] and cursor.position == 33
    restored = PromptCursor(size, seed)
    restored.position = 13  # a checkpoint's data position
    assert restored.next(5) == drawn[13:18]
