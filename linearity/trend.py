"""Running per-element linear trends of the weights, and the linearity statistics that select what to project.

RLVR weights move almost linearly with the step (paper §3.1), so a cycle's *velocity* (slope per step) can be
estimated either from two points (``two_point_velocity``: the anchor and now, what RL-Extra's β uses) or by a
least-squares line through every step of the cycle (``TrendAccumulator``: less sensitive to the noise of the
last step). The same running sums give the statistics that say *how* linear each tensor is, which decides
which tensors or elements to extrapolate (``notes/toy-linearity.md``: the choice of elements matters more
than β):

- ``TrendAccumulator.tensor_r2`` — per-tensor pooled R² of the per-element lines;
- ``drift_share`` — cosine between consecutive displacements (1 for steady drift, ≈ 0 for a random walk);
- ``top_fraction_mask`` — the top fraction of elements by |velocity| or |displacement|;
- ``r2_score`` — R² of a batch of series (offline analysis of sampled weights or token log-probs).

Everything works on flat buffers (a tensor or a list of tensors), in place or into caller-provided outputs,
with chunked scratch buffers instead of model-sized temporaries, and returns per-tensor partial sums where a
sharded caller has to all-reduce. Pure torch; imports nothing outside ``linearity``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from linearity.projection import DEFAULT_CHUNK_NUMEL, Buffers, _chunks, _flat, as_list, compute_dtype, sq_norm


class TrendAccumulator:
    """Running least-squares line ``y_e(t) ≈ b_e + v_e t`` for every element e of a set of flat buffers.

    Call ``update(weights, step)`` once per RL step with the current buffers; at any time read the fitted
    velocity (slope per step), intercept, value at a step, per-tensor R², or write the line's value at a
    target step back into the weights (``extrapolate_``, the ``least_squares`` velocity mode).

    Memory: O(1) in the number of steps — model-sized buffers, each of the buffer dtype (float32 for bf16/fp16/fp32
    weights, float64 for float64):

    - ``mean`` — running mean of z = y − R, and ``comoment`` — Σ (t − t̄)(z − z̄): the centred (Welford/Chan) form
      of the sums Σy and Σt·y, same count of buffers;
    - ``m2`` — Σ (z − z̄)², only with ``track_r2=True`` (the form of Σy²);
    - the reference R: the caller's (``reference=``, e.g. the RL-Extra anchor — no extra memory) or, if none is
      given, an owned copy of the first snapshot after each ``reset()`` (one buffer in the weights' dtype).

    plus float64 scalars n, t̄ and S_tt = Σ (t − t̄)² (``buffer_count`` says how many model-sized buffers it owns).

    Why centred: weights are O(1e-2) while an RL step moves them by O(lr) ≈ 1e-6; raw fp32 sums Σy, Σt·y
    cancel catastrophically in ``n Σty − Σt Σy``: on such data (fp32, 50 steps) the slope error was 8e-4 of the
    largest slope with raw sums and 2e-4 with Welford updates on y, against 4e-7 with Welford on z = y − R.
    Subtracting a nearby reference is exact (Sterbenz), so centring costs no precision.

    With an external ``reference`` the caller must not change it between ``reset()`` and the last read
    (reset the accumulator whenever the anchor is re-snapshotted).
    """

    def __init__(
        self,
        like: Buffers,
        *,
        reference: Buffers | None = None,
        track_r2: bool = True,
        dtype: torch.dtype | None = None,
        chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    ) -> None:
        """
        Args:
            like: k tensors with the shapes/devices/dtypes of the weights that will be passed to ``update``
                (contiguous; not kept).
            reference: optional k tensors R_i (same shapes and devices) to centre on; see the class docstring.
            track_r2: keep Σ(z − z̄)² for R² (one more buffer).
            dtype: buffer dtype (default: float32, or float64 for float64 weights).
            chunk_numel: elements per chunk of the scratch buffer used by ``update`` and ``value_at``.
        """
        ws = as_list(like)
        self._shapes = [tuple(w.shape) for w in ws]
        self._devices = [w.device for w in ws]
        self._wdtypes = [w.dtype for w in ws]
        self.dtype = dtype or compute_dtype(ws[0].dtype if ws else torch.float32)
        self.chunk_numel = int(chunk_numel)
        self.track_r2 = bool(track_r2)
        self.mean = [torch.zeros(w.shape, dtype=self.dtype, device=w.device) for w in ws]
        self.comoment = [torch.zeros(w.shape, dtype=self.dtype, device=w.device) for w in ws]
        self.m2 = [torch.zeros(w.shape, dtype=self.dtype, device=w.device) for w in ws] if track_r2 else None
        if reference is not None:
            refs = as_list(reference)
            self._check(refs, "reference")
            self.reference = refs
            self._owns_reference = False
        else:
            self.reference = [torch.empty_like(w, memory_format=torch.contiguous_format) for w in ws]
            self._owns_reference = True
        self.n = 0
        self.mean_step = 0.0
        self.step_sq_dev = 0.0  # S_tt = Σ (t − t̄)²

    # ------------------------------------------------------------------------------------------- state

    @property
    def buffer_count(self) -> int:
        """Model-sized buffers this accumulator owns (2, +1 with R², +1 without an external reference)."""
        return 2 + (1 if self.track_r2 else 0) + (1 if self._owns_reference else 0)

    @property
    def buffer_bytes(self) -> int:
        """Bytes held in model-sized buffers."""
        bufs = self.mean + self.comoment + (self.m2 or []) + (self.reference if self._owns_reference else [])
        return sum(b.numel() * b.element_size() for b in bufs)

    def reset(self) -> None:
        """Forget every update (buffers are zeroed in place, nothing is reallocated)."""
        torch._foreach_zero_(self.mean)
        torch._foreach_zero_(self.comoment)
        if self.m2 is not None:
            torch._foreach_zero_(self.m2)
        self.n = 0
        self.mean_step = 0.0
        self.step_sq_dev = 0.0

    def state_dict(self) -> dict:
        """Everything needed to resume (tensors are the live buffers; the caller copies/saves them)."""
        state = {
            "n": self.n,
            "mean_step": self.mean_step,
            "step_sq_dev": self.step_sq_dev,
            "mean": self.mean,
            "comoment": self.comoment,
            "m2": self.m2,
        }
        if self._owns_reference:
            state["reference"] = self.reference
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()`` (copies into the existing buffers)."""
        self.n = int(state["n"])
        self.mean_step = float(state["mean_step"])
        self.step_sq_dev = float(state["step_sq_dev"])
        torch._foreach_copy_(self.mean, list(state["mean"]))
        torch._foreach_copy_(self.comoment, list(state["comoment"]))
        if self.m2 is not None and state.get("m2") is not None:
            torch._foreach_copy_(self.m2, list(state["m2"]))
        if self._owns_reference and state.get("reference") is not None:
            torch._foreach_copy_(self.reference, list(state["reference"]))

    def _check(self, xs: list[Tensor], what: str) -> None:
        if len(xs) != len(self._shapes):
            raise ValueError(f"{what}: {len(xs)} tensors, accumulator has {len(self._shapes)}")
        for i, (x, shape, dev) in enumerate(zip(xs, self._shapes, self._devices)):
            if tuple(x.shape) != shape or x.device != dev:
                raise ValueError(f"{what}[{i}]: shape/device {tuple(x.shape)}/{x.device} != {shape}/{dev}")

    def _require_fit(self) -> None:
        if self.n < 2 or self.step_sq_dev <= 0.0:
            raise ValueError(f"a line needs at least two distinct steps (have n={self.n}, S_tt={self.step_sq_dev})")

    # ------------------------------------------------------------------------------------------ update

    @torch.no_grad()
    def update(self, weights: Buffers, step: float) -> None:
        """Add the snapshot ``weights`` (k tensors, the shapes given at construction) taken at ``step``.

        Cost per call: one chunked pass reading W, R and the 2–3 buffers and writing the buffers; extra memory one
        scratch chunk. Steps need not be evenly spaced or ordered.
        """
        ws = as_list(weights)
        self._check(ws, "weights")
        step = float(step)
        if self.n == 0 and self._owns_reference:
            torch._foreach_copy_(self.reference, ws)  # z = 0 for this snapshot: the sums stay zero
            self.n, self.mean_step, self.step_sq_dev = 1, step, 0.0
            return
        k = self.n + 1
        dt = step - self.mean_step  # deviation from the old mean step
        c_co = dt * (k - 1) / k
        c_m2 = (k - 1) / k
        c_mean = 1.0 / k
        for i, w in enumerate(ws):
            wf = _flat(w, "weights")
            rf = _flat(self.reference[i], "reference")
            mf, cf = self.mean[i].view(-1), self.comoment[i].view(-1)
            qf = self.m2[i].view(-1) if self.m2 is not None else None
            n = wf.numel()
            if n == 0:
                continue
            scratch = torch.empty(min(self.chunk_numel, n), dtype=self.dtype, device=w.device)
            for s, e in _chunks(n, self.chunk_numel):
                d = scratch[: e - s]
                if wf.dtype == d.dtype and rf.dtype == d.dtype:
                    torch.sub(wf[s:e], rf[s:e], out=d)
                else:
                    d.copy_(wf[s:e])  # exact upcast first: z = y − R is then exact (Sterbenz) for nearby values
                    d.sub_(rf[s:e])
                d.sub_(mf[s:e])  # z − z̄_old
                cf[s:e].add_(d, alpha=c_co)
                if qf is not None:
                    qf[s:e].addcmul_(d, d, value=c_m2)
                mf[s:e].add_(d, alpha=c_mean)
        self.n = k
        self.mean_step += dt / k
        self.step_sq_dev += dt * dt * (k - 1) / k

    # ------------------------------------------------------------------------------------------- reads

    def _outs(self, out: Buffers | None) -> list[Tensor]:
        if out is None:
            return [torch.empty(s, dtype=self.dtype, device=d) for s, d in zip(self._shapes, self._devices)]
        outs = as_list(out)
        self._check(outs, "out")
        return outs

    @torch.no_grad()
    def velocity(self, out: Buffers | None = None) -> list[Tensor]:
        """Fitted slope per step ``v = Σ(t − t̄)(z − z̄) / S_tt`` per element.

        Args:
            out: optional k tensors to write into (any float dtype); if None, k new tensors of the buffer dtype
                are allocated (model-sized — pass ``out`` in the training loop).

        Returns:
            the k output tensors (shapes as the weights).
        """
        self._require_fit()
        outs = self._outs(out)
        torch._foreach_copy_(outs, self.comoment)
        torch._foreach_mul_(outs, 1.0 / self.step_sq_dev)
        return outs

    def intercept(self, out: Buffers | None = None) -> list[Tensor]:
        """Fitted value at step 0, ``b = y(0)`` per element (k tensors; ``out`` as in ``velocity``)."""
        return self.value_at(0.0, out)

    @torch.no_grad()
    def value_at(self, step: float, out: Buffers | None = None) -> list[Tensor]:
        """The fitted line at ``step``: ``R + z̄ + v (step − t̄)`` per element.

        Args:
            step: any step (inside the window: smoothing; beyond it: extrapolation).
            out: optional k tensors to write into (e.g. the weights themselves, any float dtype; must not alias
                the reference or the accumulator's buffers); if None, allocates k tensors of the buffer dtype.

        The small terms ``z̄ + v (step − t̄)`` are formed in the buffer dtype in a chunk-sized scratch and added to R
        with a single rounding into ``out``.
        """
        self._require_fit()
        outs = self._outs(out)
        alpha = (float(step) - self.mean_step) / self.step_sq_dev
        for i, o in enumerate(outs):
            of = _flat(o, "out")
            rf = _flat(self.reference[i], "reference")
            mf, cf = self.mean[i].view(-1), self.comoment[i].view(-1)
            n = of.numel()
            if n == 0:
                continue
            scratch = torch.empty(min(self.chunk_numel, n), dtype=self.dtype, device=o.device)
            for s, e in _chunks(n, self.chunk_numel):
                d = scratch[: e - s]
                torch.add(mf[s:e], cf[s:e], alpha=alpha, out=d)  # the small terms z̄ + v (step − t̄)
                if of.dtype == d.dtype and rf.dtype == d.dtype:
                    torch.add(rf[s:e], d, out=of[s:e])
                else:
                    d.add_(rf[s:e])  # R upcast exactly inside the add
                    of[s:e].copy_(d)  # one rounding into a lower-precision out
        return outs

    def extrapolate_(self, weights: Buffers, target_step: float) -> None:
        """In place: write the fitted line's value at ``target_step`` into ``weights`` (k tensors).

        The ``least_squares`` velocity mode of RL-Extra: after the m real steps of a cycle, jump to
        ``target_step`` (typically the cycle's last real step + n) along the least-squares line instead of the
        two-point chord. On a pure line this reproduces future points exactly (to rounding).
        """
        self.value_at(target_step, out=weights)

    # ------------------------------------------------------------------------------------------ linearity

    @torch.no_grad()
    def r2_partial_sums(self) -> tuple[Tensor, Tensor]:
        """Per-tensor ``(explained, total)`` sums of squares, float64 (k,) each, on the first buffer's device.

        ``explained_i = Σ_e comoment_e² / S_tt`` (variance captured by the per-element lines) and
        ``total_i = Σ_e m2_e``. Under sharding, all-reduce both (sum) and divide: ``tensor_r2_from_sums``.
        Needs ``track_r2=True``.
        """
        if self.m2 is None:
            raise ValueError("constructed with track_r2=False")
        self._require_fit()
        explained = sq_norm(self.comoment, chunk_numel=self.chunk_numel) / self.step_sq_dev
        total = torch.zeros_like(explained)
        for i, q in enumerate(self.m2):
            qf = q.view(-1)
            for s, e in _chunks(qf.numel(), self.chunk_numel):
                total[i] += qf[s:e].sum(dtype=torch.float64)
        return explained, total

    def tensor_r2(self) -> Tensor:
        """Per-tensor pooled R² = Σ explained / Σ total over the tensor's elements, float64 (k,).

        The variance-weighted mean of the per-element R² (elements that move more count more — the ones a
        projection moves most). NaN for a tensor whose elements never moved. Local (unsharded) view; for shards
        all-reduce ``r2_partial_sums()`` first.
        """
        return tensor_r2_from_sums(*self.r2_partial_sums())

    @torch.no_grad()
    def element_r2(self, index: int, out: Tensor | None = None) -> Tensor:
        """Per-element R² of tensor ``index``: ``comoment² / (S_tt · m2)``, NaN where an element never moved.

        Args:
            index: which tensor.
            out: optional tensor of that tensor's shape (float) to write into; else allocated.
        """
        if self.m2 is None:
            raise ValueError("constructed with track_r2=False")
        self._require_fit()
        c, q = self.comoment[index], self.m2[index]
        if out is None:
            out = torch.empty_like(c)
        torch.mul(c, c, out=out)
        out.div_(q).div_(self.step_sq_dev)
        out.masked_fill_(q == 0, float("nan"))
        return out.clamp_(max=1.0)


def tensor_r2_from_sums(explained: Tensor, total: Tensor) -> Tensor:
    """R² per tensor from (all-reduced) partial sums: ``explained / total``, NaN where total is 0, clamped ≤ 1."""
    r2 = explained / total
    r2 = torch.where(total > 0, r2, torch.full_like(r2, float("nan")))
    return r2.clamp(max=1.0)


# ------------------------------------------------------------------------------------- two-point velocity


@torch.no_grad()
def two_point_velocity(w_now: Buffers, anchor: Buffers, steps: float, out: Buffers | None = None) -> list[Tensor]:
    """The chord's slope per step ``(W_now − A) / steps`` (RL-Extra's own estimate).

    Args:
        w_now, anchor: k tensors each (matching shapes/devices).
        steps: number of steps between A and W_now (> 0).
        out: optional k tensors (float) to write into; else k new tensors of ``compute_dtype(W.dtype)``.

    Returns:
        the k output tensors. The difference is formed after an exact upcast (no bf16 rounding of W − A).
    """
    if steps == 0:
        raise ValueError("steps must be non-zero")
    ws, anchors = as_list(w_now), as_list(anchor)
    if len(ws) != len(anchors):
        raise ValueError(f"anchor: {len(anchors)} tensors for {len(ws)} weight tensors")
    if out is None:
        outs = [torch.empty(w.shape, dtype=compute_dtype(w.dtype), device=w.device) for w in ws]
    else:
        outs = as_list(out)
    torch._foreach_copy_(outs, ws)
    torch._foreach_sub_(outs, anchors)
    torch._foreach_mul_(outs, 1.0 / float(steps))
    return outs


# ---------------------------------------------------------------------------------------------- drift share


class DriftShare(NamedTuple):
    """Cosine between consecutive displacements: ``per_tensor`` float64 (k,) and ``total`` (0-d)."""

    per_tensor: Tensor
    total: Tensor


def drift_share(dot_prev_now: Tensor, sq_prev: Tensor, sq_now: Tensor) -> DriftShare:
    """The share of a displacement that is steady drift: ``cos(d_prev, d_now)`` per tensor and overall.

    Args:
        dot_prev_now: per-tensor Σ d_prev · d_now, shape (k,) (``projection.dot`` / ``displacement_dot``),
            already all-reduced over ranks for sharded buffers.
        sq_prev, sq_now: per-tensor squared norms, shape (k,) (``displacement_stats(...).per_tensor``).

    Returns:
        ``DriftShare(per_tensor, total)``; NaN where a displacement is zero. For a trajectory
        ``W_t = W_0 + v t + noise`` and consecutive k-step displacements this is ≈ ‖v k‖² / (‖v k‖² + noise
        energy): 1 for pure drift, ≈ 0 for a random walk (independent increments). ``notes/toy-linearity.md``
        found ≥ 0.7 necessary for RL-Extra to pay.
    """
    dot_prev_now, sq_prev, sq_now = (x.to(torch.float64) for x in (dot_prev_now, sq_prev, sq_now))
    denom = torch.sqrt(sq_prev * sq_now)
    nan = torch.full_like(denom, float("nan"))
    per = torch.where(denom > 0, dot_prev_now / denom, nan)
    tden = torch.sqrt(sq_prev.sum() * sq_now.sum())
    total = torch.where(tden > 0, dot_prev_now.sum() / tden, torch.full_like(tden, float("nan")))
    return DriftShare(per, total)


# ------------------------------------------------------------------------------------------ element selection


def abs_threshold(
    x: Buffers,
    fraction: float,
    *,
    sample_size: int = 1 << 20,
    generator: torch.Generator | None = None,
) -> float:
    """The |x| threshold above which lie the top ``fraction`` of all elements of ``x`` (one tensor or k tensors).

    Exact (``kthvalue`` of all |x|) when the total element count is ≤ ``sample_size``; otherwise the same
    order statistic of a uniform sample (with replacement) of ``sample_size`` elements, so huge buffers are never
    sorted or copied: O(sample_size) memory and time. The realised fraction then has a standard error of
    sqrt(f (1 − f) / sample_size) (≤ 0.05 % absolute at the default 2²⁰). ``inf`` when nothing is selected,
    0 when everything is.

    Under sharding, each rank can share its sample (or its threshold) and the caller combines them.
    """
    xs = [t.reshape(-1) for t in as_list(x)]
    total = sum(t.numel() for t in xs)
    if total == 0 or fraction <= 0:
        return math.inf
    if fraction >= 1:
        return 0.0
    if total <= sample_size:
        vals = torch.cat([t.detach().abs().to(torch.float64) for t in xs])
    else:
        idx = torch.randint(total, (sample_size,), generator=generator)
        idx, _ = torch.sort(idx)
        offsets = torch.tensor([0] + [t.numel() for t in xs]).cumsum(0)
        parts = []
        for i, t in enumerate(xs):
            lo, hi = torch.searchsorted(idx, offsets[i]).item(), torch.searchsorted(idx, offsets[i + 1]).item()
            if hi > lo:
                parts.append(t.detach()[(idx[lo:hi] - offsets[i]).to(t.device)].abs().to(torch.float64).cpu())
        vals = torch.cat(parts)
    m = vals.numel()
    k = int(round(fraction * m))
    if k <= 0:
        return math.inf
    if k >= m:
        return 0.0
    return float(torch.kthvalue(vals.cpu(), m - k + 1).values)


@torch.no_grad()
def top_fraction_mask(
    x: Buffers,
    fraction: float,
    *,
    sample_size: int = 1 << 20,
    generator: torch.Generator | None = None,
    out: Buffers | None = None,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
) -> Tensor | list[Tensor]:
    """Bool mask of the top ``fraction`` of elements by magnitude |x| (one global threshold over all tensors).

    Args:
        x: a tensor or k tensors — typically the fitted velocity or the steady displacement W − A.
        fraction: share of elements to select, in [0, 1].
        sample_size, generator: see ``abs_threshold`` (exact up to ``sample_size`` elements, sampled above).
        out: optional bool tensor(s) with x's shapes to write into (else allocated: 1 byte per element).

    Returns:
        a bool tensor for a tensor ``x``, else a list of k bool tensors. Ties at the threshold are all selected;
        zeros are never selected unless ``fraction >= 1`` (an element that did not move has no trend to follow).
        Without ties and without sampling exactly ``round(fraction · numel)`` elements are selected. The
        comparison runs chunk-wise (scratch of ``chunk_numel`` elements), not on a model-sized |x|.
    """
    xs = as_list(x)
    thr = abs_threshold(xs, fraction, sample_size=sample_size, generator=generator)
    outs = [torch.empty(t.shape, dtype=torch.bool, device=t.device) for t in xs] if out is None else as_list(out)
    for t, o in zip(xs, outs):
        if o.shape != t.shape or o.dtype != torch.bool:
            raise ValueError("out must hold bool tensors with x's shapes")
        if fraction >= 1:
            o.fill_(True)
            continue
        if math.isinf(thr):
            o.fill_(False)
            continue
        tf, of = _flat(t, "x"), _flat(o, "out")
        n = tf.numel()
        if n == 0:
            continue
        scratch = torch.empty(min(chunk_numel, n), dtype=t.dtype, device=t.device)
        for s, e in _chunks(n, chunk_numel):
            a = scratch[: e - s]
            torch.abs(tf[s:e], out=a)
            if thr > 0:
                torch.ge(a, thr, out=of[s:e])
            else:
                torch.gt(a, 0, out=of[s:e])
    return outs[0] if isinstance(x, Tensor) else outs


# ---------------------------------------------------------------------------------------------------- R²


def r2_score(y: Tensor, t: Tensor | Sequence[float] | None = None, *, constant: float = float("nan")) -> Tensor:
    """R² of the least-squares line of each series in a batch: ``y`` against ``t``.

    Args:
        y: (..., T) — a batch of series, e.g. (num_sampled_weights, num_checkpoints).
        t: (T,) or broadcastable to y — the steps (default 0..T−1); needs ≥ 2 distinct values.
        constant: the value returned for a constant series (R² is 0/0 there). Default NaN — "undefined", the
            way the paper drops weights that never changed; sklearn's ``r2_score`` would give 1.0 (the fitted line
            is perfect) and ``numpy.corrcoef`` gives NaN.

    Returns:
        (...) tensor of R² in [0, 1] (float64 for float64 input, else float32):
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
