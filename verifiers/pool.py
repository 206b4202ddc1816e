"""Process-isolated, parallel reward scoring: :class:`ScoringPool`.

Why processes: verifiers run untrusted model output through SymPy (``math``) or,
later, sandboxes; a single response can hang (``9^{9^{9^9}}``), blow the stack or
kill its interpreter. Each sample is scored in a worker process with a per-sample
deadline: a sample that runs past ``timeout_s``, or whose worker dies (segfault,
``os._exit``, OOM kill), scores 0.0, that worker is killed and replaced, and the
pool keeps going. Nothing here uses signals in the calling process, so
``score_batch`` works from any thread and inside Ray actors (math-verify's own
``signal.alarm`` timeout is disabled in :mod:`verifiers.math_verifier`).

Choices made
------------
* **Pebble** (``pebble.ProcessPool`` with ``schedule(..., timeout=...)``) does the
  kill-on-timeout and replace-dead-worker bookkeeping; we do no hand-rolled process
  management. Pebble's timeout counts from the moment a worker *starts* a task, so
  samples waiting in the queue never time out. A timed-out worker gets SIGTERM,
  then SIGKILL after pebble's 3 s grace if it is stuck in C code, so a timed-out
  sample resolves within ``timeout_s`` + ~0.2 s (Python code) to ``timeout_s`` + ~3 s
  (a long C call that holds the GIL).
* **Start method: forkserver** (fallback ``spawn`` where unavailable; ``fork`` is
  refused because the callers are threaded: Ray, torch). Workers never inherit the
  parent's heap (CUDA, model weights, Ray state). The forkserver is asked to
  preload ``verifiers`` (``set_forkserver_preload(["verifiers"])``), so math-verify
  and SymPy are imported once and each new or replacement worker forks ready in
  milliseconds instead of re-importing SymPy (~0.5-1 s). That preload setting is
  process-global and only takes effect if this process's forkserver is not running
  yet; if ``verifiers`` cannot be imported there (it is found through the current
  directory / ``PYTHONPATH`` / site-packages: Python 3.11's forkserver ignores the
  parent's ``sys.path``), the preload is skipped silently and each worker imports
  it itself: slower, still correct. Workers import only ``verifiers`` (and pebble),
  plus the ``plugin_modules`` given. Caveat of both spawn and forkserver (standard
  multiprocessing behaviour): a child re-imports the parent's ``__main__`` module
  as ``__mp_main__`` when that is a script file or a ``-m`` module (not a package
  ``__main__``), so entry scripts must keep work under ``if __name__ == "__main__"``;
  in a Ray actor that module is Ray's ``default_worker.py``, i.e. each worker
  imports ``ray`` once at start.
* **Chunking trade-off.** Verifiers registered ``cheap=True`` (``arith``) are sent
  ``chunk_size`` samples per task (at most an even share per worker), cutting IPC
  from one round trip per sample to one per chunk. The timeout then applies to the
  chunk as a whole. If a chunk times out or crashes, its samples are *re-scored
  one per task* with their own timeouts, so only the offending samples score 0.0;
  the cost is up to about twice the timeout of latency for that batch when it
  happens. Non-cheap verifiers (``math``) are always one sample per task: their
  per-sample work (ms) dwarfs the IPC (~0.1 ms), and a bad sample then costs one
  timeout only.
* **Start-up probe.** A new pool schedules one no-op task per worker; the first
  ``score_batch`` waits for them until ``startup_timeout_s`` after the pool's
  creation and raises ``RuntimeError`` (the pool stopped) when they are not all
  done: a worker that re-imports an unguarded entry script runs that script's work
  (a training job, say) instead of taking tasks, and every batch would then wait
  out its safety deadline, then retry one sample per task, for hours. The workers
  start while the caller goes on (as before the probe); the check costs nothing
  once they have.
* **Broken pool recovery.** If pebble reports the whole pool broken (e.g. a worker
  died before its task was acknowledged), the pool is rebuilt and the affected
  samples are retried once, one per task; a second failure scores 0.0. If *no*
  sample of a multi-sample batch could be scored and every retry found the pool
  broken, the workers are dying at start-up (e.g. an unguarded ``__main__``, see
  above): ``score_batch`` raises ``RuntimeError`` rather than return all-zero
  rewards. A safety deadline on every batch guarantees ``score_batch`` returns even
  if the pool wedges (outstanding samples then score 0.0 and the pool is rebuilt).
* Worker recycling: each worker is replaced after ``max_tasks_per_worker`` tasks
  (default 1000) to bound SymPy cache growth; cheap with the forkserver preload.
* Results are sanitised in the worker: non-finite or non-numeric scores become
  0.0 and scores are clipped to [0, 1]; a verifier that raises scores 0.0.
* A verifier name unknown in the parent raises ``ValueError`` before anything is
  scheduled; a name registered in the parent but missing in the workers (its module
  not passed as ``plugin_modules``) raises ``RuntimeError``: a config error is loud,
  not a silent stream of zero rewards.

Thread safety: ``score_batch`` may be called from several threads at once. A pool
rebuild triggered by one call makes concurrent calls retry their in-flight
samples on the new pool.
"""

from __future__ import annotations

import importlib
import logging
import math
import multiprocessing
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import CancelledError
from concurrent.futures import wait as _wait_futures
from concurrent.futures.process import BrokenProcessPool

import pebble
from pebble import ProcessExpired

from . import get_verifier, is_cheap

__all__ = ["ScoringPool", "score_one_isolated"]

log = logging.getLogger(__name__)

# Safety-net slack on top of the per-task timeouts when waiting for a batch.
_BATCH_SLACK_S = 60.0
# Per-task allowance beyond timeout_s: pebble's SIGTERM->SIGKILL grace (3 s) + polling.
_KILL_GRACE_S = 5.0
# How often a waiting batch checks whether another thread replaced the pool.
_POLL_S = 0.5


def _sanitize(value) -> float:
    """Coerce a verifier's return value to a float in [0, 1]; anything odd -> 0.0."""
    try:
        x = float(value)
    except Exception:
        return 0.0
    if not math.isfinite(x):
        return 0.0
    return min(1.0, max(0.0, x))


def _worker_init(plugin_modules: tuple[str, ...]) -> None:
    """Runs once in each worker: import modules that register extra verifiers.

    An import failure is logged, not raised: a raising initializer makes pebble
    respawn the worker forever or declare the pool broken; the missing verifier
    is reported instead by :func:`_score_group` as a clear error.
    """
    for name in plugin_modules:
        try:
            importlib.import_module(name)
        except Exception:
            log.exception("scoring worker could not import plugin module %r", name)


def _score_group(verifier_name: str, responses: list, references: list) -> list[float]:
    """Worker task: score a group of samples with one verifier, in order.

    Per-sample exceptions score 0.0. Only an unknown verifier name raises (a
    configuration error, surfaced to the caller).
    """
    fn = get_verifier(verifier_name)
    out = []
    for response, reference in zip(responses, references):
        try:
            out.append(_sanitize(fn(response, reference)))
        except Exception:
            out.append(0.0)
    return out


def _ready() -> bool:
    """The start-up probe's task: a worker that runs it has started and imported what it needs."""
    return True


def _make_context(start_method: str | None):
    methods = multiprocessing.get_all_start_methods()
    if start_method is None:
        start_method = "forkserver" if "forkserver" in methods else "spawn"
    if start_method not in ("forkserver", "spawn"):
        raise ValueError(
            f"start_method must be 'forkserver' or 'spawn', got {start_method!r} "
            "(fork would copy the parent's threads and heap into the workers)"
        )
    ctx = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        # Process-global; effective only if the forkserver is not running yet.
        ctx.set_forkserver_preload(["verifiers"])
    return ctx


class ScoringPool:
    """Score ``(verifier, response, reference)`` samples in parallel worker processes.

    Args:
        max_workers: number of worker processes.
        timeout_s: per-sample (per-task) deadline in seconds, counted from when a
            worker starts the sample; a sample past it scores 0.0.
        plugin_modules: extra module names that register verifiers; imported here
            (so their names validate) and in every worker.
        start_method: ``"forkserver"`` (default where available) or ``"spawn"``.
        chunk_size: max samples per task for ``cheap`` verifiers.
        max_tasks_per_worker: recycle a worker after this many tasks (0: never).
        startup_timeout_s: the workers must all have run a no-op task this long
            after the pool's creation, else the first ``score_batch`` raises
            ``RuntimeError``.

    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        max_workers: int,
        timeout_s: float,
        *,
        plugin_modules: Iterable[str] = (),
        start_method: str | None = None,
        chunk_size: int = 64,
        max_tasks_per_worker: int = 1000,
        startup_timeout_s: float = 120.0,
    ):
        if int(max_workers) < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
        if not (float(timeout_s) > 0 and math.isfinite(float(timeout_s))):
            raise ValueError(f"timeout_s must be a positive finite number, got {timeout_s!r}")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
        if not (float(startup_timeout_s) > 0 and math.isfinite(float(startup_timeout_s))):
            raise ValueError(f"startup_timeout_s must be a positive finite number, got {startup_timeout_s!r}")
        if int(max_tasks_per_worker) < 0:
            raise ValueError(f"max_tasks_per_worker must be >= 0, got {max_tasks_per_worker!r}")
        self.max_workers = int(max_workers)
        self.timeout_s = float(timeout_s)
        self.chunk_size = int(chunk_size)
        self.max_tasks_per_worker = int(max_tasks_per_worker)
        self.plugin_modules = tuple(plugin_modules)
        for name in self.plugin_modules:  # register their verifiers here too
            importlib.import_module(name)
        self._ctx = _make_context(start_method)
        self.start_method = self._ctx.get_start_method()
        self._lock = threading.Lock()
        self._closed = False
        #: how many times the underlying pebble pool was rebuilt (diagnostics).
        self.rebuilds = 0
        self._pool = self._new_pool()
        self._startup_timeout_s = float(startup_timeout_s)
        self._started_by = time.monotonic() + self._startup_timeout_s
        self._starting = [self._pool.schedule(_ready) for _ in range(self.max_workers)]  # the start-up probe

    # -- pool lifecycle -------------------------------------------------------

    def _new_pool(self) -> pebble.ProcessPool:
        return pebble.ProcessPool(
            max_workers=self.max_workers,
            max_tasks=self.max_tasks_per_worker,
            initializer=_worker_init,
            initargs=(self.plugin_modules,),
            context=self._ctx,
        )

    def _check_started(self) -> None:
        """The start-up probe's tasks done by ``startup_timeout_s`` after creation; else stop the pool and raise."""
        futures = self._starting
        if not futures:
            return
        _, pending = _wait_futures(futures, timeout=max(0.0, self._started_by - time.monotonic()))
        failed = [f for f in futures if f not in pending and f.exception() is not None]
        if pending or failed:
            self.close()
            why = f"{len(pending)} of {len(futures)} not done" if pending else f"{failed[0].exception()!r}"
            raise RuntimeError(
                f"scoring workers did not start within {self._startup_timeout_s:g} s ({why}); check that the entry "
                "script keeps its work under `if __name__ == '__main__':` (workers re-import __main__ and run what "
                "it does at import) and that the workers can import 'verifiers' and the plugin modules"
            )
        self._starting = []

    @staticmethod
    def _shutdown(pool: pebble.ProcessPool) -> None:
        try:
            pool.stop()
            pool.join(timeout=10)
        except Exception:  # already broken / stopped: nothing more to do
            log.debug("error stopping pebble pool", exc_info=True)

    def _replace_pool(self, old: pebble.ProcessPool) -> pebble.ProcessPool:
        """Swap in a fresh pebble pool if ``old`` is still current; return the current one."""
        with self._lock:
            if self._closed:
                raise RuntimeError("ScoringPool is closed")
            if self._pool is old:
                log.warning("scoring pool broken or wedged; rebuilding it")
                self._pool = self._new_pool()
                self.rebuilds += 1
                stale = old
            else:
                stale = None
            current = self._pool
        if stale is not None:
            self._shutdown(stale)
        return current

    def close(self) -> None:
        """Stop the worker processes. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool = self._pool
        self._shutdown(pool)

    def __enter__(self) -> ScoringPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- scoring --------------------------------------------------------------

    def score_batch(self, verifier_name: str, responses: Sequence[str], references: Sequence[str]) -> list[float]:
        """Scores of ``responses`` against ``references`` with one verifier, in order.

        A sample that times out, crashes its worker or makes the verifier raise
        scores 0.0. Raises ``ValueError`` for an unknown verifier or mismatched
        lengths, ``RuntimeError`` if the pool is closed or the workers lack the
        verifier.
        """
        if self._closed:
            raise RuntimeError("ScoringPool is closed")
        get_verifier(verifier_name)  # unknown name: ValueError, before any work
        self._check_started()
        responses = list(responses)
        references = list(references)
        if len(responses) != len(references):
            raise ValueError(f"got {len(responses)} responses but {len(references)} references")
        n = len(responses)
        scores = [0.0] * n
        if n == 0:
            return scores
        size = 1
        if is_cheap(verifier_name):
            size = max(1, min(self.chunk_size, math.ceil(n / self.max_workers)))
        groups = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
        retry, ok, _ = self._run(verifier_name, groups, responses, references, scores, True)
        if retry:
            singles = [[i] for g in retry for i in g]
            _, ok2, broken2 = self._run(verifier_name, singles, responses, references, scores, False)
            if ok + ok2 == 0 and len(singles) > 1 and broken2 == len(singles):
                # Not one sample could be scored and every retry found the pool
                # broken: workers die at start-up, not because of a sample.
                raise RuntimeError(
                    "scoring workers keep dying before they can score anything; "
                    "check that the entry script keeps its work under "
                    "`if __name__ == '__main__':` (workers re-import __main__) and "
                    "that the workers can import 'verifiers' and the plugin modules"
                )
        return scores

    def score(self, verifier_name: str, response: str, reference: str) -> float:
        """Score one sample (see :meth:`score_batch`)."""
        return self.score_batch(verifier_name, [response], [reference])[0]

    def _schedule(self, pool, verifier_name, group, responses, references):
        return pool.schedule(
            _score_group,
            args=(
                verifier_name,
                [responses[i] for i in group],
                [references[i] for i in group],
            ),
            timeout=self.timeout_s,
        )

    def _run(
        self,
        verifier_name: str,
        groups: list[list[int]],
        responses: list,
        references: list,
        scores: list[float],
        allow_retry: bool,
    ) -> tuple[list[list[int]], int, int]:
        """Score ``groups`` (one task each) into ``scores``.

        Returns ``(groups to retry, groups scored, groups lost to a broken pool)``.
        With ``allow_retry`` False every failure is final (0.0).
        """
        pool = self._pool
        futures = []
        for group in groups:
            try:
                fut = self._schedule(pool, verifier_name, group, responses, references)
            except RuntimeError:  # pebble pool in error state: rebuild once
                pool = self._replace_pool(pool)
                fut = self._schedule(pool, verifier_name, group, responses, references)
            futures.append(fut)

        rounds = math.ceil(len(groups) / self.max_workers)
        deadline = time.monotonic() + rounds * (self.timeout_s + _KILL_GRACE_S) + _BATCH_SLACK_S
        pending = set(futures)
        abandoned = False
        while pending:
            left = deadline - time.monotonic()
            if left <= 0 or self._pool is not pool or self._closed:
                abandoned = True
                break
            _, pending = _wait_futures(pending, timeout=min(_POLL_S, left))

        retry: list[list[int]] = []
        rebuild = False
        n_ok = n_broken = 0
        for group, fut in zip(groups, futures):
            if not fut.done():
                fut.cancel()
                rebuild = rebuild or self._pool is pool  # wedged, not replaced elsewhere
                if allow_retry:
                    retry.append(group)
                continue
            try:
                exc = fut.exception()
            except CancelledError as e:
                exc = e
            if exc is None:
                values = fut.result()
                if len(values) != len(group):  # cannot happen; be safe
                    values = [0.0] * len(group)
                for i, v in zip(group, values):
                    scores[i] = _sanitize(v)
                n_ok += 1
            elif isinstance(exc, (TimeoutError, ProcessExpired)):
                # Attributable to this task: only a multi-sample chunk is retried.
                if allow_retry and len(group) > 1:
                    retry.append(group)
            elif isinstance(exc, (BrokenProcessPool, CancelledError)):
                # Pool-level failure, not attributable to this sample.
                rebuild = True
                n_broken += 1
                if allow_retry:
                    retry.append(group)
            else:
                raise RuntimeError(
                    f"scoring task for verifier {verifier_name!r} failed in the worker "
                    f"(is its module passed as plugin_modules?): {exc}"
                ) from exc
        if abandoned and self._pool is pool:
            rebuild = True
        if rebuild and not self._closed:
            self._replace_pool(pool)
        return retry, n_ok, n_broken


def score_one_isolated(verifier_name: str, response: str, reference: str, timeout_s: float, **pool_kwargs) -> float:
    """Score one sample in a throw-away one-worker :class:`ScoringPool`.

    Convenient for scripts and debugging; pays a worker start per call, so use a
    long-lived :class:`ScoringPool` for training.
    """
    with ScoringPool(1, timeout_s, **pool_kwargs) as pool:
        return pool.score(verifier_name, response, reference)
