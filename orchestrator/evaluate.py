"""Evaluate checkpoints: Avg@k and the unbiased Pass@k per dataset, through the vLLM rollout actors.

    python -m orchestrator.evaluate                                     # the toy model on the toy task, k = 8
    python -m orchestrator.evaluate 'eval.checkpoints=[ckpt/rl_step_0/hf,ckpt/rl_step_300/hf]' \\
        'eval.datasets=[toy_add,toy_mul]' eval.k=16
    python -m orchestrator.evaluate --logits-extrapolation \\
        eval.logits_extrapolation.t0_path=ckpt/rl_step_0/hf eval.logits_extrapolation.t1_path=ckpt/rl_step_300/hf \\
        'eval.logits_extrapolation.steps=[0,300,900]'

For every checkpoint × dataset: `eval.k` samples per prompt (temperature / top-p from `eval`, the paper's 0.6 /
0.95 by default; max tokens from `rollout.max_tokens` unless `eval.max_tokens`), scored by the dataset's
verifier in the scoring pool's worker processes. Reported per dataset: Avg@k (mean score over all samples),
Pass@k and Pass@j for j = 1, 2, 4, … < k (Chen et al.'s unbiased estimator from the k samples; a sample counts
as correct when its score is 1), mean response length and the share cut by the length cap. Results go to one
JSON file, one MLflow run (`eval/<dataset>/<metric>`, step = the checkpoint's RL step when every checkpoint
has a distinct one, else its index; the config as params, the JSON as artifact) and a table on stdout.

Choices:
- **One engine for many checkpoints.** The rollout actors start once; each next checkpoint's safetensors are
  streamed into the running engines through the same worker-extension path the training sync uses
  (`RolloutActor.update_weights`, buckets ending at layer edges, one bucket in the driver at a time). Measured
  on the tiny model: a reload takes ~10 ms against ~4-5 s for a fresh actor. Checkpoints whose config or
  tokenizer differ from the loaded one (or hub ids, or .bin weights) get a fresh engine instead.
- **Logits extrapolation** (`--logits-extrapolation`, or `eval.logits_extrapolation.enabled=true`) samples from
  `l_t0 + α (l_t1 − l_t0)` with `linearity.logits_extrapolation` — two transformers models in lockstep, batched
  across prompts and samples — in the driver process (on a GPU cluster give the driver a GPU, e.g.
  `ray job submit --entrypoint-num-gpus 1`), and is scored by the same code. α from `steps: [t0, t1, target]` or
  explicit. vLLM is not involved (nor started, unless checkpoints are listed too), so the two can be compared:
  `eval.checkpoints=[t0, t1]` with the flag evaluates both checkpoints and their extrapolation in one run.
- The literal `--logits-extrapolation` flag is rewritten to its Hydra override before Hydra parses argv.
- A bad value fails before anything starts, with one line naming the field (exit 2), e.g.
  `error: eval.checkpoints[1]: expected a checkpoint directory with config.json (or a hub id), got '/x'`; so does a
  bad input, naming the file: every checkpoint's config, weights and tokenizer (and, for a training checkpoint's
  `hf/` export, the checkpoint itself, as resume checks it), every dataset row (`orchestrator/data.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from actors.groups import ActorGroups
from orchestrator.checkpoints import (
    SafetensorsError,
    checkpoint_problem,
    checkpoint_step,
    read_safetensors_checkpoint,
    step_of_tag,
)
from orchestrator.cli import hydra_cli
from orchestrator.config import ConfigError, DataConfig, EvaluateConfig, InputError, check_fields, to_typed
from orchestrator.console import console
from orchestrator.metrics import sample_metrics
from orchestrator.models import check_model_dir, is_local, load_tokenizer
from orchestrator.train import run_to_completion

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
ARGV_FLAGS = {"--logits-extrapolation": "eval.logits_extrapolation.enabled=true"}
# config.json keys that do not change what a checkpoint's engine looks like
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype"}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "added_tokens.json",
)


# ------------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class CheckpointSpec:
    """One model to evaluate: a local HF directory or a hub id, and its RL step when known."""

    path: str
    step: int | None = None


@dataclass
class DatasetSpec:
    """One eval dataset: its label, its data config and the field that named it (for errors)."""

    name: str
    data: DataConfig
    field: str  # "data" or "eval.datasets[i]"


@dataclass
class EvalResult:
    """Metrics of one target (checkpoint or logits extrapolation) on one dataset."""

    target: str
    kind: str  # checkpoint | logits_extrapolation
    step: int
    dataset: str
    verifier: str
    num_prompts: int
    k: int
    avg_at_k: float
    pass_at_k: float
    pass_at: dict[str, float]
    response_length: float
    truncated_frac: float
    gen_time_s: float
    tokens_per_s: float
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- argv


def rewrite_argv(argv: list[str]) -> list[str]:
    """Map the literal CLI flags (`--logits-extrapolation`) to their Hydra overrides; leave the rest alone."""
    return [ARGV_FLAGS.get(a, a) for a in argv]


# ------------------------------------------------------------------------------------------ validation


def _check_checkpoint(path, where: str) -> str:
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}: expected a checkpoint path or hub id, got {path!r}")
    local = os.path.expanduser(path)
    if is_local(path) and not (Path(local) / "config.json").is_file():
        raise ConfigError(f"{where}: expected a checkpoint directory with config.json (or a hub id), got {path!r}")
    return local if is_local(path) else path


def validate_eval(cfg: DictConfig | EvaluateConfig) -> EvaluateConfig:
    """The typed evaluation config; raises ConfigError (one line naming the field) on the first bad value.
    Checks that the listed checkpoints exist; loads nothing."""
    ev = to_typed(cfg, EvaluateConfig)
    check_fields(ev, "")
    e, lx = ev.eval, ev.eval.logits_extrapolation
    for i, path in enumerate(e.checkpoints or []):
        _check_checkpoint(path, f"eval.checkpoints[{i}]")
    if lx.enabled:
        for key in ("t0_path", "t1_path"):
            _check_checkpoint(getattr(lx, key), f"eval.logits_extrapolation.{key}")
    uses_vllm = e.checkpoints is not None or not lx.enabled
    if uses_vllm and e.checkpoints is None:  # the model config's model is the one checkpoint
        if ev.model.source == "path":
            _check_checkpoint(ev.model.path, "model.path")
        elif ev.data.source != "toy":
            raise ConfigError(
                f"eval.checkpoints: expected a list of checkpoints with data.source={ev.data.source} "
                "(the default toy model is built from a toy data config), got null"
            )
    for ds in resolve_datasets(ev):
        prompt_tokens = ds.data.max_prompt_tokens
        if uses_vllm and prompt_tokens + ev.max_tokens > ev.rollout.max_model_len:
            raise ConfigError(
                f"{ds.field}.max_prompt_tokens: expected max_prompt_tokens + max tokens ({prompt_tokens} + "
                f"{ev.max_tokens}) <= rollout.max_model_len ({ev.rollout.max_model_len})"
            )
    return ev


# ------------------------------------------------------------------------------------ datasets, models


def _load_group(name: str, where: str) -> DataConfig:
    """A data group preset (conf/data/<name>.yaml) over the DataConfig defaults."""
    path = CONF_DIR / "data" / f"{name}.yaml"
    if not isinstance(name, str) or not path.is_file():
        groups = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))
        raise ConfigError(f"{where}: expected a data group name (one of {groups}) or a dict, got {name!r}")
    node = OmegaConf.load(path)
    if path.read_text().lstrip().startswith("# @package _global_"):
        node = node.data  # a global group also sets other sections (model, rollout); only its data applies here
    return _typed_data(node, where)


def _typed_data(node, where: str) -> DataConfig:
    """DataConfig from overrides, checked, with errors naming `where` (e.g. eval.datasets[1].toy.digits)."""
    try:
        data = to_typed(OmegaConf.create(node) if isinstance(node, dict) else node, DataConfig)
    except ConfigError:
        raise
    except Exception as exc:  # an unknown key or a type clash
        raise ConfigError(f"{where}: {' '.join(str(exc).split())[:200]}") from None
    check_fields(data, where)
    return data


def _dataset_label(d: DataConfig) -> str:
    if d.source == "toy":
        return f"toy_{d.toy.op}{d.toy.digits}"
    if d.source == "files":
        files = d.eval_files
        return Path(str(files if isinstance(files, str) else files[0])).stem
    return str(d.hub_id).replace("/", "_")


def resolve_datasets(cfg: DictConfig | EvaluateConfig) -> list[DatasetSpec]:
    """`eval.datasets` entries (group names or dicts) → DatasetSpecs; null → the `data` config."""
    cfg = to_typed(cfg, EvaluateConfig)
    entries = cfg.eval.datasets
    if entries is None:
        return [DatasetSpec(_dataset_label(cfg.data), cfg.data, "data")]
    specs = []
    for i, entry in enumerate(entries):
        where = f"eval.datasets[{i}]"
        if isinstance(entry, dict):
            over = dict(entry)
            name, group = over.pop("name", None), over.pop("group", None)
            if group is not None:
                base = OmegaConf.structured(_load_group(group, f"{where}.group"))
            else:
                base = OmegaConf.structured(cfg.data)
            try:
                merged = OmegaConf.merge(base, over)
            except Exception as exc:  # an unknown key (struct mode) or a type clash
                raise ConfigError(f"{where}: {' '.join(str(exc).split())[:200]}") from None
            data = _typed_data(merged, where)
            label = name or group or _dataset_label(data)
        else:
            data, label = _load_group(entry, where), entry
        specs.append(DatasetSpec(str(label), data, where))
    names = [s.name for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"eval.datasets: expected distinct dataset names, got {dup!r} twice (give each a `name`)")
    return specs


def load_eval_rows(cfg: EvaluateConfig, ds: DatasetSpec, tokenizers: list) -> tuple[list[str], list[str], int]:
    """The dataset's held-out split, every row checked (the prompt lengths under each tokenizer in `tokenizers`):
    (prompt texts, reference answers) of the first `eval.max_prompts` good rows, and how many bad rows were skipped
    (`data.skip_bad_rows`; without it a bad row is an InputError)."""
    import datasets

    from orchestrator.data import PromptEncoder, check_split, read_split

    datasets.disable_progress_bars()
    d = ds.data
    split = read_split(d, "eval", cfg.model.cache_dir, cfg.seed, prefix=ds.field)
    for tok in tokenizers:
        split.check_prompt_lengths(PromptEncoder(tok, d.apply_chat_template, d.max_prompt_tokens))
    rows, skipped = check_split(split, d, None, log=console)
    n = len(rows) if cfg.eval.max_prompts is None else min(len(rows), cfg.eval.max_prompts)
    rows = rows.select(range(n))
    return list(rows["prompt"]), list(rows["answer"]), skipped


def check_local_model(path: str) -> None:
    """A local model folder checked before anything starts (config, weights), and for the HF export of a training
    checkpoint (`rl_step_<N>/hf`) the checkpoint itself, with the check resume uses."""
    if not is_local(path):
        return
    check_model_dir(path)
    parent = Path(path).parent
    if step_of_tag(parent.name) is not None:
        problem = checkpoint_problem(parent, world_size=None)
        if problem:
            raise InputError(problem)


def tokenizer_key(path: str) -> str:
    """What tells two models' tokenizers apart: a hub id, or the hash of a local folder's tokenizer files."""
    p = Path(path)
    if not p.is_dir():
        return path
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        if (p / name).is_file():
            h.update(name.encode() + (p / name).read_bytes())
    return h.hexdigest()


def engine_signature(path: str) -> str | None:
    """A hash of what a vLLM engine fixes at start (model config, tokenizer files); None when the weights can't
    be streamed into a running engine (hub id, no safetensors)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        return None
    try:
        read_safetensors_checkpoint(p)
    except SafetensorsError as exc:
        if exc.problem == "no_weights":
            return None
        raise
    config = {k: v for k, v in json.loads((p / "config.json").read_text()).items() if k not in _VOLATILE_CONFIG_KEYS}
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in _TOKENIZER_FILES:
        if (p / name).is_file():
            h.update(name.encode() + (p / name).read_bytes())
    return h.hexdigest()


def checkpoint_buckets(path: str, bucket_mb: float):
    """Yield the checkpoint's tensors as buckets [(name, tensor), ...] of about `bucket_mb`, ending only at
    decoder-layer edges (what the engine's layer-wise reload needs). Only one bucket is in memory at a time."""
    from safetensors import safe_open

    from actors.weight_sync import layer_key

    tensors = read_safetensors_checkpoint(path).tensors
    layers: dict[str, list[str]] = {}
    for name in sorted(tensors):
        layers.setdefault(layer_key(name), []).append(name)
    limit, plan, current, size = bucket_mb * 2**20, [], [], 0
    for names in layers.values():
        current += names
        size += sum(tensors[n].nbytes for n in names)
        if size >= limit:
            plan.append(current)
            current, size = [], 0
    if current:
        plan.append(current)
    for names in plan:
        bucket = []
        for name in names:
            with safe_open(str(tensors[name].file), framework="pt") as h:
                bucket.append((name, h.get_tensor(name)))
        yield bucket


# ---------------------------------------------------------------------------------------------- engines


class RolloutEngines:
    """The vLLM rollout actors, holding one checkpoint at a time: started once, then reloaded in place when the
    next checkpoint has the same architecture and tokenizer, restarted otherwise."""

    def __init__(self, cfg: EvaluateConfig):
        self.cfg = cfg
        self.groups: ActorGroups | None = None
        self.signature: str | None = None

    def load(self, path: str) -> dict:
        """Make the engines hold `path`. Returns {"how": start | reload | restart, "load_s": seconds}."""
        start = time.perf_counter()
        sig = engine_signature(path)
        if self.groups is not None and sig is not None and sig == self.signature:
            self._reload(path)
            how = "reload"
        else:
            how = "start" if self.groups is None else "restart"
            self.shutdown()
            self.groups = self._start(path)
        self.signature = sig
        return {"how": how, "load_s": time.perf_counter() - start}

    def _start(self, path: str) -> ActorGroups:
        """Start the rollout actors on `path`, placed like the job's (orchestrator/cluster.py)."""
        from actors.rollout import RolloutSpec
        from orchestrator.cluster import start_actor_groups

        specs = [RolloutSpec(path, self.cfg.rollout, self.cfg.seed + i) for i in range(self.cfg.rollout.num_actors)]
        return start_actor_groups(self.cfg, None, specs)

    def _reload(self, path: str) -> None:
        import ray

        from actors.weight_sync import to_transport

        version = self.groups.weight_version + 1
        for bucket in checkpoint_buckets(path, self.cfg.rollout.bucket_mb):
            ref = ray.put([[(n, to_transport(t)) for n, t in bucket]])
            ray.get([r.update_weights.remote(ref, version) for r in self.groups.rollouts])
        self.groups.weight_version = version

    def generate(self, prompt_ids, sampling):
        return self.groups.generate(prompt_ids, sampling)

    def shutdown(self) -> None:
        if self.groups is not None:
            self.groups.shutdown()
            self.groups = None


# ------------------------------------------------------------------------------------------ evaluation


@dataclass
class Generations:
    """What one target produced on one dataset, prompt-major (k per prompt)."""

    response_ids: list[list[int]]
    texts: list[str]
    finished: list[bool]
    gen_time_s: float


class Evaluation:
    """Holds the evaluation's components; `run()` evaluates every target on every dataset. Separate from Hydra
    so tests can drive it."""

    def __init__(self, cfg: DictConfig | EvaluateConfig, output_dir: str):
        self.cfg: EvaluateConfig = validate_eval(cfg)  # nothing starts on a config that cannot work
        self.output_dir = output_dir
        self.rows: dict[str, tuple[list[str], list[str]]] = {}
        self.results: list[EvalResult] = []
        self.loads: list[dict] = []
        # set up by setup()
        self.datasets: list[DatasetSpec] = []
        self.checkpoints: list[CheckpointSpec] = []
        self.scorer = None  # verifiers.pool.ScoringPool
        self.tracker = None  # orchestrator.tracking.Tracker
        self.engines: RolloutEngines | None = None
        self.ray_started = False

    def setup(self) -> None:
        from transformers.utils import logging as hf_logging

        from orchestrator.data import resolve_model
        from orchestrator.tracking import Tracker
        from verifiers.pool import ScoringPool

        cfg = self.cfg
        hf_logging.disable_progress_bar()
        self.datasets = resolve_datasets(cfg)
        paths = (
            list(cfg.eval.checkpoints)
            if cfg.eval.checkpoints is not None
            else ([] if cfg.eval.logits_extrapolation.enabled else [resolve_model(cfg, log=console)])
        )
        paths = [_check_checkpoint(p, "eval.checkpoints") for p in paths]
        self.checkpoints = [CheckpointSpec(p, checkpoint_step(p)) for p in paths]
        skipped = {}
        tokenizers = self.check_models()
        for ds in self.datasets:
            prompts, answers, skipped[f"data/skipped_rows_eval/{_metric_name(ds.name)}"] = load_eval_rows(
                cfg, ds, tokenizers
            )
            self.rows[ds.name] = (prompts, answers)
        self.scorer = ScoringPool(max_workers=cfg.reward.num_workers, timeout_s=cfg.reward.timeout_s)
        self.tracker = Tracker(cfg, run_name=cfg.eval.run_name or f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
        self.tracker.log_config(cfg)
        self.tracker.log_metrics(skipped, step=0)
        if self.tracker.enabled:
            self.tracker.client.set_tag(self.tracker.run_id, "rlextra.kind", "eval")
        if self.checkpoints:
            from orchestrator.cluster import init_ray

            self.ray_started = init_ray(cfg.cluster)
            self.engines = RolloutEngines(cfg)

    def check_models(self) -> list:
        """Every local model the evaluation loads, checked before anything starts; returns the tokenizers prompts
        will be encoded with (one per distinct tokenizer: the checkpoints', logits extrapolation's t1)."""
        lx = self.cfg.eval.logits_extrapolation
        paths = [c.path for c in self.checkpoints]
        if lx.enabled:
            check_local_model(_check_checkpoint(lx.t0_path, "eval.logits_extrapolation.t0_path"))
            paths.append(_check_checkpoint(lx.t1_path, "eval.logits_extrapolation.t1_path"))
        tokenizers = {}
        for path in paths:
            check_local_model(path)
            key = tokenizer_key(path)
            if key not in tokenizers:
                tokenizers[key] = load_tokenizer(path)
        return list(tokenizers.values())

    # ------------------------------------------------------------------------------------------ pieces

    def _steps(self) -> list[int]:
        steps = [c.step for c in self.checkpoints]
        if all(s is not None for s in steps) and len(set(steps)) == len(steps):
            return steps
        return list(range(len(self.checkpoints)))

    def _encode(self, tokenizer, ds: DatasetSpec):
        from orchestrator.data import PromptEncoder

        encode = PromptEncoder(tokenizer, bool(ds.data.apply_chat_template), int(ds.data.max_prompt_tokens))
        return [encode(p) for p in self.rows[ds.name][0]]  # every length was checked in setup()

    def _vllm_generate(self, prompt_ids: list[list[int]]) -> Generations:
        from orchestrator.messages import SamplingConfig

        e = self.cfg.eval
        sampling = SamplingConfig(
            n=int(e.k),
            temperature=float(e.temperature),
            top_p=float(e.top_p),
            max_tokens=self.cfg.max_tokens,
            seed=int(self.cfg.seed),
        )
        out = self.engines.generate(prompt_ids, sampling)
        return Generations(out.response_ids, out.response_text, out.finished, out.gen_time_s)

    def _score(self, target: str, kind: str, step: int, ds: DatasetSpec, gen: Generations, extra=None) -> EvalResult:
        k = int(self.cfg.eval.k)
        answers = self.rows[ds.name][1]
        refs = [answers[j // k] for j in range(len(gen.texts))]
        scores = self.scorer.score_batch(str(ds.data.verifier), gen.texts, refs)
        tokens = sum(len(r) for r in gen.response_ids)
        result = EvalResult(
            target=target,
            kind=kind,
            step=step,
            dataset=ds.name,
            verifier=str(ds.data.verifier),
            num_prompts=len(answers),
            k=k,
            **sample_metrics(scores, k),
            response_length=tokens / len(gen.response_ids),
            truncated_frac=1.0 - sum(gen.finished) / len(gen.finished),
            gen_time_s=gen.gen_time_s,
            tokens_per_s=tokens / max(gen.gen_time_s, 1e-9),
            extra=extra or {},
        )
        if self.cfg.eval.save_samples:
            self._save_samples(result, ds, gen, scores)
        prefix = "eval" if kind == "checkpoint" else "logits_extra"
        name = _metric_name(ds.name)
        metrics = {
            f"{prefix}/{name}/avg_at_k": result.avg_at_k,
            f"{prefix}/{name}/pass_at_k": result.pass_at_k,
            f"{prefix}/{name}/response_length": result.response_length,
            f"{prefix}/{name}/truncated_frac": result.truncated_frac,
            **{f"{prefix}/{name}/pass_at_{j}": v for j, v in result.pass_at.items() if int(j) != k},
        }
        self.tracker.log_metrics(metrics, step=step)
        self.results.append(result)
        return result

    def _save_samples(self, result: EvalResult, ds: DatasetSpec, gen: Generations, scores: list[float]) -> None:
        prompts, answers = self.rows[ds.name]
        k = result.k
        folder = Path(self.output_path()).parent / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        tag = (
            f"{len(self.results):03d}-{_metric_name(Path(result.target).name or result.target)}-{_metric_name(ds.name)}"
        )
        with open(folder / f"{tag.replace('/', '_')}.jsonl", "w") as f:
            for j, (text, score, done) in enumerate(zip(gen.texts, scores, gen.finished)):
                f.write(
                    json.dumps(
                        {
                            "target": result.target,
                            "dataset": ds.name,
                            "prompt_index": j // k,
                            "prompt": prompts[j // k],
                            "answer": answers[j // k],
                            "response": text,
                            "score": score,
                            "finished": done,
                        }
                    )
                    + "\n"
                )

    def output_path(self) -> str:
        return str(self.cfg.eval.output or os.path.join(self.output_dir, "eval.json"))

    # ----------------------------------------------------------------------------------------- targets

    def _evaluate_checkpoints(self, bar) -> None:
        for ckpt, step in zip(self.checkpoints, self._steps()):
            load = self.engines.load(ckpt.path)
            self.loads.append({"checkpoint": ckpt.path, **load})
            tok = load_tokenizer(ckpt.path)
            for ds in self.datasets:
                gen = self._vllm_generate(self._encode(tok, ds))
                r = self._score(ckpt.path, "checkpoint", step, ds, gen)
                _advance(bar, r)

    def _evaluate_logits_extrapolation(self, bar) -> None:
        from linearity.logits_extrapolation import LogitsExtrapolationSampler, SamplerConfig, alpha_from_steps
        from orchestrator.models import load_pair

        lx, e = self.cfg.eval.logits_extrapolation, self.cfg.eval
        steps = list(lx.steps) if lx.steps is not None else None
        alpha = float(lx.alpha) if lx.alpha is not None else alpha_from_steps(*steps)
        m0, m1, tok = load_pair(
            _check_checkpoint(lx.t0_path, "t0_path"),
            _check_checkpoint(lx.t1_path, "t1_path"),
            str(lx.dtype),
            str(lx.device),
        )
        eos = {tok.eos_token_id} | set(_as_list(m1.generation_config.eos_token_id))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        sampler = LogitsExtrapolationSampler(m0, m1, eos_ids=[x for x in eos if x is not None], pad_id=pad)
        cfg = SamplerConfig(
            alpha=alpha,
            n=int(e.k),
            temperature=float(e.temperature),
            top_p=float(e.top_p),
            max_tokens=self.cfg.max_tokens,
            seed=int(self.cfg.seed),
            max_batch_rows=int(lx.max_batch_rows),
        )
        target = f"logits-extrapolation(alpha={alpha:g})"
        step = int(steps[2]) if steps is not None else 0
        info = {
            "t0_path": lx.t0_path,
            "t1_path": lx.t1_path,
            "alpha": alpha,
            "steps": steps,
            "device": str(sampler.device),
            "dtype": str(lx.dtype),
        }
        self.tracker.log_metrics({"logits_extra/alpha": alpha}, step=step)
        for ds in self.datasets:
            out = sampler.generate(self._encode(tok, ds), cfg)
            texts = [tok.decode(r, skip_special_tokens=True) for r in out.response_ids]
            gen = Generations(out.response_ids, texts, out.finished, out.gen_time_s)
            _advance(bar, self._score(target, "logits_extrapolation", step, ds, gen, extra=info))

    # -------------------------------------------------------------------------------------------- loop

    def run(self) -> dict:
        from tqdm import tqdm

        start = time.perf_counter()
        lx_on = self.cfg.eval.logits_extrapolation.enabled
        total = (len(self.checkpoints) + int(lx_on)) * len(self.datasets)
        bar = tqdm(total=total, desc="eval", disable=not self.cfg.eval.progress, file=sys.stdout, dynamic_ncols=True)
        if self.checkpoints:
            self._evaluate_checkpoints(bar)
        if lx_on:
            self._evaluate_logits_extrapolation(bar)
        bar.close()
        summary = self._summary(time.perf_counter() - start)
        path = self.output_path()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
        self.tracker.log_artifact(path)
        print_results(self.results)
        console(f"results: {path}; MLflow run {self.tracker.run_id} at {self.tracker.uri}")
        return summary

    def _summary(self, wall: float) -> dict:
        e = self.cfg.eval
        return {
            "settings": {
                "k": int(e.k),
                "temperature": float(e.temperature),
                "top_p": float(e.top_p),
                "max_tokens": self.cfg.max_tokens,
                "seed": int(self.cfg.seed),
                "max_prompts": e.max_prompts,
            },
            "checkpoints": [asdict(c) for c in self.checkpoints],
            "datasets": [
                {"name": d.name, "verifier": str(d.data.verifier), "num_prompts": len(self.rows[d.name][0])}
                for d in self.datasets
            ],
            "results": [asdict(r) for r in self.results],
            "engine_loads": self.loads,
            "wall_time_s": wall,
            "mlflow_run_id": self.tracker.run_id,
            "mlflow_tracking_uri": self.tracker.uri,
        }

    def close(self, status: str = "FINISHED") -> None:
        import ray

        for closer in (
            lambda: self.engines.shutdown() if self.engines else None,
            lambda: self.scorer.close() if self.scorer else None,
            lambda: self.tracker.finish(status) if self.tracker else None,
            lambda: ray.shutdown() if self.ray_started else None,
        ):
            try:
                closer()
            except Exception as exc:  # keep closing the rest
                console(f"warning: shutdown step failed: {exc}")


def _advance(bar, r: EvalResult) -> None:
    bar.set_postfix(dataset=r.dataset, avg=f"{r.avg_at_k:.3f}", pass_k=f"{r.pass_at_k:.3f}")
    bar.update(1)


def _as_list(x) -> list:
    return [] if x is None else (list(x) if isinstance(x, (list, tuple)) else [x])


def _metric_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def print_results(results: list[EvalResult]) -> None:
    if not results:
        return
    k = results[0].k
    head = ("target", "step", "dataset", f"Avg@{k}", f"Pass@{k}", "len", "tok/s")
    rows = [
        (
            r.target if len(r.target) <= 48 else "…" + r.target[-47:],
            str(r.step),
            r.dataset,
            f"{r.avg_at_k:.3f}",
            f"{r.pass_at_k:.3f}",
            f"{r.response_length:.1f}",
            f"{r.tokens_per_s:.0f}",
        )
        for r in results
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print("\n" + line.format(*head))
    for row in rows:
        print(line.format(*row))
    print(flush=True)


def run_evaluation(cfg: DictConfig | EvaluateConfig, output_dir: str) -> dict:
    return run_to_completion(Evaluation(cfg, output_dir))


@hydra_cli("evaluate", EvaluateConfig)
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_evaluation(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    sys.argv = rewrite_argv(sys.argv)
    main()
