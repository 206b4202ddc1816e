"""Linearity analysis over a series of checkpoints: R² of weights, token log-probs and activations against step.

What it measures (paper §3.1–3.2, App. A.2; the paper's official analysis code is the reference for the rules):

- **Weights.** From every floating-point tensor, a fixed random sample of its elements (default 0.1 %, at least
  50) is read from every checkpoint; elements that barely move are dropped (range over the series ≤ 1e-4, or
  fewer than 4 distinct values — bf16 steps, mostly), and each remaining element's R² against the step is
  summarised per tensor, per layer and per module.
- **Token log-probs.** Fixed probe responses are teacher-forced through every checkpoint; each response
  token's log-prob is one series. Tokens fall into the paper's Fig. 9 groups: large change & high R² (steady
  re-weighting), large change & low R² (fluctuating), and stable (change below the threshold).
- **Activations.** For the same probes, a fixed sample of hidden-state elements per layer (the embedding
  output is layer 0) is one series each.

Choices made:

- **Streaming, O(1) in the number of checkpoints.** Checkpoints are read one at a time, and each series keeps
  running statistics only (:class:`SeriesAccumulator`: first/last value, min/max, a distinct-value tracker up to
  4, and the centred Welford sums of y and t·y and y² in float64). Memory is a fixed number of float64 per
  sampled element, whatever the number of checkpoints; the only state that grows with the series is the full
  trajectory of a small, fixed number of elements (``track``, default 64) kept for the example plots.
- **Deterministic sampling.** Indices come from ``numpy.random.default_rng`` seeded by a hash of
  ``(seed, tensor name)``: the same elements are read from every checkpoint and in every run, whatever the
  tensor order or the set of tensors.
- **R²** is the squared Pearson correlation of the series with the step, i.e. ``1 − SS_res/SS_tot`` of the
  least-squares line (the same quantity as :func:`linearity.trend.r2_score`, scipy's ``linregress().rvalue**2``
  and the paper's code); NaN for a constant series.

Pure numpy (+ torch only inside :func:`probe_forward`, which runs a model object it is given); imports nothing
from Ray, vLLM, DeepSpeed or the rest of the project. Reading checkpoints, loading models, writing the results
and drawing them is ``orchestrator.analyze`` (and ``orchestrator.plots``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "AnalysisConfig",
    "AnalysisError",
    "SeriesAccumulator",
    "WeightResult",
    "Probe",
    "ProbeSeries",
    "ActivationPlan",
    "parse_param_name",
    "heatmap_matrix",
    "sample_count",
    "sample_indices",
    "weight_result",
    "distribution_summary",
    "token_groups",
    "probe_forward",
    "TOKEN_GROUPS",
]


class AnalysisError(ValueError):
    """Bad input (a checkpoint, a step, a config field); the message is one line naming it."""


# ------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class AnalysisConfig:
    """Every knob of the analysis (defaults follow the paper's code where it has one)."""

    weight_fraction: float = 1e-3  # share of each tensor's elements sampled
    weight_min_samples: int = 50  # at least this many per tensor (all of a smaller tensor)
    min_abs_change: float = 1e-4  # drop a weight whose range over the series is ≤ this
    min_distinct: int = 4  # drop a weight (or activation) with fewer distinct values over the series
    r2_threshold: float = 0.7  # "linear" (the paper reports the share above 0.7)
    seed: int = 0  # sampling of weights, activations, probe responses, example elements
    logprobs: bool = True  # run the token log-prob and activation analyses (needs probes)
    num_probes: int = 64  # probe prompts (from the data or a file)
    samples_per_probe: int = 2  # responses generated per prompt by the first checkpoint
    probe_temperature: float = 1.0  # sampling temperature of those responses (0 = greedy)
    probe_max_tokens: int = 32  # response length cap for the generated probes
    logprob_change: float = 0.2  # "large change" of a token log-prob: range over the series ≥ this (nats)
    activation_samples: int = 2048  # sampled hidden-state elements per layer
    activation_min_change: float = 1e-6  # drop an activation whose range is ≤ this
    batch_size: int = 16  # probes per forward pass
    track: int = 64  # full trajectories kept per analysis, for the example plots
    plots: bool = True  # draw the PNGs (False: JSON only)
    device: str = "cpu"  # where checkpoints run the probes
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto (the checkpoint's dtype)

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("weight_fraction", 0.0 < self.weight_fraction <= 1.0, "a number in (0, 1]"),
            ("weight_min_samples", self.weight_min_samples >= 1, "an integer >= 1"),
            ("min_abs_change", self.min_abs_change >= 0.0, "a number >= 0"),
            ("min_distinct", self.min_distinct >= 1, "an integer >= 1"),
            ("r2_threshold", 0.0 <= self.r2_threshold <= 1.0, "a number in [0, 1]"),
            ("num_probes", self.num_probes >= 1, "an integer >= 1"),
            ("samples_per_probe", self.samples_per_probe >= 1, "an integer >= 1"),
            ("probe_temperature", self.probe_temperature >= 0.0, "a number >= 0 (0 = greedy)"),
            ("probe_max_tokens", self.probe_max_tokens >= 1, "an integer >= 1"),
            ("logprob_change", self.logprob_change >= 0.0, "a number >= 0"),
            ("activation_samples", self.activation_samples >= 0, "an integer >= 0"),
            ("activation_min_change", self.activation_min_change >= 0.0, "a number >= 0"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("track", self.track >= 0, "an integer >= 0"),
            ("dtype", self.dtype in ("float32", "bfloat16", "float16", "auto"), "float32 | bfloat16 | float16 | auto"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise AnalysisError(f"analysis.{name}: expected {expected}, got {getattr(self, name)!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> AnalysisConfig:
        """From a dict / OmegaConf node of field values; an unknown key is a one-line error naming it.

        An ``enabled`` key (the on/off switch of a config group such as ``analysis.enabled``) is ignored."""
        if values is None:
            return cls()
        if isinstance(values, cls):
            return values
        defaults = cls()
        known = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in dict(values).items():
            if key == "enabled":
                continue
            if key not in known:
                raise AnalysisError(f"analysis.{key}: unknown field (known: {', '.join(known)})")
            kwargs[key] = _coerce(key, value, type(getattr(defaults, key)))
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(key: str, value: Any, ftype: type) -> Any:
    """A config value as the field's type: bool only from a bool, int from an integral number, float from a number."""
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer(),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[ftype]
    if not ok:
        raise AnalysisError(f"analysis.{key}: expected {ftype.__name__}, got {value!r}")
    return ftype(value)


# ----------------------------------------------------------------------------------------------- sampling


def sample_count(numel: int, fraction: float, min_samples: int) -> int:
    """``min(numel, max(min_samples, int(numel · fraction)))`` — the paper's rule."""
    return int(min(numel, max(min_samples, int(numel * fraction))))


def _name_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def sample_indices(name: str, numel: int, fraction: float, min_samples: int, seed: int) -> np.ndarray:
    """Sorted, distinct flat indices (int64 (k,)) of the elements of tensor ``name`` to analyse.

    Deterministic in (seed, name, numel): the same elements in every checkpoint and every run. Memory O(k)
    even for huge tensors (numpy's sampler without replacement does not permute the whole range).
    """
    k = sample_count(numel, fraction, min_samples)
    rng = np.random.default_rng(_name_seed(seed, name))
    idx = rng.choice(numel, size=k, replace=False) if k < numel else np.arange(numel)
    return np.sort(idx.astype(np.int64))


# ----------------------------------------------------------------------------------------- accumulator


class SeriesAccumulator:
    """Streaming statistics of n series ``y_e(t)``, fed one step at a time (all n values at step t).

    Per element (float64): first and last value, min and max, up to ``max_distinct`` distinct values seen, and the
    centred least-squares sums — mean ``z̄`` of ``z = y − y_first``, co-moment ``Σ (t − t̄)(z − z̄)`` and
    ``Σ (z − z̄)²`` (Welford/Chan updates; centring on the first value keeps the small moves of large weights
    exact). Per accumulator: the count, ``t̄`` and ``S_tt = Σ (t − t̄)²``. None of it grows with the number of
    updates, except the full trajectories of ``track`` elements (chosen at random, seeded) kept for plots.

    Steps may come in any order but must be distinct.
    """

    def __init__(self, n: int, *, max_distinct: int = 4, track: int = 0, seed: int = 0) -> None:
        self.n = int(n)
        self.max_distinct = int(max_distinct)
        self.count = 0
        self.mean_t = 0.0
        self.s_tt = 0.0
        self.first = np.zeros(n)
        self.last = np.zeros(n)
        self.last_step = -math.inf
        self.lo = np.full(n, np.inf)
        self.hi = np.full(n, -np.inf)
        self.mean = np.zeros(n)  # z̄
        self.co = np.zeros(n)  # Σ (t − t̄)(z − z̄)
        self.m2 = np.zeros(n)  # Σ (z − z̄)²
        self.distinct = np.full((n, self.max_distinct), np.nan)
        self.n_distinct = np.zeros(n, dtype=np.int16)
        k = min(int(track), self.n)
        rng = np.random.default_rng(_name_seed(seed, "track"))
        self.tracked = np.sort(rng.choice(self.n, size=k, replace=False)) if k else np.empty(0, dtype=np.int64)
        self.tracked_steps: list[float] = []
        self.tracked_values: list[np.ndarray] = []
        self._steps: set[float] = set()

    @property
    def state_bytes(self) -> int:
        """Bytes of per-element state (independent of the number of updates; excludes tracked trajectories)."""
        arrays = (self.first, self.last, self.lo, self.hi, self.mean, self.co, self.m2, self.distinct, self.n_distinct)
        return sum(a.nbytes for a in arrays)

    def update(self, values: np.ndarray, step: float) -> None:
        """Add the n values (float (n,)) observed at ``step``."""
        y = np.asarray(values, dtype=np.float64)
        if y.shape != (self.n,):
            raise ValueError(f"expected {self.n} values, got shape {y.shape}")
        step = float(step)
        if step in self._steps:
            raise AnalysisError(f"step {step:g} appears twice in the series")
        self._steps.add(step)
        if self.count == 0:
            self.first[:] = y
        np.minimum(self.lo, y, out=self.lo)
        np.maximum(self.hi, y, out=self.hi)
        if step > self.last_step:
            self.last[:] = y
            self.last_step = step
        self._track_distinct(y)
        k = self.count + 1
        dt = step - self.mean_t
        d = y - self.first
        d -= self.mean  # z − z̄_old
        self.co += d * (dt * (k - 1) / k)
        self.m2 += d * d * ((k - 1) / k)
        self.mean += d / k
        self.count = k
        self.mean_t += dt / k
        self.s_tt += dt * dt * (k - 1) / k
        if self.tracked.size:
            self.tracked_steps.append(step)
            self.tracked_values.append(y[self.tracked].copy())

    def _track_distinct(self, y: np.ndarray) -> None:
        seen = (self.distinct == y[:, None]).any(axis=1)
        new = ~seen & (self.n_distinct < self.max_distinct)
        rows = np.nonzero(new)[0]
        self.distinct[rows, self.n_distinct[rows]] = y[rows]
        self.n_distinct[rows] += 1

    # -------------------------------------------------------------------------------------------- reads

    def _require_line(self) -> None:
        if self.count < 2 or self.s_tt <= 0:
            raise AnalysisError(f"a line needs at least two distinct steps (have {self.count})")

    def r2(self) -> np.ndarray:
        """R² of each series' least-squares line (float64 (n,)), NaN for a constant series."""
        self._require_line()
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = self.co * self.co / (self.s_tt * self.m2)
        r2 = np.clip(r2, 0.0, 1.0)
        r2[self.m2 <= 0] = np.nan
        return r2

    def slope(self) -> np.ndarray:
        """Fitted slope per step (float64 (n,))."""
        self._require_line()
        return self.co / self.s_tt

    def intercept(self) -> np.ndarray:
        """Fitted value at step 0 (float64 (n,))."""
        return self.first + self.mean - self.slope() * self.mean_t

    def value_range(self) -> np.ndarray:
        """max − min over the series (float64 (n,))."""
        return self.hi - self.lo

    def keep_mask(self, min_abs_change: float, min_distinct: int) -> tuple[np.ndarray, dict[str, int]]:
        """Elements that move: range > ``min_abs_change`` and ≥ ``min_distinct`` distinct values (the paper's rule).

        Returns (bool (n,), counts of dropped elements by reason; an element failing both counts as small_change).
        """
        if min_distinct > self.max_distinct:
            raise AnalysisError(f"analysis.min_distinct: at most {self.max_distinct} here, got {min_distinct}")
        small = ~(self.value_range() > min_abs_change)
        few = self.n_distinct < min_distinct
        keep = ~small & ~few
        return keep, {"small_change": int(small.sum()), "few_distinct": int((few & ~small).sum())}

    def trajectories(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps float64 (T,), values float64 (track, T)) of the tracked elements, sorted by step."""
        steps = np.asarray(self.tracked_steps, dtype=np.float64)
        values = np.stack(self.tracked_values, axis=1) if self.tracked_values else np.empty((self.tracked.size, 0))
        order = np.argsort(steps)
        return steps[order], values[:, order]


# ------------------------------------------------------------------------------------------- statistics

QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)


def distribution_summary(r2: np.ndarray, threshold: float = 0.7, bins: int = 20) -> dict[str, Any]:
    """Count, mean, std, quantiles, share above ``threshold`` and a histogram on [0, 1] of finite R² values."""
    x = np.asarray(r2, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"count": 0}
    hist, _ = np.histogram(x, bins=bins, range=(0.0, 1.0))
    return {
        "count": int(x.size),
        "mean": float(x.mean()),
        "std": float(x.std()),
        "quantiles": {f"q{int(round(q * 100)):02d}": float(np.quantile(x, q)) for q in QUANTILES},
        "median": float(np.median(x)),
        f"frac_above_{threshold:g}": float((x > threshold).mean()),
        "histogram": {"bin_edges": np.linspace(0, 1, bins + 1).round(6).tolist(), "counts": hist.tolist()},
    }


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|decoder\.layers)\.(\d+)\.")


def parse_param_name(name: str) -> tuple[int | None, str]:
    """(layer index or None, module) of a parameter name, for the layer × module heatmap.

    ``model.layers.3.self_attn.q_proj.weight`` → (3, "q_proj"); ``…q_proj.bias`` → (3, "q_proj.bias");
    ``model.layers.0.input_layernorm.weight`` → (0, "input_layernorm"); ``model.embed_tokens.weight`` →
    (None, "embed_tokens"); ``lm_head.weight`` → (None, "lm_head"); ``model.norm.weight`` → (None, "norm").
    GPT-2 style ``transformer.h.5.attn.c_attn.weight`` → (5, "c_attn").
    """
    parts = name.split(".")
    suffix = parts[-1] if parts[-1] in ("weight", "bias") and len(parts) > 1 else None
    module = parts[-2] if suffix else parts[-1]
    if suffix == "bias":
        module += ".bias"
    m = _LAYER_RE.search(name)
    return (int(m.group(1)) if m else None), module


MODULE_ORDER = ("input_layernorm", "q_proj", "q_proj.bias", "k_proj", "k_proj.bias", "v_proj", "v_proj.bias",
                "o_proj", "post_attention_layernorm", "gate_proj", "up_proj", "down_proj")  # fmt: skip
"""Row order of the heatmap (a transformer block top to bottom); other modules follow alphabetically."""


def heatmap_matrix(tensors: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str], np.ndarray]:
    """(row modules, column labels, mean R² float64 (rows, cols), NaN where absent) from per-tensor results
    (dicts with ``layer``, ``module``, ``r2_mean``). Columns: the layer indices, then ``global`` for tensors
    outside the numbered blocks (embeddings, final norm, head)."""
    layers = sorted({t["layer"] for t in tensors if t["layer"] is not None})
    cols = [str(layer) for layer in layers] + (["global"] if any(t["layer"] is None for t in tensors) else [])
    mods = {t["module"] for t in tensors}
    rows = [m for m in MODULE_ORDER if m in mods] + sorted(m for m in mods if m not in MODULE_ORDER)
    mat = np.full((len(rows), len(cols)), np.nan)
    for t in tensors:
        if t.get("r2_mean") is None:
            continue
        c = cols.index("global" if t["layer"] is None else str(t["layer"]))
        mat[rows.index(t["module"]), c] = t["r2_mean"]
    return rows, cols, mat


# ------------------------------------------------------------------------------------------------ weights


@dataclass
class WeightResult:
    """What the weight analysis (``orchestrator.analyze.analyze_weights``) found.

    ``r2``: float64 (kept,) R² of every kept element; ``tensor_of``: int (kept,) index into ``tensors`` of each;
    ``tensors``: per-tensor dicts (name, layer, module, numel, sampled, kept, dropped…, r2_mean, r2_median,
    frac_above); ``examples``: a few tracked trajectories with their lines; ``state_bytes``: the accumulator's
    per-element state.
    """

    steps: list[float]
    r2: np.ndarray
    tensor_of: np.ndarray
    tensors: list[dict[str, Any]]
    examples: list[dict[str, Any]]
    sampled: int
    dropped: dict[str, int]
    state_bytes: int
    skipped_tensors: list[str] = field(default_factory=list)


def weight_result(
    acc: SeriesAccumulator,
    names: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
    plan: Mapping[str, np.ndarray],
    offsets: np.ndarray,
    steps: list[float],
    cfg: AnalysisConfig,
    skipped: list[str],
) -> WeightResult:
    """The weight analysis's result from its accumulator: tensor ``names[j]`` (of shape ``shapes[name]``) was
    sampled at the flat indices ``plan[name]``, held by the accumulator's elements ``offsets[j]:offsets[j + 1]``."""
    keep, dropped = acc.keep_mask(cfg.min_abs_change, cfg.min_distinct)
    r2_all = acc.r2()
    tensor_id = np.repeat(np.arange(len(names)), np.diff(offsets))
    tensors = []
    for j, name in enumerate(names):
        sl = slice(offsets[j], offsets[j + 1])
        r2_t = r2_all[sl][keep[sl]]
        layer, module = parse_param_name(name)
        tensors.append({
            "name": name, "layer": layer, "module": module, "shape": list(shapes[name]),
            "numel": math.prod(shapes[name]), "sampled": int(plan[name].size), "kept": int(r2_t.size),
            "r2_mean": float(r2_t.mean()) if r2_t.size else None,
            "r2_median": float(np.median(r2_t)) if r2_t.size else None,
            f"frac_above_{cfg.r2_threshold:g}": float((r2_t > cfg.r2_threshold).mean()) if r2_t.size else None,
        })  # fmt: skip
    examples = _examples(
        acc,
        keep,
        r2_all,
        lambda e: names[tensor_id[e]],
        lambda e: int(plan[names[tensor_id[e]]][e - offsets[tensor_id[e]]]),
    )
    return WeightResult(
        steps=steps, r2=r2_all[keep], tensor_of=tensor_id[keep], tensors=tensors, examples=examples,
        sampled=acc.n, dropped=dropped, state_bytes=acc.state_bytes, skipped_tensors=skipped,
    )  # fmt: skip


def _examples(acc: SeriesAccumulator, keep: np.ndarray, r2: np.ndarray, label, index, count: int = 6) -> list[dict]:
    """Tracked, kept elements at evenly spaced R² ranks (lowest to highest), with their fitted lines."""
    steps, values = acc.trajectories()
    rows = [i for i, e in enumerate(acc.tracked) if keep[e] and np.isfinite(r2[e])]
    if not rows:
        return []
    rows.sort(key=lambda i: r2[acc.tracked[i]])
    picks = sorted({rows[int(round(q * (len(rows) - 1)))] for q in np.linspace(0, 1, min(count, len(rows)))})
    slope, icpt = acc.slope(), acc.intercept()
    out = []
    for i in picks:
        e = int(acc.tracked[i])
        out.append(
            {
                "label": label(e),
                "index": index(e),
                "r2": float(r2[e]),
                "slope": float(slope[e]),
                "intercept": float(icpt[e]),
                "steps": steps.tolist(),
                "values": values[i].tolist(),
            }
        )
    return out


# ------------------------------------------------------------------------------------ log-probs and hidden


@dataclass(frozen=True)
class Probe:
    """A fixed prompt + response, teacher-forced through every checkpoint."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    prompt: str = ""
    response: str = ""

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise AnalysisError(
                "probe: empty prompt (at least one token is needed to predict the first response token)"
            )


@dataclass(frozen=True)
class ActivationPlan:
    """Which hidden-state elements are sampled: per layer, (token, dim) pairs over the probes' tokens.

    ``token`` indexes the concatenation of every probe's prompt+response tokens (``token_offsets`` (P+1,));
    ``per_layer[l]`` is an int64 (k, 2) array of (token, dim), sorted by token.
    """

    token_offsets: np.ndarray
    hidden_size: int
    per_layer: tuple[np.ndarray, ...]

    @classmethod
    def build(
        cls, probes: Sequence[Probe], hidden_size: int, num_layers: int, samples: int, seed: int
    ) -> ActivationPlan:
        lengths = [len(p.prompt_ids) + len(p.response_ids) for p in probes]
        offsets = np.cumsum([0] + lengths).astype(np.int64)
        total = int(offsets[-1]) * hidden_size
        per = []
        for layer in range(num_layers):
            flat = sample_indices(f"activation.{layer}", total, 0.0, samples, seed)
            per.append(np.stack([flat // hidden_size, flat % hidden_size], axis=1))
        return cls(offsets, hidden_size, tuple(per))


@dataclass
class ProbeSeries:
    """One checkpoint's outputs on the probes: response-token log-probs float64 (N,) and, per layer, the sampled
    activations float64 (k,) in :class:`ActivationPlan` order."""

    logprobs: np.ndarray
    activations: list[np.ndarray]


def probe_forward(
    model,
    probes: Sequence[Probe],
    plan: ActivationPlan | None,
    *,
    batch_size: int = 16,
    pad_id: int = 0,
    device: str = "cpu",
) -> ProbeSeries:
    """Teacher-force the probes through ``model`` (an HF causal LM) and collect log-probs and sampled activations.

    Batches are right-padded (positions stay 0..len−1, and causal attention keeps padding out of real tokens).
    Log-prob of response token j = log_softmax(logits at the position before it)[token], computed in float32 on
    the response positions only (never a (batch, seq, vocab) log-softmax). Hidden states come from
    ``output_hidden_states`` (L + 1 tensors: embeddings, then each block) when ``plan`` samples any.
    """
    import torch

    logprobs: list[np.ndarray] = []
    want_hidden = plan is not None and any(p.size for p in plan.per_layer)
    acts: list[list[np.ndarray]] = [[] for _ in plan.per_layer] if want_hidden else []
    with torch.no_grad():
        for start in range(0, len(probes), batch_size):
            batch = probes[start : start + batch_size]
            seqs = [list(p.prompt_ids) + list(p.response_ids) for p in batch]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for b, s in enumerate(seqs):
                ids[b, : len(s)] = torch.tensor(s)
                mask[b, : len(s)] = 1
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=want_hidden)
            for b, p in enumerate(batch):
                P, R = len(p.prompt_ids), len(p.response_ids)
                if R:
                    logits = out.logits[b, P - 1 : P + R - 1].float()  # (R, V)
                    tok = torch.tensor(p.response_ids, device=logits.device)
                    lp = torch.log_softmax(logits, dim=-1).gather(-1, tok[:, None])[:, 0]
                    logprobs.append(lp.double().cpu().numpy())
            if want_hidden:
                hs = out.hidden_states
                if len(hs) != len(plan.per_layer) or hs[0].shape[-1] != plan.hidden_size:
                    raise AnalysisError(
                        f"probes: the model has {len(hs)} hidden-state tensors of size {hs[0].shape[-1]}, the first "
                        f"checkpoint {len(plan.per_layer)} of size {plan.hidden_size}"
                    )
                first, last = plan.token_offsets[start], plan.token_offsets[start + len(batch)]
                for layer, pairs in enumerate(plan.per_layer):
                    sel = pairs[(pairs[:, 0] >= first) & (pairs[:, 0] < last)]
                    probe_idx = np.searchsorted(plan.token_offsets, sel[:, 0], side="right") - 1
                    dev = hs[layer].device
                    row = torch.as_tensor(probe_idx - start, device=dev)
                    pos = torch.as_tensor(sel[:, 0] - plan.token_offsets[probe_idx], device=dev)
                    dim = torch.as_tensor(sel[:, 1], device=dev)
                    acts[layer].append(hs[layer][row, pos, dim].double().cpu().numpy())
            del out
    return ProbeSeries(
        logprobs=np.concatenate(logprobs) if logprobs else np.empty(0),
        activations=[np.concatenate(a) if a else np.empty(0) for a in acts],
    )


TOKEN_GROUPS = ("large_change_high_r2", "large_change_low_r2", "stable")


def token_groups(
    r2: np.ndarray, change: np.ndarray, *, change_threshold: float = 0.2, r2_threshold: float = 0.7
) -> np.ndarray:
    """The paper's Fig. 9 groups of token log-prob series, as an int array (N,) indexing :data:`TOKEN_GROUPS`.

    0 ``large_change_high_r2``: change ≥ threshold and R² ≥ r2_threshold (steady re-weighting);
    1 ``large_change_low_r2``: change ≥ threshold and R² < r2_threshold (or undefined) — fluctuating;
    2 ``stable``: change < threshold. ``change`` is the range (max − min) of the series.
    """
    r2 = np.asarray(r2, dtype=np.float64)
    change = np.asarray(change, dtype=np.float64)
    large = change >= change_threshold
    high = np.nan_to_num(r2, nan=-1.0) >= r2_threshold
    return np.where(large & high, 0, np.where(large, 1, 2)).astype(np.int64)


def json_safe(obj: Any) -> Any:
    """NaN/inf → None and numpy scalars/arrays → Python, recursively (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj
