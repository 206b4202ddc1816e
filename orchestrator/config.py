"""The configuration, typed: one dataclass per Hydra group — its schema, defaults, documentation and constraints.

Hydra composes `conf/config.yaml` (the job) and `conf/evaluate.yaml` (the evaluation) over `JobConfig` and
`EvaluateConfig`, registered below in Hydra's ConfigStore as `job_schema` / `evaluate_schema`. A key that is not
declared here, or a value of the wrong type, fails at composition; the YAML files under `conf/` are presets that
only override fields. `validate(cfg)` turns a composed config into the typed object and checks every constraint:
each field's own (declared with `choice`, `integer`, `number`) and the relations between fields (the `check`
methods), failing on the first one with one line: `<field>: expected <what>, got <value>`.

Adding a setting: add a field to its group's dataclass with its default, its constraint and a comment saying what
it does; set it in a preset YAML only where a preset differs from the default. Actors take these dataclasses
themselves (`actors.rollout.RolloutSpec`, `actors.learner.LearnerSpec` wrap them with the model path and seed),
so there is no second set of defaults anywhere.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

# Allowed values that are defined here, by the schema; the code that implements them imports them from here.
STRATEGIES = ("extrapolate", "rank1", "lookahead")
BETA_MODES = ("fixed", "schedule", "adaptive", "auto")
ANCHOR_MODES = ("cycle_start", "previous_step")
OPTIMIZER_AFTER_PROJECTION = ("keep", "reset")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


class ConfigError(ValueError):
    """A bad config value. The message is one line: `<field>: expected <what>, got <value>`."""


class InputError(ConfigError):
    """A bad input the config points at (a data file, a model folder, a checkpoint). The message is one line:
    `<path>[:<line>]: expected <what>, found <what is there>`. A ConfigError, so every entry point reports it the
    same way: one line, exit code 2, before anything starts."""


# ------------------------------------------------------------------------------------------ field constraints


def choice(default: Any, options: Sequence | Callable[[], Sequence]) -> Any:
    """A field whose value must be one of `options` (a sequence, or a function returning one: a registry)."""
    return field(default=default, metadata={"choices": options})


def integer(default: Any, *, ge: int | None = None, le: int | None = None) -> Any:
    """An integer field, optionally bounded: `ge` <= value <= `le`."""
    return field(default=default, metadata={"integer": (ge, le)})


def number(default: Any, *, gt: float | None = None, ge: float | None = None, le: float | None = None) -> Any:
    """A number field, optionally bounded below (`gt` open or `ge` closed) and above (`le`)."""
    return field(default=default, metadata={"number": (gt, ge, le)})


def listed(factory: Callable[[], list]) -> Any:
    """A list field with a default (dataclasses need a factory for mutable defaults)."""
    return field(default_factory=factory)


def _check_integer(path: str, v: Any, ge: int | None, le: int | None) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or (ge is not None and v < ge) or (le is not None and v > le):
        bounds = f" in [{ge}, {le}]" if le is not None else (f" >= {ge}" if ge is not None else "")
        raise ConfigError(f"{path}: expected an integer{bounds}, got {v!r}")


def _check_number(path: str, v: Any, gt: float | None, ge: float | None, le: float | None) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{path}: expected a number, got {v!r}")
    if (gt is not None and v <= gt) or (ge is not None and v < ge) or (le is not None and v > le):
        parts = [f"> {gt}" if gt is not None else "", f">= {ge}" if ge is not None else ""]
        parts += [f"<= {le}" if le is not None else ""]
        raise ConfigError(f"{path}: expected a number {' and '.join(p for p in parts if p)}, got {v!r}")


def _allows_none(cls: type, name: str) -> bool:
    hint = typing.get_type_hints(cls)[name]
    return type(None) in typing.get_args(hint)


def check_fields(obj: Any, prefix: str) -> None:
    """Check every declared constraint of dataclass `obj` and of the dataclasses it holds, then their `check()`.

    Nested dataclasses are checked first (a group's relations may rely on its parts being valid)."""
    for f in dataclasses.fields(obj):
        path = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, path)
            continue
        if value is None and _allows_none(type(obj), f.name):
            continue
        meta = f.metadata
        if "choices" in meta:
            options = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
            if value not in options:
                raise ConfigError(f"{path}: expected one of {list(options)}, got {value!r}")
        elif "integer" in meta:
            _check_integer(path, value, *meta["integer"])
        elif "number" in meta:
            _check_number(path, value, *meta["number"])
    check = getattr(obj, "check", None)
    if check is not None:
        check(prefix)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ------------------------------------------------------------------------------------------------------ model


@dataclass
class TinyModelConfig:
    """The embedded tiny Qwen2 (built in code, character tokenizer; see orchestrator/toy_task.py)."""

    hidden_size: int = integer(128, ge=1)  # head_dim = hidden_size / num_heads (vLLM's CPU attention needs >= 32)
    num_layers: int = integer(2, ge=1)
    num_heads: int = integer(4, ge=1)
    num_kv_heads: int = integer(2, ge=1)
    intermediate_size: int = integer(512, ge=1)
    tie_word_embeddings: bool = True
    max_positions: int = integer(64, ge=2)  # longest prompt + response the model (and vLLM) accepts

    def check(self, prefix: str) -> None:
        if self.hidden_size % self.num_heads or self.hidden_size // self.num_heads < 32:
            raise ConfigError(
                f"{_join(prefix, 'hidden_size')}: expected a multiple of num_heads with head_dim >= 32, "
                f"got hidden_size={self.hidden_size}, num_heads={self.num_heads}"
            )


@dataclass
class WarmStartConfig:
    """SFT of the tiny model on the toy task's procedure mixture before RL (cached by every field and the seed)."""

    steps: int = integer(600, ge=0)  # optimizer steps (~1 min on 2 cores)
    batch_size: int = integer(128, ge=1)
    lr: float = number(3e-3, gt=0)


@dataclass
class ModelConfig:
    """The policy: the embedded tiny model (`source: toy`) or a real one (`source: path`)."""

    source: str = choice("toy", ("toy", "path"))  # toy: build and warm-start the tiny model | path: load `path`
    path: str | None = None  # a hub id or a local save_pretrained directory (source=path)
    cache_dir: str = ".cache/rlextra"  # toy warm starts and toy data are cached here (relative to the launch dir)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)

    def check(self, prefix: str) -> None:
        if self.source == "path" and not self.path:
            raise ConfigError(
                f"{_join(prefix, 'path')}: expected a hub id or a local directory for model.source=path, got None"
            )


# ------------------------------------------------------------------------------------------------------- data


TOY_OPS = ("add", "mul", "code", "skills")
SKILL_OPERATORS = {"add": "+", "sub": "-", "mul": "*"}  # the operations a `skills` sub-skill may use
# op=skills: sub-skill i announces its careful procedure with CAREFUL_MARKERS[i] and its flawed one with
# FLAWED_MARKERS[i] (distinct behaviours are distinct words in a real model), so at most this many sub-skills
SKILL_CAREFUL_MARKERS, SKILL_FLAWED_MARKERS = "CDEFGHIJ", "NOPQRSTU"
SKILL_NAME = re.compile(r"^(add|sub|mul)([1-3])([1-3])$")  # <op><digits of a><digits of b>, e.g. add21 = 47+8


def parse_skill(name: str) -> tuple[str, int, int] | None:
    """`add21` → ("add", 2, 1); None for a name that is not a sub-skill (b never longer than a; mul: 1-digit b)."""
    match = SKILL_NAME.match(name) if isinstance(name, str) else None
    if match is None:
        return None
    op, da, db = match.group(1), int(match.group(2)), int(match.group(3))
    if db > da or (op == "mul" and db != 1):
        return None
    return op, da, db


def _column_pairs(da: int, db: int) -> list[tuple[range, range]]:
    """The digit ranges of a and b column by column, lowest first (leading digits are 1-9, missing ones 0)."""
    return [
        (range(1 if i == da - 1 else 0, 10), range(1 if i == db - 1 else 0, 10) if i < db else range(0, 1))
        for i in range(da)
    ]


def skill_problem_count(op: str, da: int, db: int) -> int:
    """How many problems of a sub-skill need the careful procedure (a carry in add / mul, a borrow in sub): all
    problems of the shape less those the flawed procedure gets right, counted column by column."""
    span_a, span_b = 9 * 10 ** (da - 1), 9 * 10 ** (db - 1)
    if op == "mul":  # b in 2..9; carry-free iff every digit of a times b stays below 10
        total = span_a * 8
        carry_free = sum(math.prod(sum(x * b <= 9 for x in xs) for xs, _ in _column_pairs(da, 1)) for b in range(2, 10))
        return total - carry_free
    if op == "add":
        total = span_a * span_b
        easy = math.prod(sum(x + y <= 9 for x in xs for y in ys) for xs, ys in _column_pairs(da, db))
        return total - easy
    total = span_a * span_b if da > db else span_a * (span_a + 1) // 2  # sub: b <= a
    easy = math.prod(sum(x >= y for x in xs for y in ys) for xs, ys in _column_pairs(da, db))
    return total - easy


@dataclass
class ToyTaskConfig:
    """One variant of the synthetic task (generated from the seed; `cache_fields()` are what its data depends on)."""

    # add: a+b | mul: a*b with a 1-digit b | code: tiny Python function problems | skills: a mixture of sub-skills
    op: str = choice("add", TOY_OPS)
    digits: int = integer(2, ge=1, le=6)  # add / mul: digits of the (first) operand
    careful_fraction: float = number(0.3, gt=0, le=1)  # add / mul / code: share of correct solutions in the warm start
    num_train: int = integer(20000, ge=1)  # RL train prompts
    num_eval: int = integer(500, ge=1)  # held-out eval prompts (disjoint from train)
    # skills: the sub-skills, `<op><digits of a><digits of b>` with op add | sub (a >= b) | mul (b in 2..9), e.g.
    # add21 = 47+8. Only problems that need the careful procedure are drawn (a carry, or a borrow in sub), so the
    # flawed one is always wrong; eval prompts are spread evenly over the sub-skills.
    skills: list[str] = listed(lambda: ["add22", "sub22", "add21", "sub21", "add32", "sub32", "add31", "sub31"])
    # skills: each sub-skill's probability of choosing the careful procedure in the warm start (in the order of
    # `skills`); spread out so that RL lifts them one after another instead of all at once: the rarest are chosen so
    # seldom that GRPO samples a rewarded answer for them only every few steps (exploration-bound, as a behaviour a
    # reasoning model rarely shows). Both procedures are taught equally well whatever the share
    # (toy_task.skill_warm_start_example)
    careful_shares: list[float] = listed(lambda: [0.3, 0.1, 0.03, 0.01, 0.005, 0.003, 0.002, 0.001])
    # skills: the warm start is cached only once every sub-skill's careful procedure is carried out (greedy, mode
    # token given) on at least this share of held-out problems; else it is rebuilt (see toy_task.py)
    min_fidelity: float = number(0.8, ge=0, le=1)

    def cache_fields(self) -> dict:
        """The fields this variant's data and warm start are built from (the cache keys hash them): the sub-skill
        fields only for op=skills, so adding them left every other variant's cached data where it was."""
        fields = dataclasses.asdict(self)
        if self.op != "skills":
            fields = {k: fields[k] for k in ("op", "digits", "careful_fraction", "num_train", "num_eval")}
        return fields

    def skill_counts(self) -> dict[str, int]:
        """op=skills: how many problems each sub-skill can produce."""
        return {name: skill_problem_count(*parse_skill(name)) for name in self.skills}

    def distinct_problems(self) -> int:
        """How many different prompts this variant can produce."""
        if self.op == "code":
            return 10**9  # random arguments: effectively unbounded
        if self.op == "skills":
            return sum(self.skill_counts().values())
        first = 9 * 10 ** (self.digits - 1)
        return first * (first if self.op == "add" else 8)

    def check(self, prefix: str) -> None:
        if self.careful_fraction >= 1:
            raise ConfigError(
                f"{_join(prefix, 'careful_fraction')}: expected a number in (0, 1), got {self.careful_fraction!r}"
            )
        if self.op == "skills":
            self._check_skills(prefix)
            return
        if self.num_eval >= self.distinct_problems():
            raise ConfigError(
                f"{_join(prefix, 'num_eval')}: expected fewer than the {self.distinct_problems()} distinct "
                f"{self.digits}-digit problems (some must be left for training), got {self.num_eval}"
            )

    def _check_skills(self, prefix: str) -> None:
        names, shares = list(self.skills), list(self.careful_shares)
        bad = next((n for n in names if parse_skill(n) is None), None)
        if not names or bad is not None or len(set(names)) != len(names) or len(names) > len(SKILL_CAREFUL_MARKERS):
            raise ConfigError(
                f"{_join(prefix, 'skills')}: expected 1-{len(SKILL_CAREFUL_MARKERS)} distinct names "
                f"<op><digits of a><digits of b> with op add, sub or mul, digits 1-3, b no longer than a (mul: 1-digit "
                f"b), e.g. add21; got {names!r}"
            )
        if len(shares) != len(names) or not all(isinstance(x, (int, float)) and 0 < x < 1 for x in shares):
            raise ConfigError(
                f"{_join(prefix, 'careful_shares')}: expected {len(names)} numbers in (0, 1), one per skill, "
                f"got {shares!r}"
            )
        per_skill = -(-self.num_eval // len(names))
        for name, count in self.skill_counts().items():
            if per_skill >= count:
                raise ConfigError(
                    f"{_join(prefix, 'num_eval')}: expected fewer than {count * len(names)} ({name} has "
                    f"{count} problems and gets {per_skill} eval prompts; some must be left for training), "
                    f"got {self.num_eval}"
                )


def _verifier_names() -> list[str]:
    from verifiers import VERIFIERS

    return sorted(VERIFIERS)


@dataclass
class DataConfig:
    """Prompts and reference answers: the synthetic toy task, local files, or a hub dataset, through `datasets`."""

    source: str = choice("toy", ("toy", "files", "hub"))
    toy: ToyTaskConfig = field(default_factory=ToyTaskConfig)  # source=toy
    # source=files: a path, directory or glob, or a list of them (.jsonl / .json / .parquet / .csv, one format)
    train_files: Any = None
    eval_files: Any = None  # source=files: the held-out split, given the same way
    hub_id: str | None = None  # source=hub: e.g. DigitalLearningGmbH/MATH-lighteval (needs network)
    hub_config: str | None = None  # source=hub: the dataset's config name, if any
    train_split: str = "train"  # source=hub
    eval_split: str = "test"  # source=hub
    prompt_field: str = "prompt"  # record field holding the prompt text
    answer_field: str = "answer"  # record field holding the reference answer
    prompt_template: str = "{prompt}"  # python format string applied to the prompt field
    apply_chat_template: bool = False  # wrap the prompt with the tokenizer's chat template (real chat models)
    verifier: str = choice("arith", _verifier_names)  # a name from the verifier registry (arith | math | code ...)
    max_prompt_tokens: int = integer(32, ge=1)  # longer prompts are bad rows
    # Bad rows (unparsable, a missing / null / wrongly typed prompt or answer, a prompt over max_prompt_tokens, a
    # reference answer the verifier can never give a full score): false = fail naming the first and the count |
    # true = drop them, say how many, and log data/skipped_rows_train and data/skipped_rows_eval to MLflow
    skip_bad_rows: bool = False

    def check(self, prefix: str) -> None:
        if self.source == "files":
            for key in ("train_files", "eval_files"):
                if getattr(self, key) is None:
                    raise ConfigError(
                        f"{_join(prefix, key)}: a value is required for data.source=files (a path or a list of paths)"
                    )
        if self.source == "hub" and not self.hub_id:
            raise ConfigError(f"{_join(prefix, 'hub_id')}: a value is required for data.source=hub (a dataset id)")
        try:
            ok = "\0" in self.prompt_template.format(prompt="\0")
        except (KeyError, IndexError, ValueError):  # another field, a stray brace
            ok = False
        if not ok:
            raise ConfigError(
                f"{_join(prefix, 'prompt_template')}: expected a format string with {{prompt}} as its only field "
                f"(other braces doubled), got {self.prompt_template!r}"
            )


# ----------------------------------------------------------------------------------------------------- algo


def _advantage_names() -> list[str]:
    from orchestrator.algorithms import ADVANTAGE_ESTIMATORS

    return sorted(ADVANTAGE_ESTIMATORS)


def _loss_names() -> list[str]:
    from orchestrator.algorithms import POLICY_LOSSES

    return sorted(POLICY_LOSSES)


def _agg_modes() -> tuple[str, ...]:
    from orchestrator.algorithms import AGG_MODES

    return AGG_MODES


def _kl_kinds() -> tuple[str, ...]:
    from orchestrator.algorithms import KL_PENALTY_KINDS

    return KL_PENALTY_KINDS


@dataclass
class AlgoConfig:
    """The RL algorithm: advantage estimator + policy loss from orchestrator/algorithms.py (verl's definitions)."""

    name: str = "grpo"  # a label for runs and logs
    advantage: str = choice("grpo", _advantage_names)  # grpo | drgrpo | reinforce_plus_plus | ..._baseline
    loss: str = choice("ppo_clip", _loss_names)  # ppo_clip (dual-clip PPO) | gspo
    clip_low: float = number(0.2, ge=0, le=1)  # ratio clip 1 - clip_low
    clip_high: float = number(0.2, ge=0)  # ratio clip 1 + clip_high
    clip_ratio_c: float = number(3.0, gt=1)  # dual-clip bound for negative advantages (ppo_clip only)
    loss_agg: str = choice("token-mean", _agg_modes)  # how token losses are aggregated
    eps: float = number(1e-6, ge=0)  # added to the group std
    gamma: float = number(1.0, ge=0, le=1)  # discount for REINFORCE++ returns (ignored by group estimators)
    kl_coef: float = number(0.0, ge=0)  # > 0: a KL-to-reference loss term; each learner rank holds a frozen reference
    kl_kind: str = choice("k3", _kl_kinds)  # k1 | k2 | k3 (verl's kl | mse | low_var_kl)


# ------------------------------------------------------------------------------------------------- schedule


def _selection_modes() -> tuple[str, ...]:
    from linearity.zero_shards import SELECTION_MODES

    return SELECTION_MODES


def _velocity_modes() -> tuple[str, ...]:
    from linearity.zero_shards import VELOCITY_MODES

    return VELOCITY_MODES


@dataclass
class ScheduleConfig:
    """`rl`: every step is a real gradient step. `rl_extra`: real RL steps in cycles, each ended by an extrapolation
    phase that moves the learners' fp32 master shards in place, W ← A + β (W − A) along a direction the strategy picks,
    A the anchor; each rank moves only its own shard, optimizer state / LR schedule / data position carry on
    (actors/extrapolator.py decides whether, what and how far; every strategy has the same monitor, validation,
    guards, rollback, checkpoints and MLflow phase runs).

    Strategies (`strategy`):
    - `extrapolate`: the paper's RL-Extra (§4.3): after m real steps, stretch the cycle's displacement by β =
      (m + n) / m on the elements `selection` picks by measured linearity. Knobs: m, n, anchor, velocity, selection*.
    - `rank1` (AlphaRL / RELEX): per weight matrix, move only along the dominant rank-1 direction of the cycle's update
      W − A (found by a power iteration over all-reduced vectors, no gather), stretched by β; with
      velocity=least_squares the step along it is the least-squares slope of the cycle. Vectors (biases, norms)
      stay. Knobs: m, n, velocity, rank1_iters.
    - `lookahead` (SFPO, arXiv 2510.04072): every rollout batch gets `lookahead_steps` fast optimizer steps from the
      slow weights S, then the reposition W ← S + α (W − S) (α = `lookahead_alpha` < 1: the anchor is S), then one
      slow correction step on the same batch; switched off for good when the per-step entropy's z-score over
      `entropy_window` steps reaches `entropy_z`. Every real step is a cycle (m = 1).

    β modes (`beta_mode`): `fixed` (`beta`; lookahead: α) | `schedule` ((m+n)/m; lookahead: α) | `adaptive`
    (candidates × the largest β, each tested against not moving on the validation batch, the best accepted kept) |
    `auto` (adaptive, and extrapolate / rank1 only when the linearity monitor says linear).

    These dataclass defaults are what `schedule=rl_extra` gives: the paper's extrapolate under `auto`, m 10, n 30.
    The job's default is the preset `conf/schedule/lookahead.yaml` (strategy lookahead, m 1, beta_mode fixed), which
    saved real steps against GRPO at its best lr (one optimizer step a batch) on every report seed measured, ending
    level with it or up to 0.03 below; against GRPO tuned in trainer.updates_per_batch (16 on toy_skills) it takes
    1.5x more real steps to the target and ends level or higher, in a quarter of the optimizer passes (README,
    RL-Extra); `schedule=rl` is plain RL."""

    name: str = choice("rl_extra", ("rl", "rl_extra"))
    strategy: str = choice("extrapolate", STRATEGIES)  # extrapolate | rank1 | lookahead (see the docstring)
    m: int = integer(10, ge=1)  # real RL steps per cycle (lookahead: 1, every SFPO step ends in its reposition)
    n: int = integer(30, ge=0)  # extrapolated (virtual) steps per cycle (β = (m+n)/m = 4 at most)
    # cycle_start (A = weights at the cycle start) | previous_step (A = weights one step back: eq. 3 read literally)
    anchor: str = choice("cycle_start", ANCHOR_MODES)
    # two_point (the chord W − A) | least_squares (slope of a per-element line through every step of the cycle;
    # cycle_start only; 2 more shard copies; not lookahead)
    velocity: str = choice("two_point", _velocity_modes)
    # fixed (beta; lookahead: lookahead_alpha) | schedule ((m+n)/m, or 1+n for previous_step; lookahead:
    # lookahead_alpha) | adaptive (candidates tested on validation) | auto (adaptive, only when the monitor says linear)
    beta_mode: str = choice("auto", BETA_MODES)
    # extrapolate / rank1 — fixed: the β; adaptive/auto: the largest β tried (null = the schedule's)
    beta: float | None = number(None, gt=0)
    # adaptive/auto: fractions of the largest β to try (extrapolate / rank1: those giving β > 1; lookahead: α·f <= 1);
    # each is kept only if the validation test accepts it against not moving
    candidates: list[float] = listed(lambda: [0.5, 1.0])
    # auto (extrapolate / rank1): minimum drift share, the cosine of consecutive displacements (the first cycle: of its
    # two halves)
    monitor_threshold: float = number(0.7, ge=-1, le=1)
    monitor_r2: float | None = number(None, ge=0, le=1)  # auto: also require this median sampled-weight R² (null: off)
    monitor_samples: int = integer(2048, ge=1)  # weight elements sampled per rank for the running R²
    # extrapolate — names (include/exclude only) | tensor_drift (tensors whose drift share >= selection_threshold) |
    # top_elements (top selection_fraction of elements by steady displacement); rank1 / lookahead use the names only
    selection: str = choice("top_elements", _selection_modes)
    selection_threshold: float = number(0.7, ge=-1, le=1)  # tensor_drift: minimum per-tensor drift share
    selection_fraction: float = number(0.05, gt=0, le=1)  # top_elements: share of the name-selected elements
    include: list[str] = listed(lambda: ["*"])  # fnmatch patterns of parameter names that may be projected
    # never projected; null = linearity.selection.DEFAULT_EXCLUDE (norm layers), for lookahead nothing (as SFPO)
    exclude: list[str] | None = None
    anchor_device: str | None = None  # where anchors live: null = with the shard; "cpu" saves accelerator memory
    optimizer: str = choice("keep", OPTIMIZER_AFTER_PROJECTION)  # after a projection: keep the Adam state | reset it
    # rank1: power iterations per cycle (each two passes over the shard and two all-reduces of Σ (rows + columns))
    rank1_iters: int = integer(8, ge=1)
    lookahead_steps: int = integer(3, ge=1)  # lookahead: fast optimizer steps per rollout batch (SFPO's K)
    lookahead_alpha: float = number(0.8, gt=0, le=1)  # lookahead: reposition W ← S + α (W − S) (SFPO's step size)
    entropy_window: int = integer(30, ge=2)  # lookahead: steps in the entropy z-score window (SFPO's zscore_w)
    entropy_z: float | None = number(1.0, gt=0)  # lookahead: switch off for good at this z-score (null: never)
    validation_prompts: int = integer(32, ge=2)  # fixed train-split slice scoring projections (adaptive/auto/guard)
    validation_samples: int = integer(4, ge=1)  # samples per validation prompt
    # adaptive/auto: the validation test's false-positive rate per phase (a candidate no better than not moving is
    # kept with at most this probability; split over the candidates; linearity/validation.py derives it)
    validation_fpr: float = number(0.05, gt=0, le=0.5)
    guard_nan: bool = True  # roll the shards back if a projection produces NaN/Inf (off: fail the job)
    # roll back (and shrink β) if the validation's estimated reward change is below −guard_margin (null: off)
    guard_margin: float | None = number(None, ge=0)
    # after a rollback: largest β ← 1 + (β − 1) · shrink (lookahead: α ← α · shrink)
    shrink: float = number(0.5, ge=0, le=1)
    eval_around_projection: bool = False  # evaluate the held-out split just before and after each projection

    @property
    def schedule_beta(self) -> float:
        """The strategy's coefficient: lookahead's α; else the paper's β, (m + n) / m over a cycle, or 1 + n for one
        step's displacement (previous_step)."""
        if self.strategy == "lookahead":
            return self.lookahead_alpha
        return (self.m + self.n) / self.m if self.anchor == "cycle_start" else 1.0 + self.n

    @property
    def needs_validation(self) -> bool:
        return self.beta_mode in ("adaptive", "auto") or self.guard_margin is not None

    def check(self, prefix: str) -> None:
        if self.name != "rl_extra":
            return
        if self.beta_mode == "fixed" and self.beta is None and self.strategy != "lookahead":
            raise ConfigError(f"{_join(prefix, 'beta')}: expected a number when schedule.beta_mode=fixed, got null")
        if self.strategy == "lookahead":
            if self.m != 1:
                raise ConfigError(
                    f"{_join(prefix, 'm')}: expected 1 for strategy=lookahead (every SFPO step ends in its "
                    f"reposition), got {self.m}"
                )
            if self.beta is not None:
                raise ConfigError(
                    f"{_join(prefix, 'beta')}: expected null for strategy=lookahead (its coefficient is "
                    f"lookahead_alpha), got {self.beta}"
                )
            if self.velocity != "two_point" or self.anchor != "cycle_start":
                raise ConfigError(
                    f"{_join(prefix, 'strategy')}: lookahead repositions on the chord from the slow weights; expected "
                    f"velocity=two_point and anchor=cycle_start, got {self.velocity} and {self.anchor}"
                )
        if self.velocity == "least_squares" and self.anchor != "cycle_start":
            raise ConfigError(
                f"{_join(prefix, 'velocity')}: least_squares fits a line through the cycle; "
                "needs schedule.anchor=cycle_start"
            )
        if self.velocity == "least_squares" and self.anchor_device is not None:
            raise ConfigError(
                f"{_join(prefix, 'anchor_device')}: least_squares keeps its sums beside the shard; expected null"
            )
        if not self.candidates or not all(c > 0 for c in self.candidates):
            raise ConfigError(
                f"{_join(prefix, 'candidates')}: expected a non-empty list of positive fractions, "
                f"got {self.candidates!r}"
            )
        from linearity.selection import DEFAULT_EXCLUDE, TensorSelector

        try:
            TensorSelector(tuple(self.include), tuple(DEFAULT_EXCLUDE if self.exclude is None else self.exclude))
        except ValueError as exc:
            raise ConfigError(f"{prefix or 'schedule'}: {exc}") from None


# -------------------------------------------------------------------------------------------- rollout, learner


@dataclass
class RolloutConfig:
    """vLLM rollout actors (one engine each). Everything a vLLM engine is built from, bar the model and the seed."""

    num_actors: int = integer(1, ge=1)  # engines; prompts are split across them
    num_cpus: float = number(1, ge=0)  # Ray CPUs per actor
    num_gpus: float = number(0, ge=0)  # GPUs per actor (1 on a GPU cluster; tensor_parallel_size with TP)
    dtype: str = choice("float32", ("float32", "bfloat16", "float16", "auto"))  # bfloat16 for real models
    max_model_len: int = integer(64, ge=2)  # prompt + response tokens
    # KV cache size; null = on CPU room for max_num_seqs sequences of max_model_len tokens (from the model's shape:
    # a smaller cache makes the engine run the batch in waves: the job warns at start), on GPU as 0; 0 = vLLM sizes it
    # by gpu_memory_utilization
    kv_cache_mb: int | None = integer(None, ge=0)
    gpu_memory_utilization: float = number(0.5, gt=0, le=1)  # GPU share vLLM may take when kv_cache_mb = 0
    max_num_seqs: int = integer(256, ge=1)  # sequences per engine step
    # tokens per engine step; null = vLLM's default (on CPU at least max_model_len and max_num_seqs). CPU engines
    # prefill whole prompts (actors/rollout.py says why), so there it must hold max_model_len tokens
    max_num_batched_tokens: int | None = integer(None, ge=1)
    enforce_eager: bool = True  # no CUDA graphs / torch.compile (true on CPU: compiling gains nothing on tiny models)
    tensor_parallel_size: int = integer(1, ge=1)  # GPUs one engine spans (tensor parallelism)
    temperature: float = number(1.0, gt=0)  # training samples and Avg@k (the loss's log-probs use the same)
    top_p: float = number(1.0, gt=0, le=1)  # nucleus sampling for training samples
    max_tokens: int = integer(8, ge=1)  # response length cap
    # responses shorter than this cannot end (vLLM masks EOS until then; HF's min_new_tokens). For benchmarks at
    # equal work (bench/vs_trl.py: every response max_tokens long on both sides): the learner does not mask EOS, so
    # the recorded behaviour log-probs of a masked step differ from the learner's
    min_tokens: int = integer(0, ge=0)
    # OMP_NUM_THREADS for the engine on CPU: the engine generates while the learners wait (on-policy), so it gets
    # the cores. Measured on 2 cores (bench/engine_threads.py, 15M model): 2 threads 1.39x the tokens/s of 1, and
    # the weight sync's re-pack of the linear layers runs on them too. Actors' OpenMP threads wait passively
    # (orchestrator/cluster.py): with libgomp's spinning default a descheduled thread stalls its team
    omp_threads: int = integer(2, ge=1)
    bucket_mb: float = number(64, gt=0)  # weight sync bucket size; buckets end at layer edges
    # How the learners' weights reach the engines at every sync (actors/weight_sync.py). object_store: learner rank 0
    # returns its buckets, Ray's object store carries them, each engine reads them through its own call.
    # collective: learner rank 0 broadcasts the buckets over a process group of its own with every engine's workers
    # (gloo on CPU, NCCL on GPU), double-buffered; set up when the actors start and again after any restart.
    weight_sync: str = choice("object_store", ("object_store", "collective"))
    weight_sync_timeout_s: float = number(600, gt=0)  # collective: a sync or group set-up waiting longer fails

    def check(self, prefix: str) -> None:
        if self.min_tokens > self.max_tokens:
            raise ConfigError(
                f"{_join(prefix, 'min_tokens')}: expected at most rollout.max_tokens ({self.max_tokens}), "
                f"got {self.min_tokens}"
            )
        budget = self.max_num_batched_tokens
        if budget is not None and budget < self.max_num_seqs:
            raise ConfigError(
                f"{_join(prefix, 'max_num_batched_tokens')}: expected at least {_join(prefix, 'max_num_seqs')} "
                f"({self.max_num_seqs}, a token for each sequence of an engine step), got {budget}"
            )
        if budget is not None and not self.num_gpus and budget < self.max_model_len:
            raise ConfigError(
                f"{_join(prefix, 'max_num_batched_tokens')}: expected at least {_join(prefix, 'max_model_len')} "
                f"({self.max_model_len}) on CPU (num_gpus 0), where a prompt is prefilled in one engine step, "
                f"got {budget}"
            )


@dataclass
class LearnerConfig:
    """The DeepSpeed ZeRO learner group: world_size ranks, one Ray actor each."""

    world_size: int = integer(1, ge=1)  # ranks (data parallel)
    zero_stage: int = choice(2, (1, 2, 3))
    dtype: str = choice("fp32", ("fp32", "bf16"))  # bf16 keeps fp32 master weights (what RL-Extra projects)
    lr: float = number(3e-5, gt=0)  # AdamW learning rate
    betas: list[float] = listed(lambda: [0.9, 0.999])  # AdamW betas
    weight_decay: float = number(0.0, ge=0)
    warmup_steps: int = integer(0, ge=0)  # linear LR warm-up in RL steps (the schedule advances once per batch)
    grad_clip: float = number(1.0, ge=0)  # global gradient norm clip
    micro_batch_size: int = integer(64, ge=1)  # samples per forward/backward; gradients accumulate to the rank's share
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (memory for time; real models)
    num_cpus: float = number(1, ge=0)  # Ray CPUs per rank
    num_gpus: float = number(0, ge=0)  # GPUs per rank (1 on a GPU cluster)
    num_threads: int = integer(2, ge=0)  # torch threads per rank on CPU (0 = torch default)
    backend: str = choice("auto", ("auto", "gloo", "nccl"))  # auto: nccl on GPU, gloo on CPU

    def check(self, prefix: str) -> None:
        if len(self.betas) != 2 or not all(0 <= float(b) < 1 for b in self.betas):
            raise ConfigError(f"{_join(prefix, 'betas')}: expected two numbers in [0, 1), got {list(self.betas)!r}")


# ------------------------------------------------------------------------------------------ tracking, cluster


@dataclass
class TrackingConfig:
    """MLflow tracking. MLFLOW_TRACKING_URI, when set, wins over tracking_uri."""

    enabled: bool = True
    tracking_uri: str = "sqlite:///mlflow.db"  # view with: mlflow ui --backend-store-uri sqlite:///mlflow.db
    experiment: str = "rlextra"  # experiment name
    run_name: str | None = None  # null = "<algo>-<schedule>[-<strategy>][-<beta_mode>]-<data>-<timestamp>"


@dataclass
class ClusterConfig:
    """Where the actors run: an in-process Ray (`local`) or an existing cluster (`existing`, e.g. `ray job submit`).

    Placement: one placement group holds every rollout and learner bundle unless `rollout_strategy` or
    `learner_strategy` is set, which gives each group its own (the other then uses `placement_strategy`)."""

    mode: str = choice("local", ("local", "existing"))
    address: str | None = None  # existing: the GCS address (host:6379, ray://host:10001 or auto)
    num_cpus: int | None = integer(8, ge=1)  # local: logical CPUs Ray may hand out (> cores is fine); null = all
    log_to_driver: bool = False  # stream actor logs to the console
    placement_strategy: str = choice("PACK", PLACEMENT_STRATEGIES)  # for the shared placement group
    rollout_strategy: str | None = choice(None, PLACEMENT_STRATEGIES)  # a placement group of the rollouts' own
    learner_strategy: str | None = choice(None, PLACEMENT_STRATEGIES)  # e.g. STRICT_SPREAD: one rank per node
    # custom Ray resources added to every rollout / learner bundle, e.g. {rollout_node: 1}; null = none.
    # (Any, checked by check_resources: OmegaConf cannot merge a mapping into an Optional[Dict] that is null.)
    rollout_resources: Any = None
    learner_resources: Any = None
    placement_timeout_s: float = number(300, gt=0)  # give up (releasing what was reserved) after this long
    max_rollout_restarts: int = integer(3, ge=0)  # dead rollout actors are restarted and re-synced at most this often

    def check(self, prefix: str) -> None:
        for group in ("rollout", "learner"):
            check_resources(getattr(self, f"{group}_resources"), _join(prefix, f"{group}_resources"))
        if self.mode != "existing":
            return
        address = self.address
        path = _join(prefix, "address")
        if not isinstance(address, str) or not address.strip():
            raise ConfigError(f"{path}: expected 'auto', host:port or ray://host:port, got {address!r}")
        if address.startswith(("http://", "https://")):
            raise ConfigError(
                f"{path}: expected the cluster's GCS address (host:6379, 'auto' or ray://host:10001), got the "
                f"dashboard URL {address!r}; to use it, submit the job: "
                f"ray job submit --address {address} -- python -m orchestrator.train ..."
            )


def check_resources(value: dict | None, path: str) -> dict[str, float]:
    """A group's extra per-bundle resources as {name: amount}; None means none."""
    if value is None:
        return {}
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping of custom resource name to amount, got {value!r}")
    for name, amount in value.items():
        if name in BUILTIN_RESOURCES:
            raise ConfigError(
                f"{path}: {name!r} is set by rollout/learner num_cpus and num_gpus; expected custom resources only"
            )
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise ConfigError(f"{path}: expected a number >= 0 for {name!r}, got {amount!r}")
    return {str(k): float(v) for k, v in value.items()}


# ------------------------------------------------------------------------------------------------------ job


@dataclass
class TrainerConfig:
    """The training loop: steps, batch, evaluation, checkpoints, resume."""

    total_steps: int = integer(150, ge=0)  # real RL steps (each = one rollout batch and its optimizer step(s))
    prompts_per_step: int = integer(32, ge=1)  # prompts per RL step
    samples_per_prompt: int = integer(8, ge=1)  # responses per prompt (the GRPO group size)
    # 0: strictly on-policy (generate, then learn). 1: the engines generate batch t+1 on the weights of step t-1
    # while the learners train on batch t (one step stale; the loss's old_logp is the behaviour log-prob);
    # the pipeline drains before an RL-Extra projection
    off_policy_steps: int = integer(0, ge=0, le=1)
    # optimizer steps per rollout batch, each a full pass over it (TRL's num_iterations μ; verl's ppo_epochs with one
    # mini-batch): every pass's clipped ratio is against the behaviour log-probs, the LR schedule and RL-Extra's
    # cycles advance once per RL step. A well-tuned GRPO tunes it beside the lr (bench/step_savings.py
    # --grpo-updates). lookahead takes 1: its lookahead_steps are its passes
    updates_per_batch: int = integer(1, ge=1)
    eval_every: int = integer(20, ge=0)  # evaluate the held-out split every N steps (and before/after); 0 = only those
    eval_prompts: int = integer(500, ge=1)  # at most this many eval prompts
    eval_samples: int = integer(4, ge=1)  # k for Avg@k / Pass@k (sampled at rollout.temperature); greedy too
    checkpoint_every: int = integer(0, ge=0)  # save a checkpoint every N steps (0 = only at the end)
    save_final: bool = True  # save the final checkpoint (HF weights + DeepSpeed optimizer state)
    keep_checkpoints: int = integer(2, ge=0)  # keep the newest N step checkpoints (0 = keep all)
    max_learner_restarts: int = integer(2, ge=0)  # a dead learner rank restarts the group from the newest checkpoint
    # auto: continue from the newest complete checkpoint in output_dir/checkpoints (same MLflow run) | never
    resume: str = choice("auto", ("auto", "never"))
    output_dir: str | None = None  # where checkpoints and summary.json go; null = Hydra's run directory
    progress: bool = True  # a progress bar with reward and accuracy


@dataclass
class AnalysisConfig:
    """Linearity analysis of the job's own checkpoints at the end (what `python -m orchestrator.analyze` does)."""

    enabled: bool = False  # needs trainer.checkpoint_every > 0 and keep_checkpoints 0 (all) or >= 3
    weight_fraction: float = number(0.001, gt=0, le=1)  # share of each tensor's elements sampled (>= 50 per tensor)
    num_probes: int = integer(64, ge=1)  # eval prompts teacher-forced through every checkpoint (token log-prob R²)
    samples_per_probe: int = integer(2, ge=1)  # responses per probe, sampled once by the first checkpoint
    plots: bool = True  # PNGs beside linearity.json (false: JSON only)


@dataclass
class RewardConfig:
    """The verifier worker pool (scoring runs in parallel worker processes, never in the driver)."""

    num_workers: int = integer(2, ge=1)  # verifier worker processes
    # per-sample limit; a sample past it scores 0 and its worker is replaced.
    # code verifier: keep >= tests per problem x (sandbox wall_s + 2), e.g. 24 for 4 tests
    timeout_s: float = number(10.0, gt=0)


@dataclass
class JobConfig:
    """`python -m orchestrator.train`: the whole job."""

    seed: int = integer(0, ge=0)  # seeds data order, sampling and the learner; same seed, same result on CPU
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    @property
    def batch_size(self) -> int:
        """Samples per RL step."""
        return self.trainer.prompts_per_step * self.trainer.samples_per_prompt

    def check(self, prefix: str = "") -> None:
        tr, m, d, r, lr = self.trainer, self.model, self.data, self.rollout, self.learner
        if self.analysis.enabled:
            if not tr.checkpoint_every:
                raise ConfigError(
                    "analysis.enabled: needs checkpoints to analyse; expected trainer.checkpoint_every > 0"
                )
            if tr.keep_checkpoints != 0 and tr.keep_checkpoints < 3:
                raise ConfigError(
                    "analysis.enabled: needs at least 3 kept checkpoints; expected trainer.keep_checkpoints 0 or >= 3"
                )
            if not tr.save_final:
                raise ConfigError(
                    "analysis.enabled: the final checkpoint ends the series; expected trainer.save_final=true"
                )
        if d.source == "toy" and m.source != "toy":
            raise ConfigError("data.source: expected files or hub with a real model (model.source=path), got toy")
        if m.source == "toy" and r.max_model_len > m.tiny.max_positions:
            raise ConfigError(
                f"rollout.max_model_len: expected <= model.tiny.max_positions ({m.tiny.max_positions}), "
                f"got {r.max_model_len}"
            )
        if d.max_prompt_tokens + r.max_tokens > r.max_model_len:
            raise ConfigError(
                f"rollout.max_model_len: expected >= data.max_prompt_tokens + rollout.max_tokens "
                f"({d.max_prompt_tokens + r.max_tokens}), got {r.max_model_len}"
            )
        if r.weight_sync == "collective" and bool(r.num_gpus) != bool(lr.num_gpus):
            raise ConfigError(
                "rollout.weight_sync: collective needs the learners and the engines on the same kind of device "
                f"(NCCL on GPUs, gloo on CPUs), got rollout.num_gpus={r.num_gpus}, learner.num_gpus={lr.num_gpus}"
            )
        if tr.prompts_per_step % r.num_actors:
            raise ConfigError(
                f"trainer.prompts_per_step: expected a multiple of rollout.num_actors ({r.num_actors}), "
                f"got {tr.prompts_per_step}"
            )
        s = self.schedule
        if tr.off_policy_steps and s.name == "rl_extra" and s.strategy == "lookahead":
            raise ConfigError(
                "trainer.off_policy_steps: expected 0 with schedule.strategy=lookahead (the default schedule; its "
                "reposition and slow step work on the batch of their own step's weights; schedule=rl_extra or "
                f"schedule=rl take a batch in flight), got {tr.off_policy_steps}"
            )
        if tr.updates_per_batch > 1 and s.name == "rl_extra" and s.strategy == "lookahead":
            raise ConfigError(
                "trainer.updates_per_batch: expected 1 with schedule.strategy=lookahead (the default schedule: "
                "schedule.lookahead_steps sets its optimizer steps per rollout batch; schedule=rl or schedule=rl_extra "
                f"take several), got {tr.updates_per_batch}"
            )
        validating = s.name == "rl_extra" and s.needs_validation
        if validating and r.top_p != 1.0:
            raise ConfigError(
                f"rollout.top_p: expected 1.0 when schedule.beta_mode={s.beta_mode} or guard_margin validates "
                f"projections (its importance weights need the untruncated sampler), got {r.top_p}"
            )
        if validating and s.validation_prompts * s.validation_samples < lr.world_size:
            raise ConfigError(
                f"schedule.validation_prompts: expected validation_prompts * validation_samples >= learner.world_size "
                f"({lr.world_size}: every rank scores a share), got {s.validation_prompts} * {s.validation_samples}"
            )
        if self.batch_size % (lr.world_size * lr.micro_batch_size):
            raise ConfigError(
                f"learner.micro_batch_size: expected prompts_per_step * samples_per_prompt ({self.batch_size}) to be "
                f"divisible by world_size * micro_batch_size ({lr.world_size} * {lr.micro_batch_size})"
            )


# ------------------------------------------------------------------------------------------------ evaluation


@dataclass
class LogitsExtrapolationConfig:
    """Sample from l_t0 + α (l_t1 − l_t0) with two checkpoints in lockstep (transformers, in the driver)."""

    enabled: bool = False  # also enabled by the CLI flag --logits-extrapolation
    t0_path: str | None = None  # the earlier checkpoint
    t1_path: str | None = None  # the later checkpoint (its tokenizer is used)
    alpha: float | None = number(None)  # explicit α (1 = t1, > 1 extrapolates); or give `steps`
    steps: list[float] | None = None  # [t0, t1, target]: α = (target − t0) / (t1 − t0)
    dtype: str = choice("float32", ("float32", "bfloat16", "float16"))  # logits are mixed in fp32 either way
    device: str = choice("auto", ("auto", "cpu", "cuda"))  # auto: cuda when available
    max_batch_rows: int = integer(512, ge=1)  # prompts x k decoded together (bounds the two KV caches' memory)

    def check(self, prefix: str) -> None:
        if not self.enabled:
            return
        for key in ("t0_path", "t1_path"):
            if getattr(self, key) is None:
                raise ConfigError(
                    f"{_join(prefix, key)}: expected a checkpoint path when {prefix}.enabled is true, got None"
                )
        if (self.alpha is None) == (self.steps is None):
            steps = None if self.steps is None else list(self.steps)
            raise ConfigError(
                f"{_join(prefix, 'alpha')}: expected exactly one of alpha or steps=[t0, t1, target], "
                f"got alpha={self.alpha!r}, steps={steps!r}"
            )
        if self.alpha is not None and not math.isfinite(self.alpha):
            raise ConfigError(f"{_join(prefix, 'alpha')}: expected a finite number, got {self.alpha!r}")
        if self.steps is not None and (len(self.steps) != 3 or self.steps[0] == self.steps[1]):
            raise ConfigError(
                f"{_join(prefix, 'steps')}: expected three numbers [t0, t1, target] with t1 != t0, "
                f"got {list(self.steps)!r}"
            )


@dataclass
class EvalConfig:
    """`python -m orchestrator.evaluate`'s own settings (the rest reuses the job's groups)."""

    # HF checkpoint dirs (or hub ids); null = the model config's model. A step is read from rlextra_state.json /
    # an rl_step_<N> folder name when present.
    checkpoints: list[str] | None = None
    # data-group names (toy_mul, files, ...) or dicts {group: <name>, name: <label>, <data fields to override>};
    # a dict without `group` overrides the data config. null = the data config
    datasets: list[Any] | None = None
    k: int = integer(8, ge=1)  # samples per prompt; Avg@k and the unbiased Pass@k are computed from them
    temperature: float = number(0.6, ge=0)  # the paper's evaluation setting
    top_p: float = number(0.95, gt=0, le=1)
    max_tokens: int | None = integer(None, ge=1)  # response cap; null = rollout.max_tokens
    max_prompts: int | None = integer(None, ge=1)  # at most this many prompts per dataset (the first); null = all
    output: str | None = None  # JSON with every result; null = <hydra run dir>/eval.json
    save_samples: bool = False  # also write every response with its score to <output dir>/samples/*.jsonl
    progress: bool = True  # progress bar over checkpoints x datasets
    run_name: str | None = None  # MLflow run name; null = "eval-<timestamp>"
    logits_extrapolation: LogitsExtrapolationConfig = field(default_factory=LogitsExtrapolationConfig)

    def check(self, prefix: str) -> None:
        if self.checkpoints is not None and len(self.checkpoints) == 0:
            raise ConfigError(
                f"{_join(prefix, 'checkpoints')}: expected a non-empty list of checkpoint paths or null, got []"
            )
        if self.datasets is not None and len(self.datasets) == 0:
            raise ConfigError(
                f"{_join(prefix, 'datasets')}: expected a non-empty list of data-group names or dicts, or null, got []"
            )
        lx = self.logits_extrapolation
        if lx.enabled and lx.max_batch_rows < self.k:
            raise ConfigError(
                f"{_join(prefix, 'logits_extrapolation.max_batch_rows')}: expected an integer >= {self.k}, "
                f"got {lx.max_batch_rows!r}"
            )


@dataclass
class EvaluateConfig:
    """`python -m orchestrator.evaluate`: checkpoints x datasets through the vLLM rollout actors."""

    seed: int = integer(0, ge=0)  # seeds sampling (vLLM per-request seed, the logits-extrapolation generator), toy data
    model: ModelConfig = field(default_factory=ModelConfig)  # the default checkpoint when eval.checkpoints is null
    data: DataConfig = field(default_factory=DataConfig)  # the default dataset when eval.datasets is null
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # engine settings; max_tokens is the default cap
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def max_tokens(self) -> int:
        """The response cap of evaluation samples."""
        return self.eval.max_tokens if self.eval.max_tokens is not None else self.rollout.max_tokens


# ------------------------------------------------------------------------------------- composed → typed


def to_typed(cfg: DictConfig | Any, schema: type) -> Any:
    """The typed object of a composed (or hand-made) config; an instance of `schema` is returned as it is.

    The config is merged over the schema, so a key the schema does not declare (e.g. added with Hydra's `+key=`)
    or a value of the wrong type is a ConfigError naming the field."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    if isinstance(cfg, schema):
        return cfg
    _reject_unknown_keys(cfg, schema, schema, "")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))
    except MissingMandatoryValue as exc:
        raise ConfigError(f"{exc.full_key}: a value is required (it is ??? in the config)") from None
    except (ConfigAttributeError, ConfigKeyError) as exc:
        raise ConfigError(unknown_field_message(exc.full_key, schema)) from None
    except ValidationError as exc:
        raise ConfigError(f"{exc.full_key}: {str(exc.msg).strip().splitlines()[0]}") from None


def _reject_unknown_keys(node: Any, schema: type, root: type, prefix: str) -> None:
    """Hydra's `+key=value` adds keys even to a typed config: refuse what the schema does not declare."""
    if not isinstance(node, (dict, DictConfig)):
        return
    hints = typing.get_type_hints(schema)
    for key in node.keys():
        path = _join(prefix, str(key))
        if key not in hints:
            raise ConfigError(unknown_field_message(path, root))
        if dataclasses.is_dataclass(hints[key]):
            _reject_unknown_keys(node[key], hints[key], root, path)


def unknown_field_message(full_key: str, schema: type) -> str:
    """`learner.zero_stag` → `learner.zero_stag: not a field of learner (its fields: world_size, ...)`."""
    parent, _, _ = full_key.rpartition(".")
    node = schema
    for part in parent.split(".") if parent else []:
        node = typing.get_type_hints(node).get(part) if dataclasses.is_dataclass(node) else None
    where = parent or "the config"
    if dataclasses.is_dataclass(node):
        return f"{full_key}: not a field of {where} (its fields: {', '.join(f.name for f in dataclasses.fields(node))})"
    return f"{full_key}: not a field of {where}"


def validate(cfg: DictConfig | JobConfig) -> JobConfig:
    """The job's typed config; raises ConfigError (one line naming the field) on the first bad value."""
    job = to_typed(cfg, JobConfig)
    check_fields(job, "")
    return job


def from_yaml_preset(schema: type, preset: DictConfig | dict) -> Any:
    """A group's dataclass with a preset's overrides applied (e.g. a data group loaded from conf/data/*.yaml)."""
    return to_typed(OmegaConf.create(preset) if isinstance(preset, dict) else preset, schema)


def to_container(cfg: Any) -> dict:
    """A typed config (or a composed one) as plain dicts and lists, e.g. to log it."""
    node = OmegaConf.structured(cfg) if dataclasses.is_dataclass(cfg) else cfg
    return OmegaConf.to_container(node, resolve=True)


def to_yaml(cfg: Any) -> str:
    node = OmegaConf.structured(cfg) if dataclasses.is_dataclass(cfg) else cfg
    return OmegaConf.to_yaml(node, resolve=True)


CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose `conf/<config_name>.yaml` with command-line style overrides, as the entry points do (for tests,
    benchmarks and tools that drive a job from Python)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


_STORE = ConfigStore.instance()
_STORE.store(name="job_schema", node=JobConfig)
_STORE.store(name="evaluate_schema", node=EvaluateConfig)
del _STORE
