"""Tests of orchestrator/algorithms.py against hand-computed values and loop-based references.

The references below are written as plain Python loops over floats, transcribing verl's
``core_algos.py`` formulas literally (defaultdict grouping, the reversed-time return loop, per-token
dual-clip PPO), so they share no code and no vectorisation tricks with the module under test. The comparison
with the installed verl package itself is tests/test_algorithms_verl.py.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from orchestrator import algorithms as alg
from orchestrator.algorithms import (
    ADVANTAGE_ESTIMATORS,
    AGG_MODES,
    POLICY_LOSSES,
    agg_loss,
    drgrpo_advantages,
    get_advantage_fn,
    get_policy_loss_fn,
    grpo_advantages,
    gspo_loss,
    kl_penalty,
    masked_mean,
    masked_whiten,
    policy_loss,
    ppo_clip_loss,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
)

F64 = torch.float64


# ------------------------------------------------------------------------------------------------
# Loop-based references (verl formulas, plain Python floats)
# ------------------------------------------------------------------------------------------------


def ref_group_stats(scores, index):
    groups = defaultdict(list)
    for s, g in zip(scores, index):
        groups[g].append(s)
    stats = {}
    for g, xs in groups.items():
        if len(xs) == 1:
            stats[g] = (0.0, 1.0)  # verl: mean 0, std 1 for a singleton
        else:
            m = sum(xs) / len(xs)
            stats[g] = (m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)))
    return stats


def ref_grpo(scores, index, mask, eps=1e-6, norm=True):
    stats = ref_group_stats(scores, index)
    out = []
    for s, g, row in zip(scores, index, mask):
        m, sd = stats[g]
        a = (s - m) / (sd + eps) if norm else s - m
        out.append([a * mk for mk in row])
    return out


def ref_masked_whiten(values, mask):
    n = sum(sum(r) for r in mask)
    mean = sum(v * m for rv, rm in zip(values, mask) for v, m in zip(rv, rm)) / (n + 1e-8)
    var = sum((v - mean) ** 2 * m for rv, rm in zip(values, mask) for v, m in zip(rv, rm)) / (n + 1e-8)
    var *= n / (n - 1)
    return [[(v - mean) / math.sqrt(var + 1e-8) for v in rv] for rv in values]


def ref_token_rewards(scores, mask):
    """Reward on the last valid token of each row (verl's reward managers)."""
    out = []
    for s, row in zip(scores, mask):
        r = [0.0] * len(row)
        valid = [t for t, m in enumerate(row) if m]
        if valid:
            r[valid[-1]] = s
        out.append(r)
    return out


def ref_rfpp(scores, mask, gamma):
    rewards = ref_token_rewards(scores, mask)
    returns = []
    for rew, row in zip(rewards, mask):
        ret = [0.0] * len(row)
        running = 0.0
        for t in reversed(range(len(row))):
            new_running = rew[t] + gamma * running
            ret[t] = new_running * row[t]
            # verl 0.9.1: a masked (observation) token carries the running return through unchanged
            running = new_running if row[t] else running
        returns.append(ret)
    w = ref_masked_whiten(returns, mask)
    return [[a * m for a, m in zip(ra, rm)] for ra, rm in zip(w, mask)]


def ref_rfpp_baseline(scores, index, mask):
    stats = ref_group_stats(scores, index)
    tiled = [[(s - stats[g][0]) * m for m in row] for s, g, row in zip(scores, index, mask)]
    w = ref_masked_whiten(tiled, mask)
    return [[a * m for a, m in zip(ra, rm)] for ra, rm in zip(w, mask)]


def ref_agg(loss, mask, mode):
    T = len(mask[0])
    lens = [sum(r) for r in mask]
    sums = [sum(x * m for x, m in zip(rl, rm)) for rl, rm in zip(loss, mask)]
    nonempty = [n > 0 for n in lens]
    if mode == "token-mean":
        return sum(sums) / sum(lens) if sum(lens) else 0.0
    if not any(nonempty):
        return 0.0
    if mode == "seq-mean-token-mean":
        per = [s / (n + 1e-8) for s, n, ne in zip(sums, lens, nonempty) if ne]  # verl's per-row 1e-8
        return sum(per) / len(per)
    per = [s for s, ne in zip(sums, nonempty) if ne]
    if mode == "seq-mean-token-sum":
        return sum(per) / len(per)
    if mode == "seq-mean-token-sum-norm":
        return sum(per) / len(per) / T
    raise AssertionError(mode)


def ref_ppo(logp, old, adv, mask, lo, hi, c, mode):
    losses, clipped, lower, kl = [], 0.0, 0.0, 0.0
    n = sum(sum(r) for r in mask)
    for rl, ro, ra, rm in zip(logp, old, adv, mask):
        row = []
        for lp, op, a, m in zip(rl, ro, ra, rm):
            d = min(max(lp - op, -20.0), 20.0)
            ratio = math.exp(d)
            l1 = -a * ratio
            l2 = -a * min(max(ratio, 1 - lo), 1 + hi)
            cl1 = max(l1, l2)
            l3 = -a * c
            loss = min(l3, cl1) if a < 0 else cl1
            row.append(loss)
            clipped += float(l2 > l1) * m
            lower += float(cl1 > l3 and a < 0) * m
            kl += -d * m
        losses.append(row)
    return ref_agg(losses, mask, mode), clipped / n, lower / n, kl / n


def ref_gspo(logp, old, adv, mask, lo, hi):
    losses, clipped = [], 0.0
    n = sum(sum(r) for r in mask)
    for rl, ro, ra, rm in zip(logp, old, adv, mask):
        length = max(sum(rm), 1)
        s = math.exp(min(sum((lp - op) * m for lp, op, m in zip(rl, ro, rm)) / length, 10.0))
        row = []
        for a, m in zip(ra, rm):
            l1, l2 = -a * s, -a * min(max(s, 1 - lo), 1 + hi)
            row.append(max(l1, l2))
            clipped += float(l2 > l1) * m
        losses.append(row)
    return ref_agg(losses, mask, "seq-mean-token-mean"), clipped / n


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


def close(actual, expected, tol=1e-9):
    assert torch.allclose(actual, t(expected, actual.dtype), atol=tol, rtol=tol), (actual, expected)


def random_batch(seed, B=12, T=7, empty_rows=(3,)):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(F64)
    for r in empty_rows:
        mask[r] = 0
    return g, mask


# ------------------------------------------------------------------------------------------------
# GRPO / Dr.GRPO
# ------------------------------------------------------------------------------------------------


def test_grpo_hand_values():
    # groups (non-contiguous ids): 5 -> [1,0,1,0]; 9 -> [1,0]; 2 -> [0.7] (singleton); 7 -> [1,1,1]
    rewards = t([1, 0, 1, 0, 1, 0, 0.7, 1, 1, 1])
    gids = torch.tensor([5, 5, 5, 5, 9, 9, 2, 7, 7, 7])
    mask = torch.ones(10, 3, dtype=F64)
    mask[1, 2] = 0  # a shorter response
    adv = grpo_advantages(rewards, gids, mask)
    eps = 1e-6
    a4 = 0.5 / (math.sqrt(1 / 3) + eps)  # n=4: mean .5, unbiased std sqrt(4 * .25 / 3)
    a2 = 0.5 / (math.sqrt(0.5) + eps)  # n=2: mean .5, std sqrt(.5)
    expected_scalars = [a4, -a4, a4, -a4, a2, -a2, 0.7 / (1 + eps), 0, 0, 0]
    expected = [[s] * 3 for s in expected_scalars]
    expected[1][2] = 0.0
    close(adv, expected, 1e-12)
    assert adv.shape == (10, 3) and adv.dtype == F64

    dr = drgrpo_advantages(rewards, gids, mask)
    dr_scalars = [0.5, -0.5, 0.5, -0.5, 0.5, -0.5, 0.7, 0, 0, 0]  # singleton: r - 0
    expected = [[s] * 3 for s in dr_scalars]
    expected[1][2] = 0.0
    close(dr, expected, 1e-12)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("norm", [True, False])
def test_grpo_matches_loop_reference(dtype, tol, norm):
    g, mask = random_batch(0, B=16)
    rewards = torch.rand(16, generator=g, dtype=F64).to(dtype)
    gids = torch.tensor([0, 0, 0, 0, 3, 3, 3, 11, 11, 4, 8, 8, 8, 8, 8, 1])  # has singletons 4 and 1
    adv = grpo_advantages(rewards, gids, mask.to(dtype), scale_by_std=norm)
    ref = ref_grpo(rewards.double().tolist(), gids.tolist(), mask.tolist(), norm=norm)
    assert adv.dtype == dtype
    close(adv, ref, tol)


def test_grpo_edge_cases_exact():
    # singleton: verl keeps r / (1 + eps); equal rewards in float32 (0.1 is inexact) -> exactly 0.
    rewards = torch.tensor([0.1, 0.1, 0.1, -2.0, 0.3, 0.3], dtype=torch.float32)
    gids = torch.tensor([1, 1, 1, 2, 3, 3])
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[5] = False  # empty response in an all-equal group
    adv = grpo_advantages(rewards, gids, mask, eps=1e-6)
    assert torch.all(adv[[0, 1, 2, 4, 5]] == 0)
    assert torch.allclose(adv[3], torch.full((4,), -2.0 / (1 + 1e-6)))
    assert grpo_advantages(rewards, gids, mask, scale_by_std=False)[3].eq(-2.0).all()


def test_empty_rows_give_zero_advantages_without_nan():
    g, mask = random_batch(1, B=8, empty_rows=(0, 5))
    rewards = torch.rand(8, generator=g, dtype=F64)
    gids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for name, fn in ADVANTAGE_ESTIMATORS.items():
        adv = fn(rewards, gids, mask, eps=1e-6, gamma=0.9)
        assert torch.isfinite(adv).all(), name
        assert torch.all(adv[[0, 5]] == 0), name
        assert torch.all(adv[mask == 0] == 0), name
    # every row empty: still zeros, no NaN
    empty = torch.zeros(4, 3)
    for name, fn in ADVANTAGE_ESTIMATORS.items():
        adv = fn(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1]), empty)
        assert torch.equal(adv, torch.zeros(4, 3)), name


def test_grpo_rejects_bad_shapes():
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), torch.ones(3, 2))
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long), torch.ones(3, 2))
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.ones(2, 2))


# ------------------------------------------------------------------------------------------------
# REINFORCE++ and REINFORCE++-baseline
# ------------------------------------------------------------------------------------------------


def test_reinforce_pp_hand_values():
    # rows: [r=1, len 2], [r=0, len 3], gamma .5 -> returns [[.5, 1, 0], [0, 0, 0]]
    rewards = t([1.0, 0.0])
    mask = t([[1, 1, 0], [1, 1, 1]])
    adv = reinforce_pp_advantages(rewards, mask, gamma=0.5)
    # valid returns: .5, 1, 0, 0, 0 -> mean .3, squared deviations sum .8, unbiased var .8 / 4 = .2
    sd = math.sqrt(0.2 + 1e-8)
    expected = [[0.2 / sd, 0.7 / sd, 0.0], [-0.3 / sd, -0.3 / sd, -0.3 / sd]]
    close(adv, expected, 1e-7)  # masked_mean's (n + 1e-8) shifts the mean by ~1e-9


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_reinforce_pp_matches_loop_reference(gamma):
    g, mask = random_batch(2, B=10, T=9)
    mask[4, 3] = 0  # a gap inside a response (e.g. masked tool output): verl carries the return across it
    mask[6] = torch.tensor([0, 0, 1, 1, 0, 1, 0, 0, 0], dtype=F64)
    rewards = torch.randn(10, generator=g, dtype=F64)
    adv = reinforce_pp_advantages(rewards, mask, gamma=gamma)
    close(adv, ref_rfpp(rewards.tolist(), mask.tolist(), gamma), 1e-9)


def test_reinforce_pp_baseline_matches_loop_reference():
    g, mask = random_batch(3, B=9, T=6)
    rewards = torch.randint(0, 2, (9,), generator=g).to(F64)
    gids = torch.tensor([7, 7, 7, 1, 1, 1, 2, 5, 5])  # 2 is a singleton
    adv = reinforce_pp_baseline_advantages(rewards, gids, mask)
    close(adv, ref_rfpp_baseline(rewards.tolist(), gids.tolist(), mask.tolist()), 1e-9)


def test_masked_whiten_degenerate_is_finite():
    one = torch.tensor([[0.0, 3.0, 0.0]])
    m1 = torch.tensor([[0.0, 1.0, 0.0]])
    assert torch.equal(masked_whiten(one, m1) * m1, torch.zeros(1, 3))  # verl raises here
    assert torch.equal(masked_whiten(one, torch.zeros(1, 3)) * 0, torch.zeros(1, 3))  # and here
    # regular case equals the loop reference
    v, m = t([[1.0, 2.0, 4.0], [3.0, 0.0, 9.0]]), t([[1, 1, 1], [1, 0, 0]])
    close(masked_whiten(v, m), ref_masked_whiten(v.tolist(), m.tolist()), 1e-12)
    assert masked_mean(v, torch.zeros_like(v)).item() == 0.0


# ------------------------------------------------------------------------------------------------
# agg_loss
# ------------------------------------------------------------------------------------------------


def test_agg_loss_hand_values_and_empty_rows():
    loss = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = t([[1, 1, 0], [1, 1, 1], [0, 0, 0]])  # last row empty
    expected = {
        "token-mean": (1 + 2 + 4 + 5 + 6) / 5,
        "seq-mean-token-mean": (1.5 + 5.0) / 2,  # empty row excluded (older verl: NaN)
        "seq-mean-token-sum": (3 + 15) / 2,
        "seq-mean-token-sum-norm": (3 + 15) / 2 / 3,
    }
    for mode, value in expected.items():
        out = agg_loss(loss, mask, mode)
        # rel 1e-7: seq-mean-token-mean divides each row by (n + 1e-8), as verl does
        assert out.dim() == 0 and math.isclose(out.item(), value, rel_tol=1e-7), mode
        assert math.isclose(out.item(), ref_agg(loss.tolist(), mask.tolist(), mode), rel_tol=1e-12)
    assert math.isclose(agg_loss(loss, mask, "seq-mean-token-sum-norm", loss_scale_factor=6).item(), 1.5)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_agg_loss_all_empty_is_zero_with_finite_grad(mode):
    loss = torch.full((2, 3), float("nan"))  # even garbage in padded positions must not leak
    loss.requires_grad_(True)
    out = agg_loss(loss, torch.zeros(2, 3), mode)
    out.backward()
    assert out.item() == 0.0 and torch.equal(loss.grad, torch.zeros(2, 3))


def test_agg_loss_global_batch_info_and_errors():
    loss, mask = t([[1.0, 3.0], [5.0, 0.0]]), t([[1, 1], [1, 0]])
    # a DP shard: global 6 tokens over 2 ranks -> local sum 9 / 6 * 2
    assert math.isclose(agg_loss(loss, mask, "token-mean", dp_size=2, batch_num_tokens=6).item(), 3.0)
    assert math.isclose(agg_loss(loss, mask, "seq-mean-token-sum", dp_size=2, global_batch_size=4).item(), 4.5)
    with pytest.raises(ValueError, match="batch_num_tokens"):
        agg_loss(loss, mask, "token-mean", dp_size=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        agg_loss(loss, mask, "seq-mean-token-mean", dp_size=2)
    with pytest.raises(ValueError, match="'nope'"):
        agg_loss(loss, mask, "nope")


# ------------------------------------------------------------------------------------------------
# PPO clip (dual clip)
# ------------------------------------------------------------------------------------------------


def _hand_batch():
    # row 0: A=+1, ratios [1, 1.5, .5]; row 1: A=-1, ratios [5, .5], last token padding
    old = t([[-1.0, -2.0, -0.5], [-3.0, -1.0, 0.0]])
    delta = t([[0.0, math.log(1.5), math.log(0.5)], [math.log(5.0), math.log(0.5), 0.0]])
    adv = t([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    return old, old + delta, adv, mask


def test_ppo_clip_hand_values():
    old, logp, adv, mask = _hand_batch()
    # per-token losses: row0 [-1, -1.2 (clipped), -.5]; row1 [3 (dual clip: min(3, 5)), .8 (clipped)]
    expected = {
        "token-mean": (-1 - 1.2 - 0.5 + 3 + 0.8) / 5,
        "seq-mean-token-mean": (-2.7 / 3 + 3.8 / 2) / 2,
        "seq-mean-token-sum": (-2.7 + 3.8) / 2,
        "seq-mean-token-sum-norm": (-2.7 + 3.8) / 2 / 3,
    }
    for mode, value in expected.items():
        loss, metrics = policy_loss("ppo_clip", logp, old, adv, mask, agg=mode)
        assert math.isclose(loss.item(), value, rel_tol=1e-7, abs_tol=1e-12), mode
        assert math.isclose(metrics["clip_frac"], 2 / 5, rel_tol=1e-6)
        assert math.isclose(metrics["clip_frac_lower"], 1 / 5, rel_tol=1e-6)
        assert math.isclose(metrics["ppo_kl"], -math.log(1.5 * 0.5 * 5 * 0.5) / 5, rel_tol=1e-6)
        assert set(metrics) == {"clip_frac", "clip_frac_lower", "ppo_kl"}
        assert all(type(v) is float for v in metrics.values())


def test_ppo_clip_gradient_flows_through_logp_only():
    old, logp, adv, mask = _hand_batch()
    logp = logp.clone().requires_grad_(True)
    old = old.clone().requires_grad_(True)
    adv = adv.clone().requires_grad_(True)
    loss, _ = ppo_clip_loss(logp, old, adv, mask)
    loss.backward()
    assert old.grad is None and adv.grad is None
    # d/dlogp of -A*ratio is -A*ratio on unclipped tokens, 0 on clipped / dual-clipped / padded ones
    close(logp.grad, [[-1.0 / 5, 0.0, -0.5 / 5], [0.0, 0.0, 0.0]], 1e-12)


def test_dual_clip_on_negative_advantage_with_large_ratio():
    logp = t([[math.log(50.0)]]).requires_grad_(True)  # ratio 50 on a negative-advantage token
    old, adv, mask = t([[0.0]]), t([[-2.0]]), t([[1.0]])
    loss, metrics = ppo_clip_loss(logp, old, adv, mask, clip_ratio_c=3.0)
    loss.backward()
    assert math.isclose(loss.item(), 2.0 * 3.0)  # bounded at -A * c instead of -A * 50 = 100
    assert logp.grad.item() == 0.0
    assert metrics["clip_frac_lower"] == pytest.approx(1.0) and metrics["clip_frac"] == 0.0
    # below c the dual clip is inactive: ratio 2 -> loss -A * 2
    loss2, m2 = ppo_clip_loss(t([[math.log(2.0)]]), old, adv, mask)
    assert math.isclose(loss2.item(), 4.0) and m2["clip_frac_lower"] == 0.0
    with pytest.raises(ValueError, match="clip_ratio_c"):
        ppo_clip_loss(logp, old, adv, mask, clip_ratio_c=1.0)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_ppo_clip_matches_loop_reference(mode):
    g, mask = random_batch(4, B=6, T=5, empty_rows=(2,))
    old = -torch.rand(6, 5, generator=g, dtype=F64) * 3
    logp = old + torch.randn(6, 5, generator=g, dtype=F64) * 0.6
    logp[0, 0] = old[0, 0] + 30.0  # exercises the +-20 clamp
    adv = torch.randn(6, 1, generator=g, dtype=F64).expand(6, 5).contiguous()
    loss, metrics = ppo_clip_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, agg=mode)
    r_loss, r_clip, r_lower, r_kl = ref_ppo(
        logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, 3.0, mode
    )
    assert math.isclose(loss.item(), r_loss, rel_tol=1e-9, abs_tol=1e-12)
    assert metrics["clip_frac"] == pytest.approx(r_clip, rel=1e-6)
    assert metrics["clip_frac_lower"] == pytest.approx(r_lower, rel=1e-6, abs=1e-12)
    assert metrics["ppo_kl"] == pytest.approx(r_kl, rel=1e-6)


@pytest.mark.parametrize("kind", ["ppo_clip", "gspo"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_policy_loss_empty_rows_no_nan(kind, mode):
    mask = t([[1, 1, 0], [0, 0, 0]])
    logp = t([[-1.0, -2.0, 0.0], [0.0, 0.0, 0.0]]).requires_grad_(True)
    old, adv = t([[-1.1, -1.9, 0.0], [0.0, 0.0, 0.0]]), t([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    loss, metrics = policy_loss(kind, logp, old, adv, mask, agg=mode)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(math.isfinite(v) for v in metrics.values())
    loss0, metrics0 = policy_loss(kind, logp, old, adv, torch.zeros(2, 3), agg=mode)
    assert loss0.item() == 0.0 and all(v == 0.0 for v in metrics0.values())


# ------------------------------------------------------------------------------------------------
# GSPO
# ------------------------------------------------------------------------------------------------


def test_gspo_matches_reference_and_gradient():
    g, mask = random_batch(5, B=5, T=4, empty_rows=(1,))
    old = -torch.rand(5, 4, generator=g, dtype=F64)
    logp = (old + torch.randn(5, 4, generator=g, dtype=F64) * 1e-3).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, -0.5, 2.0, -1.5], dtype=F64)[:, None].expand(5, 4).contiguous()
    loss, metrics = policy_loss("gspo", logp, old, adv, mask)  # GSPO defaults: 3e-4/4e-4, seq-mean-token-mean
    r_loss, r_clip = ref_gspo(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 3e-4, 4e-4)
    assert math.isclose(loss.item(), r_loss, rel_tol=1e-9)
    assert metrics["clip_frac"] == pytest.approx(r_clip) and metrics["clip_frac_lower"] == 0.0
    direct, _ = gspo_loss(logp, old, adv, mask)
    assert direct.item() == loss.item()

    loss.backward()
    # Token gradient of the stop-gradient construction: -A_i * s_i / (len_i * n_seqs) if sequence i is
    # not clipped, 0 if it is; padded tokens get 0.
    n_seqs = int((mask.sum(-1) > 0).sum())
    expected = torch.zeros(5, 4, dtype=F64)
    with torch.no_grad():
        for i in range(5):
            n = mask[i].sum()
            if n == 0:
                continue
            s = torch.exp(((logp[i] - old[i]) * mask[i]).sum() / n)
            a = adv[i, 0]
            clipped = bool(-a * torch.clamp(s, 1 - 3e-4, 1 + 4e-4) > -a * s)
            if not clipped:
                expected[i] = -a * s / (n * n_seqs) * mask[i]
    assert torch.allclose(logp.grad, expected, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# KL penalty
# ------------------------------------------------------------------------------------------------


def test_kl_penalty_values_and_clamps():
    logp, ref = t([0.0, -1.0, -0.2, 0.0]), t([0.0, -0.5, -0.4, -30.0])
    d = [0.0, -0.5, 0.2, 30.0]
    close(kl_penalty(logp, ref, "k1"), d, 1e-12)
    close(kl_penalty(logp, ref, "kl"), d, 1e-12)
    close(kl_penalty(logp, ref, "k2"), [0.5 * x * x for x in d], 1e-12)
    close(kl_penalty(logp, ref, "mse"), [0.5 * x * x for x in d], 1e-12)
    # k3 = exp(-d) + d - 1; the last entry: -d = -30 clamps to -20 -> exp(-20) + 20 - 1 = 19 -> clamp 10
    k3 = [math.exp(-x) + x - 1 for x in d[:3]] + [10.0]
    close(kl_penalty(logp, ref, "k3"), k3, 1e-12)
    close(kl_penalty(logp, ref, "low_var_kl"), k3, 1e-12)
    close(kl_penalty(logp, ref, "abs"), [abs(x) for x in d], 1e-12)
    with pytest.raises(ValueError, match="'k4'"):
        kl_penalty(logp, ref, "k4")


# ------------------------------------------------------------------------------------------------
# Registries
# ------------------------------------------------------------------------------------------------


def test_registries_and_lookup_errors():
    assert {"grpo", "drgrpo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"} <= set(ADVANTAGE_ESTIMATORS)
    assert {"ppo_clip", "gspo"} <= set(POLICY_LOSSES)
    assert get_policy_loss_fn("ppo_clip") is ppo_clip_loss
    rewards, gids, mask = t([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]), torch.ones(3, 2, dtype=F64)
    assert torch.equal(get_advantage_fn("drgrpo")(rewards, gids, mask), drgrpo_advantages(rewards, gids, mask))
    assert torch.equal(get_advantage_fn("grpo")(rewards, gids, mask), grpo_advantages(rewards, gids, mask))

    for lookup, name in ((get_advantage_fn, "nope_adv"), (get_policy_loss_fn, "nope_loss")):
        with pytest.raises(ValueError) as err:
            lookup(name)
        msg = str(err.value)
        assert repr(name) in msg and "\n" not in msg
    assert "grpo" in str(pytest.raises(ValueError, get_advantage_fn, "x").value)
    assert "ppo_clip" in str(pytest.raises(ValueError, policy_loss, "x", *([torch.zeros(1, 1)] * 4)).value)

    with pytest.raises(ValueError, match="already registered"):
        alg.register_advantage("grpo")(lambda *a, **k: None)
    with pytest.raises(ValueError, match="already registered"):
        alg.register_policy_loss("ppo_clip")(lambda *a, **k: None)
