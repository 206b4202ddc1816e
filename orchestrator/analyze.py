"""Linearity analysis of a series of checkpoints: weights, token log-probs and activations against the RL step.

    python -m orchestrator.analyze --run-dir outputs/2026-01-01/12-00-00            # a training run's checkpoints
    python -m orchestrator.analyze --checkpoints ck/rl_step_0/hf ck/rl_step_50/hf ck/rl_step_100/hf \\
        --probes data/eval.jsonl --out linearity/                                   # any HF dirs (steps from names)

Writes ``linearity.json`` (distribution quantiles, share above 0.7, per-layer and per-module means, the token
groups of the paper's Fig. 9, activation R² per layer), PNGs (``overview.png`` first; see ``orchestrator/plots.py``)
and ``probes.jsonl`` (the probe prompts and responses, reusable with ``--probes``) into ``--out``
(default ``<run-dir>/linearity``), and logs them to the run's MLflow run as artifacts under ``linearity/``.

Choices:
- A run directory (``trainer.output_dir`` / the Hydra run dir) is read as every ``checkpoints/rl_step_N/hf``
  plus, as step 0, the model the run started from (``model_path`` in its ``summary.json``), unless ``--no-base``;
  keep them with ``trainer.checkpoint_every=N trainer.keep_checkpoints=0``.
- Probes: prompts from ``--probes`` (jsonl/json records with ``prompt`` and optionally ``response``, or a text
  file, one prompt a line) or, for a run directory with ``.hydra/config.yaml``, the run's held-out eval split.
  Responses not given are sampled once from the first checkpoint (seeded), then teacher-forced through every
  checkpoint, one checkpoint in memory at a time (transformers, ``--device``).
- The numbers come from ``linearity.analysis`` (pure numpy, streaming); this module finds and reads checkpoints,
  runs models, writes files and talks to MLflow.
- **Reading only the sampled weights.** Safetensors files are memory-mapped with numpy and indexed at the
  (sorted) sampled positions, so no tensor is ever materialised: the process never holds more than the samples
  (the page cache may hold file pages; they are not the process's memory). bf16 is decoded exactly from its
  16 bits. numpy rather than torch here so that ``tracemalloc`` sees every allocation (the memory test uses it).

The trainer calls :func:`analyze_run` on its own checkpoints at the end of a job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from linearity.analysis import (
    TOKEN_GROUPS,
    ActivationPlan,
    AnalysisConfig,
    AnalysisError,
    Probe,
    SeriesAccumulator,
    WeightResult,
    distribution_summary,
    heatmap_matrix,
    json_safe,
    probe_forward,
    sample_indices,
    token_groups,
    weight_result,
)
from orchestrator.checkpoints import (
    CHECKPOINTS_DIR,
    HF_DIR,
    SafetensorsError,
    TensorEntry,
    read_safetensors_checkpoint,
    step_from_path,
    step_of_tag,
)
from orchestrator.cli import OneLineArgumentParser, report_errors
from orchestrator.models import check_model_dir, load_causal_lm, load_tokenizer

FORMAT_VERSION = 1  # of linearity.json
SUMMARY_NAME = "linearity.json"
PROBES_NAME = "probes.jsonl"


# ------------------------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """One point of the series: an HF checkpoint directory (safetensors) and its RL step."""

    step: float
    path: Path


def check_series(checkpoints: Sequence[Checkpoint], cfg: AnalysisConfig) -> list[Checkpoint]:
    """The checkpoints sorted by step; a one-line error if there are too few or a step repeats."""
    ckpts = sorted(checkpoints, key=lambda c: c.step)
    need = max(3, cfg.min_distinct)
    if len(ckpts) < need:
        why = (
            f"an element needs analysis.min_distinct={cfg.min_distinct} distinct values to be kept, so"
            if need > 3
            else "a line fit with residuals needs"
        )
        raise AnalysisError(f"checkpoints: {why} at least {need} checkpoints; got {len(ckpts)}")
    steps = [c.step for c in ckpts]
    if len(set(steps)) != len(steps):
        raise AnalysisError(f"checkpoints: steps must be distinct, got {', '.join(f'{s:g}' for s in steps)}")
    return ckpts


def checkpoints_from_paths(paths: Sequence[str], steps: Sequence[float] | None = None) -> list[Checkpoint]:
    """Checkpoints from explicit paths; steps given (same length) or read from the paths' names."""
    if steps is not None and len(steps) != len(paths):
        raise AnalysisError(f"--steps: expected {len(paths)} steps (one per --checkpoints path), got {len(steps)}")
    out = []
    for i, p in enumerate(paths):
        if not Path(p).is_dir():
            raise AnalysisError(f"--checkpoints {p}: not a directory")
        step = steps[i] if steps is not None else step_from_path(p)
        if step is None:
            raise AnalysisError(f"--checkpoints {p}: no step in the path (rl_step_N, global_step_N, ...); give --steps")
        out.append(Checkpoint(float(step), Path(p)))
    return out


def discover_run_checkpoints(run_dir: str | Path, include_base: bool = True) -> list[Checkpoint]:
    """Every ``checkpoints/rl_step_N/hf`` of a run (``run_dir`` may also be the ``checkpoints`` folder itself),
    plus the run's starting model as step 0 (``model_path`` in ``summary.json``) when ``include_base``."""
    run = Path(run_dir)
    if not run.is_dir():
        raise AnalysisError(f"--run-dir {run}: not a directory")
    root = run / CHECKPOINTS_DIR if (run / CHECKPOINTS_DIR).is_dir() else run
    found = []
    for d in root.iterdir():
        step = step_of_tag(d.name)
        if step is not None and (d / HF_DIR / "config.json").is_file():
            found.append(Checkpoint(float(step), d / HF_DIR))
    if not found:
        raise AnalysisError(
            f"--run-dir {run}: no checkpoints/rl_step_N/hf folders (train with trainer.checkpoint_every=N "
            "trainer.keep_checkpoints=0 to keep a series)"
        )
    summary = run / "summary.json"
    if include_base and summary.is_file() and not any(c.step == 0 for c in found):
        base = json.loads(summary.read_text()).get("model_path")
        if base and (Path(base) / "config.json").is_file():
            found.append(Checkpoint(0.0, Path(base)))
    return sorted(found, key=lambda c: c.step)


def _as_checkpoints(items: Sequence[Checkpoint | tuple[float, str]]) -> list[Checkpoint]:
    out = []
    for it in items:
        out.append(it if isinstance(it, Checkpoint) else Checkpoint(float(it[0]), Path(it[1])))
    return sorted(out, key=lambda c: c.step)


# ------------------------------------------------------------------------------------------------ probes


def load_probe_file(path: str | Path) -> list[dict[str, Any]]:
    """Records with ``prompt`` (and optionally ``response``) from jsonl / json, or one prompt per line of text."""
    p = Path(path)
    if not p.is_file():
        raise AnalysisError(f"--probes {p}: file not found")
    text = p.read_text()
    if p.suffix in (".jsonl", ".json"):
        try:
            rows = (
                json.loads(text)
                if p.suffix == ".json"
                else [json.loads(line) for line in text.splitlines() if line.strip()]
            )
        except json.JSONDecodeError as e:
            raise AnalysisError(f"--probes {p}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(rows, list) or not all(
            isinstance(r, dict) and isinstance(r.get("prompt"), str) for r in rows
        ):
            raise AnalysisError(f"--probes {p}: expected records with a string 'prompt' field")
        return rows
    return [{"prompt": line} for line in text.splitlines() if line.strip()]


def prompts_from_run(run_dir: str | Path) -> list[str] | None:
    """The held-out eval prompts of a run made by ``python -m orchestrator.train`` (its ``.hydra/config.yaml``)."""
    cfg_file = Path(run_dir) / ".hydra" / "config.yaml"
    if not cfg_file.is_file():
        return None
    from omegaconf import OmegaConf

    from orchestrator.config import validate
    from orchestrator.data import load_splits

    return list(load_splits(validate(OmegaConf.load(cfg_file)), encode=None).eval["prompt"])


def build_probes(
    first: Checkpoint,
    rows: Sequence[Mapping[str, Any] | Sequence[int] | str],
    cfg: AnalysisConfig,
    *,
    chat_template: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[list[Probe], Any]:
    """Probes from prompts (text or token ids) and optional responses; missing responses are sampled once from
    the first checkpoint (seeded; ``samples_per_probe`` per prompt). Returns (probes, tokenizer)."""
    import torch

    tok = load_tokenizer(str(first.path))
    rows = list(rows)[: cfg.num_probes]
    if not rows:
        raise AnalysisError("probes: no prompts")
    encoded, given = [], []
    for r in rows:
        rec = {"prompt": r} if isinstance(r, str) else (r if isinstance(r, Mapping) else {"prompt_ids": list(r)})
        if "prompt_ids" in rec:
            ids = [int(x) for x in rec["prompt_ids"]]
        elif chat_template:
            ids = list(
                tok.apply_chat_template(
                    [{"role": "user", "content": rec["prompt"]}], add_generation_prompt=True, tokenize=True
                )
            )
        else:
            ids = tok(rec["prompt"], add_special_tokens=True)["input_ids"]
        encoded.append(ids)
        resp = rec.get("response_ids") or None
        if resp is None and isinstance(rec.get("response"), str):
            resp = tok(rec["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        given.append(resp)
    probes = [Probe(tuple(p), tuple(r), tok.decode(p), tok.decode(r)) for p, r in zip(encoded, given) if r is not None]
    missing = [p for p, r in zip(encoded, given) if r is None]
    if missing:
        model = load_causal_lm(first.path, cfg.dtype, cfg.device)
        torch.manual_seed(cfg.seed)
        probes += _generate(model, tok, missing, cfg)
        del model
        log(
            f"probes: sampled {cfg.samples_per_probe} response(s) for each of {len(missing)} prompts "
            f"from step {first.step:g}"
        )
    return probes, tok


def _generate(model, tok, prompts: list[list[int]], cfg: AnalysisConfig) -> list[Probe]:
    """Sampled (or greedy at temperature 0) responses, left-padded batches; a response keeps its EOS."""
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[Probe] = []
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start : start + cfg.batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(batch):
            ids[b, width - len(p) :] = torch.tensor(p)
            mask[b, width - len(p) :] = 1
        greedy = cfg.probe_temperature == 0
        # plain sampling at the temperature: top_k=0 / top_p=1 switch off generation_config's defaults (top_k 50)
        sampling = {} if greedy else {"temperature": cfg.probe_temperature, "top_p": 1.0, "top_k": 0}
        gen = model.generate(
            input_ids=ids.to(cfg.device), attention_mask=mask.to(cfg.device), max_new_tokens=cfg.probe_max_tokens,
            do_sample=not greedy, num_return_sequences=cfg.samples_per_probe, pad_token_id=pad,
            eos_token_id=tok.eos_token_id, **sampling,
        )  # fmt: skip
        for i, row in enumerate(gen[:, width:].tolist()):
            resp = row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row
            if not resp:
                continue
            prompt = batch[i // cfg.samples_per_probe]
            out.append(Probe(tuple(prompt), tuple(resp), tok.decode(prompt), tok.decode(resp)))
    return out


# -------------------------------------------------------------------------------------- probe analysis


def analyze_probes(
    checkpoints: Sequence[Checkpoint],
    probes: Sequence[Probe],
    tok,
    cfg: AnalysisConfig,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Token log-prob and activation R² over the checkpoints (one model in memory at a time)."""
    lengths = np.array([len(p.response_ids) for p in probes])
    n_tok = int(lengths.sum())
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    lp_acc = SeriesAccumulator(n_tok, track=min(n_tok, 4096), seed=cfg.seed)  # log-prob series are few: keep most
    act_accs: list[SeriesAccumulator] = []
    plan = None
    for i, ck in enumerate(checkpoints):
        model = load_causal_lm(ck.path, cfg.dtype, cfg.device)
        if plan is None:
            c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
            plan = ActivationPlan.build(
                probes, int(c.hidden_size), int(c.num_hidden_layers) + 1, cfg.activation_samples, cfg.seed
            )
            act_accs = [
                SeriesAccumulator(p.shape[0], max_distinct=max(4, cfg.min_distinct), seed=cfg.seed)
                for p in plan.per_layer
            ]
        series = probe_forward(model, probes, plan, batch_size=cfg.batch_size, pad_id=pad, device=cfg.device)
        del model
        lp_acc.update(series.logprobs, ck.step)
        for acc, values in zip(act_accs, series.activations):
            acc.update(values, ck.step)
        log(f"probes: step {ck.step:g} ({i + 1}/{len(checkpoints)}) mean log-prob {series.logprobs.mean():.4f}")
    return {
        "logprobs": _logprob_result(lp_acc, probes, lengths, tok, cfg),
        "activations": _activation_result(act_accs, cfg),
    }


def _logprob_result(acc: SeriesAccumulator, probes, lengths, tok, cfg: AnalysisConfig) -> dict[str, Any]:
    r2, change = acc.r2(), acc.value_range()
    group_of = token_groups(r2, change, change_threshold=cfg.logprob_change, r2_threshold=cfg.r2_threshold)
    probe_of = np.repeat(np.arange(len(probes)), lengths)
    pos_of = np.concatenate([np.arange(n) for n in lengths]) if len(lengths) else np.empty(0, dtype=int)
    steps, values = acc.trajectories()
    slope, icpt = acc.slope(), acc.intercept()
    row_of = {int(e): i for i, e in enumerate(acc.tracked)}

    def example(e: int) -> dict[str, Any]:
        p = probes[probe_of[e]]
        token_id = p.response_ids[pos_of[e]]
        return {
            "probe": int(probe_of[e]),
            "position": int(pos_of[e]),
            "token": tok.decode([token_id]),
            "prompt": p.prompt,
            "response": p.response,
            "r2": float(r2[e]),
            "change": float(change[e]),
            "slope": float(slope[e]),
            "intercept": float(icpt[e]),
            "steps": steps.tolist(),
            "values": values[row_of[e]].tolist(),
        }

    groups = {}
    for k, g in enumerate(TOKEN_GROUPS):
        members = np.nonzero(group_of == k)[0]
        tracked = [int(e) for e in members if int(e) in row_of]
        tracked.sort(key=lambda e: -change[e])  # the most-moving first (for "stable": the least stable)
        tracked = _distinct_tokens_first(tracked, lambda e: probes[probe_of[e]].response_ids[pos_of[e]])
        groups[g] = {
            "count": int(members.size), "frac": float(members.size / max(1, len(r2))),
            "r2_mean": float(np.nanmean(r2[members])) if members.size and np.isfinite(r2[members]).any() else None,
            "change_mean": float(change[members].mean()) if members.size else None,
            "examples": [example(e) for e in tracked[:4]],
        }  # fmt: skip
    moving = change >= cfg.logprob_change
    return {
        "probes": len(probes), "tokens": int(len(r2)), "change_threshold": cfg.logprob_change,
        "change_measure": "max - min of the token's log-prob over the series (nats)",
        "r2_moving": distribution_summary(r2[moving], cfg.r2_threshold),
        "r2_all": distribution_summary(r2, cfg.r2_threshold),
        "r2_by_change_quartile": _by_quartile(r2, change),
        "groups": groups,
        "_arrays": {"r2": r2, "change": change, "group_of": group_of},
    }  # fmt: skip


def _distinct_tokens_first(order: list[int], token_of) -> list[int]:
    """``order`` with the first occurrence of each token id moved ahead (examples show different tokens)."""
    seen, first, rest = set(), [], []
    for e in order:
        (rest if token_of(e) in seen else first).append(e)
        seen.add(token_of(e))
    return first + rest


def _by_quartile(r2: np.ndarray, change: np.ndarray) -> list[dict[str, float]]:
    """Mean R² of the tokens in each quartile of log-prob change (the paper: larger change, higher R²)."""
    ok = np.isfinite(r2)
    if ok.sum() < 4:
        return []
    edges = np.quantile(change[ok], [0, 0.25, 0.5, 0.75, 1.0])
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = ok & (change >= lo) & (change <= hi)
        out.append(
            {"change_from": float(lo), "change_to": float(hi), "r2_mean": float(r2[m].mean()), "count": int(m.sum())}
        )
    return out


def _activation_result(accs: Sequence[SeriesAccumulator], cfg: AnalysisConfig) -> dict[str, Any]:
    layers, arrays = {}, []
    for layer, acc in enumerate(accs):
        if acc.n == 0:
            arrays.append(np.empty(0))
            continue
        keep, dropped = acc.keep_mask(cfg.activation_min_change, cfg.min_distinct)
        r2 = acc.r2()[keep]
        arrays.append(r2)
        layers[str(layer)] = {**distribution_summary(r2, cfg.r2_threshold), "sampled": acc.n, "dropped": dropped}
    means = [layers[str(i)].get("mean") if str(i) in layers else None for i in range(len(accs))]
    return {"layers": layers, "per_layer_mean": means, "layer_0": "embedding output", "_arrays": arrays}


# -------------------------------------------------------------------------------------------- weights

FLOAT_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}
# This tool's wording of unreadable weights where it differs from the reader's (the CLI's tests pin some of it).
_UNREADABLE = {
    "no_weights": "checkpoint {path}: expected model.safetensors or model.safetensors.index.json "
    "(an HF save_pretrained directory), found {found} .safetensors files",
    "bad_index": "{path}: expected a JSON object with a 'weight_map'",
    "missing_shard": "checkpoint {path.parent}: shard {path.name} listed in the index is missing",
    "header_length": "{path}: not a safetensors file (header length {length})",
    "header_not_json": "{path}: not a safetensors file (bad JSON header)",
}


def read_entries(ckpt_dir: str | Path) -> dict[str, TensorEntry]:
    """Tensor name → :class:`TensorEntry` of an HF checkpoint directory (headers only)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise AnalysisError(f"checkpoint {d}: not a directory")
    try:
        entries = read_safetensors_checkpoint(d).tensors
    except SafetensorsError as e:
        wording = _UNREADABLE.get(e.problem, "checkpoint {e}" if e.path == d else "{e}")
        raise AnalysisError(wording.format(e=e, path=e.path, **e.details)) from None
    if not entries:
        raise AnalysisError(f"checkpoint {d}: no tensors")
    return entries


def read_elements(entry: TensorEntry, indices: np.ndarray) -> np.ndarray:
    """The elements of ``entry`` (flattened, C order) at ``indices`` (int64 (k,), sorted for locality), as float64.

    Only those elements are read (memory map); bf16 is widened exactly (its bits are the top half of a float32).
    """
    if entry.dtype not in FLOAT_DTYPES:
        raise AnalysisError(f"{entry.file}: tensor {entry.name} has dtype {entry.dtype}, not a float type")
    if entry.numel == 0:
        return np.empty(0, dtype=np.float64)
    mm = np.memmap(entry.file, dtype=FLOAT_DTYPES[entry.dtype], mode="r", offset=entry.offset, shape=(entry.numel,))
    raw = np.asarray(mm[indices])  # a copy of k elements; the map is released below
    del mm
    if entry.dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return raw.astype(np.float64)


def check_compatible(
    base: Mapping[str, TensorEntry], other: Mapping[str, TensorEntry], where: Path, names: Iterable[str]
) -> None:
    """Every analysed tensor must exist in ``other`` with the same shape (dtype may differ: fp32 vs bf16)."""
    for name in names:
        e = other.get(name)
        if e is None:
            raise AnalysisError(f"checkpoint {where}: tensor {name} is missing (present in the first checkpoint)")
        if e.shape != base[name].shape:
            raise AnalysisError(
                f"checkpoint {where}: tensor {name} has shape {list(e.shape)}, "
                f"the first checkpoint {list(base[name].shape)}"
            )
        if e.dtype not in FLOAT_DTYPES:
            raise AnalysisError(f"checkpoint {where}: tensor {name} has dtype {e.dtype}, not a float type")


def analyze_weights(
    checkpoints: Sequence[Checkpoint],
    cfg: AnalysisConfig | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> WeightResult:
    """R² of a fixed sample of every floating-point tensor's elements over the checkpoint series.

    Streams: one checkpoint at a time, one tensor at a time, reading only the sampled elements. Tensors are
    those of the first checkpoint; every later checkpoint must have them with the same shapes.
    """
    cfg = cfg or AnalysisConfig()
    ckpts = check_series(checkpoints, cfg)
    steps = [c.step for c in ckpts]
    base = read_entries(ckpts[0].path)
    names = sorted(n for n, e in base.items() if e.dtype in FLOAT_DTYPES and e.numel > 0)
    skipped = sorted(n for n in base if n not in names)
    plan = {n: sample_indices(n, base[n].numel, cfg.weight_fraction, cfg.weight_min_samples, cfg.seed) for n in names}
    offsets = np.cumsum([0] + [plan[n].size for n in names])
    acc = SeriesAccumulator(int(offsets[-1]), max_distinct=max(4, cfg.min_distinct), track=cfg.track, seed=cfg.seed)
    values = np.empty(acc.n)
    for i, ck in enumerate(ckpts):
        entries = base if i == 0 else read_entries(ck.path)
        if i:
            check_compatible(base, entries, ck.path, names)
        for j, name in enumerate(names):
            values[offsets[j] : offsets[j + 1]] = read_elements(entries[name], plan[name])
        acc.update(values, ck.step)
        del entries
        if log:
            log(f"weights: step {ck.step:g} ({i + 1}/{len(ckpts)}) {ck.path}")
    shapes = {n: base[n].shape for n in names}
    return weight_result(acc, names, shapes, plan, offsets, steps, cfg, skipped)


def _weight_summary(w: WeightResult, cfg: AnalysisConfig) -> dict[str, Any]:
    tensors = w.tensors
    per_layer, per_module = {}, {}
    for key, getter in (("layer", lambda t: t["layer"]), ("module", lambda t: t["module"])):
        target = per_layer if key == "layer" else per_module
        groups: dict[str, list[int]] = {}
        for j, t in enumerate(tensors):
            k = "global" if getter(t) is None else str(getter(t))
            groups.setdefault(k, []).append(j)
        for k, js in groups.items():
            r2 = w.r2[np.isin(w.tensor_of, js)]
            target[k] = float(r2.mean()) if r2.size else None
    rows, cols, mat = heatmap_matrix(tensors)
    return {
        "tensors_analyzed": len(tensors), "elements_sampled": w.sampled, "elements_kept": int(w.r2.size),
        "dropped": w.dropped, "r2": distribution_summary(w.r2, cfg.r2_threshold),
        "per_layer_mean": per_layer, "per_module_mean": per_module,
        "heatmap": {"modules": rows, "layers": cols, "mean_r2": mat},
        "state_bytes": w.state_bytes, "skipped_tensors": w.skipped_tensors,
        "tensors": {t["name"]: {k: v for k, v in t.items() if k != "name"} for t in tensors},
        "examples": [{k: v for k, v in e.items()} for e in w.examples],
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ the API


def analyze_run(
    checkpoints: Sequence[Checkpoint | tuple[float, str]],
    out_dir: str | os.PathLike,
    cfg: AnalysisConfig | Mapping[str, Any] | None = None,
    *,
    prompts: Sequence[str | Sequence[int] | Mapping[str, Any]] | None = None,
    chat_template: bool = False,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Analyse a checkpoint series, write ``linearity.json`` + PNGs + ``probes.jsonl`` into ``out_dir``.

    Args:
        checkpoints: ``(step, hf_dir)`` pairs or :class:`Checkpoint` s (any order; ≥ 3, distinct steps; a step-0
            base model may be one of them).
        out_dir: created if needed.
        cfg: :class:`AnalysisConfig` or a mapping of its fields (e.g. an OmegaConf node); None = defaults.
        prompts: probe prompts (text, token ids, or records with ``prompt`` / ``prompt_ids`` and optionally
            ``response`` / ``response_ids``); None or empty = weights only.
        chat_template: encode text prompts with the tokenizer's chat template.
        mlflow_run_id, tracking_uri: log the outputs there (artifacts under ``linearity/``, headline metrics
            ``linearity/*`` at the last step).

    Returns:
        The summary dict (as written to ``linearity.json``), with ``plots`` (file names) and ``seconds``.
    """
    from orchestrator import plots

    started = time.perf_counter()
    cfg = AnalysisConfig.from_mapping(cfg)
    ckpts = check_series(_as_checkpoints(checkpoints), cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log(f"linearity analysis of {len(ckpts)} checkpoints (steps {', '.join(f'{c.step:g}' for c in ckpts)}) → {out}")
    weights = analyze_weights(ckpts, cfg, log=log)
    summary: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "steps": [c.step for c in ckpts],
        "checkpoints": [str(c.path) for c in ckpts],
        "config": cfg.to_dict(),
        "weights": _weight_summary(weights, cfg),
    }
    probe_part = None
    if cfg.logprobs and prompts:
        probes, tok = build_probes(ckpts[0], prompts, cfg, chat_template=chat_template, log=log)
        _write_probes(out / PROBES_NAME, probes)
        probe_part = analyze_probes(ckpts, probes, tok, cfg, log=log)
        summary.update({k: {kk: vv for kk, vv in v.items() if kk != "_arrays"} for k, v in probe_part.items()})
    summary["plots"] = _plot_all(plots, out, weights, summary, probe_part, cfg) if cfg.plots else {}
    summary["seconds"] = round(time.perf_counter() - started, 2)
    (out / SUMMARY_NAME).write_text(json.dumps(json_safe(summary), indent=1, allow_nan=False) + "\n")
    if mlflow_run_id:
        log_to_mlflow(out, summary, mlflow_run_id, tracking_uri)
    log(headline(summary))
    return summary


def _write_probes(path: Path, probes: Sequence[Probe]) -> None:
    with open(path, "w") as f:
        for p in probes:
            f.write(
                json.dumps(
                    {
                        "prompt": p.prompt,
                        "response": p.response,
                        "prompt_ids": list(p.prompt_ids),
                        "response_ids": list(p.response_ids),
                    }
                )
                + "\n"
            )


def _plot_all(plots, out: Path, weights: WeightResult, summary, probe_part, cfg: AnalysisConfig) -> dict[str, str]:
    thr = cfg.r2_threshold
    files = {}
    lp = probe_part["logprobs"]["_arrays"] if probe_part else None
    act = probe_part["activations"]["_arrays"] if probe_part else None
    moving = lp["r2"][lp["change"] >= cfg.logprob_change] if lp else None
    steps = summary["steps"]
    title = f"linearity over {len(steps)} checkpoints (steps {steps[0]:g}–{steps[-1]:g})"
    files["overview"] = plots.overview(out / "overview.png", weights.r2, weights.tensors, moving, act, thr, title)
    files["weights_r2_hist"] = plots.weights_histogram(out / "weights_r2_hist.png", weights.r2, thr)
    files["weights_heatmap"] = plots.weights_heatmap(out / "weights_heatmap.png", weights.tensors)
    files["weight_trajectories"] = plots.trajectories(out / "weight_trajectories.png", weights.examples)
    if lp is not None:
        files["logprob_r2_hist"] = plots.logprob_histogram(
            out / "logprob_r2_hist.png", moving, lp["r2"], thr, cfg.logprob_change
        )
        files["logprob_groups"] = plots.token_groups_figure(
            out / "logprob_groups.png", summary["logprobs"]["groups"], lp["r2"], lp["change"], lp["group_of"],
            cfg.logprob_change, thr)  # fmt: skip
        files["activations_r2"] = plots.activations_figure(out / "activations_r2.png", act, thr)
    return {k: Path(v).name for k, v in files.items()}


def headline(summary: Mapping[str, Any]) -> str:
    """One line: the medians and shares above the threshold."""
    thr = summary["config"]["r2_threshold"]
    key = f"frac_above_{thr:g}"
    w = summary["weights"]["r2"]
    parts = [
        f"weights: median R² {w.get('median', float('nan')):.3f}, {100 * w.get(key, float('nan')):.0f} % > {thr:g} "
        f"({w.get('count', 0)} of {summary['weights']['elements_sampled']} sampled elements moved)"
    ]
    lp = summary.get("logprobs", {}).get("r2_moving")
    if lp and lp.get("count"):
        parts.append(
            f"token log-probs: median R² {lp['median']:.3f}, {100 * lp[key]:.0f} % > {thr:g} "
            f"({lp['count']} moved tokens)"
        )
    return "; ".join(parts)


def headline_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The few numbers worth a metric: medians and shares above the threshold."""
    thr = summary["config"]["r2_threshold"]
    key = f"frac_above_{thr:g}"
    out = {}
    sections = [("weight_r2", summary["weights"]["r2"])]
    if "logprobs" in summary:
        sections.append(("logprob_r2", summary["logprobs"]["r2_moving"]))
    for name, d in sections:
        if d.get("count"):
            out[f"linearity/{name}_median"] = d["median"]
            out[f"linearity/{name}_frac_above_{thr:g}"] = d[key]
    return out


def log_to_mlflow(out_dir: Path, summary: Mapping[str, Any], run_id: str, tracking_uri: str | None) -> None:
    """Artifacts under ``linearity/`` and headline metrics at the last analysed step, on an existing run."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    client.log_artifacts(run_id, str(out_dir), "linearity")
    now = int(time.time() * 1000)
    step = int(summary["steps"][-1])
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in headline_metrics(summary).items()])


# --------------------------------------------------------------------------------------------- the CLI


def _build_parser() -> argparse.ArgumentParser:
    d = AnalysisConfig()
    p = OneLineArgumentParser(
        prog="python -m orchestrator.analyze",
        description="R² of weights, token log-probs and activations against the RL step over a checkpoint series.",
    )
    src = p.add_argument_group("checkpoints (one of)")
    src.add_argument(
        "--run-dir", help="a training run's output dir: its checkpoints/rl_step_N/hf (+ its base model as step 0)"
    )
    src.add_argument("--checkpoints", nargs="+", metavar="DIR", help="HF checkpoint directories")
    p.add_argument(
        "--steps", nargs="+", type=float, help="the step of each --checkpoints dir (default: from the names)"
    )
    p.add_argument("--no-base", action="store_true", help="with --run-dir: do not add the starting model as step 0")
    p.add_argument("--out", help="output directory (default <run-dir>/linearity)")
    g = p.add_argument_group("probes")
    g.add_argument(
        "--probes", help="jsonl/json records with 'prompt' [+ 'response'], or a text file (one prompt a line)"
    )
    g.add_argument("--no-probes", action="store_true", help="weights only")
    g.add_argument("--chat-template", action="store_true", help="wrap text prompts in the tokenizer's chat template")
    g.add_argument("--num-probes", type=int, default=d.num_probes)
    g.add_argument("--samples-per-probe", type=int, default=d.samples_per_probe)
    g.add_argument("--temperature", type=float, default=d.probe_temperature, help="of the probe responses (0 = greedy)")
    g.add_argument("--max-new-tokens", type=int, default=d.probe_max_tokens)
    g.add_argument(
        "--activation-samples", type=int, default=d.activation_samples, help="hidden-state elements per layer"
    )
    g.add_argument("--device", default=d.device)
    g.add_argument("--dtype", default=d.dtype, help="float32 | bfloat16 | float16 | auto")
    w = p.add_argument_group("weights")
    w.add_argument("--weight-fraction", type=float, default=d.weight_fraction, help="share of each tensor sampled")
    w.add_argument("--min-samples", type=int, default=d.weight_min_samples, help="at least this many per tensor")
    w.add_argument("--min-abs-change", type=float, default=d.min_abs_change)
    w.add_argument("--seed", type=int, default=d.seed)
    m = p.add_argument_group("MLflow")
    m.add_argument("--mlflow-run-id", help="log to this run (default with --run-dir: the run in its summary.json)")
    m.add_argument("--tracking-uri", help="default: the run's, else MLFLOW_TRACKING_URI")
    m.add_argument("--no-mlflow", action="store_true")
    return p


def _config_from_args(args) -> AnalysisConfig:
    return AnalysisConfig(
        weight_fraction=args.weight_fraction, weight_min_samples=args.min_samples,
        min_abs_change=args.min_abs_change, seed=args.seed, logprobs=not args.no_probes,
        num_probes=args.num_probes, samples_per_probe=args.samples_per_probe,
        probe_temperature=args.temperature, probe_max_tokens=args.max_new_tokens,
        activation_samples=args.activation_samples, device=args.device, dtype=args.dtype,
    )  # fmt: skip


def _resolve(args) -> tuple[list[Checkpoint], Path, list | None, str | None, str | None]:
    if bool(args.run_dir) == bool(args.checkpoints):
        raise AnalysisError("--run-dir/--checkpoints: give exactly one of them")
    if args.run_dir:
        ckpts = discover_run_checkpoints(args.run_dir, include_base=not args.no_base)
        out = Path(args.out or Path(args.run_dir) / "linearity")
    else:
        if not args.out:
            raise AnalysisError("--out: required with --checkpoints")
        ckpts, out = checkpoints_from_paths(args.checkpoints, args.steps), Path(args.out)
    base = read_entries(ckpts[0].path)  # bad or mismatched checkpoints fail here, before any output
    names = [n for n, e in base.items() if e.dtype in FLOAT_DTYPES]
    for c in ckpts[1:]:
        check_compatible(base, read_entries(c.path), c.path, names)
    prompts = None
    if not args.no_probes:
        if args.probes:
            prompts = load_probe_file(args.probes)
        elif args.run_dir:
            prompts = prompts_from_run(args.run_dir)
    if prompts:  # every checkpoint is loaded as a model, the first one's tokenizer encodes the probes
        for c in ckpts:
            check_model_dir(c.path)
        load_tokenizer(str(ckpts[0].path))
    run_id, uri = args.mlflow_run_id, args.tracking_uri
    summary_file = Path(args.run_dir) / "summary.json" if args.run_dir else None
    if not args.no_mlflow and not run_id and summary_file and summary_file.is_file():
        s = json.loads(summary_file.read_text())
        run_id, uri = s.get("mlflow_run_id"), uri or s.get("mlflow_tracking_uri")
    if args.no_mlflow:
        run_id = None
    return ckpts, out, prompts, run_id, uri or os.environ.get("MLFLOW_TRACKING_URI")


@report_errors(AnalysisError)
def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    cfg = _config_from_args(args)
    ckpts, out, prompts, run_id, uri = _resolve(args)
    if prompts is None and cfg.logprobs:
        print("note: no probes (--probes, or a run dir with .hydra/config.yaml): weights only", file=sys.stderr)
    summary = analyze_run(
        ckpts,
        out,
        cfg,
        prompts=prompts,
        chat_template=args.chat_template,
        mlflow_run_id=run_id,
        tracking_uri=uri,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(f"{out / SUMMARY_NAME}: {headline(summary)}; plots: {', '.join(summary['plots'].values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
