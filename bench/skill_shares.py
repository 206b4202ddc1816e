"""Which sub-skills a run has found, and when: the per-sub-skill view behind "a strategy ends below GRPO".

bench/step_savings.py says *that* an arm ends below GRPO-best on a seed; this says *which* behaviour it is missing.
On `data=toy_skills` a sub-skill's accuracy is its share of careful choices times how well the careful procedure is
carried out, and the careful choice of a rare sub-skill is found by sampling, at a time that differs from run to run.

For GRPO and one other arm (`--schedule`, default the `auto` row of bench/step_savings.py), per seed and per step
count, one run from the warm start to that many real steps (runs are deterministic, so a shorter run is the prefix of a
longer one; one that ends on a cycle boundary stops before that cycle's projection), then, from its final checkpoint,
per sub-skill: the **careful share**, the model's probability of the sub-skill's careful mode token right after its
eval prompts (mean over them), and the **careful fidelity**, the share of 64 held-out problems (not eval prompts) it
solves greedily when given the careful mode token (`toy_task.procedure_fidelity`) — whether a missing sub-skill is
never chosen or chosen but carried out wrong (then its samples score 0 either way and GRPO gets no signal from
them) — beside the run's eval Avg@k.

    python bench/skill_shares.py [--task toy_skills] [--schedule <overrides>] [--lr 4e-4] [--seeds 6]
                                 [--steps 30 55 120]

Headline: the smallest careful share of any sub-skill at the last step count, the arm's median over seeds (GRPO's
beside it): a share near 0 is a sub-skill the run has not found.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import common  # noqa: F401  (sets up sys.path and env)
from common import code_version, emit
from step_savings import STRATEGIES, BenchError, OneLineParser, run_cli, task_overrides
from trajectory_noise import train_run

GRPO = ["schedule=rl"]


def skills_task(task: list[str], seed: int):
    """The task's toy spec; BenchError (one line) unless it composes and is an op=skills task."""
    from orchestrator.config import compose, validate

    try:
        spec = validate(compose([*task_overrides(tuple(task)), f"seed={seed}"])).data.toy
    except Exception as exc:  # a Hydra or config error: its first line names the override
        raise BenchError(f"--task: {str(exc).strip().splitlines()[0]}") from None
    if spec.op != "skills":
        raise BenchError(f"--task: expected a task with data.toy.op=skills (e.g. toy_skills), got op={spec.op}")
    return spec


def skill_profile(checkpoint: str, task: list[str], seed: int) -> tuple[dict[str, float], dict[str, float]]:
    """Per sub-skill, (the mean probability of its careful mode token right after its eval prompts, the share of
    held-out problems it solves greedily after the careful mode token)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator import toy_task

    spec = skills_task(task, seed)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    prompts = [r["prompt"] for r in toy_task.make_splits(spec, seed)["eval"]]
    shares = {}
    for index, skill in enumerate(spec.skills):
        careful_id = tok.convert_tokens_to_ids(toy_task.skill_markers(index)[0])
        mine = [p for p in prompts if toy_task.skill_of(p) == skill]
        rows = [[tok.bos_token_id, *tok.encode(p, add_special_tokens=False)] for p in mine]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])  # long[B, P], left-padded
        mask = (ids != tok.pad_token_id).long()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        shares[skill] = float(logits[:, -1].float().softmax(-1)[:, careful_id].mean())
    fidelity = {k: v["careful"] for k, v in toy_task.procedure_fidelity(model, tok, spec, seed).items()}
    return shares, fidelity


def main() -> dict:
    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", nargs="+", default=["toy_skills"], help="a data preset name and/or overrides")
    ap.add_argument("--schedule", nargs="+", default=STRATEGIES["auto-m5n15-top5"], help="the arm beside GRPO")
    ap.add_argument("--lr", type=float, default=4e-4, help="both arms' lr (bench/step_savings.py's GRPO-best)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[6])
    ap.add_argument("--steps", nargs="+", type=int, default=[30, 55, 120], help="real step counts, one run each")
    args = ap.parse_args()
    if any(s < 1 for s in args.steps):
        ap.error(f"--steps: expected positive step counts, got {args.steps}")
    steps = sorted(set(args.steps))
    for seed in args.seeds:
        skills_task(args.task, seed)  # nothing starts on a task this cannot read
    arms = {"grpo": GRPO, "arm": list(args.schedule)}
    table: dict[str, dict] = {arm: {} for arm in arms}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        for seed in args.seeds:
            for arm, schedule in arms.items():
                for n in steps:
                    name = f"{arm}-seed{seed}-steps{n}"
                    summary = train_run(args.task, schedule, args.lr, seed, n, name, out, ["trainer.save_final=true"])
                    shares, fidelity = skill_profile(summary["final_checkpoint"], args.task, seed)
                    table[arm].setdefault(str(seed), {})[str(n)] = {
                        "eval_acc": round(summary["eval_accuracy_after"], 4),
                        "careful_share": {k: round(v, 4) for k, v in shares.items()},
                        "careful_fidelity": {k: round(v, 4) for k, v in fidelity.items()},
                    }
                    low = min(shares, key=shares.get)
                    print(
                        f"{arm} seed {seed} step {n}: eval {summary['eval_accuracy_after']:.4f}; careful share "
                        + ", ".join(f"{k} {v:.3f}" for k, v in shares.items())
                        + f" (lowest {low}); careful fidelity "
                        + ", ".join(f"{k} {v:.2f}" for k, v in fidelity.items()),
                        flush=True,
                    )
    last = str(steps[-1])

    def lowest(arm: str) -> float:
        return statistics.median(min(by_step[last]["careful_share"].values()) for by_step in table[arm].values())

    result = {
        "metric": "lowest_careful_share_at_last_step",
        "value": round(lowest("arm"), 4),
        "goal": None,
        "grpo": round(lowest("grpo"), 4),
        "table": table,
        "task": args.task,
        "schedule": args.schedule,
        "lr": args.lr,
        "seeds": args.seeds,
        "steps": steps,
        "code": code_version(),
        "wall_s": round(time.perf_counter() - start),
    }
    emit(result)
    return result


if __name__ == "__main__":
    run_cli("skill_shares", main)
