"""orchestrator/algorithms.py against verl's own reference code (``verl/trainer/ppo/core_algos.py``, verl 0.9.1).

Unlike tests/test_algorithms.py (hand values and loop transcriptions of verl's formulas), every reference
value here is computed by the installed verl package itself, called with its real signatures and config
objects (``ActorConfig`` for the policy losses, ``AlgoConfig`` for REINFORCE++). Nothing from verl is
vendored or stubbed.

verl is installed in the dev environment as ``pip install --no-deps verl==0.9.1`` (its declared deps pin
transformers<5.11 and pull wandb, peft, ...); the few modules that ``core_algos``' import chain needs and the
project does not already have are pinned in the ``dev`` extra of pyproject.toml (tensordict, pyvers,
codetiming, orjson). The import is done in a fixture, not at collection, so that a run selecting other tests
does not pay verl's ~7 s import (it imports ray, transformers and tensordict).

Conventions used to feed verl:
* verl's outcome estimators take ``token_level_rewards [B, T]`` and sum it over T; verl's reward managers put
  the scalar reward at index ``valid_response_length - 1``, i.e. on the last valid token, and at ``T - 1``
  (index -1) for an empty response. ``token_rewards`` below does exactly that, so verl sees the same
  per-response scores as our ``rewards`` vector, empty responses included.
* verl groups with ``defaultdict`` keyed by ``index[i]``: the index must be a numpy array (as verl's
  ``non_tensor_batch["uid"]``), not a torch tensor (0-d tensors hash by identity). We pass string uids.

Where verl itself is not well-defined we do not compare (our behaviour there is covered in
tests/test_algorithms.py): ``masked_whiten`` over fewer than two valid tokens (verl raises), ``agg_loss``
with every row empty (verl returns 0/0 = NaN in token-mean), and GRPO groups of equal rewards whose float32
``torch.mean`` is inexact (e.g. eight rewards of 0.7: verl's residual 6e-8 divided by ``std + eps = 1e-6``
gives 0.06, ours gives 0). Equal-reward groups with exactly representable means (binary rewards, 0.5, -2)
are compared, and there verl gives exactly 0 as well.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.algorithms import (
    AGG_MODES,
    agg_loss,
    drgrpo_advantages,
    get_advantage_fn,
    grpo_advantages,
    kl_penalty,
    policy_loss,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
)

SEEDS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def verl():
    """verl's ``core_algos`` module. `make setup` installs verl; without it every test here fails (never skips)."""
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as exc:
        pytest.fail(f"verl is not importable ({exc}); `make setup` installs it: pip install --no-deps verl==0.9.1")
    return core_algos


def actor_config(*, clip_low: float, clip_high: float, clip_ratio_c: float = 3.0, global_batch_info=None):
    """A real verl ``ActorConfig`` carrying the fields the policy losses read."""
    from verl.workers.config import ActorConfig

    return ActorConfig(
        strategy="fsdp",  # required fields with no default; not read by the losses
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=clip_low,
        clip_ratio_low=clip_low,
        clip_ratio_high=clip_high,
        clip_ratio_c=clip_ratio_c,
        global_batch_info=dict(global_batch_info or {}),
    )


# ------------------------------------------------------------------------------------------------
# Input generators
# ------------------------------------------------------------------------------------------------


def lengths_mask(lengths, T: int, *, left_pad=None, dtype=torch.float32) -> torch.Tensor:
    """[B, T] mask of contiguous responses; right-padded, or left-padded where ``left_pad[i]``."""
    pos = torch.arange(T)
    rows = []
    for i, n in enumerate(lengths):
        n = int(n)
        row = pos >= T - n if (left_pad is not None and bool(left_pad[i])) else pos < n
        rows.append(row)
    return torch.stack(rows).to(dtype)


def random_mask(g: torch.Generator, B: int, T: int, *, n_empty: int = 2, mixed_padding=True, dtype=torch.float32):
    """Random contiguous-response mask with ``n_empty`` empty rows, one full row and one single-token row."""
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    perm = torch.randperm(B, generator=g)
    lengths[perm[:n_empty]] = 0
    lengths[perm[n_empty]] = T
    lengths[perm[n_empty + 1]] = 1
    left = torch.rand(B, generator=g) < 0.3 if mixed_padding else None
    return lengths_mask(lengths, T, left_pad=left, dtype=dtype)


def random_groups(g: torch.Generator, B: int, sizes=(1, 2, 3, 4, 5, 8)) -> torch.Tensor:
    """Group ids for B responses: random group sizes (singletons included), arbitrary ids, interleaved."""
    ids, gid = [], 0
    while len(ids) < B:
        size = sizes[int(torch.randint(len(sizes), (1,), generator=g))]
        gid += int(torch.randint(1, 1000, (1,), generator=g))  # not 0..G-1
        ids += [gid] * size
    ids = torch.tensor(ids[:B])
    return ids[torch.randperm(B, generator=g)]


def uid_index(group_ids: torch.Tensor) -> np.ndarray:
    """verl's index: a numpy object array of string uids (like ``non_tensor_batch["uid"]``)."""
    return np.array([f"uid-{int(i)}" for i in group_ids], dtype=object)


def token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's ``token_level_rewards``: the reward on the last valid token (index -1 for an empty row)."""
    T = mask.shape[-1]
    pos = torch.arange(T)
    last = torch.where(mask.bool(), pos, torch.full_like(pos, -1)).amax(dim=-1)
    last = torch.where(last < 0, torch.full_like(last, T - 1), last)  # verl: valid_response_length - 1 = -1
    out = torch.zeros(mask.shape, dtype=rewards.dtype)
    out[torch.arange(len(rewards)), last] = rewards
    return out


def random_rewards(g: torch.Generator, B: int, kind: str) -> torch.Tensor:
    if kind == "binary":
        return (torch.rand(B, generator=g) < 0.5).float()
    if kind == "graded":  # a few discrete levels, as partial-credit verifiers give
        return torch.randint(0, 5, (B,), generator=g).float() / 4
    return torch.randn(B, generator=g) * 2 + 0.5


def assert_close(ours: torch.Tensor, ref: torch.Tensor, *, atol: float, rtol: float = 0.0, what: str = ""):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs verl {tuple(ref.shape)}"
    assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype} vs verl {ref.dtype}"
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol, msg=lambda m: f"{what} differs from verl: {m}")


# ------------------------------------------------------------------------------------------------
# GRPO / Dr.GRPO
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["normal", "binary", "graded"])
@pytest.mark.parametrize("norm", [True, False])
def test_grpo_matches_verl(verl, seed, kind, norm):
    g = torch.Generator().manual_seed(seed)
    B, T = 40, 7
    mask = random_mask(g, B, T, n_empty=3)
    gids = random_groups(g, B)
    rewards = random_rewards(g, B, kind)
    eps = 1e-6
    ref, ref_returns = verl.compute_grpo_outcome_advantage(
        token_rewards(rewards, mask), mask, uid_index(gids), epsilon=eps, norm_adv_by_std_in_grpo=norm
    )
    ours = grpo_advantages(rewards, gids, mask, eps=eps, scale_by_std=norm)
    # verl rounds (r - mean) / (std + eps) in float32; we compute the statistics in float64.
    assert_close(ours, ref, atol=1e-5, rtol=1e-6, what="grpo")
    assert torch.equal(ref, ref_returns)
    if not norm:
        assert_close(drgrpo_advantages(rewards, gids, mask), ref, atol=1e-5, rtol=1e-6, what="drgrpo")
    # The registry adapters are the same computation.
    name = "grpo" if norm else "drgrpo"
    assert torch.equal(get_advantage_fn(name)(rewards, gids, mask, eps=eps), ours)


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_edge_cases_match_verl(verl, norm):
    T = 5
    # Groups: all singletons; all-equal groups with exact float32 means; a group with empty responses;
    # a group of two; an int64 mask (verl's response_mask is the int attention mask).
    gids = torch.tensor([10, 11, 12, 20, 20, 20, 20, 21, 21, 21, 22, 22, 22, 22, 22, 22, 22, 22, 30, 30, 30, 40, 40])
    rewards = torch.tensor(
        [0.3, -1.7, 1.0, 0.5, 0.5, 0.5, 0.5, -2.0, -2.0, -2.0] + [1.0] * 8 + [0.2, 0.9, -0.4, 0.0, 1.0]
    )
    lengths = torch.tensor([5, 1, 0, 5, 3, 2, 1, 4, 4, 4, 5, 4, 3, 2, 1, 1, 2, 3, 0, 0, 3, 1, 5])
    for mask in (lengths_mask(lengths, T), lengths_mask(lengths, T, dtype=torch.int64)):
        ref, _ = verl.compute_grpo_outcome_advantage(
            token_rewards(rewards, mask), mask, uid_index(gids), epsilon=1e-6, norm_adv_by_std_in_grpo=norm
        )
        ours = grpo_advantages(rewards, gids, mask, eps=1e-6, scale_by_std=norm)
        assert_close(ours, ref, atol=1e-5, rtol=1e-6, what="grpo edge cases")
        # Equal-reward groups: exactly 0 in both.
        assert torch.equal(ours[3:18], torch.zeros(15, T)) and torch.equal(ref[3:18], torch.zeros(15, T))
        # Singletons: r / (1 + eps) (or r) on their valid tokens.
        assert torch.equal(ours[:3] != 0, mask[:3].bool() & (rewards[:3, None] != 0))


def test_grpo_larger_batch_matches_verl_vectorized(verl):
    """verl also ships a vectorised GRPO (``group_mean_std``); both of its versions agree with ours."""
    g = torch.Generator().manual_seed(7)
    B, T = 256, 9
    mask = random_mask(g, B, T, n_empty=5)
    gids = random_groups(g, B)
    rewards = random_rewards(g, B, "normal")
    ours = grpo_advantages(rewards, gids, mask)
    ref_loop, _ = verl.compute_grpo_outcome_advantage(token_rewards(rewards, mask), mask, uid_index(gids))
    ref_vec, _ = verl.compute_grpo_vectorized_outcome_advantage(token_rewards(rewards, mask), mask, gids.numpy())
    assert_close(ours, ref_loop, atol=1e-5, rtol=1e-6, what="grpo (loop)")
    assert_close(ours, ref_vec, atol=1e-5, rtol=1e-6, what="grpo (vectorized)")


# ------------------------------------------------------------------------------------------------
# REINFORCE++ and REINFORCE++-baseline
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma", [1.0, 0.95, 0.5, 0.0])
def test_reinforce_pp_matches_verl(verl, seed, gamma):
    from verl.trainer.config import AlgoConfig

    g = torch.Generator().manual_seed(seed)
    B, T = 24, 8
    mask = random_mask(g, B, T, n_empty=2)
    rewards = random_rewards(g, B, "normal")
    ref, _ = verl.compute_reinforce_plus_plus_outcome_advantage(
        token_rewards(rewards, mask), mask, config=AlgoConfig(gamma=gamma)
    )
    ours = reinforce_pp_advantages(rewards, mask, gamma=gamma)
    assert_close(ours, ref, atol=2e-6, rtol=1e-6, what=f"reinforce++ (gamma={gamma})")
    assert torch.equal(get_advantage_fn("reinforce_plus_plus")(rewards, None, mask, gamma=gamma), ours)


def test_reinforce_pp_edge_cases_match_verl(verl):
    from verl.trainer.config import AlgoConfig

    T = 6
    # Single-token responses, full rows, left padding, empty rows, and only two valid tokens in all.
    cases = [
        (torch.tensor([1.0, -1.0, 0.0]), torch.tensor([1, 1, 0]), None),
        (torch.tensor([2.0, 0.5, -1.0, 3.0]), torch.tensor([6, 1, 0, 6]), torch.tensor([0, 1, 0, 1])),
        (torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([3, 5, 2, 6]), torch.tensor([1, 1, 0, 0])),
    ]
    for rewards, lengths, left in cases:
        mask = lengths_mask(lengths, T, left_pad=left)
        for gamma in (1.0, 0.9):
            ref, _ = verl.compute_reinforce_plus_plus_outcome_advantage(
                token_rewards(rewards, mask), mask, config=AlgoConfig(gamma=gamma)
            )
            ours = reinforce_pp_advantages(rewards, mask, gamma=gamma)
            assert_close(ours, ref, atol=2e-6, rtol=1e-6, what=f"reinforce++ edge (lengths={lengths.tolist()})")


def test_reinforce_pp_masked_holes_match_verl(verl):
    """Multi-turn masks with holes inside a response (tool/observation tokens masked out)."""
    from verl.trainer.config import AlgoConfig

    mask = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    rewards = torch.tensor([1.0, -0.5, 0.3])
    ref, _ = verl.compute_reinforce_plus_plus_outcome_advantage(
        token_rewards(rewards, mask), mask, config=AlgoConfig(gamma=1.0)
    )
    assert_close(reinforce_pp_advantages(rewards, mask, gamma=1.0), ref, atol=2e-6, what="reinforce++ holes")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["normal", "binary", "graded"])
def test_reinforce_pp_baseline_matches_verl(verl, seed, kind):
    g = torch.Generator().manual_seed(seed)
    B, T = 40, 7
    mask = random_mask(g, B, T, n_empty=3)
    gids = random_groups(g, B)
    rewards = random_rewards(g, B, kind)
    ref, ref_returns = verl.compute_reinforce_plus_plus_baseline_outcome_advantage(
        token_rewards(rewards, mask), mask, uid_index(gids), epsilon=1e-6
    )
    ours = reinforce_pp_baseline_advantages(rewards, gids, mask)
    # Group means: float32 in verl, float64 here (observed max difference ~5e-7 after the whitening).
    assert_close(ours, ref, atol=2e-6, rtol=1e-6, what="reinforce++-baseline")
    assert torch.equal(ref, ref_returns)
    assert torch.equal(get_advantage_fn("reinforce_plus_plus_baseline")(rewards, gids, mask), ours)


def test_reinforce_pp_baseline_edge_cases_match_verl(verl):
    T = 4
    # Singletons (mean 0), an all-equal group, a group with an empty member, an int64 mask.
    gids = torch.tensor([1, 2, 3, 3, 3, 4, 4, 5, 5, 5])
    rewards = torch.tensor([0.7, -0.2, 1.0, 1.0, 1.0, 0.0, 1.0, 0.25, -0.5, 2.0])
    lengths = torch.tensor([4, 1, 3, 4, 2, 0, 3, 4, 1, 2])
    for mask in (lengths_mask(lengths, T), lengths_mask(lengths, T, dtype=torch.int64)):
        ref, _ = verl.compute_reinforce_plus_plus_baseline_outcome_advantage(
            token_rewards(rewards, mask), mask, uid_index(gids)
        )
        ours = reinforce_pp_baseline_advantages(rewards, gids, mask)
        assert_close(ours, ref, atol=2e-6, rtol=1e-6, what="reinforce++-baseline edge cases")


# ------------------------------------------------------------------------------------------------
# Loss aggregation
# ------------------------------------------------------------------------------------------------


def _agg_kwargs_cases(mask: torch.Tensor):
    n_tok = float(mask.sum())
    n_seq = float((mask.sum(-1) > 0).sum())
    return [
        {},
        {"loss_scale_factor": 3},
        # data parallel: this rank's share of a global batch 4x larger
        {"dp_size": 4, "batch_num_tokens": 4 * n_tok + 5, "global_batch_size": 4 * n_seq + 1},
        {"dp_size": 2, "batch_num_tokens": 2 * n_tok, "global_batch_size": 2 * n_seq, "loss_scale_factor": 11},
    ]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", AGG_MODES)
def test_agg_loss_matches_verl_value_and_grad(verl, seed, mode):
    g = torch.Generator().manual_seed(seed)
    B, T = 12, 9
    mask = random_mask(g, B, T, n_empty=2)
    base = torch.randn(B, T, generator=g)
    for kwargs in _agg_kwargs_cases(mask):
        ours_in = base.clone().requires_grad_(True)
        ref_in = base.clone().requires_grad_(True)
        ours = agg_loss(ours_in, mask, mode, **kwargs)
        ref = verl.agg_loss(ref_in, mask, mode, **kwargs)
        what = f"agg_loss({mode}, {kwargs})"
        assert_close(ours, ref, atol=1e-6, rtol=1e-6, what=what)
        ours.backward()
        ref.backward()
        assert_close(ours_in.grad, ref_in.grad, atol=1e-7, rtol=1e-6, what=what + " grad")


# ------------------------------------------------------------------------------------------------
# Policy losses
# ------------------------------------------------------------------------------------------------

METRIC_KEYS = {"clip_frac": "actor/pg_clipfrac", "clip_frac_lower": "actor/pg_clipfrac_lower", "ppo_kl": "actor/ppo_kl"}


def policy_inputs(g: torch.Generator, B: int, T: int, *, spread: float, n_empty: int = 2):
    """logp / old_logp / advantages / mask with log-ratios around ``spread`` (some beyond the +-20 clamp)."""
    mask = random_mask(g, B, T, n_empty=n_empty)
    old_logp = -torch.rand(B, T, generator=g) * 5
    logp = old_logp + torch.randn(B, T, generator=g) * spread
    # A few extreme log-ratios: both signs past the +-20 clamp and ratios past the dual-clip bound.
    extreme = torch.rand(B, T, generator=g) < 0.05
    logp = torch.where(extreme, old_logp + torch.randn(B, T, generator=g) * 25, logp)
    adv = torch.randn(B, T, generator=g) * 1.5 * mask
    return logp, old_logp, adv, mask


def compare_policy_loss(verl_fn, kind, logp, old_logp, adv, mask, *, clip_low, clip_high, agg, clip_ratio_c, gbi):
    ours_logp = logp.clone().requires_grad_(True)
    ref_logp = logp.clone().requires_grad_(True)
    ours, ours_metrics = policy_loss(
        kind,
        ours_logp,
        old_logp,
        adv,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        agg=agg,
        clip_ratio_c=clip_ratio_c,
        agg_kwargs=gbi,
    )
    cfg = actor_config(clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c, global_batch_info=gbi)
    ref, ref_metrics = verl_fn(old_logp, ref_logp, adv, mask, loss_agg_mode=agg, config=cfg)
    what = f"{kind}(agg={agg}, clip=({clip_low}, {clip_high}), c={clip_ratio_c}, {gbi})"
    assert_close(ours, ref, atol=1e-6, rtol=1e-6, what=what)
    for ours_key, verl_key in METRIC_KEYS.items():
        assert ours_metrics[ours_key] == pytest.approx(ref_metrics[verl_key], abs=1e-6, rel=1e-6), (
            f"{what}: metric {ours_key}={ours_metrics[ours_key]} vs verl {verl_key}={ref_metrics[verl_key]}"
        )
    ours.backward()
    ref.backward()
    assert_close(ours_logp.grad, ref_logp.grad, atol=1e-6, rtol=1e-6, what=what + " d/dlogp")
    return ours_metrics


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_ppo_clip_matches_verl_vanilla(verl, seed, agg):
    g = torch.Generator().manual_seed(seed)
    logp, old_logp, adv, mask = policy_inputs(g, 16, 10, spread=0.4)
    n_tok, n_seq = float(mask.sum()), float((mask.sum(-1) > 0).sum())
    seen_clip = seen_dual = 0.0
    for clip_low, clip_high, clip_ratio_c, gbi in [
        (0.2, 0.2, 3.0, {}),
        (0.2, 0.28, 3.0, {}),  # DAPO clip-higher
        (0.1, 0.3, 1.5, {"dp_size": 2, "batch_num_tokens": 2 * n_tok, "global_batch_size": 2 * n_seq}),
    ]:
        metrics = compare_policy_loss(
            verl.compute_policy_loss_vanilla,
            "ppo_clip",
            logp,
            old_logp,
            adv,
            mask,
            clip_low=clip_low,
            clip_high=clip_high,
            agg=agg,
            clip_ratio_c=clip_ratio_c,
            gbi=gbi,
        )
        seen_clip = max(seen_clip, metrics["clip_frac"])
        seen_dual = max(seen_dual, metrics["clip_frac_lower"])
    # The inputs exercise both clips, so the metric comparison is not vacuous.
    assert seen_clip > 0 and seen_dual > 0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_gspo_matches_verl(verl, seed, agg):
    g = torch.Generator().manual_seed(seed)
    seen_clip = 0.0
    # Small per-token log-ratios so the sequence ratio sits around GSPO's 3e-4 / 4e-4 clip range; then a
    # larger spread (with the extreme tokens of policy_inputs, some sequence ratios hit the exp clamp at 10).
    for spread, clip_low, clip_high in [(1e-3, 3e-4, 4e-4), (0.5, 0.2, 0.2)]:
        logp, old_logp, adv, mask = policy_inputs(g, 16, 10, spread=spread)
        if spread < 0.1:  # keep the tiny spread free of extremes
            logp = old_logp + (logp - old_logp).clamp(-5 * spread, 5 * spread)
        metrics = compare_policy_loss(
            verl.compute_policy_loss_gspo,
            "gspo",
            logp,
            old_logp,
            adv,
            mask,
            clip_low=clip_low,
            clip_high=clip_high,
            agg=agg,
            clip_ratio_c=3.0,
            gbi={},
        )
        seen_clip = max(seen_clip, metrics["clip_frac"])
    assert seen_clip > 0


def test_policy_losses_without_empty_rows_match_verl(verl):
    """A batch with no empty row and no extreme ratio: the plain case, every mode, both losses."""
    g = torch.Generator().manual_seed(11)
    logp, old_logp, adv, mask = policy_inputs(g, 8, 6, spread=0.3, n_empty=0)
    for agg in AGG_MODES:
        for kind, fn, clips in (
            ("ppo_clip", verl.compute_policy_loss_vanilla, (0.2, 0.2)),
            ("gspo", verl.compute_policy_loss_gspo, (3e-4, 4e-4)),
        ):
            compare_policy_loss(
                fn, kind, logp, old_logp, adv, mask, clip_low=clips[0], clip_high=clips[1], agg=agg,
                clip_ratio_c=3.0, gbi={},
            )  # fmt: skip


def test_policy_loss_names_match_verl_registry(verl):
    """Our ``ppo_clip`` is verl's ``vanilla``; ``gspo`` is ``gspo`` (the functions verl's actor dispatches to)."""
    assert verl.get_policy_loss_fn("vanilla") is verl.compute_policy_loss_vanilla
    assert verl.get_policy_loss_fn("gspo") is verl.compute_policy_loss_gspo
    assert verl.get_adv_estimator_fn("grpo") is verl.compute_grpo_outcome_advantage
    assert verl.get_adv_estimator_fn("reinforce_plus_plus") is verl.compute_reinforce_plus_plus_outcome_advantage
    assert (
        verl.get_adv_estimator_fn("reinforce_plus_plus_baseline")
        is verl.compute_reinforce_plus_plus_baseline_outcome_advantage
    )


# ------------------------------------------------------------------------------------------------
# KL penalty
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["k1", "kl", "k2", "mse", "k3", "low_var_kl", "abs"])
def test_kl_penalty_matches_verl_value_and_grad(verl, seed, kind):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 50
    ref_logp = -torch.rand(B, T, generator=g) * 8
    # Differences from tiny to past both of k3's clamps (|d| > 20 and kld > 10).
    scale = torch.tensor([1e-3, 0.1, 1.0, 5.0, 15.0, 30.0])[:, None]
    base = ref_logp + torch.randn(B, T, generator=g) * scale
    ours_in = base.clone().requires_grad_(True)
    ref_in = base.clone().requires_grad_(True)
    ours = kl_penalty(ours_in, ref_logp, kind)
    ref = verl.kl_penalty(ref_in, ref_logp, kind)
    assert_close(ours, ref, atol=1e-6, rtol=1e-6, what=f"kl_penalty({kind})")
    w = torch.randn(B, T, generator=g)  # a random cotangent, so every element's gradient is checked
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    assert_close(ours_in.grad, ref_in.grad, atol=1e-6, rtol=1e-6, what=f"kl_penalty({kind}) grad")
