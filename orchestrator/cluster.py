"""Ray side of the job: connect or start Ray, place the actor groups, move weights between them, and restart
rollout actors that die.

Placement (all from `cluster.*`, documented in conf/cluster/*.yaml):
- By default one placement group holds a bundle per rollout actor and per learner rank, spread or packed by
  `cluster.placement_strategy`, so the two groups are reserved together (no half-started job holding resources).
- `cluster.rollout_strategy` / `cluster.learner_strategy`, when either is set, give each group its own placement
  group with its own strategy (e.g. learner ranks STRICT_SPREAD one per node, rollout engines PACK). Both groups
  are still reserved before any actor starts, and both are released if either cannot be reserved.
- `cluster.rollout_resources` / `cluster.learner_resources` add custom Ray resources to every bundle of a group
  (e.g. `{rollout_node: 1}`), which pins the group to the nodes started with that resource
  (`ray start --resources='{"rollout_node": 4}'`, or a KubeRay worker group's `rayStartParams.resources`).
The plan (which bundles, which strategy, which actor in which bundle) is a pure function, `plan_placement`.

Rollout restarts: a rollout call (generate, weight update) that finds its actor dead (RayActorError) recreates
the actor in the same placement-group bundle from the same `RolloutSpec`, pushes it the learners' current weights
under the current weight version (the learners always hold the weights of that version while the driver calls
the rollout engines), and retries the call once. At most `cluster.max_rollout_restarts` restarts per job; each is
logged and counted in `ActorGroups.rollout_restarts`. Rollout actors are named per job and slot, so a copy of
the `ActorGroups` (one sent to another actor) that finds its handle dead adopts the replacement another copy
already started instead of starting a second one in the same bundle. Learner deaths are not handled here.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from omegaconf import DictConfig

from actors.learner import LearnerActor, LearnerSpec
from actors.rollout import RolloutActor, RolloutSpec
from orchestrator.console import console
from orchestrator.messages import RolloutResult, SamplingConfig, TrainBatch

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def free_port() -> int:
    """A TCP port free on this node now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------- config


def validate_cluster(cfg: DictConfig) -> None:
    """Raise ConfigError (one line naming the field) on a bad `cluster.*` value. Fields a hand-built config
    leaves out take their defaults."""
    from orchestrator.config import ConfigError, _choice, _float, _int

    c = cfg.cluster
    mode = _choice(cfg, "cluster.mode", ["local", "existing"])
    _choice(cfg, "cluster.placement_strategy", list(STRATEGIES))
    for group in ("rollout", "learner"):
        if c.get(f"{group}_strategy") is not None:
            _choice(cfg, f"cluster.{group}_strategy", list(STRATEGIES))
        _resources(c.get(f"{group}_resources"), f"cluster.{group}_resources")
    if "max_rollout_restarts" in c:
        _int(cfg, "cluster.max_rollout_restarts", lo=0)
    if "placement_timeout_s" in c:
        _float(cfg, "cluster.placement_timeout_s", lo=0, lo_open=True)
    if mode == "local" and c.get("num_cpus") is not None:
        _int(cfg, "cluster.num_cpus", lo=1)
    if mode == "existing":
        address = c.get("address")
        if not isinstance(address, str) or not address.strip():
            raise ConfigError(f"cluster.address: expected 'auto', host:port or ray://host:port, got {address!r}")
        if address.startswith(("http://", "https://")):
            raise ConfigError(
                f"cluster.address: expected the cluster's GCS address (host:6379, 'auto' or ray://host:10001), got the "
                f"dashboard URL {address!r}; to use it, submit the job: "
                f"ray job submit --address {address} -- python -m orchestrator.train ..."
            )


def _resources(value, path: str) -> dict[str, float]:
    """A group's extra per-bundle resources as {name: amount}; None means none."""
    from omegaconf import OmegaConf

    from orchestrator.config import ConfigError

    if value is None:
        return {}
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping of custom resource name to amount, got {value!r}")
    for name, amount in value.items():
        if name in _BUILTIN_RESOURCES:
            raise ConfigError(
                f"{path}: {name!r} is set by rollout/learner num_cpus and num_gpus; expected custom resources only"
            )
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise ConfigError(f"{path}: expected a number >= 0 for {name!r}, got {amount!r}")
    return {str(k): float(v) for k, v in value.items()}


# ------------------------------------------------------------------------------------------------- Ray


def init_ray(cfg: DictConfig) -> bool:
    """Start or connect to Ray. Returns True when this call started it (and so should shut it down).

    `cluster=existing` connects to `cluster.address` (default: `RAY_ADDRESS`, else `auto`, which finds a cluster
    started on this machine with `ray start`; `ray job submit` sets `RAY_ADDRESS` for the job)."""
    import ray

    validate_cluster(cfg)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return False
    if cfg.cluster.mode == "existing":
        ray.init(address=str(cfg.cluster.address), log_to_driver=bool(cfg.cluster.log_to_driver))
    else:
        ray.init(
            address="local",  # always a new in-process Ray, even when another runs on this machine
            num_cpus=cfg.cluster.num_cpus,
            include_dashboard=False,
            log_to_driver=bool(cfg.cluster.log_to_driver),
            configure_logging=False,
        )
    return True


def _base_env(on_gpu: bool) -> dict:
    env = {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    if not on_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("TORCH_EXTENSIONS_DIR", "HF_HOME", "HF_HUB_OFFLINE", "PYTHONPATH"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def rollout_actor_env(omp_threads: int = 1, on_gpu: bool = False) -> dict:
    """Environment of a rollout actor: in-process vLLM engine, no torch.compile, few OMP threads."""
    return _base_env(on_gpu) | {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TORCH_COMPILE_DISABLE": "1",
        "OMP_NUM_THREADS": str(omp_threads),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }


def learner_actor_env(num_threads: int = 0, on_gpu: bool = False) -> dict:
    env = _base_env(on_gpu)
    if num_threads:
        env["OMP_NUM_THREADS"] = str(num_threads)
    return env


# ------------------------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class GroupPlacement:
    """One placement group to reserve: its bundles ({resource: amount} each) and strategy."""

    name: str
    bundles: tuple[dict, ...]
    strategy: str


@dataclass(frozen=True)
class PlacementPlan:
    """Placement groups to reserve, and the (placement group index, bundle index) of every actor."""

    groups: tuple[GroupPlacement, ...]
    rollout_slots: tuple[tuple[int, int], ...]
    learner_slots: tuple[tuple[int, int], ...]


def _bundle(num_cpus: float, num_gpus: float, custom: dict[str, float]) -> dict:
    b = {"CPU": float(num_cpus), **({"GPU": float(num_gpus)} if num_gpus else {}), **custom}
    b = {k: v for k, v in b.items() if v > 0}
    return b or {"CPU": 0.01}  # Ray refuses empty bundles


def _bundles(cfg: DictConfig, group: str, count: int) -> tuple[dict, ...]:
    """`count` bundles for the `group` ("rollout" or "learner") actors: their CPUs, GPUs and custom resources."""
    if not count:  # no actors: the config may even lack the group (an evaluation has no learner section)
        return ()
    g = cfg[group]
    bundle = _bundle(
        g.num_cpus, g.num_gpus, _resources(cfg.cluster.get(f"{group}_resources"), f"cluster.{group}_resources")
    )
    return tuple(dict(bundle) for _ in range(count))


def plan_placement(cfg: DictConfig, num_rollouts: int, world_size: int) -> PlacementPlan:
    """Bundles and strategies for `num_rollouts` rollout actors and `world_size` learner ranks (pure). With no
    learner ranks (rollout engines alone, e.g. evaluation) there is no learner placement group."""
    c = cfg.cluster
    rollout_bundles, learner_bundles = _bundles(cfg, "rollout", num_rollouts), _bundles(cfg, "learner", world_size)
    r_strategy, l_strategy = c.get("rollout_strategy"), c.get("learner_strategy")
    if r_strategy is None and l_strategy is None:
        return PlacementPlan(
            groups=(GroupPlacement("job", rollout_bundles + learner_bundles, str(c.placement_strategy)),),
            rollout_slots=tuple((0, i) for i in range(num_rollouts)),
            learner_slots=tuple((0, num_rollouts + r) for r in range(world_size)),
        )
    groups = (GroupPlacement("rollout", rollout_bundles, str(r_strategy or c.placement_strategy)),)
    if learner_bundles:  # Ray refuses an empty placement group
        groups += (GroupPlacement("learner", learner_bundles, str(l_strategy or c.placement_strategy)),)
    return PlacementPlan(
        groups=groups,
        rollout_slots=tuple((0, i) for i in range(num_rollouts)),
        learner_slots=tuple((1, r) for r in range(world_size)),
    )


def reserve(plan: PlacementPlan, timeout_s: float) -> list:
    """Create every placement group of the plan and wait for all; on failure remove them all and raise."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pgs = [placement_group(list(g.bundles), strategy=g.strategy) for g in plan.groups]
    ready, _ = ray.wait([pg.ready() for pg in pgs], num_returns=len(pgs), timeout=timeout_s)
    if len(ready) < len(pgs):
        for pg in pgs:
            remove_placement_group(pg)
        wanted = "; ".join(f"{g.name}: {len(g.bundles)} x {g.bundles[0]} {g.strategy}" for g in plan.groups)
        raise RuntimeError(
            f"cluster: could not reserve the placement groups ({wanted}) within {timeout_s:.0f} s "
            f"(cluster.placement_timeout_s); available: {ray.available_resources()}"
        )
    return pgs


def _slot_strategy(pgs: list, slot: tuple[int, int]):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=pgs[slot[0]], placement_group_bundle_index=slot[1])


def _placed(actor_cls, pgs: list, slot: tuple[int, int], resources_cfg, env: dict, **options):
    """`actor_cls` options for an actor in bundle `slot` of the reserved placement groups `pgs`."""
    return actor_cls.options(
        num_cpus=resources_cfg.num_cpus,
        num_gpus=resources_cfg.num_gpus,
        scheduling_strategy=_slot_strategy(pgs, slot),
        runtime_env={"env_vars": env},
        **options,
    )


def _rollout_starter(cfg: DictConfig, pgs: list, plan: PlacementPlan, names: list[str] | None = None) -> Callable:
    """`start(spec, i)`: rollout actor `i` (named `names[i]` when given) in its bundle of the plan."""
    import ray

    rc = cfg.rollout
    env = rollout_actor_env(rc.omp_threads, bool(rc.num_gpus))
    remote = ray.remote(RolloutActor)

    def start(spec: RolloutSpec, i: int):
        options = {"name": names[i]} if names else {}
        return _placed(remote, pgs, plan.rollout_slots[i], rc, env, **options).remote(spec)

    return start


# ---------------------------------------------------------------------------------------------- groups


@dataclass
class ActorGroups:
    """The live actors of one job and the weight version the rollout engines hold.

    `rollout_factory(spec, i)` starts rollout actor `i` (named `rollout_names[i]`) in its own placement-group
    bundle: used at start and to replace an actor that died (at most `max_rollout_restarts` times). Everything here
    pickles, so the groups can be handed to another actor (e.g. the extrapolator)."""

    rollouts: list
    learners: list
    placement_groups: list
    weight_version: int = 0
    rollout_specs: list = field(default_factory=list)
    rollout_names: list = field(default_factory=list)
    rollout_factory: Callable | None = None
    max_rollout_restarts: int = 0
    bucket_mb: float = 64.0
    rollout_restarts: int = 0
    log: Callable[[str], None] = console
    learner_factory: Callable | None = None  # (rank, master_addr, port) -> a new learner actor in rank's bundle
    learner_rendezvous: Callable | None = None  # () -> (rank 0's node address, a free port there)

    # ----------------------------------------------------------------------------------------- rollout

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> RolloutResult:
        """Split prompts evenly across the rollout actors; results come back in prompt order."""
        k = len(self.rollouts)
        chunks = [prompt_ids[i::k] for i in range(k)]
        index = [list(range(i, len(prompt_ids), k)) for i in range(k)]
        used = [i for i in range(k) if chunks[i]]
        by_actor = self._call_rollouts(lambda r, i: r.generate.remote(chunks[i], sampling), used, resync=True)
        merged = RolloutResult([], [], [], [], [], [], self.weight_version, 0.0)
        rows = []
        for i in used:
            part, idx = by_actor[i], index[i]
            if part.weight_version != self.weight_version:
                raise RuntimeError(
                    f"rollout actor returned weight version {part.weight_version}, expected {self.weight_version}"
                )
            for j in range(len(part.response_ids)):
                rows.append((idx[part.prompt_index[j]], j, part, j))
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
                    if not self._adopt_replacement(i, resync):
                        self._restart_rollout(i, exc, resync)
                    ref = submit(self.rollouts[i], i)
        return out

    def _adopt_replacement(self, i: int, resync: bool) -> bool:
        """If another copy of these groups already replaced dead actor `i`, take its replacement (brought to the
        current weight version with `resync`). Returns False when there is none."""
        import ray

        if not self.rollout_names:
            return False
        try:
            live = ray.get_actor(self.rollout_names[i])
        except ValueError:  # no live actor holds the name
            return False
        if live._actor_id == self.rollouts[i]._actor_id:
            return False
        self.rollouts[i] = live
        if resync and ray.get(live.get_weight_version.remote()) != self.weight_version:
            self._push_current_weights(live)
        self.log(f"cluster: rollout actor {i} was already restarted elsewhere; using it")
        return True

    def _push_current_weights(self, actor) -> None:
        import ray

        refs = [
            learner.export_weights.remote(self.bucket_mb) for learner in self.learners
        ]  # every rank: ZeRO-3 gathers
        ray.get(actor.update_weights.remote(refs[0], self.weight_version))
        ray.get(refs[1:])

    def _restart_rollout(self, i: int, exc: Exception, resync: bool) -> None:
        """Replace dead rollout actor `i` in its bundle; with `resync`, load the learners' weights at the
        current version into it."""
        import ray

        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if self.rollout_factory is None or self.rollout_restarts >= self.max_rollout_restarts:
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
        if resync and self.weight_version > 0:
            self._push_current_weights(actor)
        self.rollouts[i] = actor
        what = f"back at weight version {self.weight_version}" if resync else "back; it gets this sync's weights"
        self.log(f"cluster: rollout actor {i} is {what} ({time.perf_counter() - start:.1f} s)")

    # ----------------------------------------------------------------------------------------- learner

    def train_step(self, shards: list[TrainBatch]) -> list:
        import ray

        return ray.get([learner.train_step.remote(s) for learner, s in zip(self.learners, shards)])

    def sync_weights(self, bucket_mb: float | None = None) -> dict:
        """Learners → rollout engines. Rank 0's buckets go straight from the object store to every engine;
        the driver never holds the weights. Every rank takes part (ZeRO-3 gathers are collectives). An engine
        found dead is restarted and loaded with these same buckets."""
        import ray

        if bucket_mb is not None:
            self.bucket_mb = float(bucket_mb)
        refs = [learner.export_weights.remote(self.bucket_mb) for learner in self.learners]
        version = self.weight_version + 1
        results = self._call_rollouts(
            lambda r, i: r.update_weights.remote(refs[0], version), range(len(self.rollouts)), resync=False
        )
        ray.get(refs[1:])
        self.weight_version = version
        loads = list(results.values())
        return {"version": version, "tensors": loads[0]["tensors"], "load_s": max(r["time_s"] for r in loads)}

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
        self.log(f"cluster: learner group restarted ({len(self.learners)} ranks, {time.perf_counter() - start:.1f} s)")

    def call_learners(self, method: str, *args, **kwargs) -> list:
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


def start_actor_groups(
    cfg: DictConfig, learner: LearnerSpec, rollout_specs: list[RolloutSpec], log: Callable[[str], None] = console
) -> ActorGroups:
    """Reserve the placement groups of `plan_placement` and start the rollout actors and learner ranks."""
    import ray

    rc, lc, c = cfg.rollout, cfg.learner, cfg.cluster
    plan = plan_placement(cfg, len(rollout_specs), learner.world_size)
    pgs = reserve(plan, float(c.get("placement_timeout_s", 300)))

    names = [f"rlextra-rollout-{uuid.uuid4().hex[:12]}-{i}" for i in range(len(rollout_specs))]
    start_rollout = _rollout_starter(cfg, pgs, plan, names)
    rollouts = [start_rollout(spec, i) for i, spec in enumerate(rollout_specs)]

    learner_env = learner_actor_env(lc.num_threads, bool(lc.num_gpus))
    LearnerRemote = ray.remote(LearnerActor)

    def rendezvous():
        """Rank 0's node address and a free port there (asked of a task placed in rank 0's bundle)."""
        return ray.get(
            ray.remote(num_cpus=0)(lambda: (ray.util.get_node_ip_address(), free_port()))
            .options(scheduling_strategy=_slot_strategy(pgs, plan.learner_slots[0]))
            .remote()
        )

    def start_learner(rank: int, master_addr: str, port: int):
        return _placed(LearnerRemote, pgs, plan.learner_slots[rank], lc, learner_env).remote(
            learner, rank, master_addr, port
        )

    master_addr, port = rendezvous()
    learners = [start_learner(rank, master_addr, port) for rank in range(learner.world_size)]
    groups = ActorGroups(
        rollouts=rollouts,
        learners=learners,
        placement_groups=pgs,
        rollout_specs=list(rollout_specs),
        rollout_names=names,
        rollout_factory=start_rollout,
        max_rollout_restarts=int(c.get("max_rollout_restarts", 0)),
        bucket_mb=float(rc.get("bucket_mb", 64.0)),
        log=log,
        learner_factory=start_learner,
        learner_rendezvous=rendezvous,
    )
    try:
        ray.get([learner.setup.remote() for learner in learners] + [r.ping.remote() for r in rollouts])
    except Exception:
        groups.shutdown()
        raise
    return groups


def start_rollout_group(cfg: DictConfig, rollout_specs: list[RolloutSpec]) -> ActorGroups:
    """Rollout actors without learners (e.g. evaluation engines), reserved and placed as the job places its own:
    `plan_placement` with no learner ranks, `reserve`, one bundle each. No restarts: without learners there are
    no weights to load into a replacement."""
    import ray

    plan = plan_placement(cfg, len(rollout_specs), 0)
    pgs = reserve(plan, float(cfg.cluster.get("placement_timeout_s", 300)))
    start_rollout = _rollout_starter(cfg, pgs, plan)
    groups = ActorGroups(
        rollouts=[start_rollout(spec, i) for i, spec in enumerate(rollout_specs)], learners=[], placement_groups=pgs
    )
    try:
        ray.get([r.ping.remote() for r in groups.rollouts])
    except Exception:
        groups.shutdown()
        raise
    return groups
