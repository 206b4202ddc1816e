"""Avg@k and the unbiased Pass@k (orchestrator/metrics.py) against hand-computed values."""

from __future__ import annotations

import pytest

from orchestrator.metrics import pass_at_k, pass_levels, sample_metrics


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 2, 1 - 3 / 10),  # 1 − C(3,2)/C(5,2) = 0.7
        (10, 3, 1, 0.3),  # Pass@1 = c / n
        (4, 1, 2, 1 - 3 / 6),  # 1 − C(3,2)/C(4,2)
        (8, 2, 4, 1 - 15 / 70),  # 1 − C(6,4)/C(8,4)
        (5, 0, 3, 0.0),
        (4, 3, 2, 1.0),  # n − c < k: every draw of 2 holds a correct sample
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_sample_metrics_hand_computed():
    # two prompts, k = 4: A has 2 correct; B none correct and one half-credit sample (counts for Avg, not Pass)
    scores = [1.0, 0.0, 1.0, 0.0] + [0.0, 0.0, 0.0, 0.5]
    m = sample_metrics(scores, 4)
    assert m["avg_at_k"] == pytest.approx(2.5 / 8)
    assert m["pass_at"]["1"] == pytest.approx((2 / 4 + 0) / 2)
    assert m["pass_at"]["2"] == pytest.approx((1 - 1 / 6 + 0) / 2)  # A: 1 − C(2,2)/C(4,2)
    assert m["pass_at_k"] == m["pass_at"]["4"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="multiple of k=4"):
        sample_metrics([1.0] * 6, 4)


def test_pass_levels():
    assert pass_levels(1) == [1] and pass_levels(8) == [1, 2, 4, 8] and pass_levels(6) == [1, 2, 4, 6]
