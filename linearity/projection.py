"""In-place weight projection along the RL trajectory, and the reductions that monitor it.

RL-Extra (paper §4.3) runs cycles of ``m`` real RL steps followed by ``n`` extrapolated ones. At the end of the
real steps every rank moves its own shard of the fp32 master weights along the cycle's displacement:

    W ← A + β (W − A),        A = the weights at the start of the cycle (the *anchor*), β = (m + n) / m

This module is that projection and nothing else: pure tensor math on *flat buffers* (a tensor, or a list of
tensors such as DeepSpeed's flat fp32 partitions), with no knowledge of Ray, vLLM or DeepSpeed, so it runs on
any device and is unit-tested on CPU.

Why it is written this way:

- The projection runs on the whole (sharded) model between two training steps, so it must cost about a memory
  copy and allocate nothing the size of the model. ``Tensor.lerp_(anchor, 1 − β)`` computes
  ``W + (1 − β)(A − W) = A + β (W − A)`` in one read-read-write pass, about as fast as ``copy_`` (0.8–0.9× a
  copy's speed on this shared 2-core CPU, ``bench/projection.py``; about 2.3× faster than the chain); a
  ``mul_/add_`` chain makes three passes and an out-of-place expression allocates several model-sized
  temporaries. ``torch._foreach_lerp_`` does the same on a list of tensors in one call, with a per-tensor β
  (``ScalarList`` overload).
- Masked projection (only selected elements move) cannot be written as a single scalar ``lerp_``; it is done
  chunk by chunk through one small scratch buffer (``chunk_numel`` elements), so the extra memory is bounded
  by the chunk, not by the model.
- The statistics (squared norms of the displacement, over the same masks as the projection) are returned as
  per-tensor partial sums in float64 on the buffers' device, so a distributed caller all-reduces them
  (sum over ranks) and only then forms norms or ratios. The statistics that decide *what* to project (drift
  share, top-fraction selection, least-squares trends) are in ``linearity.trend``.

Precision: every function computes in at least float32 and rounds once into the destination. For fp32 buffers
the projection is exact to fp32 rounding (a few ulp of ``|W| + |A| + |β (W − A)|``). For bf16 buffers ``lerp_``
computes in fp32 and rounds the result once to bf16 (error ≤ 1 bf16 ulp of the result, i.e. relative ≤ 2⁻⁸,
plus the fp32 rounding above, which only shows where the result nearly cancels to 0), but the displacement
``W − A`` of a bf16 weight is itself quantised to the bf16 grid of ``W``, so small per-step updates are lost —
project the fp32 master weights, not their bf16 copy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

Buffers = Tensor | Sequence[Tensor]
"""A flat buffer or a list of them (each of any shape; the chunked paths need contiguous tensors)."""

DEFAULT_CHUNK_NUMEL = 1 << 20
"""Elements per chunk for the paths that need a scratch buffer (4 MiB at fp32): big enough to amortise the
Python loop, small enough to stay out of the model-size memory budget."""


# ----------------------------------------------------------------------------------------------- helpers


def as_list(x: Buffers) -> list[Tensor]:
    """A tensor becomes a one-element list; a sequence of tensors becomes a list."""
    if isinstance(x, Tensor):
        return [x]
    return list(x)


def _check_pair(weights: list[Tensor], other: list[Tensor], what: str, *, same_dtype: bool = True) -> None:
    if len(weights) != len(other):
        raise ValueError(f"{what}: {len(other)} tensors for {len(weights)} weight tensors")
    for i, (w, o) in enumerate(zip(weights, other)):
        if w.shape != o.shape:
            raise ValueError(f"{what}[{i}]: shape {tuple(o.shape)} != weight shape {tuple(w.shape)}")
        if w.device != o.device:
            raise ValueError(f"{what}[{i}]: device {o.device} != weight device {w.device}")
        if same_dtype and w.dtype != o.dtype:
            raise ValueError(f"{what}[{i}]: dtype {o.dtype} != weight dtype {w.dtype}")


def flat_view(t: Tensor, what: str) -> Tensor:
    """``t`` as a 1-D view (``dtype[numel]``) without copying; ``what`` names it in the error for a strided tensor."""
    if not t.is_contiguous():
        raise ValueError(f"{what}: expected a contiguous (flat) buffer")
    return t.view(-1)


def chunk_bounds(numel: int, chunk_numel: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of consecutive chunks of at most ``chunk_numel`` elements covering ``range(numel)``."""
    for start in range(0, numel, chunk_numel):
        yield start, min(start + chunk_numel, numel)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in for buffers of ``dtype``: float32 for half types, else ``dtype`` itself."""
    return torch.promote_types(dtype, torch.float32)


def _betas(beta: float | Sequence[float] | Tensor, k: int) -> list[float]:
    if isinstance(beta, Tensor):
        beta = beta.tolist() if beta.dim() > 0 else float(beta)
    if isinstance(beta, (int, float)):
        betas = [float(beta)] * k
    else:
        betas = [float(b) for b in beta]
        if len(betas) != k:
            raise ValueError(f"{len(betas)} betas for {k} weight tensors")
    for b in betas:
        if not math.isfinite(b):
            raise ValueError(f"beta must be finite, got {b}")
    return betas


def per_tensor_masks(mask: Tensor | Sequence[Tensor | None] | None, k: int) -> list[Tensor | None]:
    """k mask entries (None = the whole tensor) from any of the ``mask`` argument forms of ``project_``."""
    if mask is None:
        return [None] * k
    if isinstance(mask, Tensor):
        if k != 1:
            raise ValueError("a bare mask tensor needs a single weight tensor; pass a list of masks")
        return [mask]
    masks = list(mask)
    if len(masks) != k:
        raise ValueError(f"{len(masks)} masks for {k} weight tensors")
    return masks


# ------------------------------------------------------------------------------------------- projection


def project_(
    weights: Buffers,
    anchor: Buffers,
    beta: float | Sequence[float] | Tensor,
    mask: Tensor | Sequence[Tensor | None] | None = None,
    *,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
) -> None:
    """In place: ``W ← A + β (W − A)`` on every weight tensor (optionally only on masked elements).

    Args:
        weights: k tensors W_i (any shapes; fp32, bf16, fp16 or fp64), modified in place.
        anchor: k tensors A_i with W_i's shape, dtype and device (not modified).
        beta: one β for all tensors, or k per-tensor betas (a sequence or a 1-D tensor of length k).
            β = 1 leaves W unchanged (those tensors are skipped: exact identity, no memory traffic);
            β = 0 writes A exactly; β > 1 extrapolates, 0 < β < 1 interpolates.
        mask: None (project every element), or per tensor a ``bool`` mask with W_i's shape (a list aligned with
            ``weights``, entries may be None = whole tensor; a bare tensor when ``weights`` is one tensor):
            selected elements get exactly what the unmasked projection gives, the rest is untouched.
        chunk_numel: elements per chunk of the masked paths' scratch buffer.

    Cost: unmasked tensors go through ``torch._foreach_lerp_`` — one pass (read W, read A, write W), no
    allocation, as fast as ``copy_``. Masked tensors are processed in chunks through one scratch buffer of
    ``min(chunk_numel, numel)`` elements (float32 or wider, 4 MiB at the default chunk; nothing else is
    allocated): for fp32/fp64 weights the chunk's per-element lerp weight ``m (1 − β)`` is written into the
    scratch (cache-resident) and ``lerp_`` runs with it — the same main-memory traffic as the unmasked path plus
    reading the mask (1 byte per element, a quarter of an fp32 buffer); on CPU ≈ 2–3× the unmasked time (the
    mask→float conversion and the tensor-weight lerp are slower kernels). bf16/fp16 weights: a ``lerp`` into a
    half-precision scratch plus a ``where``. The mask itself is the caller's memory.

    Precision: fp32 is exact to fp32 rounding of the result. bf16/fp16 are computed in fp32 and rounded once to
    the buffer's dtype (within one ulp of the result); see the module docstring on why the fp32 master weights,
    not their bf16 copy, should be projected.
    """
    ws, anchors = as_list(weights), as_list(anchor)
    _check_pair(ws, anchors, "anchor")
    betas = _betas(beta, len(ws))
    masks = per_tensor_masks(mask, len(ws))

    full_w, full_a, full_weight = [], [], []
    for w, a, b, m in zip(ws, anchors, betas, masks):
        if b == 1.0:
            continue  # identity: leave the tensor (and its mask) alone
        if m is None:
            full_w.append(w)
            full_a.append(a)
            full_weight.append(1.0 - b)
        else:
            _project_masked_(w, a, b, m, chunk_numel)
    if full_w:
        if len(set(full_weight)) == 1:
            torch._foreach_lerp_(full_w, full_a, full_weight[0])
        else:
            torch._foreach_lerp_(full_w, full_a, full_weight)


def _project_masked_(w: Tensor, a: Tensor, beta: float, m: Tensor, chunk_numel: int) -> None:
    if m.shape != w.shape:
        raise ValueError(f"mask shape {tuple(m.shape)} != weight shape {tuple(w.shape)}")
    if m.device != w.device:
        raise ValueError(f"mask device {m.device} != weight device {w.device}")
    if m.dtype != torch.bool:
        raise TypeError(f"mask must be bool, got {m.dtype}")
    wf, af, mf = flat_view(w, "weights"), flat_view(a, "anchor"), flat_view(m, "mask")
    n = wf.numel()
    if n == 0:
        return
    size, cdt = min(chunk_numel, n), compute_dtype(w.dtype)
    if cdt == w.dtype:
        # fp32 / fp64: a per-element lerp weight m·(1 − β), exactly (1 − β) or 0, so selected elements are
        # bit-identical to the unmasked path and the others are left as they are.
        mf = mf.view(torch.uint8)  # uint8 → float conversion is vectorised, bool → float is not
        lw_buf = torch.empty(size, dtype=w.dtype, device=w.device)
        for s, e in chunk_bounds(n, chunk_numel):
            lw = lw_buf[: e - s]
            lw.copy_(mf[s:e])
            lw.mul_(1.0 - beta)
            wf[s:e].lerp_(af[s:e], lw)
    else:
        # half types: lerp into a scratch of the weight's dtype (the unmasked path's rounding), then select.
        out_buf = torch.empty(size, dtype=w.dtype, device=w.device)
        for s, e in chunk_bounds(n, chunk_numel):
            out = out_buf[: e - s]
            torch.lerp(wf[s:e], af[s:e], 1.0 - beta, out=out)
            torch.where(mf[s:e], out, wf[s:e], out=wf[s:e])


def snapshot_(anchor: Buffers, weights: Buffers) -> None:
    """In place: ``A ← W`` for every tensor (``torch._foreach_copy_``), e.g. at the start of an RL-Extra cycle.

    Args:
        anchor: k preallocated tensors, each with the shape of its weight tensor (dtype and device may differ:
            e.g. an fp32 anchor kept on CPU for a GPU shard; the copy converts).
        weights: k tensors W_i (not modified).
    """
    anchors, ws = as_list(anchor), as_list(weights)
    if len(anchors) != len(ws):
        raise ValueError(f"anchor: {len(anchors)} tensors for {len(ws)} weight tensors")
    for i, (a, w) in enumerate(zip(anchors, ws)):
        if a.shape != w.shape:
            raise ValueError(f"anchor[{i}]: shape {tuple(a.shape)} != weight shape {tuple(w.shape)}")
    torch._foreach_copy_(anchors, ws)


# ------------------------------------------------------------------------------------------- statistics


class DisplacementStats(NamedTuple):
    """Squared norms of ``W − A``: ``per_tensor`` float64[k], ``total`` float64[] its sum (same device)."""

    per_tensor: Tensor
    total: Tensor


def displacement_stats(
    weights: Buffers,
    anchor: Buffers,
    mask: Tensor | Sequence[Tensor | None] | None = None,
    *,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
) -> DisplacementStats:
    """Squared norm of the displacement ``‖W_i − A_i‖²`` per tensor and in total, optionally over masked elements.

    Args:
        weights, anchor: k tensors each (matching shapes and devices; dtypes may differ).
        mask: None, or per tensor None (every element) or a bool mask with W_i's shape — the same forms as
            ``project_``'s ``mask``, so the norm of what a projection moves is measured with the projection's masks.

    Returns:
        ``DisplacementStats(per_tensor=float64[k], total=float64[])`` on the weights' device — partial sums: under
        sharding, all-reduce ``per_tensor`` (sum) and recompute ``total`` as its sum.

    Precision: ``W − A`` is formed in ``compute_dtype`` (at least float32, after an exact upcast). Whole tensors:
    chunk-wise (scratch of ``chunk_numel`` elements), each chunk's ``dot`` in that dtype, chunk sums in float64.
    Masked tensors: the selected elements are gathered (temporaries of the selection's size), squared in float64
    and summed at once.
    """
    ws, anchors = as_list(weights), as_list(anchor)
    _check_pair(ws, anchors, "anchor", same_dtype=False)
    masks = per_tensor_masks(mask, len(ws))
    per = torch.zeros(len(ws), dtype=torch.float64, device=ws[0].device if ws else torch.device("cpu"))
    for i, (w, a, m) in enumerate(zip(ws, anchors, masks)):
        per[i] = _sq_distance(w, a, chunk_numel) if m is None else _masked_sq_distance(w, a, m)
    return DisplacementStats(per, per.sum())


def sq_norm(d: Buffers, *, chunk_numel: int = DEFAULT_CHUNK_NUMEL) -> Tensor:
    """Per-tensor squared norms ``Σ d_i²``: float64[k] on d's device (partial sums to all-reduce).

    Args:
        d: k tensors (any shapes and float dtypes), summed as ``displacement_stats`` sums whole tensors.
    """
    ds = as_list(d)
    out = torch.zeros(len(ds), dtype=torch.float64, device=ds[0].device if ds else torch.device("cpu"))
    for i, t in enumerate(ds):
        out[i] = _sq_distance(t, None, chunk_numel)
    return out


def _sq_distance(w: Tensor, a: Tensor | None, chunk_numel: int) -> Tensor:
    """float64[]: ``Σ (w − a)²`` (``Σ w²`` without ``a``), chunk by chunk through one scratch buffer."""
    wf = flat_view(w, "weights")
    af = flat_view(a, "anchor") if a is not None else None
    n = wf.numel()
    acc = torch.zeros((), dtype=torch.float64, device=w.device)
    if n == 0:
        return acc
    cdt = compute_dtype(w.dtype if a is None else torch.promote_types(w.dtype, a.dtype))
    scratch = torch.empty(min(chunk_numel, n), dtype=cdt, device=w.device)
    for s, e in chunk_bounds(n, chunk_numel):
        d = _diff_chunk(scratch, wf, af, s, e)
        acc += torch.dot(d, d).double()
    return acc


def _diff_chunk(scratch: Tensor, w: Tensor, a: Tensor | None, s: int, e: int) -> Tensor:
    """``w[s:e] − a[s:e]`` in the scratch's dtype (exact upcast first), or a view of w when no upcast is needed."""
    if a is None and w.dtype == scratch.dtype:
        return w[s:e]
    d = scratch[: e - s]
    if a is not None and w.dtype == scratch.dtype and a.dtype == scratch.dtype:
        torch.sub(w[s:e], a[s:e], out=d)
    else:
        d.copy_(w[s:e])
        if a is not None:
            d.sub_(a[s:e])
    return d


def _masked_sq_distance(w: Tensor, a: Tensor, m: Tensor) -> Tensor:
    """float64[]: ``Σ (w − a)²`` over the elements where the bool mask ``m`` (w's shape) is set."""
    if m.dtype != torch.bool or m.shape != w.shape:
        raise ValueError(f"mask: expected bool{list(w.shape)}, got {m.dtype} {list(m.shape)}")
    cdt = compute_dtype(torch.promote_types(w.dtype, a.dtype))
    d = w[m].to(cdt) - a[m].to(cdt)
    return (d.double() ** 2).sum()
