"""The linearity statistics of an RL-Extra cycle and the least-squares jump: the math ``ShardProjector`` runs.

RLVR weights move almost linearly with the step (paper §3.1), so a cycle can be extrapolated along the chord
``W − A`` (``linearity.projection.project_``) or along a least-squares line through every step of the cycle
(``TrendAccumulator.advance_``: less sensitive to the noise of the last step). Statistics of the same cycle decide
*which* tensors or elements to move (``notes/toy-linearity.md``: the choice of elements matters more than β):

- ``drift_partial_sums`` → ``drift_share`` — cosine between consecutive displacements (1 for steady drift, ≈ 0
  for a random walk), per tensor and overall;
- ``steady_displacement`` → ``top_fraction_mask`` — the top fraction of elements by a score, one global threshold
  (``threshold_from_sample``) from a uniform sample of the scores;
- ``r2_score`` — R² of a batch of series (sampled weights over the cycle's steps; offline analysis).

Sharded callers (``linearity.zero_shards``) run each function on their own shard: partial sums are all-reduced by
the caller and then finished here, and ``top_fraction_mask`` takes the caller's all-gather for the score sample.
Everything works on flat buffers, in place or chunk by chunk, with no model-sized temporaries except where a
docstring says so. Pure torch; imports nothing outside ``linearity``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from linearity.projection import (
    DEFAULT_CHUNK_NUMEL,
    Buffers,
    as_list,
    chunk_bounds,
    compute_dtype,
    flat_view,
    per_tensor_masks,
)


class TrendAccumulator:
    """Running least-squares line ``y_e(t) ≈ b_e + v_e t`` for every element e of k flat buffers.

    Call ``update(weights, step)`` once per RL step (the first at the anchor); ``advance_`` then moves weights
    along the fitted slope v (the ``least_squares`` velocity of RL-Extra).

    Memory: two buffers per weight tensor, of ``compute_dtype`` of the reference (float32 for fp32 master weights),
    O(1) in the number of steps: ``mean`` — the running mean of z = y − R, and ``comoment`` — Σ (t − t̄)(z − z̄),
    the centred (Welford/Chan) form of the sums Σy and Σt·y; plus float64 scalars n, t̄ and S_tt = Σ (t − t̄)².

    Why centred on a reference R (the RL-Extra anchor, no extra memory): weights are O(1e-2) while an RL step moves
    them by O(lr) ≈ 1e-6; raw fp32 sums Σy, Σt·y cancel catastrophically in ``n Σty − Σt Σy``: on such data (fp32,
    50 steps) the slope error was 8e-4 of the largest slope with raw sums and 2e-4 with Welford updates on y,
    against 4e-7 with Welford on z = y − R. Subtracting a nearby reference is exact (Sterbenz), so centring costs
    no precision. The caller must not change R between ``reset()`` and the last ``advance_`` (reset whenever the
    anchor is re-snapshotted).
    """

    def __init__(self, reference: Buffers, *, chunk_numel: int = DEFAULT_CHUNK_NUMEL) -> None:
        """
        Args:
            reference: k contiguous tensors R_i to centre on (kept, not copied); the weights given to ``update``
                and ``advance_`` must have their shapes and devices.
            chunk_numel: elements per chunk of the scratch buffers of ``update`` and the masked ``advance_``.
        """
        refs = as_list(reference)
        self.reference = refs
        self._shapes = [tuple(r.shape) for r in refs]
        self._devices = [r.device for r in refs]
        self.dtype = compute_dtype(refs[0].dtype if refs else torch.float32)
        self.chunk_numel = int(chunk_numel)
        self.mean = [torch.zeros(r.shape, dtype=self.dtype, device=r.device) for r in refs]
        self.comoment = [torch.zeros(r.shape, dtype=self.dtype, device=r.device) for r in refs]
        self.n = 0
        self.mean_step = 0.0
        self.step_sq_dev = 0.0  # S_tt = Σ (t − t̄)²

    @property
    def has_fit(self) -> bool:
        """Whether a line is defined: at least two updates at distinct steps."""
        return self.n >= 2 and self.step_sq_dev > 0.0

    def reset(self) -> None:
        """Forget every update (buffers are zeroed in place, nothing is reallocated)."""
        torch._foreach_zero_(self.mean)
        torch._foreach_zero_(self.comoment)
        self.n = 0
        self.mean_step = 0.0
        self.step_sq_dev = 0.0

    def state_dict(self) -> dict:
        """Everything needed to resume (tensors are the live buffers; the caller copies/saves them)."""
        return {
            "n": self.n,
            "mean_step": self.mean_step,
            "step_sq_dev": self.step_sq_dev,
            "mean": self.mean,
            "comoment": self.comoment,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()`` (copies into the existing buffers; other keys are ignored)."""
        self.n = int(state["n"])
        self.mean_step = float(state["mean_step"])
        self.step_sq_dev = float(state["step_sq_dev"])
        torch._foreach_copy_(self.mean, list(state["mean"]))
        torch._foreach_copy_(self.comoment, list(state["comoment"]))

    def _check(self, xs: list[Tensor], what: str) -> None:
        if len(xs) != len(self._shapes):
            raise ValueError(f"{what}: {len(xs)} tensors, accumulator has {len(self._shapes)}")
        for i, (x, shape, dev) in enumerate(zip(xs, self._shapes, self._devices)):
            if tuple(x.shape) != shape or x.device != dev:
                raise ValueError(f"{what}[{i}]: shape/device {tuple(x.shape)}/{x.device} != {shape}/{dev}")

    @torch.no_grad()
    def update(self, weights: Buffers, step: float) -> None:
        """Add the snapshot ``weights`` (k tensors, the reference's shapes and devices) taken at ``step``.

        Cost per call: one chunked pass reading W, R and both buffers and writing the buffers; extra memory one
        scratch chunk. Steps need not be evenly spaced or ordered.
        """
        ws = as_list(weights)
        self._check(ws, "weights")
        step = float(step)
        k = self.n + 1
        dt = step - self.mean_step  # deviation from the old mean step
        c_co = dt * (k - 1) / k
        c_mean = 1.0 / k
        for w, r, mean, comoment in zip(ws, self.reference, self.mean, self.comoment):
            wf, rf = flat_view(w, "weights"), flat_view(r, "reference")
            mf, cf = mean.view(-1), comoment.view(-1)
            n = wf.numel()
            if n == 0:
                continue
            scratch = torch.empty(min(self.chunk_numel, n), dtype=self.dtype, device=w.device)
            for s, e in chunk_bounds(n, self.chunk_numel):
                d = scratch[: e - s]
                if wf.dtype == d.dtype and rf.dtype == d.dtype:
                    torch.sub(wf[s:e], rf[s:e], out=d)
                else:
                    d.copy_(wf[s:e])  # exact upcast first: z = y − R is then exact (Sterbenz) for nearby values
                    d.sub_(rf[s:e])
                d.sub_(mf[s:e])  # z − z̄_old
                cf[s:e].add_(d, alpha=c_co)
                mf[s:e].add_(d, alpha=c_mean)
        self.n = k
        self.mean_step += dt / k
        self.step_sq_dev += dt * dt * (k - 1) / k

    @torch.no_grad()
    def advance_(self, weights: Buffers, steps: float, mask: Tensor | Sequence[Tensor | None] | None = None) -> None:
        """In place: ``W ← W + steps · v`` on the masked elements, v = comoment / S_tt the fitted slope per step.

        RL-Extra's ``least_squares`` velocity: after the m real steps of a cycle, move (β − 1)·m steps further along
        the fitted slope instead of the chord (W − A) / m. On a pure line this lands on the line's later points.

        Args:
            weights: k tensors (the reference's shapes and devices), modified in place.
            steps: how many steps to move (any float).
            mask: as ``project_``'s: None, or per tensor None (every element) or ``bool`` with the weight's shape.

        Computed as ``W += (steps / S_tt) · comoment`` (one rounding into W); a masked tensor chunk by chunk, with
        the comoment zeroed outside the mask in a chunk-sized temporary.
        """
        if not self.has_fit:
            raise ValueError(f"a line needs at least two distinct steps (have n={self.n}, S_tt={self.step_sq_dev})")
        ws = as_list(weights)
        self._check(ws, "weights")
        masks = per_tensor_masks(mask, len(ws))
        scale = steps / self.step_sq_dev
        for w, comoment, m in zip(ws, self.comoment, masks):
            wf, cf = flat_view(w, "weights"), comoment.view(-1)
            if m is None:
                wf.add_(cf, alpha=scale)
                continue
            mf = flat_view(m, "mask")
            for s, e in chunk_bounds(wf.numel(), self.chunk_numel):
                wf[s:e].add_(cf[s:e] * mf[s:e], alpha=scale)


# ---------------------------------------------------------------------------------------------- drift share


def drift_partial_sums(now: Tensor, anchor: Tensor, previous: Tensor) -> Tensor:
    """float64[3]: ``(Σ d_prev · d_now, Σ d_prev², Σ d_now²)`` over the given elements, ``d_now = now − anchor``.

    Args:
        now, anchor: float[n] each (same device) — e.g. one parameter's slice of a rank's master shard and anchor.
        previous: float[n] — the previous cycle's displacement d_prev there (zeros before the first cycle).

    Differences and products in float64; the three sums on the inputs' device. Stack them per tensor into
    float64[k, 3], all-reduce (sum over ranks) when sharded, and finish with ``drift_share``.
    """
    d_now = now.double() - anchor.double()
    d_prev = previous.double()
    return torch.stack([(d_prev * d_now).sum(), (d_prev * d_prev).sum(), (d_now * d_now).sum()])


class DriftShare(NamedTuple):
    """Cosines ``per_tensor`` (k floats, in the order of the sums' rows) and ``total``, and ``now_sq_norm`` — Σ d_now²
    over all k tensors (the current displacement's squared norm, from the same reduction as ``total``)."""

    per_tensor: list[float]
    total: float
    now_sq_norm: float


def drift_share(sums: Tensor) -> DriftShare:
    """The share of a displacement that is steady drift: ``cos(d_prev, d_now)`` per tensor and overall.

    Args:
        sums: float64[k, 3] — per tensor the ``drift_partial_sums`` (already summed over ranks for shards).

    Returns:
        ``DriftShare``; a cosine is NaN where either displacement is zero (e.g. no previous cycle). For a trajectory
        ``W_t = W_0 + v t + noise`` and consecutive k-step displacements this is ≈ ‖v k‖² / (‖v k‖² + noise
        energy): 1 for pure drift, ≈ 0 for a random walk (independent increments). ``notes/toy-linearity.md``
        found ≥ 0.7 necessary for RL-Extra to pay.
    """
    sums = sums.to(torch.float64)
    totals = sums.sum(0).tolist()
    return DriftShare([_cosine(*row) for row in sums.tolist()], _cosine(*totals), totals[2])


def _cosine(dot: float, sq_a: float, sq_b: float) -> float:
    """``dot / sqrt(sq_a · sq_b)``, NaN unless both squared norms are positive.

    In Python floats: ``math.sqrt`` is correctly rounded, torch's vectorised float64 ``sqrt`` is not (it differs
    in the last bit for about 1 % of inputs), and k is the number of parameters, not of elements.
    """
    return dot / math.sqrt(sq_a * sq_b) if sq_a > 0 and sq_b > 0 else float("nan")


# ------------------------------------------------------------------------------------------ element selection


def steady_displacement(now: Tensor, anchor: Tensor, previous: Tensor | None = None) -> Tensor:
    """float32[n]: ``|d_now|`` where the element moved the same way as in the previous cycle, 0 elsewhere.

    Args:
        now, anchor: float[n] each (same device); ``d_now = now − anchor`` is formed in float32.
        previous: float[n], the previous cycle's displacement, or None in the first cycle (then every element
            counts: the score is ``|d_now|``).

    The selection score of ``top_elements``: an element that reversed direction between cycles (d_prev · d_now ≤ 0)
    has no trend to follow.
    """
    d = now.float() - anchor.float()
    score = d.abs()
    if previous is not None:
        score = score * ((d * previous.float()) > 0)
    return score


def threshold_from_sample(sample: Tensor, fraction: float) -> float:
    """The score above which lie the top ``fraction`` of a sample: its k-th largest value, k = max(1, round(f·n)).

    Args:
        sample: float[n], n ≥ 1 — scores (e.g. all ranks' samples, concatenated).
        fraction: in (0, 1) — at least one value (the largest) is always at or above the threshold.
    """
    k = max(1, round(fraction * sample.numel()))
    return float(torch.topk(sample, k).values[-1])


@torch.no_grad()
def top_fraction_mask(
    scores: Callable[[int, slice | Tensor], Tensor],
    like: Sequence[Tensor],
    fraction: float,
    *,
    sample_size: int = 1 << 16,
    generator: torch.Generator | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
) -> list[Tensor]:
    """Bool masks of the top ``fraction`` of the elements of k flat buffers by a non-negative score.

    Args:
        scores: ``scores(i, where)`` → float[s]: the scores of buffer i's elements at ``where``, a ``slice`` or an
            int64[s] index tensor on buffer i's device (e.g. ``steady_displacement`` of those elements).
        like: the k flat buffers (only their sizes and devices are read).
        fraction: share of elements to select, in (0, 1]; 1 selects every element with a positive score.
        sample_size, generator: the threshold comes from ``min(sample_size, total)`` uniform draws (with
            replacement) over the concatenated buffers, so no model-sized score vector is ever sorted or formed.
        gather: optional ``gather(sample) → float[m]`` combining the samples of all ranks (an all-gather) so the
            threshold is global; equal per-rank sample sizes over equal-sized partitions keep it uniform.
        chunk_numel: elements per chunk when the masks are written (one chunk of scores at a time).

    Returns:
        k bool[numel_i] masks: ``score ≥ threshold`` and ``score > 0`` (an element that did not move is never
        selected). The realised fraction has a standard error of sqrt(f (1 − f) / sample size).
    """
    if fraction >= 1.0:
        threshold = 0.0  # everything that moved: no sample needed
    else:
        sample = _sample_scores(scores, like, sample_size, generator)
        if gather is not None:
            sample = gather(sample)
        threshold = threshold_from_sample(sample, fraction)
    masks = []
    for i, t in enumerate(like):
        out = torch.empty(t.numel(), dtype=torch.bool, device=t.device)
        for s, e in chunk_bounds(t.numel(), chunk_numel):
            score = scores(i, slice(s, e))
            out[s:e] = (score >= threshold) & (score > 0)
        masks.append(out)
    return masks


def _sample_scores(
    scores: Callable[[int, slice | Tensor], Tensor],
    like: Sequence[Tensor],
    sample_size: int,
    generator: torch.Generator | None,
) -> Tensor:
    """float[s] on CPU: the scores at ``s = min(sample_size, total)`` uniform positions of the concatenated buffers
    (drawn with replacement, sorted so each buffer's positions are one contiguous run)."""
    total = sum(t.numel() for t in like)
    positions = torch.randint(total, (min(sample_size, total),), generator=generator).sort().values
    parts, start = [], 0
    for i, t in enumerate(like):
        end = start + t.numel()
        lo, hi = int(torch.searchsorted(positions, start)), int(torch.searchsorted(positions, end))
        if hi > lo:
            parts.append(scores(i, (positions[lo:hi] - start).to(t.device)).cpu())
        start = end
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------------- R²


def r2_score(y: Tensor, t: Tensor | Sequence[float] | None = None, *, constant: float = float("nan")) -> Tensor:
    """R² of the least-squares line of each series in a batch: ``y`` against ``t``.

    Args:
        y: float[..., T] — a batch of series, e.g. float64[num_sampled_weights, num_steps].
        t: float[T] or broadcastable to y — the steps (default 0..T−1); needs ≥ 2 distinct values.
        constant: the value returned for a constant series (R² is 0/0 there). Default NaN — "undefined", the
            way the paper drops weights that never changed; sklearn's ``r2_score`` would give 1.0 (the fitted line
            is perfect) and ``numpy.corrcoef`` gives NaN.

    Returns:
        float[...] R² in [0, 1] (float64 for float64 input, else float32):
        ``1 − SS_res / SS_tot = cov(t, y)² / (var t · var y)``, which equals ``numpy.polyfit``-residual R² and
        ``numpy.corrcoef(t, y)[0, 1]²``; a pure line gives 1, independent noise ≈ 1 / (T − 1).
    """
    dt = compute_dtype(y.dtype) if y.is_floating_point() else torch.float32
    yv = y.to(dt)
    T = yv.shape[-1]
    if t is None:
        tv = torch.arange(T, dtype=dt, device=y.device)
    else:
        tv = torch.as_tensor(t, dtype=dt, device=y.device)
    tv = torch.broadcast_to(tv, yv.shape)
    if T < 2:
        raise ValueError("need at least two points per series")
    tc = tv - tv.mean(-1, keepdim=True)
    stt = (tc * tc).sum(-1)
    if bool((stt <= 0).any()):
        raise ValueError("t needs at least two distinct values")
    yc = yv - yv.mean(-1, keepdim=True)
    sty = (tc * yc).sum(-1)
    syy = (yc * yc).sum(-1)
    r2 = (sty * sty / (stt * syy)).clamp(0.0, 1.0)
    is_const = yv.amax(-1) == yv.amin(-1)
    return torch.where(is_const, torch.full_like(r2, constant), r2)
