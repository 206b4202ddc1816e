"""Unit tests of the pure projection / trend math in ``linearity`` (CPU, small tensors, a few seconds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from linearity.projection import displacement_dot, displacement_stats, dot, project_, snapshot_, sq_norm
from linearity.trend import (
    TrendAccumulator,
    abs_threshold,
    drift_share,
    r2_score,
    top_fraction_mask,
    two_point_velocity,
)

SHAPES = [(37,), (5, 11), (3, 4, 6), (1000,)]


def _rand(shapes, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype) for s in shapes]


def _ref(w, a, beta):
    return a.double() + beta * (w.double() - a.double())


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp at |x| (8 significant bits)."""
    ax = x.double().abs().clamp_min(2.0**-126)
    return torch.exp2(torch.floor(torch.log2(ax)) - 7)


def _bf16_tol(ref, w, a, beta):
    """One bf16 ulp of the result plus the fp32 rounding of the intermediate terms (matters near ref ≈ 0)."""
    w, a = w.double(), a.double()
    return _bf16_ulp(ref) + 2.0**-22 * (w.abs() + a.abs() + abs(beta) * (w - a).abs())


class _AllocationWatch(TorchDispatchMode):
    """Records the numel of every tensor an op returns in fresh storage (not an input's)."""

    def __init__(self):
        super().__init__()
        self.new_numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in ins:
                self.new_numels.append(t.numel())
        return out


# ------------------------------------------------------------------------------------------- projection


@pytest.mark.parametrize("beta", [2.0, 1.37, 0.4, -0.5])
def test_project_fp32_matches_reference_in_place(beta):
    ws, anchors = _rand(SHAPES, seed=1), _rand(SHAPES, seed=2)
    refs = [_ref(w, a, beta) for w, a in zip(ws, anchors)]
    ids, ptrs = [id(w) for w in ws], [w.data_ptr() for w in ws]
    a_before = [a.clone() for a in anchors]
    project_(ws, anchors, beta)
    assert [id(w) for w in ws] == ids and [w.data_ptr() for w in ws] == ptrs
    for w, r in zip(ws, refs):
        assert w.dtype == torch.float32
        torch.testing.assert_close(w.double(), r, rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(anchors, a_before))


def test_project_single_tensor_and_no_large_allocations():
    w, a = _rand([(4096,)], seed=3)[0], _rand([(4096,)], seed=4)[0]
    ref = _ref(w, a, 1.8)
    ptr = w.data_ptr()
    with _AllocationWatch() as watch:
        project_(w, a, 1.8)  # unmasked: nothing model-sized is allocated
    assert max(watch.new_numels, default=0) <= 1
    assert w.data_ptr() == ptr
    torch.testing.assert_close(w.double(), ref, rtol=0, atol=1e-6)

    w = _rand([(4096,)], seed=3)[0]
    mask = torch.rand(4096, generator=torch.Generator().manual_seed(0)) < 0.3
    ref = torch.where(mask, _ref(w, a, 1.8), w.double())
    with _AllocationWatch() as watch:
        project_(w, a, 1.8, mask, chunk_numel=256)
    assert max(watch.new_numels) <= 256  # only the chunk scratch
    torch.testing.assert_close(w.double(), ref, rtol=0, atol=1e-6)


def test_project_bf16_within_rounding():
    ws, anchors = _rand(SHAPES, torch.bfloat16, seed=5), _rand(SHAPES, torch.bfloat16, seed=6)
    refs = [_ref(w, a, 1.6) for w, a in zip(ws, anchors)]
    tols = [_bf16_tol(r, w, a, 1.6) for r, w, a in zip(refs, ws, anchors)]
    ptrs = [w.data_ptr() for w in ws]
    project_(ws, anchors, 1.6)
    assert [w.data_ptr() for w in ws] == ptrs
    for w, r, tol in zip(ws, refs, tols):
        assert w.dtype == torch.bfloat16
        err = (w.double() - r).abs()
        assert bool((err <= tol).all()), float((err / tol).max())


def test_project_beta_one_identity_and_beta_zero_anchor():
    for dtype in (torch.float32, torch.bfloat16):
        ws, anchors = _rand(SHAPES, dtype, seed=7), _rand(SHAPES, dtype, seed=8)
        before = [w.clone() for w in ws]
        project_(ws, anchors, 1.0)
        assert all(torch.equal(w, b) for w, b in zip(ws, before))
        project_(ws, anchors, 0.0)
        assert all(torch.equal(w, a) for w, a in zip(ws, anchors))


def test_project_per_tensor_betas():
    betas = [0.5, 1.0, 2.0, 3.7]
    ws, anchors = _rand(SHAPES, seed=9), _rand(SHAPES, seed=10)
    refs = [_ref(w, a, b) for w, a, b in zip(ws, anchors, betas)]
    untouched = ws[1].clone()
    project_(ws, anchors, betas)
    for w, r in zip(ws, refs):
        torch.testing.assert_close(w.double(), r, rtol=0, atol=1e-6)
    assert torch.equal(ws[1], untouched)
    ws2 = _rand(SHAPES, seed=9)
    project_(ws2, anchors, torch.tensor(betas))
    assert all(torch.equal(x, y) for x, y in zip(ws, ws2))
    with pytest.raises(ValueError):
        project_(ws, anchors, [1.0, 2.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_project_bool_mask_matches_unmasked_on_selection(dtype):
    ws, anchors = _rand(SHAPES, dtype, seed=11), _rand(SHAPES, dtype, seed=12)
    g = torch.Generator().manual_seed(1)
    masks = [torch.rand(s, generator=g) < 0.4 for s in SHAPES]
    masks[2] = None  # whole tensor
    full = [w.clone() for w in ws]
    project_(full, anchors, 2.5)
    before = [w.clone() for w in ws]
    project_(ws, anchors, 2.5, masks, chunk_numel=16)  # chunks cross every tensor
    for w, f, b, m in zip(ws, full, before, masks):
        m = torch.ones_like(w, dtype=torch.bool) if m is None else m
        assert torch.equal(w[m], f[m])  # bit-identical to the unmasked projection
        assert torch.equal(w[~m], b[~m])  # untouched


def test_project_rejects_mismatches():
    w, a = _rand([(10,)], seed=0)[0], _rand([(11,)], seed=0)[0]
    with pytest.raises(ValueError):
        project_(w, a, 2.0)
    with pytest.raises(ValueError):
        project_(w, w.bfloat16(), 2.0)
    with pytest.raises(ValueError):
        project_(w, w.clone(), float("nan"))
    with pytest.raises(TypeError):
        project_(w, w.clone(), 2.0, torch.ones(10))  # masks are bool


def test_snapshot_copies_into_preallocated_buffers():
    ws = _rand(SHAPES, torch.bfloat16, seed=15)
    anchors = [torch.empty(s, dtype=torch.float32) for s in SHAPES]
    ptrs = [a.data_ptr() for a in anchors]
    snapshot_(anchors, ws)
    assert [a.data_ptr() for a in anchors] == ptrs
    assert all(torch.equal(a, w.float()) for a, w in zip(anchors, ws))


def _per_tensor(fn, *lists):
    """float64 (k,) of ``fn`` applied to the float64 versions of the i-th tensors."""
    return torch.stack([fn(*(x.double() for x in xs)).sum() for xs in zip(*lists)])


def test_displacement_stats_and_dots():
    ws, anchors, others = _rand(SHAPES, seed=16), _rand(SHAPES, seed=17), _rand(SHAPES, seed=18)
    st = displacement_stats(ws, anchors, chunk_numel=64)
    ref = _per_tensor(lambda w, a: (w - a) ** 2, ws, anchors)
    assert st.per_tensor.dtype == torch.float64 and st.per_tensor.shape == (len(SHAPES),)
    torch.testing.assert_close(st.per_tensor, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(st.total, ref.sum(), rtol=1e-6, atol=0)
    d = displacement_dot(ws, anchors, others, ws, chunk_numel=64)
    ref = _per_tensor(lambda w, a, o: (w - a) * (o - w), ws, anchors, others)
    torch.testing.assert_close(d, ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(dot(ws, others), _per_tensor(lambda w, o: w * o, ws, others), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sq_norm(ws), _per_tensor(lambda w: w * w, ws), rtol=1e-6, atol=0)
    # bf16 inputs: the difference is formed after an exact upcast
    wb, ab = [w.bfloat16() for w in ws], [a.bfloat16() for a in anchors]
    ref = _per_tensor(lambda w, a: (w - a) ** 2, wb, ab)
    torch.testing.assert_close(displacement_stats(wb, ab).per_tensor, ref, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------- trend


def _series(n_elem, steps, *, scale=1.0, slope=0.1, noise=0.05, seed=0):
    g = np.random.default_rng(seed)
    b = g.normal(size=n_elem) * scale
    v = g.normal(size=n_elem) * slope
    steps = np.asarray(steps, dtype=np.float64)
    y = b[:, None] + v[:, None] * steps[None, :] + g.normal(size=(n_elem, len(steps))) * noise
    return y  # (n_elem, T) float64


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_trend_accumulator_matches_polyfit(dtype, tol):
    steps = [3, 4, 7, 8, 12, 13, 15, 21, 22, 30]
    y = _series(300, steps, seed=1)
    y = torch.tensor(y).to(dtype).double().numpy()  # compare against the data the accumulator sees
    acc = TrendAccumulator([torch.zeros(300, dtype=dtype)])
    for j, t in enumerate(steps):
        acc.update([torch.tensor(y[:, j], dtype=dtype)], t)
    slope, icpt = np.polyfit(np.asarray(steps, float), y.T, 1)
    v, b = acc.velocity()[0].double().numpy(), acc.intercept()[0].double().numpy()
    np.testing.assert_allclose(v, slope, rtol=0, atol=tol)
    np.testing.assert_allclose(b, icpt, rtol=0, atol=tol * 10)
    r2_np = 1 - ((y - (icpt[:, None] + slope[:, None] * np.asarray(steps))) ** 2).sum(1) / (
        (y - y.mean(1, keepdims=True)) ** 2
    ).sum(1)
    np.testing.assert_allclose(acc.element_r2(0).double().numpy(), r2_np, rtol=0, atol=tol * 100)
    explained, total = acc.r2_partial_sums()
    pooled = (r2_np * ((y - y.mean(1, keepdims=True)) ** 2).sum(1)).sum() / ((y - y.mean(1, keepdims=True)) ** 2).sum()
    np.testing.assert_allclose(acc.tensor_r2().numpy(), [pooled], rtol=1e-5)
    assert explained.shape == total.shape == (1,)


def test_trend_accumulator_rl_scale_fp32_is_centred():
    """Weights ~1e-2 moving 1e-6 per step: the fp32 slope stays accurate (raw Σy, Σty would not)."""
    steps = list(range(50))
    y = _series(5000, steps, scale=0.02, slope=1e-6, noise=3e-7, seed=2)
    y = torch.tensor(y).float().double().numpy()
    acc = TrendAccumulator([torch.zeros(5000)], chunk_numel=1000)
    for j, t in enumerate(steps):
        acc.update([torch.tensor(y[:, j]).float()], t)
    slope = np.polyfit(np.asarray(steps, float), y.T, 1)[0]
    err = np.abs(acc.velocity()[0].double().numpy() - slope).max() / np.abs(slope).max()
    assert err < 1e-5, err


def test_trend_accumulator_memory_is_constant_and_reset():
    like = _rand(SHAPES, seed=0)
    acc = TrendAccumulator(like)
    assert acc.buffer_count == 4  # mean, comoment, m2, owned reference
    bufs = acc.mean + acc.comoment + acc.m2 + acc.reference
    ptrs = [b.data_ptr() for b in bufs]
    nbytes = acc.buffer_bytes
    for t in range(40):
        acc.update(_rand(SHAPES, seed=t), t)
    assert acc.buffer_bytes == nbytes and [b.data_ptr() for b in bufs] == ptrs
    assert nbytes == 4 * sum(w.numel() * 4 for w in like)
    assert TrendAccumulator(like, reference=like, track_r2=False).buffer_count == 2
    acc.reset()
    assert acc.n == 0 and all(float(m.abs().max()) == 0 for m in acc.mean)
    with pytest.raises(ValueError):
        acc.velocity()
    acc.update(like, 5)
    with pytest.raises(ValueError):
        acc.velocity()  # one point: no line


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_extrapolate_pure_line_exact(dtype, atol):
    w0, v = _rand(SHAPES, torch.float64, seed=20), _rand(SHAPES, torch.float64, seed=21, scale=0.01)
    anchor = [x.to(dtype) for x in w0]  # the cycle's anchor at step 10 = reference
    acc = TrendAccumulator(anchor, reference=anchor, chunk_numel=64)
    for t in [0, 1, 2, 4, 7]:
        acc.update([(a + b * t).to(dtype) for a, b in zip(w0, v)], 10 + t)
    weights = [torch.empty_like(x) for x in anchor]
    ptrs = [w.data_ptr() for w in weights]
    with _AllocationWatch() as watch:
        acc.extrapolate_(weights, 10 + 25)
    assert 0 < max(watch.new_numels) <= 64  # only the chunk scratch
    assert [w.data_ptr() for w in weights] == ptrs
    for w, a, b in zip(weights, w0, v):
        torch.testing.assert_close(w.double(), a + 25 * b, rtol=0, atol=atol)
    for vel, b in zip(acc.velocity(), v):
        torch.testing.assert_close(vel.double(), b, rtol=0, atol=atol)


def test_extrapolate_into_bf16_weights():
    w0, v = _rand(SHAPES, torch.float64, seed=22), _rand(SHAPES, torch.float64, seed=23, scale=0.05)
    snaps = [[(a + b * t).bfloat16() for a, b in zip(w0, v)] for t in range(6)]
    acc = TrendAccumulator(snaps[0])
    assert acc.dtype == torch.float32
    for t, s in enumerate(snaps):
        acc.update(s, t)
    ys = np.stack([torch.cat([x.double().flatten() for x in s]).numpy() for s in snaps], 1)
    slope, icpt = np.polyfit(np.arange(6.0), ys.T, 1)
    target = torch.tensor(icpt + slope * 12)
    out = [torch.empty_like(x) for x in snaps[0]]
    acc.extrapolate_(out, 12)
    got = torch.cat([x.double().flatten() for x in out])
    assert bool(((got - target).abs() <= _bf16_ulp(target) + 1e-6).all())


def test_two_point_velocity():
    ws, anchors = _rand(SHAPES, torch.bfloat16, seed=24), _rand(SHAPES, torch.bfloat16, seed=25)
    vel = two_point_velocity(ws, anchors, 8)
    for x, w, a in zip(vel, ws, anchors):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x.double(), (w.double() - a.double()) / 8, rtol=0, atol=1e-7)
    out = [torch.empty(s) for s in SHAPES]
    assert two_point_velocity(ws, anchors, 8, out=out)[0] is out[0]


# ------------------------------------------------------------------------------------------ R² and selection


def test_r2_score_matches_numpy():
    t = np.array([0, 1, 3, 4, 8, 9, 10, 15], dtype=float)
    line = 0.3 - 2.0 * t
    rng = np.random.default_rng(3)
    noise = rng.normal(size=(2000, len(t)))
    mix = rng.normal(size=(50, 1)) + rng.normal(size=(50, 1)) * t + rng.normal(size=(50, len(t))) * 3
    y = np.concatenate([line[None], noise, mix, np.full((1, len(t)), 0.1)])
    r2 = r2_score(torch.tensor(y), torch.tensor(t)).numpy()
    assert r2[0] == pytest.approx(1.0, abs=1e-12)
    assert abs(r2[1:2001].mean() - 1 / (len(t) - 1)) < 0.02  # independent noise: E[R²] = 1/(T−1)
    assert math.isnan(r2[-1])  # constant series: undefined
    coefs = np.polyfit(t, y[:-1].T, 1)
    fit = coefs[0][:, None] * t + coefs[1][:, None]
    ref = 1 - ((y[:-1] - fit) ** 2).sum(1) / ((y[:-1] - y[:-1].mean(1, keepdims=True)) ** 2).sum(1)
    np.testing.assert_allclose(r2[:-1], ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(r2[1:5], [np.corrcoef(t, s)[0, 1] ** 2 for s in y[1:5]], atol=1e-10)
    assert float(r2_score(torch.tensor(y[-1:]), torch.tensor(t), constant=1.0)[0]) == 1.0
    r2_32 = r2_score(torch.tensor(y[:-1]).float())  # default t = 0..T−1, fp32
    assert r2_32.dtype == torch.float32 and r2_32.shape == (len(y) - 1,)
    with pytest.raises(ValueError):
        r2_score(torch.tensor(y), torch.zeros(len(t)))


def test_top_fraction_mask_exact_and_sampled():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(10_000, generator=g)
    m = top_fraction_mask(x, 0.1)
    assert m.dtype == torch.bool and int(m.sum()) == 1000
    top = torch.topk(x.abs(), 1000).indices
    assert bool(m[top].all())
    # a list: one global threshold over all tensors
    xs = [x[:3000].reshape(30, 100), x[3000:]]
    ms = top_fraction_mask(xs, 0.1, chunk_numel=777)
    assert torch.equal(torch.cat([ms[0].flatten(), ms[1]]), m)
    # sampled threshold on a "huge" tensor: close to the requested fraction
    big = torch.randn(400_000, generator=g)
    thr = abs_threshold(big, 0.05, sample_size=50_000, generator=torch.Generator().manual_seed(5))
    frac = float((big.abs() >= thr).float().mean())
    assert abs(frac - 0.05) < 0.005
    ms = top_fraction_mask(big, 0.05, sample_size=50_000, generator=torch.Generator().manual_seed(5))
    assert abs(float(ms.float().mean()) - 0.05) < 0.005
    # edges: nothing, everything, zeros never picked
    assert not bool(top_fraction_mask(x, 0.0).any()) and bool(top_fraction_mask(x, 1.0).all())
    z = torch.zeros(100)
    z[:5] = torch.arange(1.0, 6.0)
    assert int(top_fraction_mask(z, 0.5).sum()) == 5


def test_drift_share_pure_drift_vs_random_walk():
    n, k = 200_000, 10
    g = torch.Generator().manual_seed(6)
    w0 = torch.randn(n, generator=g)
    v = torch.randn(n, generator=g) * 1e-3
    # pure drift: consecutive k-step displacements are parallel
    w_k, w_2k = w0 + v * k, w0 + v * 2 * k
    dots = displacement_dot([w_2k], [w_k], [w_k], [w0])
    ds = drift_share(dots, displacement_stats([w_k], [w0]).per_tensor, displacement_stats([w_2k], [w_k]).per_tensor)
    assert float(ds.per_tensor[0]) == pytest.approx(1.0, abs=1e-4) and float(ds.total) == pytest.approx(1.0, abs=1e-4)
    # random walk: independent increments
    steps = torch.randn(2 * k, n, generator=g) * 1e-3
    w_k, w_2k = w0 + steps[:k].sum(0), w0 + steps.sum(0)
    dots = displacement_dot([w_2k], [w_k], [w_k], [w0])
    ds = drift_share(dots, displacement_stats([w_k], [w0]).per_tensor, displacement_stats([w_2k], [w_k]).per_tensor)
    assert abs(float(ds.per_tensor[0])) < 0.02
    # drift and walk of equal energy over k steps: cos ≈ 0.5
    v = torch.randn(n, generator=g) * 1e-3 / math.sqrt(k)
    w_k, w_2k = w0 + v * k + steps[:k].sum(0), w0 + v * 2 * k + steps.sum(0)
    ds = drift_share(
        displacement_dot([w_2k], [w_k], [w_k], [w0]),
        displacement_stats([w_k], [w0]).per_tensor,
        displacement_stats([w_2k], [w_k]).per_tensor,
    )
    assert float(ds.total) == pytest.approx(0.5, abs=0.02)
    assert math.isnan(float(drift_share(torch.zeros(1), torch.zeros(1), torch.ones(1)).per_tensor[0]))
