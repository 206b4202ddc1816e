"""Config validation: fail fast, with one line naming the field and what was expected.

Hydra already rejects unknown keys (the composed config is in struct mode); this module checks values and
the relations between fields, and turns the config into the typed specs the actors take.
"""

from __future__ import annotations

from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf

from actors.learner import LearnerSpec
from actors.rollout import RolloutSpec


class ConfigError(ValueError):
    """A bad config value. The message is one line: `<field>: expected <what>, got <value>`."""


def _get(cfg: DictConfig, path: str):
    try:
        return OmegaConf.select(cfg, path, throw_on_missing=True)
    except MissingMandatoryValue:
        raise ConfigError(f"{path}: a value is required (it is ??? in the config)") from None


def _int(cfg, path, lo=None, hi=None):
    v = _get(cfg, path)
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        raise ConfigError(f"{path}: expected an integer{rng}, got {v!r}")
    return v


def _float(cfg, path, lo=None, hi=None, lo_open=False):
    v = _get(cfg, path)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{path}: expected a number, got {v!r}")
    bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
    if bad_lo or (hi is not None and v > hi):
        lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        hi_s = "" if hi is None else f"<= {hi}"
        raise ConfigError(f"{path}: expected a number {' and '.join(s for s in (lo_s, hi_s) if s)}, got {v!r}")
    return float(v)


def _choice(cfg, path, choices):
    v = _get(cfg, path)
    if v not in choices:
        raise ConfigError(f"{path}: expected one of {list(choices)}, got {v!r}")
    return v


def validate_rollout_engine(cfg: DictConfig) -> None:
    """rollout.* that place and size the vLLM engines (shared by the job and `orchestrator.evaluate`)."""
    r = "rollout"
    _int(cfg, f"{r}.num_actors", lo=1)
    _float(cfg, f"{r}.num_cpus", lo=0)
    _float(cfg, f"{r}.num_gpus", lo=0)
    _choice(cfg, f"{r}.dtype", ["float32", "bfloat16", "float16", "auto"])
    _int(cfg, f"{r}.max_model_len", lo=2)
    _int(cfg, f"{r}.kv_cache_mb", lo=0)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first bad field."""
    from orchestrator.algorithms import ADVANTAGE_ESTIMATORS, AGG_MODES, POLICY_LOSSES
    from verifiers import VERIFIERS

    _int(cfg, "seed", lo=0)
    t = "trainer"
    _int(cfg, f"{t}.total_steps", lo=0)
    prompts = _int(cfg, f"{t}.prompts_per_step", lo=1)
    samples = _int(cfg, f"{t}.samples_per_prompt", lo=1)
    _int(cfg, f"{t}.eval_every", lo=0)
    _int(cfg, f"{t}.eval_prompts", lo=1)
    _int(cfg, f"{t}.eval_samples", lo=1)
    _int(cfg, f"{t}.checkpoint_every", lo=0)
    _int(cfg, f"{t}.keep_checkpoints", lo=0)
    _choice(cfg, f"{t}.resume", ["auto", "never"])
    if cfg.get("analysis") is not None and bool(cfg.analysis.enabled):
        if not cfg.trainer.checkpoint_every:
            raise ConfigError("analysis.enabled: needs checkpoints to analyse; expected trainer.checkpoint_every > 0")
        if cfg.trainer.keep_checkpoints not in (0,) and cfg.trainer.keep_checkpoints < 3:
            raise ConfigError(
                "analysis.enabled: needs at least 3 kept checkpoints; expected trainer.keep_checkpoints 0 or >= 3"
            )
        if not cfg.trainer.save_final:
            raise ConfigError(
                "analysis.enabled: the final checkpoint ends the series; expected trainer.save_final=true"
            )
    _int(cfg, f"{t}.max_learner_restarts", lo=0)

    _choice(cfg, "model.source", ["toy", "path"])
    if cfg.model.source == "path" and not _get(cfg, "model.path"):
        raise ConfigError("model.path: expected a hub id or a local directory for model.source=path, got None")
    if cfg.model.source == "toy":
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            _int(cfg, f"model.tiny.{key}", lo=1)
        if (
            cfg.model.tiny.hidden_size % cfg.model.tiny.num_heads
            or cfg.model.tiny.hidden_size // cfg.model.tiny.num_heads < 32
        ):
            raise ConfigError(
                f"model.tiny.hidden_size: expected a multiple of num_heads with head_dim >= 32, "
                f"got hidden_size={cfg.model.tiny.hidden_size}, num_heads={cfg.model.tiny.num_heads}"
            )
        _int(cfg, "model.warm_start.steps", lo=0)
        _int(cfg, "model.warm_start.batch_size", lo=1)
        _float(cfg, "model.warm_start.lr", lo=0, lo_open=True)

    source = _choice(cfg, "data.source", ["toy", "files", "hub"])
    if source == "toy":
        if cfg.model.source != "toy":
            raise ConfigError("data.source: expected files or hub with a real model (model.source=path), got toy")
        _choice(cfg, "data.toy.op", ["add", "mul", "code"])
        _int(cfg, "data.toy.digits", lo=1, hi=6)
        _float(cfg, "data.toy.careful_fraction", lo=0, hi=1, lo_open=True)
        _int(cfg, "data.toy.num_train", lo=1)
        _int(cfg, "data.toy.num_eval", lo=1)
    elif source == "files":
        for key in ("train_files", "eval_files"):
            _get(cfg, f"data.{key}")
    else:
        _get(cfg, "data.hub_id")
    _choice(cfg, "data.verifier", sorted(VERIFIERS))
    _int(cfg, "data.max_prompt_tokens", lo=1)
    if "{prompt}" not in str(_get(cfg, "data.prompt_template")):
        raise ConfigError(
            f"data.prompt_template: expected a format string containing {{prompt}}, got {cfg.data.prompt_template!r}"
        )

    _choice(cfg, "algo.advantage", sorted(ADVANTAGE_ESTIMATORS))
    _choice(cfg, "algo.loss", sorted(POLICY_LOSSES))
    _choice(cfg, "algo.loss_agg", list(AGG_MODES))
    _float(cfg, "algo.clip_low", lo=0, hi=1)
    _float(cfg, "algo.clip_high", lo=0)
    _float(cfg, "algo.clip_ratio_c", lo=1, lo_open=True)
    _float(cfg, "algo.gamma", lo=0, hi=1)
    _float(cfg, "algo.kl_coef", lo=0)
    _choice(cfg, "algo.kl_kind", ["k1", "k2", "k3"])

    r = "rollout"
    validate_rollout_engine(cfg)
    _float(cfg, f"{r}.temperature", lo=0, lo_open=True)
    _float(cfg, f"{r}.top_p", lo=0, hi=1, lo_open=True)
    _int(cfg, f"{r}.max_tokens", lo=1)
    _float(cfg, f"{r}.bucket_mb", lo=0, lo_open=True)
    if cfg.model.source == "toy" and cfg.rollout.max_model_len > cfg.model.tiny.max_positions:
        raise ConfigError(
            f"rollout.max_model_len: expected <= model.tiny.max_positions ({cfg.model.tiny.max_positions}), "
            f"got {cfg.rollout.max_model_len}"
        )
    if cfg.data.max_prompt_tokens + cfg.rollout.max_tokens > cfg.rollout.max_model_len:
        raise ConfigError(
            f"rollout.max_model_len: expected >= data.max_prompt_tokens + rollout.max_tokens "
            f"({cfg.data.max_prompt_tokens + cfg.rollout.max_tokens}), got {cfg.rollout.max_model_len}"
        )
    if prompts % cfg.rollout.num_actors:
        raise ConfigError(
            f"trainer.prompts_per_step: expected a multiple of rollout.num_actors ({cfg.rollout.num_actors}), "
            f"got {prompts}"
        )

    lr = "learner"
    world = _int(cfg, f"{lr}.world_size", lo=1)
    _choice(cfg, f"{lr}.zero_stage", [1, 2, 3])
    _choice(cfg, f"{lr}.dtype", ["fp32", "bf16"])
    _float(cfg, f"{lr}.lr", lo=0, lo_open=True)
    _float(cfg, f"{lr}.weight_decay", lo=0)
    _int(cfg, f"{lr}.warmup_steps", lo=0)
    _float(cfg, f"{lr}.grad_clip", lo=0)
    micro = _int(cfg, f"{lr}.micro_batch_size", lo=1)
    _choice(cfg, f"{lr}.backend", ["auto", "gloo", "nccl"])
    betas = _get(cfg, f"{lr}.betas")
    if len(betas) != 2 or not all(0 <= float(b) < 1 for b in betas):
        raise ConfigError(f"{lr}.betas: expected two numbers in [0, 1), got {list(betas)!r}")
    batch = prompts * samples
    if batch % (world * micro):
        raise ConfigError(
            f"learner.micro_batch_size: expected prompts_per_step * samples_per_prompt ({batch}) to be divisible "
            f"by world_size * micro_batch_size ({world} * {micro})"
        )

    _int(cfg, "reward.num_workers", lo=1)
    _float(cfg, "reward.timeout_s", lo=0, lo_open=True)

    _choice(cfg, "schedule.name", ["rl", "rl_extra"])
    if cfg.schedule.name == "rl_extra":
        _int(cfg, "schedule.m", lo=1)
        _int(cfg, "schedule.n", lo=0)
        if _get(cfg, "schedule.beta") is not None:
            _float(cfg, "schedule.beta", lo=0, lo_open=True)
        _choice(cfg, "schedule.beta_mode", ["fixed", "schedule", "adaptive", "auto"])
        if cfg.schedule.beta_mode == "fixed" and _get(cfg, "schedule.beta") is None:
            raise ConfigError("schedule.beta: expected a number when schedule.beta_mode=fixed, got null")
        _choice(cfg, "schedule.anchor", ["cycle_start", "previous_step"])
        _choice(cfg, "schedule.velocity", ["two_point", "least_squares"])
        if cfg.schedule.velocity == "least_squares" and cfg.schedule.anchor != "cycle_start":
            raise ConfigError(
                "schedule.velocity: least_squares fits a line through the cycle; needs schedule.anchor=cycle_start"
            )
        if cfg.schedule.velocity == "least_squares" and _get(cfg, "schedule.anchor_device") is not None:
            raise ConfigError("schedule.anchor_device: least_squares keeps its sums beside the shard; expected null")
        cands = _get(cfg, "schedule.candidates")
        if not cands or not all(isinstance(c, (int, float)) and c > 0 for c in cands):
            raise ConfigError(f"schedule.candidates: expected a non-empty list of positive fractions, got {cands!r}")
        _float(cfg, "schedule.monitor_threshold", lo=-1, hi=1)
        if _get(cfg, "schedule.monitor_r2") is not None:
            _float(cfg, "schedule.monitor_r2", lo=0, hi=1)
        _int(cfg, "schedule.monitor_samples", lo=1)
        _choice(cfg, "schedule.selection", ["names", "tensor_drift", "top_elements"])
        _float(cfg, "schedule.selection_threshold", lo=-1, hi=1)
        _float(cfg, "schedule.selection_fraction", lo=0, hi=1, lo_open=True)
        _choice(cfg, "schedule.optimizer", ["keep", "reset"])
        _int(cfg, "schedule.validation_prompts", lo=1)
        _int(cfg, "schedule.validation_samples", lo=1)
        if _get(cfg, "schedule.guard_margin") is not None:
            _float(cfg, "schedule.guard_margin", lo=0)
        _float(cfg, "schedule.shrink", lo=0, hi=1)
        from linearity.selection import DEFAULT_EXCLUDE, TensorSelector

        include, exclude = _get(cfg, "schedule.include"), _get(cfg, "schedule.exclude")
        for key, value in (("include", include), ("exclude", exclude)):
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise ConfigError(f"schedule.{key}: expected a list of name patterns, got {value!r}")
        try:
            TensorSelector(tuple(include), tuple(DEFAULT_EXCLUDE if exclude is None else exclude))
        except ValueError as exc:
            raise ConfigError(f"schedule: {exc}") from None

    from orchestrator.cluster import validate_cluster

    validate_cluster(cfg)  # cluster.* (mode, address, strategies, resources, restarts)


def learner_spec(cfg: DictConfig, model_path: str) -> LearnerSpec:
    lc, algo = cfg.learner, cfg.algo
    batch = cfg.trainer.prompts_per_step * cfg.trainer.samples_per_prompt
    return LearnerSpec(
        model_path=model_path,
        world_size=lc.world_size,
        zero_stage=lc.zero_stage,
        dtype=lc.dtype,
        lr=float(lc.lr),
        betas=tuple(float(b) for b in lc.betas),
        weight_decay=float(lc.weight_decay),
        warmup_steps=lc.warmup_steps,
        grad_clip=float(lc.grad_clip),
        micro_batch_size=lc.micro_batch_size,
        samples_per_rank=batch // lc.world_size,
        loss_kind=algo.loss,
        clip_low=float(algo.clip_low),
        clip_high=float(algo.clip_high),
        clip_ratio_c=float(algo.clip_ratio_c),
        loss_agg=algo.loss_agg,
        kl_coef=float(algo.kl_coef),
        kl_kind=algo.kl_kind,
        num_threads=lc.num_threads,
        backend=lc.backend,
        seed=cfg.seed,
    )


def rollout_spec(cfg: DictConfig, model_path: str, actor_index: int = 0) -> RolloutSpec:
    rc = cfg.rollout
    return RolloutSpec(
        model_path=model_path,
        dtype=rc.dtype,
        max_model_len=rc.max_model_len,
        kv_cache_mb=rc.kv_cache_mb,
        max_num_seqs=rc.max_num_seqs,
        seed=cfg.seed + actor_index,
        gpu_memory_utilization=float(rc.gpu_memory_utilization),
    )
