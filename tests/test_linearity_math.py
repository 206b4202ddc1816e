"""Unit tests of the pure projection / trend math in ``linearity`` (CPU, small tensors, a few seconds): the functions
``linearity.zero_shards.ShardProjector`` runs on every rank's shard, checked against numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from linearity.projection import displacement_stats, project_, snapshot_, sq_norm
from linearity.trend import (
    TrendAccumulator,
    drift_partial_sums,
    drift_share,
    r2_score,
    steady_displacement,
    threshold_from_sample,
    top_fraction_mask,
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
    """float64[k]: ``fn`` applied to the float64 versions of the i-th tensors, summed."""
    return torch.stack([fn(*(x.double() for x in xs)).sum() for xs in zip(*lists)])


def test_displacement_stats_whole_and_masked_and_sq_norm():
    ws, anchors = _rand(SHAPES, seed=16), _rand(SHAPES, seed=17)
    st = displacement_stats(ws, anchors, chunk_numel=64)
    ref = _per_tensor(lambda w, a: (w - a) ** 2, ws, anchors)
    assert st.per_tensor.dtype == torch.float64 and st.per_tensor.shape == (len(SHAPES),)
    torch.testing.assert_close(st.per_tensor, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(st.total, ref.sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(sq_norm(ws), _per_tensor(lambda w: w * w, ws), rtol=1e-6, atol=0)
    # masked: only what a projection with the same masks moves (None = the whole tensor)
    g = torch.Generator().manual_seed(3)
    masks = [torch.rand(s, generator=g) < 0.3 for s in SHAPES]
    masks[1] = None
    weights = [torch.ones(s, dtype=torch.float64) if m is None else m.double() for s, m in zip(SHAPES, masks)]
    ref = _per_tensor(lambda w, a, m: (w - a) ** 2 * m, ws, anchors, weights)
    torch.testing.assert_close(displacement_stats(ws, anchors, masks).per_tensor, ref, rtol=1e-6, atol=0)
    with pytest.raises(ValueError):
        displacement_stats(ws, anchors, [torch.ones(s) for s in SHAPES])  # masks are bool
    # bf16 inputs: the difference is formed after an exact upcast
    wb, ab = [w.bfloat16() for w in ws], [a.bfloat16() for a in anchors]
    ref = _per_tensor(lambda w, a: (w - a) ** 2, wb, ab)
    torch.testing.assert_close(displacement_stats(wb, ab).per_tensor, ref, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------- trend


def _series(n_elem, steps, *, scale=1.0, slope=0.1, noise=0.05, seed=0):
    """float64[n_elem, T]: noisy lines ``b + v t`` at ``steps``."""
    g = np.random.default_rng(seed)
    b = g.normal(size=n_elem) * scale
    v = g.normal(size=n_elem) * slope
    steps = np.asarray(steps, dtype=np.float64)
    return b[:, None] + v[:, None] * steps[None, :] + g.normal(size=(n_elem, len(steps))) * noise


def _fitted_slope(acc: TrendAccumulator, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """The accumulator's slope per step, read as one ``advance_`` step from zero."""
    out = [torch.zeros_like(x) for x in like]
    acc.advance_(out, 1.0)
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_trend_accumulator_slope_matches_polyfit(dtype, tol):
    steps = [3, 4, 7, 8, 12, 13, 15, 21, 22, 30]  # uneven, as a resumed or irregular cycle may be
    y = _series(300, steps, seed=1)
    snaps = [torch.tensor(y[:, j]).to(dtype) for j in range(len(steps))]
    y = torch.stack(snaps, 1).double().numpy()  # compare against the data the accumulator sees
    acc = TrendAccumulator([snaps[0]])  # centred on the first snapshot, as the projector centres on its anchor
    for snap, t in zip(snaps, steps):
        acc.update([snap], t)
    slope = np.polyfit(np.asarray(steps, float), y.T, 1)[0]
    np.testing.assert_allclose(_fitted_slope(acc, snaps[:1])[0].double().numpy(), slope, rtol=0, atol=tol)
    # masked: the selected elements move steps · slope, the others stay bit for bit
    mask = torch.rand(300, generator=torch.Generator().manual_seed(0)) < 0.5
    w = snaps[-1].clone()
    acc.advance_([w], 2.5, [mask])
    expected = y[:, -1] + 2.5 * slope
    np.testing.assert_allclose(w[mask].double().numpy(), expected[mask.numpy()], rtol=0, atol=tol * 10)
    assert torch.equal(w[~mask], snaps[-1][~mask])
    with pytest.raises(ValueError):
        acc.advance_([w], 1.0, [mask, mask])


def test_trend_accumulator_rl_scale_fp32_is_centred():
    """Weights ~1e-2 moving 1e-6 per step: the fp32 slope stays accurate (raw Σy, Σty would not)."""
    steps = list(range(50))
    y = _series(5000, steps, scale=0.02, slope=1e-6, noise=3e-7, seed=2)
    snaps = [torch.tensor(y[:, j]).float() for j in steps]
    y = torch.stack(snaps, 1).double().numpy()
    acc = TrendAccumulator([snaps[0]], chunk_numel=1000)
    for snap, t in zip(snaps, steps):
        acc.update([snap], t)
    slope = np.polyfit(np.asarray(steps, float), y.T, 1)[0]
    err = np.abs(_fitted_slope(acc, snaps[:1])[0].double().numpy() - slope).max() / np.abs(slope).max()
    assert err < 1e-5, err


def test_trend_accumulator_memory_is_constant_and_reset():
    reference = _rand(SHAPES, seed=0)
    acc = TrendAccumulator(reference, chunk_numel=64)
    bufs = acc.mean + acc.comoment
    ptrs = [b.data_ptr() for b in bufs]
    snaps = [_rand(SHAPES, seed=t) for t in range(40)]
    with _AllocationWatch() as watch:
        for t, snap in enumerate(snaps):
            acc.update(snap, t)
    assert max(watch.new_numels) <= 64  # one scratch chunk, nothing model-sized
    assert acc.n == 40 and [b.data_ptr() for b in bufs] == ptrs
    assert all(b.dtype == torch.float32 for b in bufs) and len(bufs) == 2 * len(SHAPES)  # two buffers per tensor
    acc.reset()
    assert acc.n == 0 and not acc.has_fit and all(float(b.abs().max()) == 0 for b in bufs)
    weights = [r.clone() for r in reference]
    with pytest.raises(ValueError):
        acc.advance_(weights, 1.0)
    acc.update(reference, 5)
    acc.update(reference, 5)
    with pytest.raises(ValueError):
        acc.advance_(weights, 1.0)  # two snapshots at one step: no line
    with pytest.raises(ValueError):
        acc.update(reference[:2], 6)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_advance_pure_line_lands_on_the_line(dtype, atol):
    """RL-Extra's least-squares jump: anchored at W_0, fed W_0..W_m, W_m moved (β − 1)·m steps is W_{β m}."""
    w0, v = _rand(SHAPES, torch.float64, seed=20), _rand(SHAPES, torch.float64, seed=21, scale=0.01)
    m, beta = 4, 2.5
    anchor = [x.to(dtype) for x in w0]
    acc = TrendAccumulator(anchor, chunk_numel=64)
    for t in range(m + 1):
        acc.update([(a + b * t).to(dtype) for a, b in zip(w0, v)], t)
    weights = [(a + b * m).to(dtype) for a, b in zip(w0, v)]
    before = [w.clone() for w in weights]
    g = torch.Generator().manual_seed(1)
    masks = [torch.rand(s, generator=g) < 0.5 for s in SHAPES]
    masks[0] = None
    with _AllocationWatch() as watch:
        acc.advance_(weights, (beta - 1) * m, masks)
    assert max(watch.new_numels) <= 64  # only a chunk of masked comoment
    for w, b, a, vel, mask in zip(weights, before, w0, v, masks):
        mask = torch.ones_like(w, dtype=torch.bool) if mask is None else mask
        torch.testing.assert_close(w[mask].double(), (a + beta * m * vel)[mask], rtol=0, atol=atol)
        assert torch.equal(w[~mask], b[~mask])


# ---------------------------------------------------------------------------------------------- drift share


def test_drift_partial_sums_and_share_match_numpy():
    now, anchor, prev = _rand(SHAPES, seed=30), _rand(SHAPES, seed=31), _rand(SHAPES, seed=32, scale=0.1)
    prev[2].zero_()  # a tensor without a previous displacement: its share is undefined
    sums = torch.stack([drift_partial_sums(n.view(-1), a.view(-1), p.view(-1)) for n, a, p in zip(now, anchor, prev)])
    assert sums.dtype == torch.float64 and sums.shape == (len(SHAPES), 3)
    d_now = [n.double().numpy().ravel() - a.double().numpy().ravel() for n, a in zip(now, anchor)]
    d_prev = [p.double().numpy().ravel() for p in prev]
    ref = np.array([[(q * d).sum(), (q * q).sum(), (d * d).sum()] for q, d in zip(d_prev, d_now)])
    np.testing.assert_allclose(sums.numpy(), ref, rtol=1e-12, atol=0)
    share = drift_share(sums)
    for i, (q, d) in enumerate(zip(d_prev, d_now)):
        if i == 2:
            assert math.isnan(share.per_tensor[i])
        else:
            assert share.per_tensor[i] == pytest.approx(q @ d / np.sqrt((q @ q) * (d @ d)), rel=1e-12)
    q, d = np.concatenate(d_prev), np.concatenate(d_now)
    assert share.total == pytest.approx(q @ d / np.sqrt((q @ q) * (d @ d)), rel=1e-12)
    assert share.now_sq_norm == pytest.approx(d @ d, rel=1e-12)
    assert math.isnan(drift_share(torch.tensor([[0.0, 0.0, 1.0]])).total)  # no previous cycle


def test_drift_share_pure_drift_vs_random_walk():
    n, k = 200_000, 10
    g = torch.Generator().manual_seed(6)
    w0 = torch.randn(n, generator=g)

    def share(w_k, w_2k):  # cos of the consecutive displacements w_k − w0 and w_2k − w_k
        return drift_share(drift_partial_sums(w_2k, w_k, w_k - w0)[None])

    # pure drift: consecutive k-step displacements are parallel
    v = torch.randn(n, generator=g) * 1e-3
    ds = share(w0 + v * k, w0 + v * 2 * k)
    assert ds.per_tensor[0] == pytest.approx(1.0, abs=1e-4) and ds.total == pytest.approx(1.0, abs=1e-4)
    # random walk: independent increments
    steps = torch.randn(2 * k, n, generator=g) * 1e-3
    assert abs(share(w0 + steps[:k].sum(0), w0 + steps.sum(0)).total) < 0.02
    # drift and walk of equal energy over k steps: cos ≈ 0.5
    v = torch.randn(n, generator=g) * 1e-3 / math.sqrt(k)
    assert share(w0 + v * k + steps[:k].sum(0), w0 + v * 2 * k + steps.sum(0)).total == pytest.approx(0.5, abs=0.02)


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


def test_steady_displacement_matches_numpy():
    now, anchor, prev = (torch.randn(1000, generator=torch.Generator().manual_seed(s)) for s in (40, 41, 42))
    d = now.numpy() - anchor.numpy()
    np.testing.assert_array_equal(steady_displacement(now, anchor).numpy(), np.abs(d))  # first cycle
    got = steady_displacement(now, anchor, prev).numpy()
    np.testing.assert_array_equal(got, np.where(d * prev.numpy() > 0, np.abs(d), 0.0).astype(np.float32))
    assert steady_displacement(now.double(), anchor.double()).dtype == torch.float32


def test_threshold_from_sample_is_the_kth_largest():
    sample = torch.rand(1000, generator=torch.Generator().manual_seed(7))
    desc = np.sort(sample.numpy())[::-1]
    for fraction in (0.1, 0.2345, 0.5, 0.999):
        assert threshold_from_sample(sample, fraction) == desc[round(fraction * 1000) - 1]
    assert threshold_from_sample(sample, 1e-9) == desc[0]  # at least one element is always selected


def test_top_fraction_mask_one_global_threshold_from_the_gathered_sample():
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(3000, generator=g), torch.zeros(0), torch.randn(400_000, generator=g)]
    gathered = []

    def gather(sample):  # what a sharded caller's all-gather sees; a single rank returns its own sample
        gathered.append(sample)
        return sample

    masks = top_fraction_mask(
        lambda i, where: xs[i][where].abs(),
        xs,
        0.05,
        sample_size=50_000,
        generator=torch.Generator().manual_seed(5),
        gather=gather,
        chunk_numel=777,
    )
    assert len(gathered) == 1 and gathered[0].shape == (50_000,)
    threshold = threshold_from_sample(gathered[0], 0.05)
    for x, m in zip(xs, masks):
        assert m.dtype == torch.bool and m.shape == x.shape
        assert torch.equal(m, (x.abs() >= threshold) & (x.abs() > 0))
    selected = sum(int(m.sum()) for m in masks) / sum(x.numel() for x in xs)
    assert abs(selected - 0.05) < 0.005  # the sampled threshold's standard error is 0.1 %
    # fraction 1: every element with a positive score, no sample drawn; zeros are never selected
    z = torch.zeros(100)
    z[:5] = torch.arange(1.0, 6.0)
    everything = top_fraction_mask(lambda i, where: z[where], [z], 1.0, gather=lambda s: pytest.fail("sampled"))
    assert torch.equal(everything[0], z > 0)
    assert torch.equal(top_fraction_mask(lambda i, where: z[where], [z], 0.5)[0], z > 0)
