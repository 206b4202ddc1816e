"""Ray side of the job: connect to or start Ray, reserve placement groups and start the actor groups in them.

Placement (all from `cluster.*`, documented in orchestrator/config.py ClusterConfig):
- By default one placement group holds a bundle per rollout actor and per learner rank, spread or packed by
  `cluster.placement_strategy`, so the two groups are reserved together (no half-started job holding resources).
- `cluster.rollout_strategy` / `cluster.learner_strategy`, when either is set, give each group its own placement
  group with its own strategy (e.g. learner ranks STRICT_SPREAD one per node, rollout engines PACK). Both groups
  are still reserved before any actor starts, and both are released if either cannot be reserved.
- `cluster.rollout_resources` / `cluster.learner_resources` add custom Ray resources to every bundle of a group
  (e.g. `{rollout_node: 1}`), which pins the group to the nodes started with that resource
  (`ray start --resources='{"rollout_node": 4}'`, or a KubeRay worker group's `rayStartParams.resources`).
The plan (which bundles, which strategy, which actor in which bundle) is a pure function, `plan_placement`.

The groups come back as `actors.groups.ActorGroups` carrying the factories that restart an actor in its own bundle
(a dead rollout engine is restarted there and re-synced; a dead learner rank restarts the learner group), with the
collective weight group already built when `rollout.weight_sync=collective`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from actors.groups import ActorGroups
from actors.learner import LearnerActor, LearnerSpec
from actors.rollout import RolloutActor, RolloutSpec
from orchestrator.config import ClusterConfig, JobConfig, LearnerConfig, RolloutConfig, check_resources
from orchestrator.console import console


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------- Ray


def init_ray(cluster: ClusterConfig) -> bool:
    """Start or connect to Ray. Returns True when this call started it (and so should shut it down).

    `cluster=existing` connects to `cluster.address` (default: `RAY_ADDRESS`, else `auto`, which finds a cluster
    started on this machine with `ray start`; `ray job submit` sets `RAY_ADDRESS` for the job)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return False
    if cluster.mode == "existing":
        ray.init(address=cluster.address, log_to_driver=cluster.log_to_driver)
    else:
        ray.init(
            address="local",  # always a new in-process Ray, even when another runs on this machine
            num_cpus=cluster.num_cpus,
            include_dashboard=False,
            log_to_driver=cluster.log_to_driver,
            configure_logging=False,
        )
    return True


def _base_env(on_gpu: bool) -> dict:
    """What every actor gets. OpenMP threads sleep as soon as they wait (OMP_WAIT_POLICY=PASSIVE; the driver's own
    setting wins): libgomp's default spins ~300k iterations at every barrier and after every parallel region, and
    on a node whose cores other processes also use (the engine and the learner ranks, Ray, scoring workers) a team
    member that is descheduled leaves the others spinning on cores it needs. Measured here (15M-parameter model,
    forward + backward, 2 threads, machine load 30-45): 58-76 s spinning vs 8.7-11.5 s passive (1 thread 8.6-10.9)."""
    env = {
        "RAY_AUTH_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }
    if not on_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("TORCH_EXTENSIONS_DIR", "HF_HOME", "HF_HUB_OFFLINE", "PYTHONPATH"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def rollout_actor_env(omp_threads: int, on_gpu: bool = False) -> dict:
    """Environment of a rollout actor: in-process vLLM engine, no torch.compile, `omp_threads` OpenMP threads."""
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


def plan_placement(
    cluster: ClusterConfig,
    rollout: RolloutConfig,
    learner: LearnerConfig | None,
    num_rollouts: int,
    world_size: int,
) -> PlacementPlan:
    """Bundles and strategies for `num_rollouts` rollout actors and `world_size` learner ranks (pure).

    One shared placement group unless `cluster.rollout_strategy` or `cluster.learner_strategy` is set; then each
    group that has actors gets its own (with its strategy, else `cluster.placement_strategy`)."""
    rollout_b = _bundle(
        rollout.num_cpus, rollout.num_gpus, check_resources(cluster.rollout_resources, "cluster.rollout_resources")
    )
    learner_b = (
        _bundle(
            learner.num_cpus, learner.num_gpus, check_resources(cluster.learner_resources, "cluster.learner_resources")
        )
        if world_size
        else {}
    )
    rollout_bundles = tuple(dict(rollout_b) for _ in range(num_rollouts))
    learner_bundles = tuple(dict(learner_b) for _ in range(world_size))
    if cluster.rollout_strategy is None and cluster.learner_strategy is None:
        return PlacementPlan(
            groups=(GroupPlacement("job", rollout_bundles + learner_bundles, cluster.placement_strategy),),
            rollout_slots=tuple((0, i) for i in range(num_rollouts)),
            learner_slots=tuple((0, num_rollouts + r) for r in range(world_size)),
        )
    groups, rollout_slots, learner_slots = [], (), ()
    if num_rollouts:
        strategy = cluster.rollout_strategy or cluster.placement_strategy
        rollout_slots = tuple((len(groups), i) for i in range(num_rollouts))
        groups.append(GroupPlacement("rollout", rollout_bundles, strategy))
    if world_size:
        strategy = cluster.learner_strategy or cluster.placement_strategy
        learner_slots = tuple((len(groups), r) for r in range(world_size))
        groups.append(GroupPlacement("learner", learner_bundles, strategy))
    return PlacementPlan(tuple(groups), rollout_slots, learner_slots)


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


# ---------------------------------------------------------------------------------------------- groups


def kv_cache_warning(rc: RolloutConfig, held: float, batch: int) -> str | None:
    """A line when an engine's KV cache holds fewer sequences of max_model_len tokens (`held`, the least of the
    engines') than it is handed at once: the largest `batch` one engine gets, up to max_num_seqs per engine step.
    vLLM then admits only what fits and runs the batch in waves (15M model: 11.5-16.5 s a rollout against 4.7 s).
    None when the batch fits."""
    wanted = min(rc.max_num_seqs, batch)
    if held >= wanted:
        return None
    if rc.kv_cache_mb:
        sized_by = f"rollout.kv_cache_mb={rc.kv_cache_mb}"
    elif rc.num_gpus:
        sized_by = f"rollout.gpu_memory_utilization={rc.gpu_memory_utilization}"
    else:
        sized_by = "its default size"
    return (
        f"warning: the rollout engines' KV cache ({sized_by}) holds {int(held)} sequences of rollout.max_model_len="
        f"{rc.max_model_len} tokens, and an engine is handed {wanted} at once: it generates them in waves, several "
        "times slower (rollout.kv_cache_mb=null sizes the cache to fit on CPU)"
    )


def start_actor_groups(
    cfg: JobConfig,
    learner: LearnerSpec | None,
    rollout_specs: list[RolloutSpec],
    log: Callable[[str], None] = console,
) -> ActorGroups:
    """Reserve the placement groups of `plan_placement` and start the rollout actors and learner ranks (no learner
    group when `learner` is None: the evaluation's engines). Any start failure releases everything."""
    import ray

    rc, c = cfg.rollout, cfg.cluster
    lc = learner.learner if learner is not None else None
    world_size = lc.world_size if lc is not None else 0
    plan = plan_placement(c, rc, lc, len(rollout_specs), world_size)
    pgs = reserve(plan, c.placement_timeout_s)

    def placed(actor_cls, slot, resources, env):
        return actor_cls.options(
            num_cpus=resources.num_cpus,
            num_gpus=resources.num_gpus,
            scheduling_strategy=_slot_strategy(pgs, slot),
            runtime_env={"env_vars": env},
        )

    rollout_env = rollout_actor_env(rc.omp_threads, bool(rc.num_gpus))
    RolloutRemote = ray.remote(RolloutActor)

    def start_rollout(spec: RolloutSpec, i: int):
        return placed(RolloutRemote, plan.rollout_slots[i], rc, rollout_env).remote(spec)

    LearnerRemote = ray.remote(LearnerActor)
    learner_env = learner_actor_env(lc.num_threads, bool(lc.num_gpus)) if lc is not None else {}

    def rendezvous():
        """Rank 0's node address and a free port there (asked of a task placed in rank 0's bundle)."""
        return ray.get(
            ray.remote(num_cpus=0)(lambda: (ray.util.get_node_ip_address(), free_port()))
            .options(scheduling_strategy=_slot_strategy(pgs, plan.learner_slots[0]))
            .remote()
        )

    def start_learner(rank: int, master_addr: str, port: int):
        return placed(LearnerRemote, plan.learner_slots[rank], lc, learner_env).remote(learner, rank, master_addr, port)

    groups = ActorGroups(
        rollouts=[],
        learners=[],
        placement_groups=pgs,
        bucket_mb=rc.bucket_mb,
        rollout_specs=list(rollout_specs),
        rollout_factory=start_rollout,
        max_rollout_restarts=c.max_rollout_restarts,
        learner_factory=start_learner if lc is not None else None,
        learner_rendezvous=rendezvous if lc is not None else None,
        log=log,
        weight_sync=rc.weight_sync,
        weight_sync_timeout_s=rc.weight_sync_timeout_s,
        rollout_workers=rc.tensor_parallel_size,
    )
    try:
        groups.rollouts = [start_rollout(spec, i) for i, spec in enumerate(rollout_specs)]
        if lc is not None:
            master_addr, port = rendezvous()
            groups.learners = [start_learner(rank, master_addr, port) for rank in range(world_size)]
        ray.get([rank.setup.remote() for rank in groups.learners] + [r.ping.remote() for r in groups.rollouts])
        if lc is not None and rc.weight_sync == "collective":
            groups.connect_weight_group()
    except Exception:
        groups.shutdown()
        raise
    return groups
