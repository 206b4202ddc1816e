"""Run several invocations of the entry points in one Python process, one after another, each the way
`python -m <module> <args>` runs it: `runpy` as `__main__`, its own argv and environment, its own stdout and stderr
(file descriptors 1 and 2 redirected, so log handlers and C extensions are captured too), its exit code.

    python tests/cli_batch.py cases.json results.json

cases.json: a list of {"module", "args", "env"}; results.json: a list of {"returncode", "stdout", "stderr"} in the
same order. The bad-input tests (tests/test_inputs.py, tests/test_job.py) check 30-odd refusals: one interpreter
imports torch, transformers, Hydra and MLflow once instead of once per case (~8 s each on 2 cores). What a case can
inherit from the cases before it is imported modules; the entry points keep no other state between runs. An uncaught
exception prints its traceback and ends the case with exit code 1, as the interpreter would.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile
import traceback


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)  # sys.exit("message"): printed, status 1
    return 1


def run_case(module: str, args: list[str], env: dict[str, str]) -> dict:
    saved_env, saved_argv = dict(os.environ), list(sys.argv)
    saved_fds = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = [module, *args]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            os.environ.clear()
            os.environ.update(saved_env)
            sys.argv = saved_argv
        out.seek(0)
        err.seek(0)
        result = {"returncode": code, "stdout": out.read(), "stderr": err.read()}
    for fd in saved_fds:
        os.close(fd)
    return result


def main(cases_path: str, results_path: str) -> None:
    sys.path[0] = os.getcwd()  # as `python -m` has it (not this script's folder)
    with open(cases_path) as f:
        cases = json.load(f)
    results = [run_case(c["module"], [str(a) for a in c["args"]], c["env"]) for c in cases]
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
