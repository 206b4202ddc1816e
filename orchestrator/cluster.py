"""Ray side of the job: connect or start Ray, place the actor groups, and move weights between them.

One placement group holds a bundle per rollout actor and per learner rank, so the groups are reserved
together (no half-started job holding resources) and spread or packed across nodes by
`cluster.placement_strategy`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from omegaconf import DictConfig

from actors.learner import LearnerActor, LearnerSpec
from actors.rollout import RolloutActor, RolloutSpec
from actors.types import RolloutResult, SamplingConfig, TrainBatch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_ray(cfg: DictConfig) -> bool:
    """Start or connect to Ray. Returns True when this call started it (and so should shut it down)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return False
    if cfg.cluster.mode == "existing":
        ray.init(address=cfg.cluster.get("address") or "auto", log_to_driver=bool(cfg.cluster.log_to_driver))
    else:
        ray.init(
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


@dataclass
class ActorGroups:
    """The live actors of one job and the weight version the rollout engines hold."""

    rollouts: list
    learners: list
    placement_group: object
    weight_version: int = 0

    # ----------------------------------------------------------------------------------------- rollout

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> RolloutResult:
        """Split prompts evenly across the rollout actors; results come back in prompt order."""
        import ray

        k = len(self.rollouts)
        chunks = [prompt_ids[i::k] for i in range(k)]
        index = [list(range(i, len(prompt_ids), k)) for i in range(k)]
        parts = ray.get([r.generate.remote(c, sampling) for r, c in zip(self.rollouts, chunks) if c])
        merged = RolloutResult([], [], [], [], [], [], self.weight_version, 0.0)
        rows = []
        for part, idx in zip(parts, index):
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

    # ----------------------------------------------------------------------------------------- learner

    def train_step(self, shards: list[TrainBatch]) -> list:
        import ray

        return ray.get([l.train_step.remote(s) for l, s in zip(self.learners, shards)])

    def sync_weights(self, bucket_mb: float) -> dict:
        """Learners → rollout engines. Rank 0's buckets go straight from the object store to every engine;
        the driver never holds the weights. Every rank takes part (ZeRO-3 gathers are collectives)."""
        import ray

        refs = [l.export_weights.remote(bucket_mb) for l in self.learners]
        version = self.weight_version + 1
        results = ray.get([r.update_weights.remote(refs[0], version) for r in self.rollouts])
        ray.get(refs[1:])
        self.weight_version = version
        return {"version": version, "tensors": results[0]["tensors"], "load_s": max(r["time_s"] for r in results)}

    def call_learners(self, method: str, *args, **kwargs) -> list:
        import ray

        return ray.get([getattr(l, method).remote(*args, **kwargs) for l in self.learners])

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            ray.get([l.shutdown.remote() for l in self.learners], timeout=60)
        except Exception:
            pass
        for actor in self.rollouts + self.learners:
            try:
                ray.kill(actor)
            except Exception:
                pass
        try:
            remove_placement_group(self.placement_group)
        except Exception:
            pass


def start_actor_groups(cfg: DictConfig, learner: LearnerSpec, rollout_specs: list[RolloutSpec]) -> ActorGroups:
    """Reserve one placement group (rollout bundles first, then learner ranks) and start the actors."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    rc, lc = cfg.rollout, cfg.learner
    rollout_res = {"CPU": float(rc.num_cpus), **({"GPU": float(rc.num_gpus)} if rc.num_gpus else {})}
    learner_res = {"CPU": float(lc.num_cpus), **({"GPU": float(lc.num_gpus)} if lc.num_gpus else {})}
    bundles = [dict(rollout_res) for _ in rollout_specs] + [dict(learner_res) for _ in range(learner.world_size)]
    bundles = [b if any(v > 0 for v in b.values()) else {"CPU": 0.01} for b in bundles]
    pg = placement_group(bundles, strategy=cfg.cluster.placement_strategy)
    ready, _ = ray.wait([pg.ready()], timeout=float(cfg.cluster.get("placement_timeout_s", 300)))
    if not ready:
        remove_placement_group(pg)
        raise RuntimeError(
            f"cluster: could not reserve {len(bundles)} bundles {bundles} with strategy "
            f"{cfg.cluster.placement_strategy}; available: {ray.available_resources()}"
        )

    def placed(actor_cls, i, resources_cfg, env):
        return actor_cls.options(
            num_cpus=resources_cfg.num_cpus,
            num_gpus=resources_cfg.num_gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i),
            runtime_env={"env_vars": env},
        )

    rollout_env = rollout_actor_env(rc.omp_threads, bool(rc.num_gpus))
    RolloutRemote = ray.remote(RolloutActor)
    rollouts = [placed(RolloutRemote, i, rc, rollout_env).remote(spec) for i, spec in enumerate(rollout_specs)]

    learner_env = learner_actor_env(lc.num_threads, bool(lc.num_gpus))
    LearnerRemote = ray.remote(LearnerActor)
    offset = len(rollout_specs)
    # The rendezvous point is rank 0's node: ask a task placed in rank 0's bundle for its address and a free port.
    master_addr, port = ray.get(
        ray.remote(num_cpus=0)(lambda: (ray.util.get_node_ip_address(), _free_port())).options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=offset)
        ).remote()
    )
    learners = [
        placed(LearnerRemote, offset + rank, lc, learner_env).remote(learner, rank, master_addr, port)
        for rank in range(learner.world_size)
    ]
    groups = ActorGroups(rollouts=rollouts, learners=learners, placement_group=pg)
    try:
        ray.get([l.setup.remote() for l in learners] + [r.ping.remote() for r in rollouts])
    except Exception:
        groups.shutdown()
        raise
    return groups
