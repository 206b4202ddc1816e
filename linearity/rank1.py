"""Rank-1 trend extrapolation (AlphaRL arXiv 2510.00553, RELEX arXiv 2605.21468) on flat slices of weight matrices.

AlphaRL finds that an RL update ΔW of a weight matrix is dominated by its rank-1 part σ u vᵀ, and that this part
evolves linearly with the step; RELEX fits that evolution over a window and extrapolates it. Here, per weight matrix
D = W − A (the cycle's update from the anchor A), the rank-1 strategy moves the weights only along its dominant
direction:

    W ← W + (β − 1) σ u vᵀ                      (two_point: the rank-1 part of the chord, stretched like RL-Extra's)
    W ← W + (β − 1) m (uᵀ V v) u vᵀ             (least_squares: V the per-element least-squares slope of the cycle's
                                                  m steps, so uᵀ V v is the slope of the coefficient uᵀ W_t v over time)

Finding u, v without whole matrices. Under ZeRO each rank holds a flat, row-major slice of every matrix (ZeRO-3: a
contiguous 1/world of each parameter; ZeRO-1/2: slices of flat groups, a parameter possibly split between ranks), so
a slice covers a partial first row, some full rows and a partial last row. The power iteration needs only products
with vectors, which a slice computes partially and an all-reduce completes:

    u ← D v:   every rank adds Σ_j D_ij v_j over the (i, j) it holds into an R-vector;  all-reduce;  u ← u / ‖u‖
    v ← Dᵀ u:  every rank adds Σ_i D_ij u_i into a C-vector;                          all-reduce;  σ ← ‖v‖, v ← v / σ

All matrices go through one all-reduce per half-step (one buffer of Σ R, then of Σ C floats). Cost per iteration:
two passes over the rank's shard (D formed chunk by chunk, float64 accumulation) and two all-reduces of Σ (R + C)
doubles; memory: one chunk and the vectors. The alternative, gathering each matrix whole, moves the whole model over
the network every cycle and needs the largest matrix on one rank.

After the last iteration v = Dᵀ u / σ exactly, so σ u vᵀ = u uᵀ D is the projection of D onto the direction u — a
well-defined rank-1 part of D even before the iteration has fully converged (it converges to the leading singular
triple at the rate σ₂/σ₁ per half-step; `share` = σ² / ‖D‖²_F says how much of the update that direction carries).

Everything is pure torch; a single process is the one-rank case (no all-reduce).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

Chunk = tuple[int, int, Tensor]
"""(matrix index, offset of the chunk's first element in the row-major flattened matrix, values float[n])."""


class Rank1(NamedTuple):
    """The rank-1 part σ u vᵀ of each of M matrices: `sigma` float64[M], `u` float64[R_m] and `v` float64[C_m] per
    matrix (unit vectors, or zeros where D = 0), `sq_norm` float64[M] the squared Frobenius norms ‖D‖²."""

    sigma: Tensor
    u: list[Tensor]
    v: list[Tensor]
    sq_norm: Tensor

    @property
    def share(self) -> Tensor:
        """float64[M]: σ² / ‖D‖² — the share of each update's energy along its rank-1 direction (NaN where D = 0)."""
        return self.sigma**2 / self.sq_norm


# ----------------------------------------------------------------------------------- products on one slice


def _rows(offset: int, n: int, cols: int):
    """The slice [offset, offset + n) of a row-major matrix with `cols` columns, as pieces
    (local start, row, first column, length): partial rows one by one, and the full rows as one piece with
    first column 0 and length k·cols."""
    start = 0
    row, col = divmod(offset, cols)
    if col:  # partial first row
        length = min(n, cols - col)
        yield 0, row, col, length
        start, row = length, row + 1
    full = (n - start) // cols
    if full:
        yield start, row, 0, full * cols
        start, row = start + full * cols, row + full
    if start < n:  # partial last row
        yield start, row, 0, n - start


def matvec_(out: Tensor, values: Tensor, offset: int, shape: tuple[int, int], v: Tensor) -> None:
    """out[R] += D v restricted to the slice: `values` float[n] are D's elements [offset, offset + n) (row-major),
    `v` float64[C]; out float64[R]."""
    cols = shape[1]
    d = values.double()
    for s, row, c, length in _rows(offset, d.numel(), cols):
        if c == 0 and length >= cols:
            k = length // cols
            out[row : row + k] += d[s : s + length].view(k, cols) @ v
        else:
            out[row] += d[s : s + length] @ v[c : c + length]


def rmatvec_(out: Tensor, values: Tensor, offset: int, shape: tuple[int, int], u: Tensor) -> None:
    """out[C] += Dᵀ u restricted to the slice (see `matvec_`); u float64[R], out float64[C]."""
    cols = shape[1]
    d = values.double()
    for s, row, c, length in _rows(offset, d.numel(), cols):
        if c == 0 and length >= cols:
            k = length // cols
            out += u[row : row + k] @ d[s : s + length].view(k, cols)
        else:
            out[c : c + length] += u[row] * d[s : s + length]


def bilinear(values: Tensor, offset: int, shape: tuple[int, int], u: Tensor, v: Tensor) -> float:
    """uᵀ D v restricted to the slice (a partial sum: add over the slices of every rank)."""
    out = torch.zeros(shape[0], dtype=torch.float64, device=values.device)
    matvec_(out, values, offset, shape, v)
    return float(u @ out)


@torch.no_grad()
def add_outer_(weights: Tensor, offset: int, shape: tuple[int, int], u: Tensor, v: Tensor, scale: float) -> None:
    """In place: the slice `weights` float[n] (elements [offset, offset + n) of a row-major matrix) += scale · u vᵀ
    there; computed in float64 per piece and rounded once into the weights' dtype."""
    cols = shape[1]
    for s, row, c, length in _rows(offset, weights.numel(), cols):
        if c == 0 and length >= cols:
            k = length // cols
            step = torch.outer(u[row : row + k], v).mul_(scale)
            weights[s : s + length].view(k, cols).add_(step.to(weights.dtype))
        else:
            weights[s : s + length].add_((v[c : c + length] * (u[row] * scale)).to(weights.dtype))


# --------------------------------------------------------------------------------------- power iteration


def start_vectors(shapes: Sequence[tuple[int, int]], seed: int) -> list[Tensor]:
    """float64[C_m] unit vectors, one per matrix, from `seed` (the same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _, cols in shapes:
        v = torch.randn(cols, dtype=torch.float64, generator=gen)
        out.append(v / v.norm())
    return out


@torch.no_grad()
def power_iteration(
    chunks: Callable[[], Iterable[Chunk]],
    shapes: Sequence[tuple[int, int]],
    start: Sequence[Tensor],
    iters: int,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> Rank1:
    """The rank-1 part of each of M matrices D_m given as flat slices, by `iters` power iterations.

    Args:
        chunks: called once per pass; yields (matrix index, offset, values float[n]) covering this rank's elements
            of every matrix (any chunking; D may be formed chunk by chunk, e.g. W − A, to bound memory).
        shapes: (R_m, C_m) per matrix (a parameter of shape (R, ...) is the matrix (R, prod(rest))).
        start: float64[C_m] non-zero start vectors (e.g. `start_vectors`, or the previous cycle's v: warm start).
        iters: ≥ 1 iterations (each two passes over `chunks` and two all-reduces).
        all_reduce: sums a float64 tensor over ranks (None: a single process).

    Returns:
        `Rank1` with v = Dᵀu / σ from the last half-step (so σ u vᵀ = u uᵀ D).
    """
    reduce = all_reduce or (lambda t: t)
    rows = [r for r, _ in shapes]
    cols = [c for _, c in shapes]
    row_at = [0, *torch.tensor(rows).cumsum(0).tolist()]
    col_at = [0, *torch.tensor(cols).cumsum(0).tolist()]
    m = len(shapes)
    device = start[0].device if start else torch.device("cpu")
    v = [s.to(torch.float64) / s.norm() for s in start]
    u = [torch.zeros(r, dtype=torch.float64, device=device) for r in rows]
    sigma = torch.zeros(m, dtype=torch.float64)
    sq_norm = torch.zeros(m, dtype=torch.float64)
    for it in range(iters):
        buf = torch.zeros(row_at[-1] + m, dtype=torch.float64, device=device)  # Σ R, then ‖D_m‖² (first pass)
        for i, offset, values in chunks():
            matvec_(buf[row_at[i] : row_at[i + 1]], values, offset, shapes[i], v[i])
            if it == 0:
                buf[row_at[-1] + i] += values.double().square().sum()
        buf = reduce(buf)
        if it == 0:
            sq_norm = buf[row_at[-1] :].cpu()
        for i in range(m):
            y = buf[row_at[i] : row_at[i + 1]]
            norm = y.norm()
            u[i] = y / norm if norm > 0 else torch.zeros_like(y)
        buf = torch.zeros(col_at[-1], dtype=torch.float64, device=device)
        for i, offset, values in chunks():
            rmatvec_(buf[col_at[i] : col_at[i + 1]], values, offset, shapes[i], u[i])
        buf = reduce(buf)
        for i in range(m):
            z = buf[col_at[i] : col_at[i + 1]]
            sigma[i] = z.norm()
            v[i] = z / sigma[i] if sigma[i] > 0 else torch.zeros_like(z)
    return Rank1(sigma, u, v, sq_norm)
