"""
Core RLVR algorithms: advantage estimators, policy losses, loss aggregation and KL penalties.

Pure torch on purpose (no Ray / vLLM / DeepSpeed imports): the learner actors, the offline tools and the
tests all import this module, and it must run on a CPU-only machine.

Every function reproduces the numerics of verl's ``verl/trainer/ppo/core_algos.py`` and of the masked
reductions in ``verl/utils/torch_functional.py`` (recent verl, with ``masked_mean`` dividing by
``mask.sum() + 1e-8`` and ``agg_loss`` excluding fully masked sequences). The code is our own; the
formulas are verl's. Where verl returns NaN, raises, or depends on float rounding in a degenerate case,
we return a finite, documented value instead; those places are:

* ``masked_var`` / ``masked_whiten`` with fewer than two valid elements: verl raises ``ValueError``; we use
  a variance of 0, so the single valid element whitens to 0 (and an all-masked input to 0 after masking).
* ``agg_loss`` when every row is empty: verl divides 0 by 0 (NaN); we return 0 (with a zero gradient).
* Group statistics (GRPO, RF++-baseline) are computed in float64 and cast back. This agrees with verl's
  float32 arithmetic up to verl's own rounding (its ``r - mean`` cancels when a group's rewards are close:
  rewards 0.9330 / 0.9361 give -0.7067905 here, the exact value, and -0.7068039 in verl); for a group whose
  rewards are all equal it gives exactly 0, where verl's float32 ``torch.mean`` can leave a residual that the
  division by ``std + eps = eps`` (or RF++-baseline's global whitening) then amplifies.
* ``gspo``: defaults to ``seq-mean-token-mean`` aggregation (as the GSPO paper and verl's recipes do);
  an explicit ``agg`` is honoured, as verl 0.9.1 honours its ``loss_agg_mode``.
* ``agg_loss("seq-mean-token-sum-norm")`` follows the *latest* verl: mean over non-empty sequences of the
  token sum, divided by ``loss_scale_factor`` (default ``T``). Older verl divided the *batch sum* by ``T``
  (no 1/B factor); the two differ by a factor of B.

Conventions (as in verl): ``B`` is the batch of responses, ``T`` the padded response length, shapes are written
``dtype[dims]`` (as everywhere in the project), and ``response_mask`` is ``float[B, T]`` with 1 on the response
tokens that count (0 on padding; a row of zeros is an empty response). Advantages are constants of the batch
(computed under ``torch.no_grad``); the policy losses differentiate through ``logp`` only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "POLICY_LOSSES",
    "AGG_MODES",
    "KL_PENALTY_KINDS",
    "register_advantage",
    "register_policy_loss",
    "get_advantage_fn",
    "get_policy_loss_fn",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "grpo_advantages",
    "drgrpo_advantages",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "agg_loss",
    "policy_loss",
    "ppo_clip_loss",
    "gspo_loss",
    "kl_penalty",
]

Tensor = torch.Tensor

# --------------------------------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------------------------------

# An advantage estimator, as stored in the registry, has one uniform signature so the learner can call
# any of them the same way:
#     fn(rewards: float[B], group_ids: long[B], response_mask: float[B, T], *, eps=1e-6, gamma=1.0) -> float[B, T]
# Estimators ignore the options (and group_ids) they do not use.
AdvantageFn = Callable[..., Tensor]

# A policy loss, as stored in the registry:
#     fn(logp, old_logp, advantages, response_mask, *, clip_low, clip_high, agg, clip_ratio_c, agg_kwargs)
#       -> (scalar loss, {"clip_frac": float, "clip_frac_lower": float, "ppo_kl": float})
PolicyLossFn = Callable[..., tuple[Tensor, dict[str, float]]]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {}
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def _register(registry: dict[str, Callable], kind: str, name: str) -> Callable[[Callable], Callable]:
    def decorator(fn: Callable) -> Callable:
        # Refuse silent replacement: two modules registering the same name is a bug, not an override.
        if name in registry and registry[name] is not fn:
            raise ValueError(f"{kind} {name!r} is already registered to {registry[name]!r}")
        registry[name] = fn
        return fn

    return decorator


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator registering an advantage estimator under ``name`` in ``ADVANTAGE_ESTIMATORS``.

    The function must take ``(rewards, group_ids, response_mask, *, eps, gamma)`` and return ``float[B, T]``.
    """
    return _register(ADVANTAGE_ESTIMATORS, "advantage estimator", name)


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator registering a policy loss under ``name`` in ``POLICY_LOSSES``.

    The function must take ``(logp, old_logp, advantages, response_mask, *, clip_low, clip_high, agg,
    clip_ratio_c, agg_kwargs)`` and return ``(loss, metrics)``.
    """
    return _register(POLICY_LOSSES, "policy loss", name)


def get_advantage_fn(name: str) -> AdvantageFn:
    """Look up a registered advantage estimator.

    Raises:
        ValueError: ``name`` is not registered (the message lists the known names).
    """
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; known: {', '.join(sorted(ADVANTAGE_ESTIMATORS))}"
        ) from None


def get_policy_loss_fn(name: str) -> PolicyLossFn:
    """Look up a registered policy loss.

    Raises:
        ValueError: ``name`` is not registered (the message lists the known names).
    """
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown policy loss {name!r}; known: {', '.join(sorted(POLICY_LOSSES))}") from None


# --------------------------------------------------------------------------------------------------
# Masked reductions (verl/utils/torch_functional.py semantics)
# --------------------------------------------------------------------------------------------------


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` weighted by ``mask``.

    Args:
        values: float[...] of any shape, e.g. float[B, T].
        mask: bool[...] or float[...], the shape of ``values``.
        dim: `(int, optional)` dimension to reduce; None reduces everything.

    Returns:
        float[...]: ``values`` reduced over ``dim``.
    """
    # Select before multiplying: padded positions may hold inf/NaN (e.g. log(0)), and 0 * nan = nan.
    valid = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    weighted = valid * mask
    return weighted.sum() if dim is None else weighted.sum(dim=dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over the elements selected by ``mask``; 0 where nothing is selected.

    Same as verl: ``masked_sum / (mask.sum() + 1e-8)``. The 1e-8 is invisible in float32 for counts >= 1
    and turns 0/0 into 0 for an empty selection.

    Args:
        values: float[...] of any shape, e.g. float[B, T].
        mask: bool[...] or float[...], the shape of ``values``.
        dim: `(int, optional)` dimension to reduce; None reduces everything.

    Returns:
        float[...]: ``values`` reduced over ``dim``.
    """
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(values, mask, dim) / (count + 1e-8)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``values`` over all elements selected by ``mask`` (a scalar).

    With ``unbiased`` the Bessel correction ``n / (n - 1)`` is applied, as in verl. verl raises when
    ``n <= 1``; here the variance is 0 for ``n <= 1`` (the biased variance of at most one element is 0,
    and we keep it), so a whitening over a one-token batch yields 0 instead of crashing a training step.
    No ``.item()``: this stays free of host-device syncs.

    Args:
        values: float[...] of any shape, e.g. float[B, T].
        mask: float[...], the shape of ``values``.
        unbiased: apply Bessel's correction.

    Returns:
        float[] (0-d) variance.
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        # n <= 1: divide by 1 instead of n - 1 (the variance is 0 there anyway).
        denom = torch.where(n > 1, n - 1, torch.ones_like(n))
        variance = variance * (n / denom)
    return variance


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Whiten ``values`` with the mean and unbiased variance of the elements selected by ``mask``.

    ``(values - mean) * rsqrt(var + 1e-8)``, plus ``mean`` again when ``shift_mean`` is False (verl).
    The statistics are global over every selected element of the tensor (all rows together). Masked-out
    positions are transformed too and are not zeroed; callers multiply by the mask.

    Args:
        values: float[B, T].
        mask: float[B, T].
        shift_mean: if False, keep the original mean.

    Returns:
        float[B, T].
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


# --------------------------------------------------------------------------------------------------
# Advantage estimators (outcome rewards: one scalar per response)
# --------------------------------------------------------------------------------------------------


def _check_outcome_inputs(rewards: Tensor, response_mask: Tensor) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if response_mask.dim() != 2 or response_mask.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"response_mask must be [B, T] with B={rewards.shape[0]}, got shape {tuple(response_mask.shape)}"
        )


def _out_dtype(rewards: Tensor) -> torch.dtype:
    return rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()


def _group_mean_std(rewards: Tensor, group_ids: Any) -> tuple[Tensor, Tensor]:
    """Per-sample mean and std of the sample's group, with verl's GRPO conventions, in float64.

    A group of one has mean 0 and std 1 (verl's choice: the lone reward is kept as its own advantage);
    larger groups use ``torch.mean`` and the unbiased ``torch.std``. Vectorised with ``index_add_`` over
    ``torch.unique`` inverse indices; group ids may be any integers, not necessarily 0..G-1.

    float64 so that a group of equal rewards has a mean exactly equal to them (n*x/n is exact in
    float64 for float32 x), hence centred rewards and std exactly 0 rather than rounding residue.

    Returns:
        (mean, std): float64[B] each.
    """
    ids = torch.as_tensor(group_ids, device=rewards.device)
    if ids.dim() != 1 or ids.shape[0] != rewards.shape[0]:
        raise ValueError(f"group_ids must be 1-D [B] with B={rewards.shape[0]}, got shape {tuple(ids.shape)}")
    x = rewards.detach().to(torch.float64)
    unique_ids, inverse = torch.unique(ids, return_inverse=True)
    zeros = torch.zeros(unique_ids.numel(), dtype=torch.float64, device=x.device)
    count = zeros.index_add(0, inverse, torch.ones_like(x))
    mean_g = zeros.index_add(0, inverse, x) / count
    centred = x - mean_g[inverse]
    sq_sum = zeros.index_add(0, inverse, centred * centred)
    # clamp only keeps singletons from computing 0/0; their std is replaced below.
    std_g = torch.sqrt(sq_sum / (count - 1).clamp(min=1))
    singleton = count[inverse] == 1
    mean = torch.where(singleton, torch.zeros_like(x), mean_g[inverse])
    std = torch.where(singleton, torch.ones_like(x), std_g[inverse])
    return mean, std


@torch.no_grad()
def grpo_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    response_mask: Tensor,
    *,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> Tensor:
    """GRPO outcome advantage (verl ``compute_grpo_outcome_advantage``).

    For each response ``i`` in group ``g``: ``A_i = (r_i - mean_g) / (std_g + eps)``, or ``r_i - mean_g``
    when ``scale_by_std`` is False (Dr.GRPO, https://arxiv.org/abs/2503.20783). ``std_g`` is the unbiased
    ``torch.std``. A group of one has ``mean = 0, std = 1`` (so ``A = r / (1 + eps)``); a group of equal
    rewards gets ``A = 0``. The scalar is broadcast over the response tokens and masked.

    Args:
        rewards: float[B], one scalar reward per response.
        group_ids: long[B], integer id of each response's prompt group.
        response_mask: float[B, T].
        eps: added to the std to avoid division by zero.
        scale_by_std: divide by the group std (GRPO) or not (Dr.GRPO).

    Returns:
        advantages: float[B, T], dtype of ``rewards``.
    """
    _check_outcome_inputs(rewards, response_mask)
    dtype = _out_dtype(rewards)
    mean, std = _group_mean_std(rewards, group_ids)
    centred = rewards.detach().to(torch.float64) - mean
    scalars = centred / (std + eps) if scale_by_std else centred
    return scalars.to(dtype).unsqueeze(-1) * response_mask.to(dtype)


def drgrpo_advantages(rewards: Tensor, group_ids: Tensor, response_mask: Tensor, *, eps: float = 1e-6) -> Tensor:
    """Dr.GRPO advantage: GRPO without the std scaling, ``A_i = r_i - mean_g``.

    Args:
        rewards: float[B].
        group_ids: long[B].
        response_mask: float[B, T].
        eps: unused (no division); accepted for signature parity with GRPO.

    Returns:
        advantages: float[B, T].
    """
    return grpo_advantages(rewards, group_ids, response_mask, eps=eps, scale_by_std=False)


@torch.no_grad()
def reinforce_pp_advantages(rewards: Tensor, response_mask: Tensor, *, gamma: float = 1.0) -> Tensor:
    """REINFORCE++ advantage (verl 0.9.1 ``compute_reinforce_plus_plus_outcome_advantage``).

    The reward of each response is placed on its last valid token (as verl's reward managers do), the
    discounted return-to-go is taken with verl's recurrence, in which masked positions (observation tokens
    inside a response) get return 0 and carry the running return through unchanged, so ``gamma`` applies
    once per *valid* token; the returns are whitened over all valid tokens of the batch (``masked_whiten``),
    then masked.

    Vectorised: with a single reward ``r`` at the last valid token ``L``, the recurrence has the closed
    form ``ret[t] = r * gamma**(#valid tokens in (t, L]) * mask[t]`` for ``t <= L`` and 0 after ``L``,
    so there is no Python loop over the response length. Empty rows get advantage 0.

    Args:
        rewards: float[B].
        response_mask: float[B, T].
        gamma: discount factor.

    Returns:
        advantages: float[B, T].
    """
    _check_outcome_inputs(rewards, response_mask)
    dtype = _out_dtype(rewards)
    mask = response_mask.to(dtype)
    # Every valid token is at or before the last valid one, so suffix sums of the mask count the valid
    # tokens in [t, L]; minus the token itself gives the discount exponent.
    valid_from_t = torch.flip(torch.cumsum(torch.flip(mask, dims=[-1]), dim=-1), dims=[-1])
    exponent = (valid_from_t - mask).clamp(min=0)
    discount = torch.pow(torch.tensor(gamma, dtype=dtype, device=mask.device), exponent)
    returns = rewards.detach().to(dtype).unsqueeze(-1) * discount * mask
    return masked_whiten(returns, mask) * mask


@torch.no_grad()
def reinforce_pp_baseline_advantages(
    rewards: Tensor, group_ids: Tensor, response_mask: Tensor, *, eps: float = 1e-6
) -> Tensor:
    """REINFORCE++-baseline advantage (verl ``compute_reinforce_plus_plus_baseline_outcome_advantage``).

    Subtract the group mean reward (0 for a group of one), broadcast over the response tokens, then whiten
    globally over all valid tokens of the batch (so longer responses weigh more in the statistics, as in
    verl) and mask.

    Args:
        rewards: float[B].
        group_ids: long[B].
        response_mask: float[B, T].
        eps: unused, as in verl (the whitening uses its own 1e-8); kept for signature parity.

    Returns:
        advantages: float[B, T].
    """
    _check_outcome_inputs(rewards, response_mask)
    dtype = _out_dtype(rewards)
    mask = response_mask.to(dtype)
    mean, _ = _group_mean_std(rewards, group_ids)
    centred = (rewards.detach().to(torch.float64) - mean).to(dtype)
    scores = centred.unsqueeze(-1) * mask
    return masked_whiten(scores, mask) * mask


# Registry adapters: one calling convention for every estimator (see AdvantageFn above).


@register_advantage("grpo")
def _grpo_estimator(rewards, group_ids, response_mask, *, eps: float = 1e-6, gamma: float = 1.0) -> Tensor:
    return grpo_advantages(rewards, group_ids, response_mask, eps=eps, scale_by_std=True)


@register_advantage("drgrpo")
def _drgrpo_estimator(rewards, group_ids, response_mask, *, eps: float = 1e-6, gamma: float = 1.0) -> Tensor:
    return grpo_advantages(rewards, group_ids, response_mask, eps=eps, scale_by_std=False)


@register_advantage("reinforce_plus_plus")
def _rfpp_estimator(rewards, group_ids, response_mask, *, eps: float = 1e-6, gamma: float = 1.0) -> Tensor:
    return reinforce_pp_advantages(rewards, response_mask, gamma=gamma)


@register_advantage("reinforce_plus_plus_baseline")
def _rfpp_baseline_estimator(rewards, group_ids, response_mask, *, eps: float = 1e-6, gamma: float = 1.0) -> Tensor:
    return reinforce_pp_baseline_advantages(rewards, group_ids, response_mask, eps=eps)


# --------------------------------------------------------------------------------------------------
# Loss aggregation
# --------------------------------------------------------------------------------------------------

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _safe_div(num: Tensor, den: Any) -> Tensor:
    # A zero count only happens when every row is empty, and then num is 0 too: return 0, not 0/0.
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    return num / den.clamp(min=1e-8)


def agg_loss(
    loss_mat: Tensor,
    loss_mask: Tensor,
    agg: str,
    *,
    dp_size: int = 1,
    batch_num_tokens: float | None = None,
    global_batch_size: float | None = None,
    loss_scale_factor: float | None = None,
) -> Tensor:
    """Aggregate a per-token loss matrix into a scalar (verl ``agg_loss``).

    Modes:
        * ``token-mean``: sum over valid tokens / number of valid tokens.
        * ``seq-mean-token-sum``: per-sequence token sum, averaged over non-empty sequences.
        * ``seq-mean-token-mean``: per-sequence token mean (``/ (n_i + 1e-8)``), averaged over non-empty
          sequences. Fully masked rows are excluded from the average (older verl divided by 0 there: NaN).
        * ``seq-mean-token-sum-norm``: ``seq-mean-token-sum / loss_scale_factor`` (default: ``T``, the
          padded length), the constant-normaliser loss of Dr.GRPO.

    For data parallelism (verl's ``global_batch_info``): pass the *global* ``batch_num_tokens`` (token
    mode) or ``global_batch_size`` (sequence modes) and ``dp_size``; the local sum is divided by the
    global count and multiplied by ``dp_size`` because the DP all-reduce averages gradients.

    Args:
        loss_mat: float[B, T].
        loss_mask: float[B, T].
        agg: one of ``AGG_MODES``.
        dp_size: data-parallel world size.
        batch_num_tokens: `(float, optional)` global number of valid tokens (required if dp_size > 1).
        global_batch_size: `(float, optional)` global number of non-empty sequences (required if
            dp_size > 1).
        loss_scale_factor: `(float, optional)` divisor of ``seq-mean-token-sum-norm``; set it to a
            constant (e.g. max response length) to keep the normaliser fixed through training.

    Returns:
        loss: float[] (0-d). 0 (never NaN) when every row is empty.
    """
    if loss_mat.shape != loss_mask.shape:
        raise ValueError(f"loss_mat {tuple(loss_mat.shape)} and loss_mask {tuple(loss_mask.shape)} differ")
    if agg == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("agg_loss: batch_num_tokens (global) is required when dp_size > 1")
            batch_num_tokens = loss_mask.sum()
        return _safe_div(masked_sum(loss_mat, loss_mask), batch_num_tokens) * dp_size
    if agg in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        tokens_per_seq = loss_mask.sum(dim=-1)
        seq_losses = masked_sum(loss_mat, loss_mask, dim=-1)
        if agg == "seq-mean-token-mean":
            seq_losses = seq_losses / (tokens_per_seq + 1e-8)
        seq_mask = (tokens_per_seq > 0).to(loss_mat.dtype)  # fully masked rows do not count
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError("agg_loss: global_batch_size is required when dp_size > 1")
            global_batch_size = seq_mask.sum()
        loss = _safe_div(masked_sum(seq_losses, seq_mask), global_batch_size) * dp_size
        if agg == "seq-mean-token-sum-norm":
            loss = loss / (loss_scale_factor if loss_scale_factor is not None else loss_mask.shape[-1])
        return loss
    raise ValueError(f"unknown loss aggregation {agg!r}; known: {', '.join(AGG_MODES)}")


# --------------------------------------------------------------------------------------------------
# Policy losses
# --------------------------------------------------------------------------------------------------


def _check_loss_inputs(logp: Tensor, old_logp: Tensor, advantages: Tensor, response_mask: Tensor) -> None:
    shape = logp.shape
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("response_mask", response_mask)):
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logp has {tuple(shape)}; all must be [B, T]")


@register_policy_loss("ppo_clip")
def ppo_clip_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    clip_ratio_c: float = 3.0,
    agg_kwargs: Mapping[str, Any] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Dual-clip PPO policy loss (verl ``compute_policy_loss_vanilla``).

    ``ratio = exp(clamp(logp - old_logp, -20, 20))``;
    ``L = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))``, and for ``A < 0`` additionally
    ``L = min(L, -A * clip_ratio_c)`` (dual clip, https://arxiv.org/abs/1912.09729), so a negative-advantage
    token whose ratio exploded contributes a bounded loss with no gradient.

    Args:
        logp: float[B, T], current policy; the only input differentiated.
        old_logp: float[B, T], behaviour policy (detached).
        advantages: float[B, T] (detached).
        response_mask: float[B, T].
        clip_low / clip_high: ratio clip range ``[1 - clip_low, 1 + clip_high]``.
        agg: aggregation mode of ``agg_loss``.
        clip_ratio_c: dual-clip bound, must be > 1.
        agg_kwargs: `(Mapping, optional)` extra keyword arguments of ``agg_loss`` (dp_size, global counts).

    Returns:
        loss: float[] (0-d).
        metrics: ``clip_frac`` (share of valid tokens where the ratio clip is active), ``clip_frac_lower``
            (share where the dual clip is active), ``ppo_kl`` (masked mean of ``old_logp - logp``, with
            the same +-20 clamp as the ratio), all Python floats.
    """
    _check_loss_inputs(logp, old_logp, advantages, response_mask)
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1.0 for dual-clip PPO, got {clip_ratio_c}")
    old_logp, advantages = old_logp.detach(), advantages.detach()

    log_ratio = torch.clamp(logp - old_logp, min=-20.0, max=20.0)  # exp stays finite
    ratio = torch.exp(log_ratio)
    ppo_kl = masked_mean(-log_ratio, response_mask)

    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    clip_frac = masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)

    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.minimum(pg_losses3, clip_pg_losses1)
    negative = advantages < 0
    clip_frac_lower = masked_mean((torch.gt(clip_pg_losses1, pg_losses3) & negative).float(), response_mask)

    pg_losses = torch.where(negative, clip_pg_losses2, clip_pg_losses1)
    loss = agg_loss(pg_losses, response_mask, agg, **(agg_kwargs or {}))
    metrics = {
        "clip_frac": clip_frac.item(),
        "clip_frac_lower": clip_frac_lower.item(),
        "ppo_kl": ppo_kl.item(),
    }
    return loss, metrics


@register_policy_loss("gspo")
def gspo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    agg: str = "seq-mean-token-mean",
    clip_ratio_c: float = 3.0,
    agg_kwargs: Mapping[str, Any] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GSPO policy loss (verl ``compute_policy_loss_gspo``, https://arxiv.org/abs/2507.18071).

    Sequence-level ratio ``s_i = exp(mean_t (logp - old_logp))`` over the valid tokens of response ``i``,
    built per token as ``log s_it = sg[log s_i] + logp_it - sg[logp_it]`` (clamped at 10) so the value is
    ``s_i`` on every token while the gradient reaches each token's ``logp``. Then the PPO clip
    ``max(-A s, -A clip(s, 1 - clip_low, 1 + clip_high))``; no dual clip.

    Args:
        logp: float[B, T]; the only input differentiated.
        old_logp: float[B, T].
        advantages: float[B, T].
        response_mask: float[B, T].
        clip_low / clip_high: sequence-ratio clip range (GSPO's defaults 3e-4 / 4e-4).
        agg: aggregation; defaults to ``seq-mean-token-mean``, an explicit choice is honoured.
        clip_ratio_c: unused (GSPO has no dual clip); accepted for a uniform signature.
        agg_kwargs: `(Mapping, optional)` extra keyword arguments of ``agg_loss``.

    Returns:
        loss: float[] (0-d).
        metrics: ``clip_frac``, ``clip_frac_lower`` (always 0.0), ``ppo_kl`` (unclamped), Python floats.
    """
    _check_loss_inputs(logp, old_logp, advantages, response_mask)
    old_logp, advantages = old_logp.detach(), advantages.detach()

    log_ratio = logp - old_logp
    seq_lengths = response_mask.sum(dim=-1).clamp(min=1)  # empty rows: ratio 1, loss masked anyway
    log_ratio_seq = masked_sum(log_ratio, response_mask, dim=-1) / seq_lengths
    log_seq_ratio = logp - logp.detach() + log_ratio_seq.detach().unsqueeze(-1)
    seq_ratio = torch.exp(torch.clamp(log_seq_ratio, max=10.0))

    pg_losses1 = -advantages * seq_ratio
    pg_losses2 = -advantages * torch.clamp(seq_ratio, 1 - clip_low, 1 + clip_high)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    loss = agg_loss(pg_losses, response_mask, agg, **(agg_kwargs or {}))

    clip_frac = masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    ppo_kl = masked_mean(-log_ratio, response_mask)
    metrics = {"clip_frac": clip_frac.item(), "clip_frac_lower": 0.0, "ppo_kl": ppo_kl.item()}
    return loss, metrics


def policy_loss(
    kind: str,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float | None = None,
    clip_high: float | None = None,
    agg: str | None = None,
    clip_ratio_c: float = 3.0,
    agg_kwargs: Mapping[str, Any] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Compute the registered policy loss ``kind`` (``"ppo_clip"``, ``"gspo"``, ...).

    ``clip_low``, ``clip_high`` and ``agg`` left at None take the loss's own defaults: 0.2 / 0.2 /
    ``token-mean`` for ``ppo_clip``; 3e-4 / 4e-4 / ``seq-mean-token-mean`` for ``gspo``.

    Args:
        kind: registered name, see ``POLICY_LOSSES``.
        logp, old_logp, advantages, response_mask: float[B, T].
        clip_low / clip_high / agg / clip_ratio_c / agg_kwargs: see ``ppo_clip_loss``.

    Returns:
        (loss, metrics): scalar tensor and ``{"clip_frac", "clip_frac_lower", "ppo_kl"}`` floats.

    Raises:
        ValueError: unknown ``kind``.
    """
    fn = get_policy_loss_fn(kind)
    options: dict[str, Any] = {"clip_ratio_c": clip_ratio_c, "agg_kwargs": agg_kwargs}
    if clip_low is not None:
        options["clip_low"] = clip_low
    if clip_high is not None:
        options["clip_high"] = clip_high
    if agg is not None:
        options["agg"] = agg
    return fn(logp, old_logp, advantages, response_mask, **options)


# --------------------------------------------------------------------------------------------------
# KL penalty
# --------------------------------------------------------------------------------------------------

KL_PENALTY_KINDS = ("k1", "kl", "k2", "mse", "k3", "low_var_kl", "abs")


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token KL estimate between the policy and the reference (verl ``kl_penalty``).

    See http://joschu.net/blog/kl-approx.html. With ``d = logp - ref_logp``:
        * ``k1`` / ``kl``: ``d``
        * ``k2`` / ``mse``: ``0.5 * d**2``
        * ``k3`` / ``low_var_kl``: ``exp(-d) + d - 1``, with ``-d`` clamped to [-20, 20] before ``exp``
          and the result clamped to [-10, 10] (verl's numerical guards; the clamps zero the gradient
          outside those ranges)
        * ``abs``: ``|d|``

    Args:
        logp: float[B, T].
        ref_logp: float[B, T].
        kind: one of ``KL_PENALTY_KINDS``.

    Returns:
        float[B, T], unmasked.
    """
    if kind in ("k1", "kl"):
        return logp - ref_logp
    if kind in ("k2", "mse"):
        return 0.5 * (logp - ref_logp).square()
    if kind in ("k3", "low_var_kl"):
        kl = torch.clamp(ref_logp - logp, min=-20, max=20)
        return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    if kind == "abs":
        return (logp - ref_logp).abs()
    raise ValueError(f"unknown kl penalty {kind!r}; known: {', '.join(KL_PENALTY_KINDS)}")
