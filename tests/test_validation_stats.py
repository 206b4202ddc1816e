"""The validation test of `auto` (linearity/validation.py): its estimator, its critical values and its false-positive
rate, measured.

The stated rate: a phase that tries K candidates, none better than the current policy, keeps one with probability
≤ `validation_fpr` (α). Measured here on *exactly* null candidates — a tabular policy (one prompt = one categorical
over tokens, two of them rewarded) whose candidate moves probability among the rewarded tokens and among the
unrewarded ones but leaves every prompt's expected reward unchanged — over many independent validation batches.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from linearity.validation import paired_gain, per_prompt_gains, student_t_cdf, student_t_quantile

PROMPTS, TOKENS, REWARDED, SAMPLES = 32, 8, 2, 4  # the default validation batch: 32 prompts × 4 samples


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 31, 100, 501])
def test_student_t_against_scipy(df):
    for t in (-3.0, -0.4, 0.0, 0.7, 2.1, 9.0):
        assert student_t_cdf(t, df) == pytest.approx(scipy.stats.t.cdf(t, df), abs=1e-12)
    for p in (0.9, 0.95, 0.975, 0.99, 0.999):
        assert student_t_quantile(p, df) == pytest.approx(scipy.stats.t.ppf(p, df), rel=1e-9)


def test_per_prompt_gain_is_the_importance_sampled_change_of_the_rewarded_probability():
    idx = torch.tensor([0, 0, 1, 1, 1])
    r = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    lb = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.0], dtype=torch.float64)
    lc = torch.tensor([-0.8, -2.5, -0.5, -2.0, 0.0], dtype=torch.float64)
    d = per_prompt_gains(idx, r, lb, lc)
    expected = [(math.exp(0.2) - 1) / 2, (0.0 + 0.5 * (math.e - 1) + 0.0) / 3]
    assert d.tolist() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        per_prompt_gains(idx, r * 2, lb, lc)


def _tabular_batches(gen: torch.Generator, count: int, tilt: float, shift: float = 0.0) -> list[tuple]:
    """`count` independent validation batches of a tabular policy and a candidate, as (prompt index, reward,
    base log-prob, candidate log-prob): `tilt` moves probability within the rewarded and within the unrewarded
    tokens (expected reward unchanged on every prompt); `shift` adds to the rewarded tokens' logits (a real change)."""
    logits = torch.randn(count, PROMPTS, TOKENS, dtype=torch.float64, generator=gen)
    p1 = logits.softmax(-1)
    tilted = logits + tilt * torch.randn(logits.shape, dtype=torch.float64, generator=gen)
    pc = torch.empty_like(p1)
    for part in (slice(0, REWARDED), slice(REWARDED, TOKENS)):
        pc[..., part] = tilted[..., part].softmax(-1) * p1[..., part].sum(-1, keepdim=True)
    if shift:
        shifted = pc.log()
        shifted[..., :REWARDED] += shift
        pc = shifted.softmax(-1)
    y = torch.multinomial(p1.view(-1, TOKENS), SAMPLES, replacement=True, generator=gen).view(count, PROMPTS, SAMPLES)
    idx = torch.arange(PROMPTS).repeat_interleave(SAMPLES)
    reward = (y < REWARDED).double().view(count, -1)
    lb, lc = p1.log().gather(2, y).view(count, -1), pc.log().gather(2, y).view(count, -1)
    return [(idx, reward[i], lb[i], lc[i]) for i in range(count)]


@pytest.mark.parametrize("candidates", [1, 2])
def test_false_positive_rate_on_null_candidates_is_at_most_the_stated_rate(candidates):
    """α = 0.05 per phase, split over K candidates (Bonferroni): over 2000 phases with K null candidates each
    (tilts from barely to strongly different, the regime of a projection), the share of phases that keep one is
    at most α."""
    alpha, phases = 0.05, 2000
    gen = torch.Generator().manual_seed(candidates)
    kept = 0
    for tilt in (0.05, 0.2, 0.5, 1.0):
        batches = _tabular_batches(gen, phases // 4 * candidates, tilt)
        for i in range(0, len(batches), candidates):
            kept += any(paired_gain(*b, level=alpha / candidates).accepted for b in batches[i : i + candidates])
    rate = kept / phases
    assert rate <= alpha, f"null candidates kept in {rate:.3f} of the phases (stated: <= {alpha})"


def test_identical_candidate_is_never_kept():
    gen = torch.Generator().manual_seed(0)
    for idx, r, lb, _ in _tabular_batches(gen, 50, 0.0):
        result = paired_gain(idx, r, lb, lb.clone(), level=0.05)
        assert not result.accepted and result.gain == 0.0 and math.isnan(result.t)


def test_a_real_gain_is_kept_and_a_loss_is_not():
    """Power: raising the rewarded tokens' logits by 0.1 (≈ +0.02 expected reward) is kept in most batches; lowering
    them never."""
    gen = torch.Generator().manual_seed(1)
    gains = [paired_gain(*b, level=0.05) for b in _tabular_batches(gen, 200, 0.1, shift=0.1)]
    assert np.mean([g.accepted for g in gains]) > 0.8
    assert all(g.gain > 0 for g in gains if g.accepted)
    losses = [paired_gain(*b, level=0.05) for b in _tabular_batches(gen, 200, 0.1, shift=-0.1)]
    assert not any(g.accepted for g in losses)
