"""``code`` verifier: run the model's Python program against tests in a sandbox.

Verifiers
---------
``score(response, reference) -> float`` registered twice:

* ``code``        -- fraction of the tests passed (0.0 .. 1.0);
* ``code_strict`` -- all-or-nothing: 1.0 only if every test passes (stops at the
  first failing test, so a wrong program costs one run, not ``n``).

Both use :data:`DEFAULT_LIMITS`. Other limits / modes: :func:`score_code` takes
``limits=`` and ``strict=``; to use them inside a :class:`~verifiers.pool.ScoringPool`
register your own name in a small module (``register_verifier("code_fast")(
make_code_verifier(SandboxLimits(wall_s=1)))``) and pass that module as
``plugin_modules`` -- the workers are separate processes, so assigning a module
global in the parent would not reach them.

Response: the LAST fenced block tagged ``python``/``py``/``python3`` or untagged
(```` ```python ... ``` ```` or ```` ``` ... ``` ````); blocks tagged with another
language are ignored. No block: 0.0.

Reference: a JSON string (a parsed ``dict``/``list`` is accepted too), in one of the
two forms of LiveCodeBench's public tests:

* **stdin tests** -- ``[{"input": str, "output": str, "testtype": "stdin"}, ...]``
  (``testtype`` may be omitted). The program reads ``input`` on stdin; it passes if it
  exits with status 0 within the limits and its stdout equals ``output`` line by line
  after stripping trailing whitespace from every line and dropping trailing empty
  lines (on both sides).
* **function tests** -- ``{"fn_name": str, "tests": [{"input": ..., "output": ...}]}``.
  ``input`` is either a JSON list of positional arguments, or (LiveCodeBench's
  string form) a string holding one JSON value per line, one per argument; in the
  string form ``output`` is a JSON *string* that is decoded too. The program is
  executed as a module (``__name__ == "solution"``, so a ``__main__`` block does not
  run, with ``typing``'s names and a few stdlib modules -- collections, heapq,
  bisect, math, itertools, functools, string, re -- preloaded as LeetCode does);
  the callable is ``Solution().<fn_name>`` if a class ``Solution`` has that
  attribute, else a top-level ``<fn_name>``. The return value passes if
  ``json.loads(json.dumps(value)) == expected`` (tuples become lists; Python ``==``
  on JSON values, so ``1 == 1.0``; a non-JSON-serialisable value fails). The
  program's own prints are discarded.

Score = passed / number of tests. A reference that is not valid JSON or not one of
the forms above, or has no tests, scores 0.0; ``score`` never raises.

Sandbox (one process tree per test, see :func:`run_program`)
------------------------------------------------------------
The verifier starts ``<this python> -I -S -c <launcher>`` with an EMPTY environment,
as a new session / process group, cwd ``/``. The program's source, stdin, stdout and
stderr are unlinked temporary files passed as file descriptors (nothing on the host
file system to clean up or to leak, even if the verifier is killed); stdout is read
back up to ``limits.output_bytes`` (more fails the test) and is bounded on disk by
``RLIMIT_FSIZE``. The launcher (running as the verifier's user, normally root):

1. asks for ``PR_SET_PDEATHSIG`` = SIGKILL (dies with the verifier) and arms an
   ``alarm`` backstop of ``wall_s + 2`` s;
2. ``unshare``\\ s new **network** (only a down loopback: no connection leaves the
   sandbox, not even to 127.0.0.1), **PID**, **mount**, IPC and UTS namespaces
   (via ``libc.unshare`` with ctypes: ``os.unshare`` only exists from Python 3.12).
   Not root: it asks for the same inside a new **user** namespace instead;
3. forks the namespace's init (PID 1, root, parent-death signal too). Init makes
   every mount private, mounts a fresh ``/proc`` (only the sandbox's own processes
   are visible), mounts empty tmpfs over ``/tmp``, ``/var/tmp``, ``/dev/shm`` and
   ``/run`` (hides host sockets such as Ray's), makes the **whole mount tree
   read-only** and ``nosuid`` with one ``mount_setattr(AT_RECURSIVE)`` call (Linux
   >= 5.12), then mounts a fresh ``limits.disk_mb`` tmpfs at ``/tmp/sandbox`` owned
   by the sandbox uid: the only writable place, and the program's cwd;
4. init forks the program: ``setrlimit`` (CPU, address space, file size, open
   files, processes, no core dumps; hard = soft), ``setgroups([])`` +
   ``setresgid``/``setresuid`` to an unprivileged uid/gid **unique to this run**
   (``UID_BASE + launcher pid``, so ``RLIMIT_NPROC``, ``kill(-1)`` and file
   ownership are per sandbox, not shared by concurrent sandboxes),
   ``PR_SET_NO_NEW_PRIVS`` (setuid binaries cannot regain root), then ``execve`` of
   :func:`sandbox_python` ``-I -S`` (stdlib only) with env
   ``PATH=/usr/bin:/bin, LANG=C.UTF-8`` and only fds 0-2 open;
5. init reaps zombies until the program exits, then exits with its status; the
   kernel then SIGKILLs every process left in the PID namespace (children the
   program spawned, setsid'd or not) and reaps them before init's exit completes.

The verifier waits ``wall_s`` (on a pidfd), then SIGKILLs the launcher's process
group, which includes init (so the whole namespace goes), and waits (at most 2 s)
on a pidfd of init, which only signals once the kernel has emptied the namespace:
when ``run_program`` returns, nothing of the sandbox runs any more. Exit status:
0 passes; 128+N means killed by signal N.

Each layer degrades on its own where the kernel refuses it, and
:func:`isolation_report` (and ``RunResult.isolation``) says what is in effect.
Without a PID namespace the launcher is a child subreaper and, as root, leftovers
are killed by uid (``kill(-1, SIGKILL)`` from a helper running as the sandbox uid);
without a mount namespace the program runs in a private 0700 directory of the host
temp dir owned by its uid, removed afterwards (it can then also write other
world-writable places such as ``/tmp``); without a network namespace there is NO
network isolation: no seccomp fallback is used (no maintained libseccomp binding
is installed; ``pyseccomp`` on PyPI is unmaintained since 2021). Not root and no
user namespace: no privilege drop, no uid sweep (rlimits, empty env and process
group kill only).

Not guaranteed: memory is limited per process (``RLIMIT_AS``), so a sandbox may use
up to ``processes * memory_mb`` in total (plus ``disk_mb`` of tmpfs, which is RAM);
CPU time is per process, and programs are not niced (they compete with the host
for CPU during ``wall_s``); the program can read every world-readable file of the
host (not ``/root`` nor root's 0600 files) and see the kernel version, CPU count,
etc.; concurrent sandboxes share nothing but the read-only file system; there is
no protection against kernel exploits (no seccomp filter, no VM): this is process
isolation for buggy or mildly hostile model output, not a security boundary for
targeted attacks.

Interaction with ``ScoringPool``'s timeout: a sample runs its tests one after the
other, each bounded by ``wall_s`` plus launch/kill overhead (~0.1 s, worst case 2 s).
Give the pool ``timeout_s >= pool_timeout_s(max_tests, limits)`` (= ``max_tests *
(wall_s + 2)``) so that the sandbox's own limits are what fire; if the pool's
deadline fires first the sample scores 0.0, the worker is killed and the sandbox
dies with it through the parent-death signals (within milliseconds; nothing is
left on disk).

Note: the module is ``verifiers/code.py`` as asked, so it would shadow the stdlib
``code`` module if the ``verifiers`` directory itself were put on ``sys.path``
(the same caveat that made ``math`` live in ``math_verifier.py``); import it as
``verifiers.code``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import marshal
import math
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from . import register_reference_check, register_verifier

__all__ = [
    "SandboxLimits",
    "DEFAULT_LIMITS",
    "RunResult",
    "extract_code",
    "parse_reference",
    "run_program",
    "run_tests",
    "score_code",
    "score_code_fraction",
    "score_code_strict",
    "make_code_verifier",
    "pool_timeout_s",
    "isolation_report",
    "sandbox_python",
    "code_reference_problem",
]


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits of the sandbox (one program run = one test).

    Attributes:
        wall_s: wall-clock seconds from launch (interpreter start included, ~50 ms)
            until the whole process tree is SIGKILLed.
        cpu_s: CPU seconds per process (``RLIMIT_CPU``; SIGXCPU, then SIGKILL 1 s later).
        memory_mb: address space per process (``RLIMIT_AS``), MiB; allocations beyond
            it fail (``MemoryError``).
        file_size_mb: largest file a process may write (``RLIMIT_FSIZE``), MiB; also
            bounds how much stdout/stderr is written to disk.
        open_files: open file descriptors per process (``RLIMIT_NOFILE``).
        processes: processes + threads of the sandbox uid (``RLIMIT_NPROC``; the uid
            is unique per run, so this is a per-sandbox fork-bomb limit).
        output_bytes: stdout read back; a program that prints more fails the test.
        disk_mb: size of the writable tmpfs cwd (only with a mount namespace).
    """

    wall_s: float = 4.0
    cpu_s: float = 4.0
    memory_mb: int = 512
    file_size_mb: int = 16
    open_files: int = 64
    processes: int = 32
    output_bytes: int = 1 << 20
    disk_mb: int = 64

    def __post_init__(self):
        for name in ("wall_s", "cpu_s"):
            v = float(getattr(self, name))
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"SandboxLimits.{name} must be positive and finite, got {v!r}")
        for name in ("memory_mb", "file_size_mb", "open_files", "processes", "output_bytes", "disk_mb"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SandboxLimits.{name} must be >= 1, got {getattr(self, name)!r}")


#: limits used by the registered ``code`` / ``code_strict`` verifiers.
DEFAULT_LIMITS = SandboxLimits()

#: Seconds one run may take beyond ``wall_s`` (launch, kill, reap: ~0.1 s, at most
#: ``_REAP_WAIT_S``); used by :func:`pool_timeout_s`.
RUN_OVERHEAD_S = 2.0

# The sandbox uid/gid is UID_BASE + launcher pid: unique among live sandboxes.
UID_BASE = 1_000_000
_MARKER = "@@rlextra-result@@"
# After a wall-time kill, how long to wait for the kernel to empty the PID namespace.
_REAP_WAIT_S = 2.0
_SANDBOX_DIR = "/tmp/sandbox"
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
#: namespaces the launcher asks for (each only where the kernel allows it).
ALL_NAMESPACES = ("net", "pid", "mount", "ipc", "uts")


@dataclass(frozen=True)
class RunResult:
    """Outcome of one sandboxed program run."""

    returncode: int | None  # exit status; 128+N if killed by signal N; None if unknown
    stdout: bytes  # at most limits.output_bytes
    stderr: bytes  # at most 64 KiB (diagnostics)
    timed_out: bool  # wall_s elapsed; the process tree was killed
    output_truncated: bool  # stdout exceeded limits.output_bytes
    wall_s: float
    isolation: dict  # what the launcher managed to set up (see isolation_report)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_truncated


# --------------------------------------------------------------------------- launcher
# Runs as `python -I -S -c _LAUNCHER <marshal config, hex>` with this very interpreter;
# builtin modules + ctypes only (marshal, not json: ~10 ms less start-up per run).
_LAUNCHER = r"""
import ctypes, marshal, os, signal, sys
C = marshal.loads(bytes.fromhex(sys.argv[1]))

def print_exc():
    import traceback
    traceback.print_exc()
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
libc.unshare.argtypes = [ctypes.c_int]
libc.syscall.restype = ctypes.c_long
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 16384, 1 << 18
NS = {"net": 0x40000000, "pid": 0x20000000, "mount": 0x00020000, "ipc": 0x08000000, "uts": 0x04000000}
ALL_NS, NS = NS, {k: v for k, v in NS.items() if k in C["namespaces"]}
CLONE_NEWUSER = 0x10000000

def err():
    return os.strerror(ctypes.get_errno())

def die_with_parent(expected_ppid):
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if expected_ppid is not None and os.getppid() != expected_ppid:
        os._exit(125)

def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
        raise OSError(ctypes.get_errno(), "mount %s: %s" % (dst, err()))

class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

def readonly_tree():
    # mount_setattr(AT_FDCWD, "/", AT_RECURSIVE, {RDONLY|NOSUID}) -- Linux >= 5.12; nr 442 on all arches.
    a = MountAttr(0x1 | 0x2, 0, 0, 0)
    r = libc.syscall(ctypes.c_long(442), ctypes.c_int(-100), ctypes.c_char_p(b"/"),
                     ctypes.c_uint(0x8000), ctypes.byref(a), ctypes.c_size_t(ctypes.sizeof(a)))
    if r != 0:
        raise OSError(ctypes.get_errno(), "mount_setattr: " + err())

def sweep_uid(uid):
    # kill(-1) as the sandbox uid kills exactly the processes of that uid.
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        except BaseException:
            pass
        os._exit(0)
    os.waitpid(pid, 0)

st = {"root": os.geteuid() == 0, "userns": False, "uid": None, "errors": []}
die_with_parent(C["ppid"])
signal.alarm(C["backstop_s"])
ns = dict.fromkeys(ALL_NS, False)
if st["root"]:
    if libc.unshare(sum(NS.values())) == 0:
        ns.update(dict.fromkeys(NS, True))
    else:
        st["errors"].append("unshare(all): " + err())
        for k, f in NS.items():
            ns[k] = libc.unshare(f) == 0
    st["uid"] = C["uid_base"] + os.getpid()
else:
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(CLONE_NEWUSER | sum(NS.values())) == 0:
        try:
            with open("/proc/self/setgroups", "w") as f: f.write("deny")
            with open("/proc/self/uid_map", "w") as f: f.write("0 %d 1" % uid)
            with open("/proc/self/gid_map", "w") as f: f.write("0 %d 1" % gid)
            st["userns"] = True
            ns.update(dict.fromkeys(NS, True))
        except OSError as e:
            st["errors"].append("userns maps: %s" % e)
    else:
        st["errors"].append("unshare(user): " + err())
st.update({k + "ns": v for k, v in ns.items()})
launcher_pid = os.getpid()
if not ns["pid"]:  # orphans of the program become our children, not the host init's
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
U = st["uid"]
sfd = C["status_fd"]

def init():
    die_with_parent(None if ns["pid"] else launcher_pid)
    os.close(C["initpid_fd"])
    os.close(go_w)
    os.read(go_r, 1)  # EOF once the launcher has recorded our host pid
    os.close(go_r)
    signal.signal(signal.SIGALRM, lambda *a: os._exit(137))  # PID 1 ignores default actions
    signal.alarm(C["backstop_s"])
    files = {}
    for name, fd in C["files"].items():
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
        files[name] = b"".join(chunks)
        os.close(fd)
    cwd = None
    st.update(proc=False, private_tmp=False, readonly_root=False, tmpfs_cwd=False)
    if ns["mount"]:
        try:
            mount(None, "/", None, MS_REC | MS_PRIVATE)
            if ns["pid"]:
                try:
                    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
                    st["proc"] = True
                except OSError as e:
                    st["errors"].append(str(e))
            mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
            cwd = C["sandbox_dir"]
            os.mkdir(cwd, 0o700)
        except OSError as e:
            st["errors"].append(str(e))
    if cwd is not None:  # /tmp is private now; the rest is best effort
        try:
            for d in ("/var/tmp", "/dev/shm", "/run"):
                if os.path.isdir(d) and not os.path.islink(d):
                    mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
            st["private_tmp"] = True
        except OSError as e:
            st["errors"].append(str(e))
        try:
            readonly_tree()
            st["readonly_root"] = True
        except OSError as e:
            st["errors"].append(str(e))
        try:
            opts = "size=%dm,mode=700" % C["disk_mb"]
            if U is not None:
                opts += ",uid=%d,gid=%d" % (U, U)
            mount("tmpfs", cwd, "tmpfs", MS_NOSUID | MS_NODEV, opts)
            st["tmpfs_cwd"] = True
        except OSError as e:
            st["errors"].append(str(e))
            if U is not None:
                os.chown(cwd, U, U)
    if cwd is None:  # no (usable) mount namespace: a private dir in the host temp dir
        cwd = os.path.join(C["tmpdir"], "rlextra-code-%d-%s" % (launcher_pid, os.urandom(6).hex()))
        os.mkdir(cwd, 0o700)
        st["hostdir"] = cwd  # removed by the verifier afterwards
        if U is not None:
            os.chown(cwd, U, U)
    for name, data in files.items():
        p = os.path.join(cwd, name)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, 0o444)
    st["cwd"] = cwd
    st["no_new_privs"] = True  # set in the child below (it exits 127 if that fails)
    try:  # before the program starts: a fork bomb must not starve this write
        os.write(sfd, marshal.dumps(st))
    except OSError:
        pass
    L = C["limits"]
    child = os.fork()
    if child == 0:
        try:
            import resource as R
            os.close(sfd)
            os.chdir(cwd)
            cpu = max(1, int(-(-L["cpu_s"] // 1)))
            for res, v in ((R.RLIMIT_CPU, (cpu, cpu + 1)),
                           (R.RLIMIT_AS, (L["memory_mb"] << 20,) * 2),
                           (R.RLIMIT_FSIZE, (L["file_size_mb"] << 20,) * 2),
                           (R.RLIMIT_NOFILE, (L["open_files"],) * 2),
                           (R.RLIMIT_NPROC, (L["processes"],) * 2),
                           (R.RLIMIT_CORE, (0, 0))):
                R.setrlimit(res, v)
            if U is not None:
                os.setgroups([])
                os.setresgid(U, U, U)
                os.setresuid(U, U, U)
            if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                raise OSError("no_new_privs: " + err())
            py = C["python"]
            os.execve(py, [py, "-I", "-S"] + C["argv"], C["env"])
        except BaseException:
            print_exc()
        finally:
            os._exit(127)
    os.close(sfd)
    code = 127
    while True:  # reap everything; stop when the program itself exits
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code
            break
    os._exit(code)  # as PID 1: the kernel kills whatever is left in the namespace

go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        init()
    except BaseException:
        print_exc()
    os._exit(126)
os.close(sfd)
os.close(go_r)
for fd in C["files"].values():
    os.close(fd)
os.write(C["initpid_fd"], str(pid).encode())  # for the verifier's kill path
os.close(C["initpid_fd"])
os.close(go_w)  # let init go on
_, status = os.waitpid(pid, 0)  # returns once init's namespace is empty
code = os.waitstatus_to_exitcode(status)
if not ns["pid"]:
    if U is not None:
        sweep_uid(U)
    while True:  # reap adopted orphans (after the sweep: all dead)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
os._exit(128 - code if code < 0 else code)
"""

# Kills every process of a sandbox uid (used when there is no PID namespace).
_SWEEP = r"""
import os, signal, sys
u = int(sys.argv[1])
os.setgroups([]); os.setresgid(u, u, u); os.setresuid(u, u, u)
try:
    os.kill(-1, signal.SIGKILL)
except ProcessLookupError:
    pass
"""

# Runs inside the sandbox for function tests: argv = [harness, solution file, fn_name].
_HARNESS = r"""
import builtins, json, sys

class _Sink:
    def write(self, s):
        return len(s)
    def flush(self):
        pass

def main():
    path, fn_name = sys.argv[1], sys.argv[2]
    args = json.loads(sys.stdin.read())
    out = sys.stdout
    sys.stdout = _Sink()
    ns = {"__name__": "solution", "__builtins__": builtins}
    exec("from typing import *\nimport collections, heapq, bisect, math, itertools, functools, string, re\n", ns)
    with open(path, encoding="utf-8") as f:
        src = f.read()
    exec(compile(src, path, "exec"), ns)
    sol = ns.get("Solution")
    if isinstance(sol, type) and hasattr(sol, fn_name):
        fn = getattr(sol(), fn_name)
    elif callable(ns.get(fn_name)):
        fn = ns[fn_name]
    else:
        sys.stderr.write("function %r not found\n" % fn_name)
        sys.exit(3)
    text = json.dumps(fn(*args))
    sys.stdout = out
    out.write("\n" + MARKER + text + "\n")
    out.flush()

main()
""".replace("MARKER", repr(_MARKER))


# --------------------------------------------------------------------------- helpers


def _accessible_to_others(path: str) -> bool:
    """Whether an unprivileged other user can execute ``path`` (o+x on it and its dirs)."""
    try:
        real = os.path.realpath(path)
        if not os.path.isfile(real) or not os.stat(real).st_mode & stat.S_IXOTH:
            return False
        d = os.path.dirname(real)
        while True:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return False
            parent = os.path.dirname(d)
            if parent == d:
                return True
            d = parent
    except OSError:
        return False


@functools.cache
def sandbox_python() -> str:
    """Interpreter the sandboxed programs run with.

    ``$RLEXTRA_SANDBOX_PYTHON`` if set; when not root, ``sys.executable``; as root,
    the first of this interpreter, its base interpreter, ``/usr/bin/python3``,
    ``/usr/local/bin/python3`` that the unprivileged sandbox uid can reach (a pyenv
    or uv interpreter under ``/root`` cannot be). Programs run with ``-I -S``: the
    standard library only, no site-packages.
    """
    env = os.environ.get("RLEXTRA_SANDBOX_PYTHON")
    if env:
        return env
    if os.geteuid() != 0:
        return sys.executable
    candidates = [sys.executable, getattr(sys, "_base_executable", ""), "/usr/bin/python3", "/usr/local/bin/python3"]
    for c in candidates:
        if c and _accessible_to_others(c):
            return os.path.realpath(c)
    return os.path.realpath(sys.executable)  # will fail visibly in isolation_report()


def _poll_fd(fd: int, timeout: float) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if p.poll(max(1, int(left * 1000))):
            return True


def _pidfd_of_init(fd: int) -> int | None:
    """A pidfd of the sandbox's init (its host pid was written by the launcher), or None."""
    try:
        pid = int(os.pread(fd, 32, 0) or b"0")
        return os.pidfd_open(pid) if pid > 0 else None
    except (AttributeError, OSError, ValueError):
        return None


def _wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``proc`` to exit WITHOUT reaping it (so its pid,
    hence its process-group id, cannot be reused before we killpg it)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            return _poll_fd(fd, timeout)
        finally:
            os.close(fd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        if info is not None:
            return True
        time.sleep(0.005)
    return False


def _sweep(uid: int) -> None:
    try:
        subprocess.run(
            [sys.executable, "-I", "-S", "-c", _SWEEP, str(uid)],
            env={},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=5,
        )
    except Exception:
        pass


def _pread_all(fd: int, cap: int) -> tuple[bytes, bool]:
    """Up to ``cap`` bytes from the start of ``fd``, and whether there was more."""
    chunks, n = [], 0
    while n <= cap:
        b = os.pread(fd, min(1 << 20, cap + 1 - n), n)
        if not b:
            break
        chunks.append(b)
        n += len(b)
    data = b"".join(chunks)
    return data[:cap], len(data) > cap


def run_program(
    files: dict[str, str],
    argv: Sequence[str],
    stdin: str | bytes = b"",
    limits: SandboxLimits = DEFAULT_LIMITS,
    *,
    namespaces: Sequence[str] = ALL_NAMESPACES,
) -> RunResult:
    """Run ``python -I -S *argv`` in a fresh sandbox holding ``files`` (name -> text).

    ``argv`` is relative to the sandbox cwd (e.g. ``["solution.py"]``). Returns within
    about ``limits.wall_s`` + 0.1 s whatever the program does (at most ``wall_s`` + 2 s
    while the kernel empties a big namespace); every process of the sandbox is dead
    when it returns. Never raises for anything the program does.

    The files, stdin, stdout and stderr are unlinked temporary files (nothing to clean
    up, nothing left behind even if this process is killed); only the no-mount-namespace
    fallback creates a host directory, removed here afterwards. ``namespaces``
    restricts which namespaces are requested (to exercise the fallbacks in tests); the
    default asks for all of them, each granted where the kernel allows it.
    """
    if isinstance(stdin, str):
        stdin = stdin.encode("utf-8", "surrogateescape")
    for name in files:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad file name {name!r}")
    t0 = time.monotonic()
    proc = None
    with contextlib.ExitStack() as stack:

        def tmpfile(data: bytes = b"") -> int:
            f = stack.enter_context(tempfile.TemporaryFile())  # unlinked, 0600 root
            if data:
                f.write(data)
                f.flush()
                f.seek(0)
            return f.fileno()

        src = {name: tmpfile(text.encode("utf-8", "surrogateescape")) for name, text in files.items()}
        fd_in, fd_out, fd_err = tmpfile(stdin), tmpfile(), tmpfile()
        fd_status, fd_initpid = tmpfile(), tmpfile()
        cfg = {
            "ppid": os.getpid(),
            "backstop_s": int(math.ceil(limits.wall_s)) + 2,
            "uid_base": UID_BASE,
            "status_fd": fd_status,
            "initpid_fd": fd_initpid,
            "files": src,
            "tmpdir": tempfile.gettempdir(),
            "sandbox_dir": _SANDBOX_DIR,
            "disk_mb": int(limits.disk_mb),
            "python": sandbox_python(),
            "argv": list(argv),
            "env": dict(_ENV),
            "limits": asdict(limits),
            "namespaces": list(namespaces),
        }
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _LAUNCHER, marshal.dumps(cfg).hex()],
                stdin=fd_in,
                stdout=fd_out,
                stderr=fd_err,
                pass_fds=(fd_status, fd_initpid, *src.values()),
                env={},
                cwd="/",
                start_new_session=True,
                close_fds=True,
            )
            timed_out = not _wait_exit(proc, limits.wall_s)
            init_fd = _pidfd_of_init(fd_initpid) if timed_out else None
            try:  # the launcher is not reaped yet: its process-group id is still ours
                os.killpg(proc.pid, signal.SIGKILL)  # launcher + init (+ program unless setsid'd)
            except (ProcessLookupError, PermissionError):
                pass
            if init_fd is not None:  # init's exit completes once its PID namespace is empty
                try:
                    _poll_fd(init_fd, _REAP_WAIT_S)
                finally:
                    os.close(init_fd)
            proc.wait()
        finally:
            if proc is not None and proc.returncode is None:  # interrupted: still kill it
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        try:  # written by init before the program ran (the program never sees this fd)
            isolation = marshal.loads(_pread_all(fd_status, 1 << 16)[0])
        except (ValueError, EOFError, TypeError):
            isolation = {}
        if not isinstance(isolation, dict):
            isolation = {}
        uid = isolation.get("uid")
        if uid is not None and not isolation.get("pidns"):
            _sweep(int(uid))  # no PID namespace: kill whatever the program left behind
        hostdir = isolation.get("hostdir")
        if (
            isinstance(hostdir, str)
            and os.path.dirname(hostdir) == cfg["tmpdir"]
            and os.path.basename(hostdir).startswith("rlextra-code-")
        ):
            shutil.rmtree(hostdir, ignore_errors=True)
        stdout, truncated = _pread_all(fd_out, limits.output_bytes)
        stderr, _ = _pread_all(fd_err, 1 << 16)
        rc = None if timed_out else proc.returncode
        return RunResult(rc, stdout, stderr, timed_out, truncated, time.monotonic() - t0, isolation)


# --------------------------------------------------------------------------- parsing

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PY_TAGS = {"", "python", "py", "python3"}


def extract_code(response: str) -> str | None:
    """The last fenced block tagged python/py/python3 or untagged, or ``None``."""
    if not isinstance(response, str):
        return None
    code = None
    for m in _FENCE.finditer(response):
        if m.group(1).lower() in _PY_TAGS:
            code = m.group(2)
    if code is None or not code.strip():
        return None
    return code


@dataclass(frozen=True)
class _Test:
    kind: str  # "stdin" | "function"
    input: Any  # stdin text | list of args
    output: Any  # expected stdout text | expected JSON value


def parse_reference(reference: Any) -> tuple[str | None, list[_Test]] | None:
    """``(fn_name or None, tests)`` from a reference, or ``None`` if it is malformed."""
    try:
        data = json.loads(reference) if isinstance(reference, (str, bytes)) else reference
        if isinstance(data, dict) and "fn_name" in data:
            fn = data["fn_name"]
            if not isinstance(fn, str) or not fn.isidentifier() or not isinstance(data.get("tests"), list):
                return None
            tests = []
            for t in data["tests"]:
                args, out = t["input"], t["output"]
                if isinstance(args, str):  # LiveCodeBench: one JSON value per line
                    args = [json.loads(line) for line in args.split("\n") if line.strip()]
                    out = json.loads(out) if isinstance(out, str) else out
                elif not isinstance(args, list):
                    return None
                tests.append(_Test("function", args, json.loads(json.dumps(out))))
            return fn, tests
        if isinstance(data, list):
            tests = []
            for t in data:
                if t.get("testtype", "stdin") != "stdin":
                    return None
                if not isinstance(t["input"], str) or not isinstance(t["output"], str):
                    return None
                tests.append(_Test("stdin", t["input"], t["output"]))
            return None, tests
    except Exception:
        return None
    return None


def _normalize_lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _passes(test: _Test, code: str, fn_name: str | None, limits: SandboxLimits) -> bool:
    if test.kind == "stdin":
        r = run_program({"solution.py": code}, ["solution.py"], test.input, limits)
        if not r.ok:
            return False
        out = r.stdout.decode("utf-8", "replace")
        return _normalize_lines(out) == _normalize_lines(test.output)
    r = run_program(
        {"solution.py": code, "harness.py": _HARNESS},
        ["harness.py", "solution.py", fn_name],
        json.dumps(test.input),
        limits,
    )
    if not r.ok:
        return False
    text = r.stdout.decode("utf-8", "replace")
    for line in reversed(text.splitlines()):
        if line.startswith(_MARKER):
            try:
                return json.loads(line[len(_MARKER) :]) == test.output
            except ValueError:
                return False
    return False


def run_tests(
    response: str, reference: Any, *, limits: SandboxLimits | None = None, strict: bool = False
) -> list[bool]:
    """Per-test pass/fail of ``response`` against ``reference`` (``[]`` if there is
    no code or the reference is malformed). ``strict`` stops at the first failure."""
    limits = DEFAULT_LIMITS if limits is None else limits
    code = extract_code(response)
    parsed = parse_reference(reference)
    if code is None or parsed is None:
        return []
    fn_name, tests = parsed
    results = []
    for t in tests:
        ok = _passes(t, code, fn_name, limits)
        results.append(ok)
        if strict and not ok:
            break
    return results


def score_code(response: str, reference: Any, *, limits: SandboxLimits | None = None, strict: bool = False) -> float:
    """Fraction of tests passed (``strict``: 1.0 if all pass, else 0.0). Never raises."""
    try:
        parsed = parse_reference(reference)
        if parsed is None or not parsed[1]:
            return 0.0
        results = run_tests(response, reference, limits=limits, strict=strict)
        n = len(parsed[1])
        passed = sum(results)
        if strict:
            return 1.0 if passed == n else 0.0
        return passed / n
    except Exception:
        return 0.0


def make_code_verifier(limits: SandboxLimits | None = None, strict: bool = False) -> Callable[[str, str], float]:
    """A ``score(response, reference)`` with fixed limits/mode, for ``register_verifier``."""

    def score(response: str, reference: str) -> float:
        return score_code(response, reference, limits=limits, strict=strict)

    score.__qualname__ = f"code_verifier[{'strict' if strict else 'fraction'},{limits!r}]"
    return score


@register_verifier("code")
def score_code_fraction(response: str, reference: str) -> float:
    """Fraction of the reference's tests the response's last Python block passes."""
    return score_code(response, reference, strict=False)


@register_verifier("code_strict")
def score_code_strict(response: str, reference: str) -> float:
    """1.0 if the response's last Python block passes every test, else 0.0."""
    return score_code(response, reference, strict=True)


@register_reference_check("code", "code_strict")
def code_reference_problem(reference: str) -> str | None:
    """None when the reference holds at least one test in one of the two forms above, else why not (no program
    can be built from tests, so the tests themselves are what is checked)."""
    parsed = parse_reference(reference)
    if parsed is not None and parsed[1]:
        return None
    return (
        "expected JSON tests for the code verifier ([{input, output}, ...] or {fn_name, tests}), "
        f"found {reference!r:.80}"
    )


def pool_timeout_s(max_tests: int, limits: SandboxLimits | None = None) -> float:
    """A ``ScoringPool`` ``timeout_s`` under which the sandbox limits fire first for
    references of up to ``max_tests`` tests: ``max_tests * (wall_s + RUN_OVERHEAD_S)``."""
    limits = DEFAULT_LIMITS if limits is None else limits
    return max(1, int(max_tests)) * (limits.wall_s + RUN_OVERHEAD_S)


@functools.cache
def isolation_report() -> dict:
    """Run ``print(1)`` in the sandbox once and return what isolation was in effect:
    ``netns``, ``pidns``, ``mountns``, ``readonly_root``, ``private_tmp``,
    ``tmpfs_cwd``, ``proc``, ``uid`` (the dropped-to uid, None if no privilege drop),
    ``userns``, ``no_new_privs``, ``seccomp`` (always False), ``python``, ``works``."""
    r = run_program({"solution.py": "print(1)\n"}, ["solution.py"], b"", SandboxLimits(wall_s=10))
    rep = dict(r.isolation)
    rep["seccomp"] = False
    rep["python"] = sandbox_python()
    rep["works"] = r.ok and r.stdout.strip() == b"1"
    if not rep["works"]:
        rep["stderr"] = r.stderr.decode("utf-8", "replace")[-2000:]
    return rep
