"""Is a candidate policy better than the current one? A paired importance-sampled test, its false-positive rate stated.

RL-Extra's `auto` (and `adaptive`, and the validation-margin guard) must tell apart candidate weights that differ
from the current ones by a small projection. Sampling fresh responses under each candidate and comparing mean 0/1
rewards cannot: on 32 prompts × 4 samples a projection of 5 % of the elements rarely flips a sample, so candidates
tie ("0.578 vs best 0.578"). Here every candidate is scored on the *same* responses, sampled once from the current
policy π₁, through the probability it gives them:

    gain(c) = E_{π_c}[r] − E_{π₁}[r] = E_{y∼π₁}[(w(y) − 1) r(y)],        w(y) = π_c(y | x) / π₁(y | x)

(importance sampling). Per validation prompt g with k samples the estimate is

    d_g = (1/k) Σ_j (w_gj − 1) r_gj,        w_gj = exp(log π_c(y_gj) − log π₁(y_gj))   (sequence log-probs)

— how much likelier the candidate makes the rewarded responses: continuous (a small projection moves it), paired
(the responses' noise is shared by every candidate), unbiased for the prompt's gain, and, with rewards in [0, 1]
and w ≥ 0, **bounded below by −1**. No baseline is subtracted on purpose: with one (GRPO's r − b) the unrewarded
responses enter as −(w − 1) b, a term unbounded *below* whose rare large values (a rarely sampled wrong response
made much likelier) the sample seldom shows, which made the test below accept exactly-null candidates at 6–12 %
instead of 5 %; without it the only heavy tail is to the right, where it makes the test conservative.

The decision is a one-sided t-test over the P validation prompts (independent draws of the train distribution):
accept c when

    t = mean(d) / (sd(d) / √P)  ≥  t_{1 − α/K}(P − 1)

with K the number of candidates tried in the phase (Bonferroni). **False-positive rate**: under H0 — c's expected
reward is at most π₁'s — a candidate is accepted with probability ≤ α/K in the t-test's normal approximation (and
less where the right tail is heavy), so a phase accepts any of its K null candidates with probability ≤ α (union
bound). tests/test_validation_stats.py measures it on exactly-null candidates (probability moved among rewarded and
among unrewarded responses of a tabular policy, expected reward unchanged on every prompt): 0.018–0.046 by the size
of the change, 0.036 (K = 1) and 0.030 (K = 2) overall, at α = 0.05; a candidate worth +0.017 expected reward is
kept in 99.5 % of the batches.
A candidate identical to π₁ has w ≡ 1 and d ≡ 0 (sd 0): never accepted; neither is one with sd(d) = 0 or P < 2.

Assumptions: rewards in [0, 1]; the responses were sampled from π₁ at the log-probs' temperature with top-p = 1 (a
truncated sampler makes w wrong); log π are the sampling distribution's (log-softmax of logits / T). Pure torch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PairedGain:
    """A candidate's estimated reward gain over the current policy and its test.

    gain: mean of the per-prompt estimates d_g (reward units: the estimated E_c[r] − E_1[r]).
    t: the one-sided t statistic (NaN when sd = 0 or fewer than 2 prompts).
    prompts: P, the validation prompts.
    threshold: the critical value t_{1−level}(P − 1) it was compared with (inf when untestable).
    accepted: t ≥ threshold.
    """

    gain: float
    t: float
    prompts: int
    threshold: float
    accepted: bool


def per_prompt_gains(prompt_index: Tensor, rewards: Tensor, logp_base: Tensor, logp_cand: Tensor) -> Tensor:
    """float64[P]: every prompt's importance-sampled gain estimate d_g = mean_j (w_gj − 1) r_gj.

    Args:
        prompt_index: long[N] — the prompt of each sample, 0..P−1 (every prompt has at least one sample).
        rewards: float[N] — each sample's reward, in [0, 1].
        logp_base, logp_cand: float[N] — each response's sequence log-prob under the current policy and the candidate.
    """
    idx = prompt_index.long()
    r = rewards.double()
    if r.numel() and not bool(((r >= 0) & (r <= 1)).all()):
        raise ValueError("rewards: expected values in [0, 1] (the test relies on d_g >= -1)")
    w_minus_1 = torch.expm1(logp_cand.double() - logp_base.double())  # w − 1 without cancellation near w = 1
    prompts = int(idx.max()) + 1 if idx.numel() else 0
    count = torch.zeros(prompts, dtype=torch.float64).index_add_(0, idx, torch.ones_like(r))
    total = torch.zeros(prompts, dtype=torch.float64).index_add_(0, idx, w_minus_1 * r)
    return total / count


def paired_gain(
    prompt_index: Tensor, rewards: Tensor, logp_base: Tensor, logp_cand: Tensor, level: float
) -> PairedGain:
    """The candidate's estimated gain and its one-sided t-test at `level` (the per-candidate false-positive rate)."""
    d = per_prompt_gains(prompt_index, rewards, logp_base, logp_cand)
    p = int(d.numel())
    gain = float(d.mean()) if p else 0.0
    sd = float(d.std()) if p >= 2 else 0.0
    if p < 2 or not sd > 0.0 or not math.isfinite(sd):
        return PairedGain(gain, math.nan, p, math.inf, False)
    t = gain / (sd / math.sqrt(p))
    threshold = student_t_quantile(1.0 - level, p - 1)
    return PairedGain(gain, t, p, threshold, t >= threshold)


# ------------------------------------------------------------------------------------------ Student's t


def student_t_cdf(t: float, df: int) -> float:
    """P(T ≤ t) for Student's t with an integer number of degrees of freedom, exactly (finite series).

    With θ = atan(t / √ν), P(|T| ≤ |t|) is (Abramowitz & Stegun 26.7.3–4)
    ν odd:  (2/π) (θ + sin θ cos θ (1 + (2/3) cos²θ + … + (2·4…(ν−3))/(1·3…(ν−2)) cos^{ν−3}θ))
    ν even: sin θ (1 + (1/2) cos²θ + … + (1·3…(ν−3))/(2·4…(ν−2)) cos^{ν−2}θ)
    """
    if df < 1:
        raise ValueError(f"df: expected an integer >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:
        series, term = 0.0, 1.0
        if df > 1:
            series = 1.0
            for k in range(1, (df - 1) // 2):
                term *= c2 * (2 * k) / (2 * k + 1)
                series += term
        two_sided = (2 / math.pi) * (theta + (s * math.cos(theta) * series if df > 1 else 0.0))
    else:
        series, term = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            series += term
        two_sided = s * series
    return 0.5 + 0.5 * two_sided if t >= 0 else 0.5 - 0.5 * two_sided


@functools.lru_cache(maxsize=256)
def student_t_quantile(p: float, df: int) -> float:
    """The t with P(T ≤ t) = p (0 < p < 1), by bisection on `student_t_cdf` to 1e-12."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p: expected a probability in (0, 1), got {p}")
    lo, hi = -1.0, 1.0
    while student_t_cdf(lo, df) > p:
        lo *= 2.0
    while student_t_cdf(hi, df) < p:
        hi *= 2.0
    while hi - lo > 1e-12 * max(1.0, abs(lo), abs(hi)):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
