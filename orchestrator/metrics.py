"""Evaluation metrics from k scored samples per prompt: Avg@k and Chen et al.'s unbiased Pass@j.

Used by the training job's periodic evaluation and by `python -m orchestrator.evaluate`, so both report the same
numbers for the same scores."""

from __future__ import annotations

import math


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def pass_levels(k: int) -> list[int]:
    """The j of the Pass@j curve: powers of two below k, then k."""
    levels, j = [], 1
    while j < k:
        levels.append(j)
        j *= 2
    return levels + [k]


def sample_metrics(scores: list[float], k: int) -> dict:
    """Avg@k and Pass@j (j in pass_levels(k)) from prompt-major scores of k samples per prompt.

    Avg@k is the mean score (fractional scores count as such); for Pass@j a sample is correct when its score
    is 1, and each prompt's unbiased estimate 1 − C(k − c, j) / C(k, j) is averaged over prompts."""
    if not scores or len(scores) % k:
        raise ValueError(f"scores: expected a non-empty multiple of k={k} values, got {len(scores)}")
    correct = [sum(1 for s in scores[i : i + k] if s >= 1.0) for i in range(0, len(scores), k)]
    curve = {str(j): sum(pass_at_k(k, c, j) for c in correct) / len(correct) for j in pass_levels(k)}
    return {"avg_at_k": sum(scores) / len(scores), "pass_at_k": curve[str(k)], "pass_at": curve}
