"""A job's live actor groups: the rollout engines and the learner ranks, and what is done to each group as a whole.

`ActorGroups` splits a generation across the rollout engines and merges the results in prompt order (at once, or
submitted to run while the driver does something else: `submit_generate`), runs a train step or any method on every
learner rank, and syncs the learners' weights to the engines under a version number
(every result carries the version it was generated with; a mismatch is an error, never silently stale weights).
The sync goes through Ray's object store or, with `weight_sync="collective"`, over a weight group: a process group
of learner rank 0 and every engine worker (actors/weight_sync.py), built when the groups start
(`connect_weight_group`) and built again whenever a rollout engine or the learner group is restarted.

Restarts belong to the driver alone. The driver's groups carry factories (`orchestrator.cluster.start_actor_groups`
builds them): a rollout engine found dead is restarted in its placement-group bundle, given the learners' weights at
the current version, and its call retried (at most `max_rollout_restarts` per job); `restart_learners` replaces the
whole learner group. Groups made from bare handles (`ActorGroups.of`, what the extrapolator actor uses) have no
factories: a dead actor fails the call, and the driver, which sees that failure, restarts it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from orchestrator.console import console
from orchestrator.messages import RolloutResult, SamplingConfig, TrainBatch


@dataclass
class ActorGroups:
    """The live actors of one job and the weight version the rollout engines hold."""

    rollouts: list  # rollout actor handles
    learners: list  # learner rank handles, rank order
    placement_groups: list = field(default_factory=list)
    weight_version: int = 0
    bucket_mb: float = 64.0  # weight sync bucket size
    rollout_specs: list = field(default_factory=list)  # what each rollout actor was started from
    rollout_factory: Callable | None = None  # (spec, i) -> a new rollout actor i in its bundle; None: no restarts
    max_rollout_restarts: int = 0
    rollout_restarts: int = 0
    learner_factory: Callable | None = None  # (rank, master_addr, port) -> a new learner rank in its bundle
    learner_rendezvous: Callable | None = None  # () -> (rank 0's node address, a free port there)
    log: Callable[[str], None] = console
    weight_sync: str = "object_store"  # rollout.weight_sync: object_store | collective
    weight_sync_timeout_s: float = 600.0
    rollout_workers: int = 1  # vLLM workers per engine (its tensor_parallel_size): its ranks in the weight group
    weight_group_ready: bool = False  # collective: learner rank 0 and every engine worker are in one weight group

    @classmethod
    def of(cls, rollouts: list, learners: list, weight_version: int, bucket_mb: float, weight_sync: str) -> ActorGroups:
        """Groups over existing handles, without factories: a dead actor fails the call (the owner restarts it).
        With `weight_sync="collective"` the owner's weight group is used as it stands."""
        return cls(
            list(rollouts),
            list(learners),
            weight_version=weight_version,
            bucket_mb=bucket_mb,
            weight_sync=weight_sync,
            weight_group_ready=weight_sync == "collective",
        )

    # ----------------------------------------------------------------------------------------- rollout

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> RolloutResult:
        """Split prompts evenly across the rollout actors; results come back in prompt order. A dead engine is
        restarted at the current weight version and its share generated again."""
        k = len(self.rollouts)
        chunks, index = _split(prompt_ids, k)
        used = [i for i in range(k) if chunks[i]]
        by_actor = self._call_rollouts(lambda r, i: r.generate.remote(chunks[i], sampling, index[i]), used, resync=True)
        return _merge(by_actor, index, self.weight_version)

    def submit_generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> PendingRollout:
        """Start a generation on the weights the engines hold now and return at once (the driver learns meanwhile).

        `PendingRollout.result()` waits for it; a dead engine fails it (RayActorError): the caller drops the batch
        and generates it again after the next sync, which restarts the engine."""
        k = len(self.rollouts)
        chunks, index = _split(prompt_ids, k)
        refs = {i: self.rollouts[i].generate.remote(chunks[i], sampling, index[i]) for i in range(k) if chunks[i]}
        return PendingRollout(refs, index, self.weight_version)

    def _call_rollouts(self, submit: Callable, indices: Iterable[int], resync: bool) -> dict:
        """Run `submit(actor, i)` on the given rollout actors; an actor found dead is restarted (and, with
        `resync`, given the current weights) and its call retried. Returns {i: result}."""
        import ray
        from ray.exceptions import RayActorError

        refs = {i: submit(self.rollouts[i], i) for i in indices}
        out = {}
        for i, ref in refs.items():
            while i not in out:
                try:
                    out[i] = ray.get(ref)
                except RayActorError as exc:
                    self.restart_rollout(i, exc, resync)
                    ref = submit(self.rollouts[i], i)
        return out

    def _push_current_weights(self, actor) -> None:
        """A restarted engine gets the weights at the current version: through the object store to it alone, or
        over the weight group (just rebuilt) to every engine (the others reload what they hold)."""
        import ray

        if self.weight_sync == "collective":
            self._sync_collective(self.weight_version)
            return
        # every rank takes part: ZeRO-3 gathers are collectives
        refs = [learner.export_weights.remote(self.bucket_mb) for learner in self.learners]
        ray.get(actor.update_weights.remote(refs[0], self.weight_version))
        ray.get(refs[1:])

    def restart_rollout(self, i: int, exc: Exception, resync: bool = True) -> None:
        """Replace dead rollout actor `i` in its bundle; with `resync`, load the learners' weights at the
        current version into it."""
        import ray

        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if self.rollout_factory is None:
            raise RuntimeError(f"cluster: rollout actor {i} died ({reason}); its owner restarts it") from exc
        if self.rollout_restarts >= self.max_rollout_restarts:
            raise RuntimeError(
                f"cluster: rollout actor {i} died and no restart is left "
                f"(cluster.max_rollout_restarts={self.max_rollout_restarts}, used {self.rollout_restarts}): {reason}"
            ) from exc
        self.rollout_restarts += 1
        self.log(
            f"cluster: rollout actor {i} died ({type(exc).__name__}); restarting it in its placement bundle "
            f"(restart {self.rollout_restarts}/{self.max_rollout_restarts})"
        )
        start = time.perf_counter()
        try:
            ray.kill(self.rollouts[i], no_restart=True)
        except Exception:
            pass
        actor = self.rollout_factory(self.rollout_specs[i], i)
        ray.get(actor.ping.remote())
        self.rollouts[i] = actor
        if self.weight_sync == "collective":
            self.connect_weight_group()
        if resync and self.weight_version > 0:
            self._push_current_weights(actor)
        what = f"back at weight version {self.weight_version}" if resync else "back; it gets this sync's weights"
        self.log(f"cluster: rollout actor {i} is {what} ({time.perf_counter() - start:.1f} s)")

    def dead_rollouts(self) -> list[int]:
        """Indices of rollout actors that no longer answer."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        dead = []
        for i, actor in enumerate(self.rollouts):
            try:
                ray.get(actor.ping.remote(), timeout=60)
            except (RayActorError, GetTimeoutError):
                dead.append(i)
        return dead

    # ----------------------------------------------------------------------------------------- learner

    def train_step(self, shards: list[TrainBatch], fast: bool = False, updates: int = 1) -> list:
        """`updates` optimizer steps on every rank, each on its shard (fast: a lookahead fast step, LR schedule
        held; updates > 1: passes over the same batch, LearnerActor.train_step)."""
        import ray

        return ray.get([learner.train_step.remote(s, fast, updates) for learner, s in zip(self.learners, shards)])

    def sequence_logp(self, batch: TrainBatch):
        """float64[B]: every response's log-prob (summed over its tokens, at the batch's temperature) under the
        learners' current weights; the batch is split over the ranks (each runs one forward: ZeRO-3 gathers are
        collectives), needs len(batch) >= ranks."""
        import ray
        import torch

        parts = batch.split(len(self.learners))
        logp = ray.get([learner.compute_logp.remote(p) for learner, p in zip(self.learners, parts)])
        return torch.cat([(lp.double() * p.response_mask.double()).sum(-1) for lp, p in zip(logp, parts)])

    def sync_weights(self, bucket_mb: float | None = None) -> dict:
        """Learners → rollout engines at the next version. Every rank takes part (ZeRO-3 gathers are collectives);
        rank 0's buckets reach the engines through the object store or over the weight group, never through the
        driver. An engine found dead is restarted and given this sync's weights. Returns the version and the time
        split: export (gather + pack on rank 0), load (into vLLM, slowest engine), transport (the rest)."""
        if bucket_mb is not None:
            self.bucket_mb = float(bucket_mb)
        version = self.weight_version + 1
        start = time.perf_counter()
        if self.weight_sync == "collective":
            info = self._sync_collective(version)
        else:
            info = self._sync_object_store(version)
        self.weight_version = version
        total = time.perf_counter() - start
        transport = max(0.0, total - info["export_s"] - info["load_s"])
        return info | {"version": version, "total_s": total, "transport_s": transport, "mode": self.weight_sync}

    def _sync_object_store(self, version: int) -> dict:
        import ray

        start = time.perf_counter()
        refs = [learner.export_weights.remote(self.bucket_mb) for learner in self.learners]
        ray.wait([refs[0]])  # rank 0's buckets are in the object store
        export = time.perf_counter() - start
        results = self._call_rollouts(
            lambda r, i: r.update_weights.remote(refs[0], version), range(len(self.rollouts)), resync=False
        )
        ray.get(refs[1:])
        loads = list(results.values())
        return {"tensors": loads[0]["tensors"], "export_s": export, "load_s": max(r["time_s"] for r in loads)}

    def _sync_collective(self, version: int) -> dict:
        """One broadcast over the weight group. When it fails: a dead learner rank is raised as such (the job
        restarts the learner group); dead engines are restarted (which rebuilds the group) and the sync redone."""
        while True:
            try:
                if not self.weight_group_ready:
                    self.connect_weight_group()
                return self._broadcast(version)
            except Exception as exc:
                self.weight_group_ready = False
                self._raise_if_a_learner_died()
                dead = self.dead_rollouts()
                if not dead:
                    raise
                for i in dead:
                    self.restart_rollout(i, exc, resync=False)

    def _broadcast(self, version: int) -> dict:
        import ray

        learner_refs = [learner.broadcast_weights.remote(version, self.bucket_mb) for learner in self.learners]
        rollout_refs = [r.receive_weights.remote(version) for r in self.rollouts]
        refs = learner_refs + rollout_refs
        ray.wait(refs, num_returns=len(refs))  # all settle: a failing rank aborts the group, so none waits long
        sent = ray.get(learner_refs)[0]
        loads = ray.get(rollout_refs)
        return {"tensors": loads[0]["tensors"], "export_s": sent["pack_s"], "load_s": max(r["time_s"] for r in loads)}

    def connect_weight_group(self) -> None:
        """(Re)build the weight group: learner rank 0 hosts the rendezvous, every engine's workers join (each
        drops the group it had). Called when the groups start and after any restart."""
        import ray

        world = 1 + len(self.rollouts) * self.rollout_workers
        host, port = ray.get(self.learners[0].open_weight_group.remote(world, self.weight_sync_timeout_s))
        joins = [self.learners[0].join_weight_group.remote()] + [
            r.join_weight_group.remote(host, port, world, 1 + i * self.rollout_workers, self.weight_sync_timeout_s)
            for i, r in enumerate(self.rollouts)
        ]
        ray.get(joins)
        self.weight_group_ready = True

    def _raise_if_a_learner_died(self) -> None:
        """Ping every learner rank; a dead one raises its RayActorError (what the job's recovery looks for)."""
        import ray

        for learner in self.learners:
            ray.get(learner.ping.remote(), timeout=60)

    def restart_learners(self) -> None:
        """Replace every learner rank (a collective group cannot lose one member): kill them all, start new
        ones in the same bundles with a fresh rendezvous, and set them up (initial weights; the caller loads a
        checkpoint)."""
        import ray

        if self.learner_factory is None or self.learner_rendezvous is None:
            raise RuntimeError("cluster: these actor groups cannot restart their learners (no factory)")
        start = time.perf_counter()
        for actor in self.learners:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        addr, port = self.learner_rendezvous()
        self.learners = [self.learner_factory(rank, addr, port) for rank in range(len(self.learners))]
        ray.get([learner.setup.remote() for learner in self.learners])
        if self.weight_sync == "collective":
            self.connect_weight_group()
        self.log(f"cluster: learner group restarted ({len(self.learners)} ranks, {time.perf_counter() - start:.1f} s)")

    def call_learners(self, method: str, *args, **kwargs) -> list:
        """`method(*args, **kwargs)` on every rank at once (collectives need all ranks); results in rank order."""
        import ray

        return ray.get([getattr(learner, method).remote(*args, **kwargs) for learner in self.learners])

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            ray.get([learner.shutdown.remote() for learner in self.learners], timeout=60)
        except Exception:
            pass
        for actor in self.rollouts + self.learners:
            try:
                ray.kill(actor)
            except Exception:
                pass
        for pg in self.placement_groups:
            try:
                remove_placement_group(pg)
            except Exception:
                pass


@dataclass
class PendingRollout:
    """A generation in flight: Ray refs per engine, the prompt index of each engine's share, and the weight version
    the engines held when it was submitted (the version every part must report)."""

    refs: dict  # engine index -> ObjectRef[RolloutResult]
    index: list[list[int]]  # engine index -> positions of its prompts in the batch
    weight_version: int

    def result(self) -> RolloutResult:
        import ray

        return _merge({i: ray.get(ref) for i, ref in self.refs.items()}, self.index, self.weight_version)


def _split(prompt_ids: list[list[int]], k: int) -> tuple[list[list[list[int]]], list[list[int]]]:
    """Round-robin shares of the prompts for k engines, and each share's positions in the batch."""
    return [prompt_ids[i::k] for i in range(k)], [list(range(i, len(prompt_ids), k)) for i in range(k)]


def _merge(by_actor: dict, index: list[list[int]], weight_version: int) -> RolloutResult:
    """The engines' parts back in prompt order (a prompt's samples stay adjacent); every part must have been
    generated with `weight_version`."""
    merged = RolloutResult([], [], [], [], [], [], weight_version, 0.0)
    rows = []
    for i, part in by_actor.items():
        if part.weight_version != weight_version:
            raise RuntimeError(
                f"rollout actor returned weight version {part.weight_version}, expected {weight_version}"
            )
        for j in range(len(part.response_ids)):
            rows.append((index[i][part.prompt_index[j]], j, part, j))
        merged.gen_time_s = max(merged.gen_time_s, part.gen_time_s)
    rows.sort(key=lambda r: (r[0], r[1]))
    for prompt_i, _, part, j in rows:
        merged.prompt_index.append(prompt_i)
        merged.prompt_ids.append(part.prompt_ids[j])
        merged.response_ids.append(part.response_ids[j])
        merged.response_text.append(part.response_text[j])
        merged.logprobs.append(part.logprobs[j])
        merged.finished.append(part.finished[j])
    return merged
