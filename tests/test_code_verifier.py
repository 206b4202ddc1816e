"""Tests of the sandboxed ``code`` verifier (:mod:`verifiers.code`) and its toy tasks.

Fast (no Ray, no model): each program run is ~0.1 s; the adversarial tests use
``wall_s=2`` limits and each asserts the verifier returned within the limit plus
``MARGIN_S``. The adversarial suite checks one property per test.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import verifiers  # noqa: E402
from verifiers import code as cv  # noqa: E402
from verifiers.code import SandboxLimits, isolation_report, run_program, score_code  # noqa: E402
from verifiers.code_tasks import KINDS, make_code_tasks  # noqa: E402
from verifiers.pool import ScoringPool  # noqa: E402

FAST = SandboxLimits(wall_s=2.0, cpu_s=2.0)
MARGIN_S = 1.5


def block(src: str) -> str:
    return f"Here is my solution.\n```python\n{src}\n```\n"


def fn_ref(fn_name: str, tests: list[tuple[list, object]]) -> str:
    return json.dumps({"fn_name": fn_name, "tests": [{"input": a, "output": o} for a, o in tests]})


def stdin_ref(tests: list[tuple[str, str]]) -> str:
    return json.dumps([{"input": i, "output": o, "testtype": "stdin"} for i, o in tests])


def timed(fn, *args, **kwargs):
    t0 = time.monotonic()
    out = fn(*args, **kwargs)
    return out, time.monotonic() - t0


def procs_of_uid(uid: int) -> list[str]:
    """Live (not zombie) processes whose real uid is ``uid``, as "pid state ppid" strings."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as f:
                fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        except OSError:
            continue
        state = fields.get("State", "?").split()[0]
        if state in ("Z", "X") or int(fields.get("Uid", "-1").split()[0]) != uid:
            continue
        found.append(f"{d} {state} ppid={fields.get('PPid')} nspid={fields.get('NSpid')}")
    return found


def procs_with_marker(marker: str) -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(d))
        except OSError:
            pass
    return found


ADD_REF = fn_ref("add", [([1, 2], 3), ([5, -7], -2), ([0, 0], 0), ([10, 20], 30)])
ECHO_SUM_REF = stdin_ref([("1 2\n", "3\n"), ("10 -3\n", "7"), ("0 0\n", "0\n")])
ECHO_SUM = "a, b = map(int, input().split())\nprint(a + b)"


def test_registered_and_report():
    assert "code" in verifiers.VERIFIERS and "code_strict" in verifiers.VERIFIERS
    assert not verifiers.is_cheap("code") and not verifiers.is_cheap("code_strict")
    rep = isolation_report()
    assert rep["works"], rep
    print("isolation:", json.dumps(rep))


# ------------------------------------------------------------------ stdin form


def test_stdin_correct():
    assert score_code(block(ECHO_SUM), ECHO_SUM_REF, limits=FAST) == 1.0


def test_stdin_wrong():
    assert score_code(block("a, b = map(int, input().split())\nprint(a - b + 1)"), ECHO_SUM_REF, limits=FAST) == 0.0


def test_stdin_crash():
    assert score_code(block("print(3)\nraise SystemExit(1)"), stdin_ref([("1 2\n", "3\n")]), limits=FAST) == 0.0
    assert score_code(block("1/0"), stdin_ref([("", "")]), limits=FAST) == 0.0


def test_stdin_slow():
    src = "import time\ntime.sleep(30)\nprint(3)"
    s, dt = timed(score_code, block(src), stdin_ref([("1 2\n", "3\n")]), limits=FAST)
    assert s == 0.0 and dt < FAST.wall_s + MARGIN_S


def test_stdin_whitespace_normalisation():
    ref = stdin_ref([("", "a b\nc\n\n")])
    assert score_code(block("print('a b   ')\nprint('c\\t')\nprint()\nprint()"), ref, limits=FAST) == 1.0
    assert score_code(block("print()\nprint('a b')\nprint('c')"), ref, limits=FAST) == 0.0  # leading line counts


# ------------------------------------------------------------------ function form


def test_function_correct_top_level_and_solution_class():
    assert score_code(block("def add(a, b):\n    return a + b"), ADD_REF, limits=FAST) == 1.0
    leet = "class Solution:\n    def add(self, a: int, b: int) -> int:\n        return a + b"
    assert score_code(block(leet), ADD_REF, limits=FAST) == 1.0


def test_function_wrong():
    assert score_code(block("def add(a, b):\n    return a - b"), ADD_REF, limits=FAST) == 0.25  # (0, 0) passes


def test_function_crash_and_missing():
    assert score_code(block("def add(a, b):\n    raise ValueError"), ADD_REF, limits=FAST) == 0.0
    assert score_code(block("def plus(a, b):\n    return a + b"), ADD_REF, limits=FAST) == 0.0
    assert score_code(block("def add(a, b) return"), ADD_REF, limits=FAST) == 0.0  # syntax error


def test_function_slow():
    src = "import time\ndef add(a, b):\n    time.sleep(30)\n    return a + b"
    s, dt = timed(score_code, block(src), fn_ref("add", [([1, 2], 3)]), limits=FAST)
    assert s == 0.0 and dt < FAST.wall_s + MARGIN_S


def test_function_json_round_trip_and_prints_ignored():
    ref = fn_ref("pair", [([2], [2, 4]), ([0], [0, 0])])
    assert score_code(block("def pair(x):\n    print('noise')\n    return (x, 2 * x)"), ref, limits=FAST) == 1.0
    assert score_code(block("def pair(x):\n    return {x, 2 * x}"), ref, limits=FAST) == 0.0  # not JSON


def test_function_livecodebench_string_form():
    ref = json.dumps(
        {
            "fn_name": "twoSum",
            "tests": [
                {"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]"},
                {"input": "[3, 2, 4]\n6", "output": "[1, 2]"},
            ],
        }
    )
    src = (
        "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
        "        seen = {}\n        for i, x in enumerate(nums):\n"
        "            if target - x in seen:\n                return [seen[target - x], i]\n"
        "            seen[x] = i\n"
    )
    assert score_code(block(src), ref, limits=FAST) == 1.0


# ------------------------------------------------------------------ scoring modes, parsing


def test_fractional_score():
    src = "def add(a, b):\n    return a + b if a >= 0 and b >= 0 else 99"
    assert score_code(block(src), ADD_REF, limits=FAST) == 0.75
    half = stdin_ref([("1 2\n", "3"), ("2 2\n", "5"), ("0 1\n", "1"), ("4 4\n", "0")])
    assert score_code(block(ECHO_SUM), half, limits=FAST) == 0.5


def test_all_or_nothing_mode():
    src = "def add(a, b):\n    return a + b if a >= 0 and b >= 0 else 99"
    assert score_code(block(src), ADD_REF, limits=FAST, strict=True) == 0.0
    assert score_code(block("def add(a, b):\n    return a + b"), ADD_REF, limits=FAST, strict=True) == 1.0
    strict = verifiers.get_verifier("code_strict")
    frac = verifiers.get_verifier("code")
    assert strict(block(src), ADD_REF) == 0.0
    assert frac(block(src), ADD_REF) == 0.75
    # strict stops at the first failure: one run, not four
    results = cv.run_tests(block("def add(a, b):\n    return 0"), ADD_REF, limits=FAST, strict=True)
    assert results == [False]


def test_no_code_block():
    assert score_code("def add(a, b):\n    return a + b", ADD_REF, limits=FAST) == 0.0
    assert score_code("```text\ndef add(a, b):\n    return a + b\n```", ADD_REF, limits=FAST) == 0.0
    assert score_code("", ADD_REF) == 0.0
    assert score_code(None, ADD_REF) == 0.0  # type: ignore[arg-type]


def test_last_block_wins():
    resp = (
        "first try:\n```python\ndef add(a, b):\n    return 0\n```\nfixed:\n"
        "```\ndef add(a, b):\n    return a + b\n```\n```text\nnot code\n```"
    )
    assert cv.extract_code(resp).strip() == "def add(a, b):\n    return a + b"
    assert score_code(resp, ADD_REF, limits=FAST) == 1.0


@pytest.mark.parametrize(
    "ref",
    [
        "not json",
        "",
        "{",
        "null",
        "42",
        '"str"',
        "{}",
        "[]",
        '{"fn_name": "add"}',
        '{"fn_name": "add", "tests": []}',
        '{"fn_name": "a b", "tests": [{"input": [1], "output": 1}]}',
        '{"fn_name": "add", "tests": [{"input": 5, "output": 1}]}',
        '{"fn_name": "add", "tests": [{"output": 1}]}',
        '[{"input": "1", "output": "1", "testtype": "functional"}]',
        '[{"input": 1, "output": "1"}]',
        "[1, 2]",
    ],
)
def test_bad_reference_scores_zero(ref):
    assert score_code(block("def add(a, b):\n    return a + b"), ref, limits=FAST) == 0.0
    assert verifiers.get_verifier("code")(block("print(1)"), ref) == 0.0


def test_limits_validated():
    with pytest.raises(ValueError):
        SandboxLimits(wall_s=0)
    with pytest.raises(ValueError):
        SandboxLimits(processes=0)
    assert cv.DEFAULT_LIMITS == SandboxLimits(4.0, 4.0, 512, 16, 64, 32, 1 << 20)
    assert cv.pool_timeout_s(3) == 3 * (cv.DEFAULT_LIMITS.wall_s + cv.RUN_OVERHEAD_S)


# ------------------------------------------------------------------ adversarial (one property each)


def run_fast(src: str, stdin: str = ""):
    return timed(run_program, {"solution.py": src}, ["solution.py"], stdin, FAST)


def test_adv_infinite_loop_is_killed_in_time():
    r, dt = run_fast("while True:\n    pass")
    assert not r.ok and dt < FAST.wall_s + MARGIN_S, (r, dt)
    assert procs_of_uid(r.isolation["uid"]) == []


def test_adv_fork_bomb_is_contained():
    src = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r, dt = run_fast(src)
    assert not r.ok and dt < FAST.wall_s + MARGIN_S, (r, dt)
    assert procs_of_uid(r.isolation.get("uid", -1)) == []
    r2 = run_program({"solution.py": ECHO_SUM}, ["solution.py"], "1 2\n", FAST)  # still works
    assert r2.ok and r2.stdout == b"3\n", r2


def test_adv_memory_bomb_fails_cleanly():
    # 128 MiB of address space, not the default 512: touching 512 MiB took 0.3-1.2 s here
    # unloaded and ran past the 2 s wall limit on a loaded CI machine, so the wall limit
    # fired instead of the memory limit this test is about.
    lim = SandboxLimits(wall_s=FAST.wall_s, cpu_s=FAST.cpu_s, memory_mb=128)
    src = "x = []\nwhile True:\n    x.append(bytearray(50 * 1024 * 1024))\n    print(len(x), flush=True)"
    r, dt = timed(run_program, {"solution.py": src}, ["solution.py"], "", lim)
    assert not r.timed_out and r.returncode not in (None, 0), (r, dt)
    assert r.stderr.rstrip().endswith(b"MemoryError"), r.stderr
    assert r.stdout in (b"1\n", b"1\n2\n"), r.stdout  # the limit, not start-up, stopped it; 3 x 50 MiB > 128 MiB
    assert dt < lim.wall_s + MARGIN_S, dt


def test_adv_huge_output_is_capped():
    lim = SandboxLimits(wall_s=2.0, cpu_s=2.0, output_bytes=64 * 1024, file_size_mb=4)
    t0 = time.monotonic()
    r = run_program({"solution.py": "while True:\n    print('x' * 10000)"}, ["solution.py"], "", lim)
    dt = time.monotonic() - t0
    assert not r.ok and r.output_truncated and len(r.stdout) <= lim.output_bytes
    assert dt < lim.wall_s + MARGIN_S
    s, dt = timed(score_code, block("print('3' * 10_000_000)"), stdin_ref([("", "3")]), limits=FAST)
    assert s == 0.0 and dt < FAST.wall_s + MARGIN_S


def test_adv_cannot_write_outside_its_directory():
    tag = f"rlextra-sandbox-probe-{uuid.uuid4().hex}"
    targets = [f"/tmp/{tag}", f"/root/{tag}", f"/var/tmp/{tag}", f"/dev/shm/{tag}", str(ROOT / tag)]
    src = (
        f"import os\nfor p in {targets!r}:\n    try:\n        open(p, 'w').write('x')\n"
        "    except OSError:\n        pass\n"
        "open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())\n"
    )
    try:
        r, dt = run_fast(src)
        assert r.ok and r.stdout.strip() == b"ok"  # the temp dir itself is writable
        assert dt < FAST.wall_s + MARGIN_S
        for p in targets:
            assert not os.path.exists(p), p
    finally:
        for p in targets:
            if os.path.exists(p):
                os.remove(p)


def test_adv_environment_secrets_are_not_visible(monkeypatch):
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("RLEXTRA_TEST_SECRET", secret)
    src = (
        "import os\n"
        "def leak():\n"
        f"    found = [k for k, v in os.environ.items() if {secret!r} in v or k == 'RLEXTRA_TEST_SECRET']\n"
        "    for d in os.listdir('/proc'):\n"
        "        try:\n"
        f"            if {secret!r}.encode() in open('/proc/%s/environ' % d, 'rb').read():\n"
        "                found.append(d)\n"
        "        except OSError:\n"
        "            pass\n"
        "    return found\n"
    )
    s, dt = timed(score_code, block(src), fn_ref("leak", [([], [])]), limits=FAST)
    assert s == 1.0 and dt < FAST.wall_s + MARGIN_S  # passes only if nothing was found


def test_adv_no_network_connection():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    port = srv.getsockname()[1]
    try:
        src = (
            "import socket\ns = socket.socket()\ns.settimeout(1)\n"
            f"s.connect(('127.0.0.1', {port}))\ns.sendall(b'leak')\nprint('connected')\n"
        )
        r, dt = run_fast(src)
        assert not r.ok and b"connected" not in r.stdout and dt < FAST.wall_s + MARGIN_S
        with pytest.raises(BlockingIOError):
            srv.accept()  # nobody connected
        with socket.create_connection(("127.0.0.1", port), timeout=2):  # the server works
            pass
        time.sleep(0.05)
        conn, _ = srv.accept()
        conn.close()
    finally:
        srv.close()


def test_adv_cannot_kill_the_parent():
    me, pg = os.getpid(), os.getpgrp()
    src = (
        "import os, signal\n"
        f"for f in (lambda: os.kill(os.getppid(), 9), lambda: os.kill({me}, 9), lambda: os.killpg({pg}, 9),\n"
        "          lambda: os.kill(1, 9), lambda: os.kill(-1, 9), lambda: os.killpg(0, 9)):\n"
        "    try:\n        f()\n    except OSError:\n        pass\n"
        "print('alive')\n"
    )
    r, dt = run_fast(src)
    assert os.getpid() == me and dt < FAST.wall_s + MARGIN_S  # we are still here
    assert r.returncode is not None  # the verifier saw the program end (killed by its own killpg)
    assert score_code(block(ECHO_SUM), ECHO_SUM_REF, limits=FAST) == 1.0


def test_adv_cannot_delete_host_files(tmp_path):
    """A world-writable file in a private host directory, and a root-owned 0644 file in a 0755 directory of the
    checkout (a temporary copy of pyproject.toml: the sandbox must see it, and not be able to change it)."""
    victim_dir = tmp_path / "shared"
    victim_dir.mkdir()
    victim = victim_dir / "victim.txt"
    victim.write_text("keep me")
    os.chmod(victim_dir, 0o777)
    os.chmod(victim, 0o666)
    repo_dir = Path(tempfile.mkdtemp(prefix=".sandbox-probe-", dir=ROOT))  # outside /tmp: the sandbox sees it
    try:
        os.chmod(repo_dir, 0o755)
        repo_file = repo_dir / "pyproject.toml"
        shutil.copyfile(ROOT / "pyproject.toml", repo_file)
        os.chmod(repo_file, 0o644)
        src = (
            "import os, shutil\n"
            f"print(open({str(repo_file)!r}).read().splitlines()[0])\n"
            f"for p in ({str(victim)!r}, {str(repo_file)!r}):\n"
            "    for f in (os.remove, lambda p: open(p, 'w').close()):\n"
            "        try:\n            f(p)\n        except OSError:\n            pass\n"
            f"shutil.rmtree({str(victim_dir)!r}, ignore_errors=True)\n"
            f"shutil.rmtree({str(repo_dir)!r}, ignore_errors=True)\nprint('done')\n"
        )
        before = repo_file.read_bytes()
        r, dt = run_fast(src)
        assert r.ok and dt < FAST.wall_s + MARGIN_S
        seen = [before.decode().splitlines()[0], "done"]
        assert r.stdout.decode().splitlines() == seen, f"the sandbox did not see {repo_file}: {r.stdout[:200]!r}"
        assert victim.read_text() == "keep me"
        assert repo_file.read_bytes() == before
    finally:
        shutil.rmtree(repo_dir, ignore_errors=True)


def test_adv_spawned_sleeper_is_killed():
    marker = f"rlextra-sleeper-{uuid.uuid4().hex}"
    src = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}])\n"
        "    os._exit(0)\n"
        "time.sleep(0.3)\nprint('parent exits')\n"
    )
    r, dt = run_fast(src)
    assert r.ok and dt < FAST.wall_s + MARGIN_S
    time.sleep(0.1)
    assert procs_with_marker(marker) == []
    assert procs_of_uid(r.isolation["uid"]) == []


def test_fallback_without_pid_and_mount_namespaces():
    """Where the kernel refuses PID/mount namespaces: leftovers die by uid sweep, the
    program still runs unprivileged in a private directory that is removed afterwards."""
    marker = f"rlextra-sleeper-{uuid.uuid4().hex}"
    tag = f"rlextra-sandbox-probe-{uuid.uuid4().hex}"
    src = (
        "import os, sys\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}])\n"
        "try:\n"
        f"    open('/root/{tag}', 'w')\n"
        "except OSError:\n"
        "    pass\n"
        "print(os.getuid(), os.getcwd())\n"
    )
    t0 = time.monotonic()
    r = run_program({"solution.py": src}, ["solution.py"], "", FAST, namespaces=("net",))
    assert r.ok and time.monotonic() - t0 < FAST.wall_s + MARGIN_S
    assert not r.isolation["pidns"] and not r.isolation["mountns"] and r.isolation["netns"]
    uid, cwd = r.stdout.decode().split()
    if os.geteuid() == 0:
        assert int(uid) == r.isolation["uid"] != 0
        assert procs_of_uid(int(uid)) == []
        assert procs_with_marker(marker) == []
    assert not os.path.exists(f"/root/{tag}")
    assert not os.path.exists(cwd)  # the host temp dir is gone


def test_pool_timeout_still_kills_the_sandbox():
    """If the pool's deadline fires before the sandbox's (misconfigured timeout), the
    worker is killed and the sandbox dies with it (parent-death signals)."""
    marker = f"rlextra-sleeper-{uuid.uuid4().hex}"
    src = (
        "import os, sys, time\ndef f():\n    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}])\n"
        "    time.sleep(30)\n"
    )
    with ScoringPool(1, 1.0) as p:
        assert p.score("code", block(src), fn_ref("f", [([], 1)])) == 0.0
    deadline = time.monotonic() + 3.0
    while procs_with_marker(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert procs_with_marker(marker) == []


# ------------------------------------------------------------------ toy tasks


def test_code_tasks_deterministic_and_canonical_solutions_pass():
    a, b = make_code_tasks(40, seed=3), make_code_tasks(40, seed=3)
    assert a == b and a != make_code_tasks(40, seed=4)
    assert make_code_tasks(5, seed=3) == a[:5]
    assert len(KINDS) >= 20 and {t["kind"] for t in a} == {k.name for k in KINDS}
    for t in a:
        ref = json.loads(t["answer"])
        assert ref["fn_name"] == t["fn_name"] and len(ref["tests"]) == 4
        assert "```python" in t["prompt"]
    # every kind's canonical solution scores 1.0 in the sandbox (one test each, to stay fast)
    for t in make_code_tasks(len(KINDS), seed=1, tests_per_task=1):
        assert score_code(block(t["canonical_solution"]), t["answer"], limits=FAST) == 1.0, t["kind"]


# ------------------------------------------------------------------ through ScoringPool


@pytest.fixture(scope="module")
def pool():
    with ScoringPool(2, cv.pool_timeout_s(1)) as p:
        p.score("code", block("def f():\n    return 1"), fn_ref("f", [([], 1)]))  # warm the workers
        yield p


def test_pool_scores_in_parallel(pool):
    src = "import time\ndef f(x):\n    time.sleep(1.0)\n    return x"
    refs = [fn_ref("f", [([i], i)]) for i in range(4)]
    scores, dt = timed(pool.score_batch, "code", [block(src)] * 4, refs)
    assert scores == [1.0] * 4
    assert dt < 3.8, dt  # ~2.1 s with 2 workers; > 4.2 s serial


def test_pool_bad_program_does_not_affect_others(pool):
    tasks = make_code_tasks(4, seed=7, tests_per_task=1)
    good = [(block(t["canonical_solution"]), t["answer"]) for t in tasks]
    loop = (block("def f():\n    while True:\n        pass"), fn_ref("f", [([], 1)]))
    bomb = (
        block("import os\ndef f():\n    os.kill(os.getppid(), 9)\n    while True:\n        os.fork()"),
        fn_ref("f", [([], 1)]),
    )
    samples = [good[0], loop, good[1], bomb, good[2], good[3]]
    scores, dt = timed(pool.score_batch, "code", [s[0] for s in samples], [s[1] for s in samples])
    assert scores == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert dt < cv.DEFAULT_LIMITS.wall_s + 4 * MARGIN_S
    assert pool.rebuilds == 0  # the sandbox's own limits fired, not the pool's timeout
