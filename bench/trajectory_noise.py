"""How far apart GRPO runs end when they differ only by a nudge that leaves the expected outcome unchanged.

Any strategy that moves the weights off GRPO's path (one accepted projection is enough) ends somewhere else on the
distribution of runs GRPO itself could have made: which rare sub-skill a batch happens to sample, and when, decides
the last points of accuracy. So "auto ended 0.018 below GRPO on seed 2" (bench/step_savings.py) is only a verdict on
the strategy if GRPO's own runs end closer together than that. This measures that spread.

Per seed, GRPO at lr x and at x·(1 − δ) and x·(1 + δ) (δ = 1 % by default: the final accuracy is flat in lr around
GRPO's best, whose grid neighbours are 2x apart) is trained to the same budget on the same warm start and data
order, and evaluated once at the end on the same held-out prompts. The runs share everything up to the first
update; from there their samples differ. The eval's standard error is the binomial bound √(p(1 − p) / prompts) at
the runs' mean final accuracy (an Avg@k over k samples a prompt varies no more than one sample).

    python bench/trajectory_noise.py [--task toy_skills] [--schedule schedule=rl] [--lr 4e-4] [--seeds 1 2 3]
                                     [--steps 120] [--delta 0.01]

`--schedule` runs another arm the same way (its overrides as in bench/step_savings.py's STRATEGIES rows): the
spread of a strategy's own runs, to set beside GRPO's.

Headline: the median over seeds of (max − min final Avg@k) ÷ one eval standard error.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time

import common  # noqa: F401  (sets up sys.path and env)
from common import ROOT, code_version, emit, run_overrides
from step_savings import OneLineParser, run_cli, task_overrides


def train_run(
    task: list[str], schedule: list[str], lr: float, seed: int, steps: int, name: str, out: str, extra: list[str] = ()
) -> dict:
    """One run from the warm start to `steps` real steps with one eval at the end (and `extra` overrides, applied
    last); the job's summary."""
    from orchestrator.config import compose
    from orchestrator.train import run_job

    overrides = [
        *task_overrides(tuple(task)),
        *schedule,
        f"learner.lr={lr:.6g}",
        f"seed={seed}",
        f"trainer.total_steps={steps}",
        "trainer.eval_every=0",
        "trainer.resume=never",
        *run_overrides(name, out, f"sqlite:///{out}/mlflow.db", ROOT / ".cache" / "rlextra"),
        *extra,
    ]
    return run_job(compose(overrides), f"{out}/{name}")


def final_accuracy(
    task: list[str], schedule: list[str], lr: float, seed: int, steps: int, eval_prompts: int, out: str
) -> float:
    name = f"lr{lr:.4g}-seed{seed}"
    summary = train_run(task, schedule, lr, seed, steps, name, out, [f"trainer.eval_prompts={eval_prompts}"])
    return summary["eval_accuracy_after"]


def main() -> dict:
    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", nargs="+", default=["toy_skills"], help="a data preset name and/or overrides")
    ap.add_argument(
        "--schedule",
        nargs="+",
        default=["schedule=rl"],
        help="the arm's schedule overrides (default GRPO; e.g. bench/step_savings.py's auto-m5n15-top5 row)",
    )
    ap.add_argument("--lr", type=float, default=4e-4, help="GRPO's lr (bench/step_savings.py's GRPO-best)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--delta", type=float, default=0.01, help="the relative lr nudge")
    ap.add_argument("--eval-prompts", type=int, default=500)
    args = ap.parse_args()
    if not 0 < args.delta < 0.5:
        ap.error("--delta: expected a number in (0, 0.5)")

    lrs = [args.lr * (1 - args.delta), args.lr, args.lr * (1 + args.delta)]
    finals: dict[int, list[float]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        for seed in args.seeds:
            finals[seed] = [
                final_accuracy(args.task, args.schedule, lr, seed, args.steps, args.eval_prompts, out) for lr in lrs
            ]
            print(f"seed {seed}: final Avg@k at lr {', '.join(f'{lr:.4g}' for lr in lrs)}: {finals[seed]}", flush=True)
    mean = statistics.fmean(a for accs in finals.values() for a in accs)
    se = math.sqrt(mean * (1 - mean) / args.eval_prompts)
    spreads = {seed: max(accs) - min(accs) for seed, accs in finals.items()}
    result = {
        "metric": "final_spread_over_eval_se",
        "value": round(statistics.median(spreads.values()) / se, 2),
        "goal": None,
        "eval_se": round(se, 4),
        "spread_by_seed": {s: round(v, 4) for s, v in spreads.items()},
        "final_by_seed": finals,
        "lrs": [float(f"{lr:.4g}") for lr in lrs],
        "task": args.task,
        "schedule": args.schedule,
        "steps": args.steps,
        "eval_prompts": args.eval_prompts,
        "code": code_version(),
        "wall_s": round(time.perf_counter() - start),
    }
    emit(result)
    return result


if __name__ == "__main__":
    run_cli("trajectory_noise", main)
