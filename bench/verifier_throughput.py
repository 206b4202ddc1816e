"""Code-verifier throughput: sandboxed programs scored per second, one worker vs `--workers` workers.

Scores the toy code tasks (:mod:`verifiers.code_tasks`) with their canonical solutions through the ``code``
verifier at the default sandbox limits (one sandboxed process tree per test). Both sides are a ``ScoringPool`` (the
same code path the job uses): serial is a one-worker pool, parallel a `--workers` pool. Both are started and warmed
first (worker start-up and first imports are not timed), then timed in turns, `--repeats` times each; the medians
are compared. Headline: parallel programs/s ÷ serial programs/s (goal >= 1.5 with 2 workers). Every score must be
1.0, or the run fails. Prints human lines, then ONE JSON object on the last line of stdout.

    python bench/verifier_throughput.py [--tasks 20] [--tests-per-task 4] [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import common  # noqa: F401  (sets up sys.path and PYTHONPATH for the workers)
from common import emit


def timed_batch(pool, responses: list[str], refs: list[str]) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    scores = pool.score_batch("code", responses, refs)
    return time.perf_counter() - t0, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=20, help="toy tasks (one sample each)")
    ap.add_argument("--tests-per-task", type=int, default=4, help="tests = sandboxed programs per task")
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the parallel pool")
    ap.add_argument("--repeats", type=int, default=3, help="timed batches per side (medians compared)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from verifiers.code import DEFAULT_LIMITS, isolation_report, pool_timeout_s
    from verifiers.code_tasks import make_code_tasks
    from verifiers.pool import ScoringPool

    tasks = make_code_tasks(args.tasks, seed=args.seed, tests_per_task=args.tests_per_task)
    responses = [f"```python\n{t['canonical_solution']}```" for t in tasks]
    refs = [t["answer"] for t in tasks]
    programs = len(tasks) * args.tests_per_task
    rep = isolation_report()
    print(
        f"sandbox: python={rep['python']} netns={rep.get('netns')} pidns={rep.get('pidns')} "
        f"readonly_root={rep.get('readonly_root')} uid={rep.get('uid')} limits={DEFAULT_LIMITS}"
    )
    print(f"{len(tasks)} tasks x {args.tests_per_task} tests = {programs} programs, {args.repeats} repeats per side")

    timeout = pool_timeout_s(args.tests_per_task)
    times: dict[str, list[float]] = {"serial": [], "parallel": []}
    bad: set[int] = set()
    with ScoringPool(1, timeout) as serial, ScoringPool(args.workers, timeout) as parallel:
        pools = {"serial": serial, "parallel": parallel}
        for pool in pools.values():  # warm-up: every worker started, imports done, one sandbox run each
            pool.score_batch("code", responses[: args.workers], refs[: args.workers])
        for _ in range(args.repeats):
            for side, pool in pools.items():  # in turns, so both see the same machine load
                seconds, scores = timed_batch(pool, responses, refs)
                times[side].append(seconds)
                bad |= {i for i, s in enumerate(scores) if s != 1.0}
    if bad:
        print(f"ERROR: canonical solutions did not all score 1.0 (tasks {sorted(bad)[:10]})", file=sys.stderr)
        sys.exit(1)

    rate = {side: programs / statistics.median(t) for side, t in times.items()}
    for side, t in times.items():
        print(
            f"{side:8s}: median {statistics.median(t):6.2f} s  {rate[side]:7.1f} programs/s  "
            f"(runs: {', '.join(f'{x:.2f}' for x in t)} s)"
        )
    ratio = rate["parallel"] / rate["serial"]
    print(f"parallel ({args.workers} workers) / serial (1 worker) = {ratio:.2f} (goal 1.5), timeout {timeout:.0f} s")
    emit(
        {
            "metric": "code_verifier_programs_per_s_parallel_over_serial",
            "value": round(ratio, 3),
            "goal": 1.5,
            "serial_per_s": round(rate["serial"], 2),
            "parallel_per_s": round(rate["parallel"], 2),
            "workers": args.workers,
            "programs": programs,
            "repeats": args.repeats,
        }
    )


if __name__ == "__main__":
    main()
