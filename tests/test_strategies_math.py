"""The pure math of the rank-1 and lookahead strategies on random tensors, against references.

- rank1 (linearity/rank1.py): the power iteration over flat slices cut at arbitrary offsets, summed as an all-reduce
  would, equals numpy's SVD of the whole matrix (σ₁, u₁, v₁) on matrices with a leading direction; the slice
  products and the in-place rank-1 update equal the dense computation on every slice.
- lookahead (linearity/lookahead.py and the reposition `project_` with β = α): a hand-written SFPO step (clone the
  slow weights, K fast steps, `param = slow + α (fast − slow)`, one slow step — the loop of SFPO's
  `sfpo_update_actor`) equals the in-place one; the entropy switch equals SFPO's z-score rule written with numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from linearity.lookahead import EntropySwitch
from linearity.projection import project_, snapshot_
from linearity.rank1 import add_outer_, bilinear, matvec_, power_iteration, rmatvec_, start_vectors

# --------------------------------------------------------------------------------------------------- rank1


def _planted(rows: int, cols: int, seed: int, gap: float = 8.0) -> torch.Tensor:
    """A random matrix with a clear leading singular value (σ₁ ≈ gap × σ₂), float64."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(rows, 1, dtype=torch.float64, generator=gen)
    v = torch.randn(1, cols, dtype=torch.float64, generator=gen)
    noise = torch.randn(rows, cols, dtype=torch.float64, generator=gen)
    top = u @ v / (u.norm() * v.norm())
    return gap * top * torch.linalg.matrix_norm(noise, ord=2) + noise


def _cut(numel: int, ranks: int, seed: int) -> list[tuple[int, int]]:
    """`ranks` contiguous pieces of range(numel) cut at random points (partial rows at both ends of each)."""
    gen = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randint(1, numel, (ranks - 1,), generator=gen).tolist())
    bounds = [0, *cuts, numel]
    return list(zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("shape", [(7, 5), (33, 64), (64, 9), (1, 16)])
def test_slice_products_equal_the_dense_ones(shape):
    d = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    u = torch.randn(shape[0], dtype=torch.float64)
    v = torch.randn(shape[1], dtype=torch.float64)
    y, z, uv, flat = (
        torch.zeros(shape[0], dtype=torch.float64),
        torch.zeros(shape[1], dtype=torch.float64),
        0.0,
        d.ravel(),
    )
    updated = flat.clone()
    for s, e in _cut(flat.numel(), 4, seed=shape[0]) if flat.numel() >= 4 else [(0, flat.numel())]:
        matvec_(y, flat[s:e], s, shape, v)
        rmatvec_(z, flat[s:e], s, shape, u)
        uv += bilinear(flat[s:e], s, shape, u, v)
        add_outer_(updated[s:e], s, shape, u, v, 0.3)
    torch.testing.assert_close(y, d @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z, d.T @ u, rtol=1e-12, atol=1e-12)
    assert uv == pytest.approx(float(u @ d @ v), rel=1e-12)
    torch.testing.assert_close(updated.view(shape), d + 0.3 * torch.outer(u, v), rtol=0, atol=1e-15)


def test_add_outer_rounds_once_into_fp32():
    w = torch.randn(6, 10).ravel()
    u, v = torch.randn(6, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    expected = (w.double().view(6, 10) + 1e-3 * torch.outer(u, v)).float().ravel()
    for s, e in [(0, 13), (13, 40), (40, 60)]:
        add_outer_(w[s:e], s, (6, 10), u, v, 1e-3)
    # one rounding of the float64 step, then the fp32 add: within one ulp of the exact result
    torch.testing.assert_close(w, expected, rtol=1.2e-7, atol=0)


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_sharded_power_iteration_equals_numpy_svd(ranks):
    """Three matrices, each cut into `ranks` slices at random offsets (as ZeRO partitions a flat group); the partial
    products of every "rank" are summed (the all-reduce); σ, u, v equal numpy's leading singular triple."""
    shapes = [(40, 24), (17, 64), (96, 8)]
    mats = [_planted(r, c, seed=i) for i, (r, c) in enumerate(shapes)]
    pieces = [_cut(r * c, ranks, seed=10 * i + ranks) if ranks > 1 else [(0, r * c)] for i, (r, c) in enumerate(shapes)]

    def chunks():  # every rank's slices, in rank order; the sum over ranks is what the all-reduce would give
        for rank in range(ranks):
            for i, m in enumerate(mats):
                s, e = pieces[i][rank]
                yield i, s, m.ravel()[s:e]

    found = power_iteration(chunks, shapes, start_vectors(shapes, seed=0), iters=30)
    for i, m in enumerate(mats):
        uu, ss, vt = np.linalg.svd(m.numpy())
        sign = float(np.sign(found.u[i].numpy() @ uu[:, 0]))
        assert found.sigma[i].item() == pytest.approx(ss[0], rel=1e-12)
        np.testing.assert_allclose(sign * found.u[i].numpy(), uu[:, 0], atol=1e-10)
        np.testing.assert_allclose(sign * found.v[i].numpy(), vt[0], atol=1e-10)
        assert found.sq_norm[i].item() == pytest.approx(float((m**2).sum()), rel=1e-12)
        assert found.share[i].item() == pytest.approx(ss[0] ** 2 / float((ss**2).sum()), rel=1e-10)


def test_power_iteration_before_convergence_is_the_projection_on_u():
    """After any number of iterations σ u vᵀ = u uᵀ D: the part of D along u (what the projection adds)."""
    m = torch.randn(30, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))  # no gap: slow
    found = power_iteration(lambda: iter([(0, 0, m.ravel())]), [(30, 20)], start_vectors([(30, 20)], 1), iters=2)
    u = found.u[0]
    torch.testing.assert_close(found.sigma[0] * torch.outer(u, found.v[0]), torch.outer(u, u) @ m, rtol=0, atol=1e-12)


def test_power_iteration_of_a_zero_matrix_is_zero():
    found = power_iteration(lambda: iter([(0, 0, torch.zeros(12))]), [(3, 4)], start_vectors([(3, 4)], 0), iters=3)
    assert found.sigma[0] == 0 and not found.u[0].any() and not found.v[0].any()


# ------------------------------------------------------------------------------------------------ lookahead


def _sgd_step(w: torch.Tensor, target: torch.Tensor, lr: float) -> None:
    """One step of gradient descent on ½‖w − target‖² (the 'update_policy' of the toy)."""
    w.sub_(lr * (w - target))


def test_in_place_lookahead_equals_sfpo_loop():
    """SFPO's `sfpo_update_actor` written as its code does it (clones of the slow and fast weights, a per-parameter
    copy), against the in-place version on the same buffers: snapshot into the anchor, K fast steps, project_ with
    β = α, slow step."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(50, generator=gen), torch.randn(7, 3, generator=gen)]
    targets = [torch.randn(p.shape, generator=gen) for p in params]
    k, alpha, lr = 3, 0.8, 0.1

    ref = [p.clone() for p in params]
    slow_weights = [p.detach().clone() for p in ref]
    for _ in range(k):
        for p, t in zip(ref, targets):
            _sgd_step(p, t, lr)
    fast_weights = [p.detach().clone() for p in ref]
    for idx, p in enumerate(ref):
        p.data.copy_(slow_weights[idx] + alpha * (fast_weights[idx] - slow_weights[idx]))
    for p, t in zip(ref, targets):
        _sgd_step(p, t, lr)

    ours = [p.clone() for p in params]
    slow = [torch.empty_like(p) for p in ours]
    snapshot_(slow, ours)
    for _ in range(k):
        for p, t in zip(ours, targets):
            _sgd_step(p, t, lr)
    project_(ours, slow, alpha)
    for p, t in zip(ours, targets):
        _sgd_step(p, t, lr)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-7)  # lerp vs slow + α·(fast − slow): last-bit rounding


def _sfpo_switch(entropies: list[float], window: int, threshold: float) -> list[bool]:
    """SFPO's trainer loop: before each step, if the container holds >= window values, z of its last value within
    the last `window` (np.std: population) stops SFPO for good; the step's entropy is then appended."""
    on, container, out = True, [], []
    for e in entropies:
        container.append(e)
        if len(container) >= window:
            last = np.array(container[-window:])
            z = (container[-1] - float(np.mean(last))) / (float(np.std(last)) + 1e-9)
            if z >= threshold:
                on = False
        out.append(on)
    return out


def test_entropy_switch_equals_sfpo_z_score_rule():
    rng = np.random.default_rng(0)
    entropies = list(1.0 - 0.01 * np.arange(80) + 0.002 * rng.standard_normal(80))  # RL lowers the entropy
    entropies[50] += 0.3  # a spike: z well above 1
    switch = EntropySwitch(window=30, threshold=1.0)
    got = [switch.observe(e) for e in entropies]
    assert got == _sfpo_switch(entropies, 30, 1.0)
    assert got[49] is True and got[50] is False and not any(got[50:]), "off for good at the spike"
    restored = EntropySwitch(window=30, threshold=1.0)
    restored.load_state(switch.state())
    assert restored.on is False and list(restored.history) == entropies[-30:]
    never = EntropySwitch(window=30, threshold=None)
    assert all(never.observe(e) for e in entropies) and math.isfinite(never.last_z)
