"""Code-verifier throughput: sandboxed programs scored per second, serial vs ScoringPool.

Scores the toy code tasks (:mod:`verifiers.code_tasks`) with their canonical solutions
through the ``code`` verifier at the default sandbox limits (one sandboxed process tree
per test). Serial: direct calls in this process. Parallel: ``ScoringPool(workers)``
(warmed up first, so worker start-up is not timed). Headline: parallel programs/s ÷
serial programs/s (goal >= 1.5 with 2 workers). Every score must be 1.0, or the run
fails. Prints human lines, then ONE JSON object on the last line of stdout.

    python bench/verifier_throughput.py [--tasks 20] [--tests-per-task 4] [--workers 2]
"""

from __future__ import annotations

import argparse
import sys
import time

import common  # noqa: F401  (sets up sys.path and PYTHONPATH for the workers)
from common import emit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=20, help="toy tasks (one sample each)")
    ap.add_argument("--tests-per-task", type=int, default=4, help="tests = sandboxed programs per task")
    ap.add_argument("--workers", type=int, default=2, help="ScoringPool worker processes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from verifiers import get_verifier
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
    print(f"{len(tasks)} tasks x {args.tests_per_task} tests = {programs} programs")

    score = get_verifier("code")
    t0 = time.perf_counter()
    serial = [score(r, a) for r, a in zip(responses, refs)]
    serial_s = time.perf_counter() - t0
    serial_rate = programs / serial_s
    print(f"serial:   {serial_s:6.2f} s  {serial_rate:7.1f} programs/s")

    timeout = pool_timeout_s(args.tests_per_task)
    with ScoringPool(args.workers, timeout) as pool:
        pool.score_batch("code", responses[: args.workers], refs[: args.workers])  # warm up
        t0 = time.perf_counter()
        parallel = pool.score_batch("code", responses, refs)
        parallel_s = time.perf_counter() - t0
    parallel_rate = programs / parallel_s
    print(
        f"parallel: {parallel_s:6.2f} s  {parallel_rate:7.1f} programs/s  "
        f"({args.workers} workers, pool timeout {timeout:.0f} s)"
    )

    bad = [i for i, (a, b) in enumerate(zip(serial, parallel)) if a != 1.0 or b != 1.0]
    if bad:
        print(f"ERROR: canonical solutions did not all score 1.0 (tasks {bad[:10]})", file=sys.stderr)
        sys.exit(1)
    ratio = parallel_rate / serial_rate
    print(f"parallel / serial = {ratio:.2f} (goal 1.5)")
    emit(
        {
            "metric": "code_verifier_programs_per_s_parallel_over_serial",
            "value": round(ratio, 3),
            "goal": 1.5,
            "serial_per_s": round(serial_rate, 2),
            "parallel_per_s": round(parallel_rate, 2),
            "workers": args.workers,
            "programs": programs,
        }
    )


if __name__ == "__main__":
    main()
