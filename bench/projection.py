"""In-place RL-Extra projection (``linearity.projection.project_``) vs a plain ``copy_`` of the same buffer.

The projection ``W ← A + β (W − A)`` runs on every rank's whole shard between two training steps, so its cost
should be that of a memory copy and it should allocate nothing the size of the model. This benchmark times, on
one flat buffer of ``--numel`` elements (default 64M fp32 = 256 MiB, plus an anchor of the same size):

- ``copy``: ``dst.copy_(W)`` into a preallocated buffer (= ``snapshot_``; the baseline, the memory-bandwidth bound);
- ``project_lerp``: ``project_(W, A, β)`` — ``torch._foreach_lerp_`` (what the training loop uses);
- ``project_mask10``: ``project_`` with a bool mask selecting 10 % of the elements (chunked, one 1M scratch);
- ``mul_add_chain``: ``W.sub_(A).mul_(β).add_(A)`` — in place but three passes;
- ``clone_out_of_place``: ``W.copy_(A + β (W − A))`` — the naive expression, three model-sized temporaries.

Headline: copy time ÷ projection time (≥ ~1 means the projection costs no more than a copy; goal 0.8). Memory:
each variant runs once in a fresh subprocess whose peak RSS is reset just before it (``/proc/self/clear_refs``,
falling back to ``ru_maxrss``): the rise of the peak over the resident buffers is the variant's peak overhead.
Also counted in process: bytes of every fresh tensor an op returns (a ``TorchDispatchMode`` watch).

    python bench/projection.py [--numel 67108864] [--dtype float32] [--repeats 9] [--beta 1.5] [--no-memory]

Prints human lines, draws bench/results/projection.png, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
from common import RESULTS, emit

from linearity.projection import project_

VARIANTS = ["copy", "project_lerp", "project_mask10", "mul_add_chain", "clone_out_of_place"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def make_buffers(numel: int, dtype: torch.dtype, variant: str | None = None) -> dict:
    """W, A (and the copy target / mask when ``variant`` needs them, all when None), filled in place."""
    g = torch.Generator().manual_seed(0)
    bufs = {"w": torch.empty(numel, dtype=dtype), "a": torch.empty(numel, dtype=dtype)}
    bufs["w"].normal_(generator=g)
    bufs["a"].normal_(generator=g)
    if variant in (None, "copy"):
        bufs["dst"] = torch.empty(numel, dtype=dtype).fill_(0)
    if variant in (None, "project_mask10"):
        bufs["mask"] = torch.empty(numel, dtype=torch.bool).bernoulli_(0.1, generator=g)
    return bufs


def run_variant(name: str, bufs: dict, beta: float) -> None:
    w, a = bufs["w"], bufs["a"]
    if name == "copy":
        bufs["dst"].copy_(w)
    elif name == "project_lerp":
        project_(w, a, beta)
    elif name == "project_mask10":
        project_(w, a, beta, bufs["mask"])
    elif name == "mul_add_chain":
        w.sub_(a).mul_(beta).add_(a)
    elif name == "clone_out_of_place":
        w.copy_(a + beta * (w - a))
    else:
        raise ValueError(name)


def alternate_beta(beta: float, i: int) -> float:
    """β, then 1/β, ...: repeated projections stay bounded (same cost per call)."""
    return beta if i % 2 == 0 else 1.0 / beta


# ------------------------------------------------------------------------------------------- timing


def time_variants(numel: int, dtype: torch.dtype, beta: float, repeats: int) -> dict[str, list[float]]:
    bufs = make_buffers(numel, dtype)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for v in VARIANTS:  # warm-up (page faults of the first touch, kernel dispatch)
        run_variant(v, bufs, beta)
    for r in range(repeats):  # interleaved so that noise on the shared machine hits every variant alike
        for v in VARIANTS:
            t0 = time.perf_counter()
            run_variant(v, bufs, alternate_beta(beta, r))
            times[v].append(time.perf_counter() - t0)
    return times


def allocated_bytes(numel: int, dtype: torch.dtype, beta: float) -> dict[str, int]:
    """Bytes of fresh tensors returned by the ops of one call of each variant (the dispatch mode costs per op,
    not per element, so this runs at full size)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Watch(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            flat_in = tree_flatten((args, kwargs))[0]
            ins = {t.untyped_storage().data_ptr() for t in flat_in if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in ins:
                    self.bytes += t.numel() * t.element_size()
            return out

    bufs = make_buffers(numel, dtype)
    out = {}
    for v in VARIANTS:
        with Watch() as watch:
            run_variant(v, bufs, beta)
        out[v] = watch.bytes
    return out


# ------------------------------------------------------------------------------------------- memory


def _read_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def probe(variant: str, numel: int, dtype: torch.dtype, beta: float) -> dict:
    """Run in a fresh process: peak RSS rise of one call of ``variant`` over the resident buffers."""
    bufs = make_buffers(numel, dtype, variant)
    run_variant(variant, make_buffers(16, dtype, variant), beta)  # load the kernels outside the measurement
    if _reset_hwm() and _read_hwm_bytes() is not None:
        base = _read_hwm_bytes()
        run_variant(variant, bufs, beta)
        peak = _read_hwm_bytes()
        how = "VmHWM after clear_refs"
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        run_variant(variant, bufs, beta)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        how = "ru_maxrss"
    return {"variant": variant, "peak_overhead_bytes": max(0, peak - base), "method": how}


def measure_memory(numel: int, dtype_name: str, beta: float) -> dict[str, dict]:
    out = {}
    for v in VARIANTS:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--probe",
            v,
            "--numel",
            str(numel),
            "--dtype",
            dtype_name,
            "--beta",
            str(beta),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"memory probe {v} failed: {res.stderr[-2000:]}")
        out[v] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# ------------------------------------------------------------------------------------------- plot


def plot(path, times_ms: dict, overhead: dict | None, numel: int, dtype_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 2 if overhead else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4))
    axes = [axes] if ncols == 1 else list(axes)
    names = list(times_ms)
    colors = ["#777777" if n == "copy" else ("#2a7ab9" if n.startswith("project") else "#d95f02") for n in names]
    ax = axes[0]
    bars = ax.bar(range(len(names)), [times_ms[n] for n in names], color=colors)
    ax.bar_label(bars, [f"{times_ms[n]:.0f}" for n in names], fontsize=8)
    ax.axhline(times_ms["copy"], color="#777777", ls="--", lw=1)
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
    ax.set_ylabel("ms per call (median)")
    ax.set_title(f"W ← A + β(W − A), {numel / 2**20:.0f}M {dtype_name}")
    if overhead:
        ax = axes[1]
        bars = ax.bar(range(len(names)), [overhead[n] / 2**20 for n in names], color=colors)
        ax.bar_label(bars, [f"{overhead[n] / 2**20:.1f}" for n in names], fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
        ax.set_ylabel("peak memory overhead (MiB)")
        ax.set_title(f"buffer = {numel * torch.tensor([], dtype=DTYPES[dtype_name]).element_size() / 2**20:.0f} MiB")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numel", type=int, default=64 * 2**20)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--beta", type=float, default=1.5)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--no-memory", action="store_true", help="skip the subprocess peak-RSS probes")
    p.add_argument("--probe", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    dtype = DTYPES[args.dtype]

    if args.probe:
        print(json.dumps(probe(args.probe, args.numel, dtype, args.beta)))
        return

    nbytes = args.numel * torch.tensor([], dtype=dtype).element_size()
    print(
        f"buffer: {args.numel:,} {args.dtype} elements = {nbytes / 2**20:.0f} MiB (+ anchor); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, β = {args.beta}"
    )
    t0 = time.perf_counter()
    times = time_variants(args.numel, dtype, args.beta, args.repeats)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    copy_s = med["copy"]
    for v in VARIANTS:
        print(
            f"  {v:20s} {med[v] * 1e3:8.1f} ms   copy/this = {copy_s / med[v]:5.2f}   "
            f"(min {min(times[v]) * 1e3:.1f}, max {max(times[v]) * 1e3:.1f} ms)"
        )

    alloc = allocated_bytes(args.numel, dtype, args.beta)
    print(
        "fresh tensor bytes per call (dispatch watch): "
        + ", ".join(f"{v} {b / 2**20:.1f} MiB" for v, b in alloc.items())
    )

    mem = None
    if not args.no_memory:
        mem = measure_memory(args.numel, args.dtype, args.beta)
        print(
            "peak RSS overhead per call (fresh process): "
            + ", ".join(f"{v} {m['peak_overhead_bytes'] / 2**20:.1f} MiB" for v, m in mem.items())
            + f"  [{next(iter(mem.values()))['method']}]"
        )

    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / "projection.png"
    overhead = {v: m["peak_overhead_bytes"] for v, m in mem.items()} if mem else None
    plot(png, {v: med[v] * 1e3 for v in VARIANTS}, overhead, args.numel, args.dtype)
    ratio = copy_s / med["project_lerp"]
    print(
        f"headline: copy time / projection time = {ratio:.2f} (goal ≥ 0.8); plot {png}; "
        f"{time.perf_counter() - t0:.1f} s"
    )
    emit(
        {
            "metric": "projection_throughput_over_copy",
            "value": round(ratio, 3),
            "goal": 0.8,
            "numel": args.numel,
            "dtype": args.dtype,
            "buffer_bytes": nbytes,
            "beta": args.beta,
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "median_ms": {v: round(med[v] * 1e3, 3) for v in VARIANTS},
            "ratio_copy_over_variant": {v: round(copy_s / med[v], 3) for v in VARIANTS},
            # memory traffic: copy reads W and writes dst (2 buffers); lerp reads W and A and writes W (3)
            "copy_gb_per_s": round(2 * nbytes / copy_s / 1e9, 2),
            "project_gb_per_s": round(3 * nbytes / med["project_lerp"] / 1e9, 2),
            "peak_overhead_bytes": overhead["project_lerp"] if overhead else None,
            "peak_overhead_bytes_by_variant": overhead,
            "fresh_tensor_bytes_by_variant": alloc,
            "plot": str(png.relative_to(common.ROOT)),
        }
    )


if __name__ == "__main__":
    main()
