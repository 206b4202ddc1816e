"""GPU check of the learner side, without Ray: DeepSpeed ZeRO 1/2/3 in bf16 on one device, RL-Extra's in-place
projection on the master shards, and the weight export — one command, one JSON line.

For each ZeRO stage, in a fresh process (clean CUDA and process-group state), `actors.learner.LearnerActor` is used
as the plain class it is (world size 1; NCCL on CUDA, gloo on CPU) on a tied Qwen2 built in code:
1. `setup()`, then two train steps on a random batch whose behaviour log-probs are the model's own (ratio 1);
   loss and gradient norm must be finite.
2. The projection through the learner's `extra_*` methods (linearity/zero_shards.py ShardProjector): snapshot the
   anchor A, one more step to W, `extra_project(β)`; the master shards must equal A + β (W − A) on the selected
   elements and W elsewhere, the next forward must see the projected weights, and `extra_rollback()` must restore W
   exactly. Timed: the bare in-place projection of the master shards (`linearity.projection.project_`) against a
   `copy_` of the same shards into preallocated buffers (GB/s counting bytes read and written: 3 and 2 per element),
   and the learner's whole `extra_project` (statistics and the low-precision refresh included).
3. The weight export: `export_weights` (gather to host, the object-store form) and `broadcast_weights` over a
   one-rank weight group (actors/weight_sync.py: a ProcessGroupNCCL on CUDA built from a TCPStore, the collective
   path's sender side: gather and pack on the device), each in GB/s.
Headline: copy time ÷ projection time on the master shards, worst stage (goal 0.8, as bench/projection.py).
On a GPU both are bound by memory bandwidth and the projection moves 3 bytes where the copy moves 2, so the ratio
is 2/3 at equal bandwidth (0.74 on an H200: README, Benchmarks).

    python bench/gpu_check.py                       # CUDA, the 100m shape (96M parameters), ZeRO 1, 2, 3
    python bench/gpu_check.py --device cpu          # the same on CPU with the tiny model (what CI runs)

On the GPU machine torch, transformers, tokenizers and safetensors are there; DeepSpeed and Hydra are not
(orchestrator/config.py imports Hydra; Ray and vLLM are not needed). Carry, as wheels for CPython 3.12: deepspeed
0.19.8 and antlr4-python3-runtime 4.9.3 (PyPI has only their sdists: build them here, pure Python, with
`pip wheel --no-deps --no-build-isolation -w .whl NAME==VERSION`), and, downloaded with `pip download --no-deps
--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 -d .whl`, hjson 3.1.0,
pydantic 2.14.4, pydantic-core 2.50.5, annotated-types 0.8.0, typing-inspection 0.4.5, hydra-core 1.3.8,
omegaconf 2.3.1 and typing-extensions 4.16.0 (pydantic 2.14 needs it) — the versions of this project's environment;
there: `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`, `PYTHONPATH=/tmp/site python3
bench/gpu_check.py`. MLflow, which DeepSpeed's autotuner imports if it can, is not needed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BETA = 2.0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--shape", default=None, help="bench/common.py model shape (default: 100m on cuda, tiny on cpu)")
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--stage", type=int, default=None, help=argparse.SUPPRESS)  # internal: run one stage here
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.shape = args.shape or ("100m" if args.device == "cuda" else "tiny")
    return args


def main():
    args = parse_args()
    # DeepSpeed picks its accelerator at import: decide before anything imports it (bench/common defaults to cpu).
    os.environ["DS_ACCELERATOR"] = args.device
    if args.stage is not None:
        print(json.dumps(run_stage(args)), flush=True)
        return
    import common  # noqa: F401
    from common import build_model_dir, emit

    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path, n_params = build_model_dir(args.shape, Path(tmp))
        for stage in [int(s) for s in args.stages.split(",")]:
            cmd = [sys.executable, __file__, "--device", args.device, "--shape", args.shape]
            cmd += ["--repeats", str(args.repeats), "--stage", str(stage), "--model-dir", path]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
                rows.append({"zero_stage": stage, "ok": False, "error": " | ".join(tail)[-2000:]})
            else:
                rows.append(json.loads(lines[-1]))
            print(_line(rows[-1]), flush=True)
    ok = all(r["ok"] for r in rows)
    ratios = [r["copy_over_projection"] for r in rows if r["ok"]]
    emit(
        {
            "metric": "copy_over_projection",
            "value": round(min(ratios), 3) if ratios else None,
            "goal": 0.8,
            "ok": ok,
            "device": rows[0].get("device_name", args.device) if rows else args.device,
            "shape": args.shape,
            "params": n_params,
            "dtype": "bf16",
            "wall_s": round(time.perf_counter() - start, 1),
            "rows": rows,
        }
    )
    sys.exit(0 if ok else 1)


def _line(r: dict) -> str:
    if not r["ok"]:
        return f"ZeRO-{r['zero_stage']}: FAILED {r.get('error', '')[-600:]}"
    return (
        f"ZeRO-{r['zero_stage']} {r['backend']}: step {r['step_s'] * 1e3:.1f} ms, projection "
        f"{r['projection_gbps']:.1f} GB/s vs copy {r['copy_gbps']:.1f} GB/s ({r['copy_over_projection']:.2f}), "
        f"extra_project {r['extra_project_s'] * 1e3:.1f} ms, export {r['export_gbps']:.2f} GB/s, "
        f"broadcast {r['broadcast_gbps']:.2f} GB/s"
    )


# --------------------------------------------------------------------------------------------- one stage


def run_stage(args) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from actors.learner import LearnerActor, LearnerSpec
    from orchestrator.config import AlgoConfig, LearnerConfig

    on_cuda = args.device == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch sees no GPU")
    spec = LearnerSpec(
        args.model_dir,
        LearnerConfig(
            world_size=1,
            zero_stage=args.stage,
            dtype="bf16",
            lr=1e-3,
            grad_clip=0.0,
            micro_batch_size=4,
            num_gpus=1 if on_cuda else 0,
            num_threads=0 if on_cuda else 1,
        ),
        AlgoConfig(),
        samples_per_rank=8,
        seed=0,
    )
    learner = LearnerActor(spec, 0, "127.0.0.1", _free_port())
    info = learner.setup()
    try:
        row = {"zero_stage": args.stage, "device": info["device"], "backend": info["backend"]}
        if on_cuda:
            row["device_name"] = torch.cuda.get_device_name()
        row |= _train(learner, args)
        row |= _projection(learner, args.repeats)
        row |= _export(learner, args.repeats)
        row["ok"] = row["train_ok"] and row["projection_ok"] and row["export_ok"]
        return row
    finally:
        learner.shutdown()


def _sync():
    import torch

    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") == "cuda":
        torch.cuda.synchronize()


def _timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs after one warm-up (device synchronised around each)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _batch(learner, seed: int):
    """8 random prompt + response rows (no padding) with the model's own log-probs as behaviour (ratio 1)."""
    import torch

    from orchestrator.messages import TrainBatch

    vocab = learner.engine.module.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    n, p, r = 8, 6, 5
    prompts = torch.randint(3, vocab, (n, p), generator=gen)
    responses = torch.randint(3, vocab, (n, r), generator=gen)
    batch = TrainBatch(
        prompts=prompts,
        responses=responses,
        attention_mask=torch.ones(n, p + r, dtype=torch.long),
        response_mask=torch.ones(n, r),
        old_logp=torch.zeros(n, r),
        advantages=torch.randn(n, 1, generator=gen).expand(n, r).contiguous(),
    )
    batch.old_logp = learner.compute_logp(batch).float()
    return batch


def _train(learner, args) -> dict:
    import math

    steps = []
    for seed in range(2):
        batch = _batch(learner, seed)
        _sync()
        start = time.perf_counter()
        metrics = learner.train_step(batch)
        _sync()
        steps.append((time.perf_counter() - start, metrics))
    finite = all(math.isfinite(m.loss) and math.isfinite(m.grad_norm) and m.grad_norm > 0 for _, m in steps)
    return {"step_s": steps[-1][0], "loss": steps[-1][1].loss, "grad_norm": steps[-1][1].grad_norm, "train_ok": finite}


def _projection(learner, repeats: int) -> dict:
    import torch

    from linearity.projection import project_

    learner.extra_setup()
    proj = learner.projector
    learner.extra_snapshot()
    anchor = [a.clone() for a in proj.anchors]
    batch = _batch(learner, seed=7)
    learner.train_step(batch)
    learner.extra_begin_phase()
    w = [m.clone() for m in proj.masters]
    logp_w = learner.compute_logp(batch)

    # correctness: A + β (W − A) where selected, W elsewhere; the forward follows; the rollback restores W
    stats = learner.extra_project(BETA)
    checks = {"finite": stats.finite}
    for m, a, w0, mask in zip(proj.masters, anchor, w, proj.masks):
        expected = a.to(w0.device) + BETA * (w0 - a.to(w0.device))
        if mask is not None:
            expected = torch.where(mask, expected, w0)
        checks["projected"] = checks.get("projected", True) and torch.allclose(m, expected, rtol=1e-5, atol=1e-6)
    logp_projected = learner.compute_logp(batch)
    checks["forward_follows"] = not torch.equal(logp_projected, logp_w)
    learner.extra_rollback()
    checks["rollback_exact"] = all(torch.equal(m, w0) for m, w0 in zip(proj.masters, w))
    checks["rollback_forward"] = torch.equal(learner.compute_logp(batch), logp_w)

    # speed: the bare in-place projection of the master shards vs copying them (the masters are leaves of autograd)
    torch.set_grad_enabled(False)
    masters = proj.masters
    anchors = [a.to(m.device) for a, m in zip(proj.anchors, masters)]
    targets = [torch.empty_like(m) for m in masters]
    numel = sum(m.numel() for m in masters)
    nbytes = numel * masters[0].element_size()
    copy_s = _timed(lambda: torch._foreach_copy_(targets, masters), repeats)
    # β then 1/β: two projections that bring W back (β = 1 would be skipped as the identity); rollback restores W
    project_s = _timed(lambda: (project_(masters, anchors, BETA), project_(masters, anchors, 1 / BETA)), repeats) / 2
    extra_s = _timed(lambda: (learner.extra_project(BETA), learner.extra_project(1 / BETA)), repeats // 2 + 1) / 2
    learner.extra_rollback()
    torch.set_grad_enabled(True)
    return {
        "master_numel": numel,
        "copy_gbps": 2 * nbytes / copy_s / 1e9,
        "projection_gbps": 3 * nbytes / project_s / 1e9,
        "copy_over_projection": copy_s / project_s,
        "extra_project_s": extra_s,
        "projection_checks": checks,
        "projection_ok": all(checks.values()),
    }


def _export(learner, repeats: int) -> dict:
    from actors.weight_sync import from_transport

    meta = list(learner.parameter_meta())
    nbytes = sum(t.numel() * t.element_size() for _, t in meta)
    buckets = learner.export_weights(64.0)
    exported = {n: from_transport(*t) for bucket in buckets for n, t in bucket}
    export_s = _timed(lambda: learner.export_weights(64.0), max(1, repeats // 2))
    learner.open_weight_group(1, 120)
    learner.join_weight_group()
    sent = learner.broadcast_weights(1, 64.0)
    broadcast_s = _timed(lambda: learner.broadcast_weights(1, 64.0), max(1, repeats // 2))
    learner.close_weight_group()
    same_names = [n for n, _ in meta] == list(exported)
    shapes_ok = all(tuple(exported[n].shape) == tuple(t.shape) for n, t in meta)
    return {
        "export_bytes": nbytes,
        "export_gbps": nbytes / export_s / 1e9,
        "broadcast_gbps": nbytes / broadcast_s / 1e9,
        "export_ok": same_names and shapes_ok and sent["bytes"] >= nbytes,
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
