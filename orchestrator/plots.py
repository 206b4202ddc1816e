"""Plots of a linearity analysis (matplotlib, Agg backend): what a person would rather look at than read.

- ``overview.png`` — the one to embed: weight R² histogram, token log-prob R² histogram, the layer × module
  heatmap of mean weight R², and the R² of activations per layer (2 × 2).
- ``weights_r2_hist.png``, ``logprob_r2_hist.png`` — the paper's Fig. 1(a)/(b): R² distributions with the 0.7
  line and the share above it.
- ``weights_heatmap.png`` — the paper's Fig. 8: mean R² per (module, layer); embeddings / final norm / head in
  a ``global`` column; empty cells grey.
- ``weight_trajectories.png`` — the paper's Fig. 1(c): sampled weights at evenly spaced R² ranks, points and
  their least-squares lines.
- ``logprob_groups.png`` — the paper's Fig. 9: example tokens of each group (large change & high R², large change
  & low R², stable) and the change-vs-R² scatter that defines the groups.
- ``activations_r2.png`` — the paper's Fig. 7: R² of sampled hidden-state elements per layer (box plots).

Every function takes plain arrays / the dicts of ``linearity.analysis`` and writes one PNG; nothing is shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from linearity.analysis import TOKEN_GROUPS, heatmap_matrix

BLUE, RED, GREEN, GREY = "#0072B2", "#D55E00", "#009E73", "#777777"
GROUP_COLOURS = {"large_change_high_r2": BLUE, "large_change_low_r2": RED, "stable": GREY}
GROUP_TITLES = {
    "large_change_high_r2": "large change, high R²",
    "large_change_low_r2": "large change, low R²",
    "stable": "stable",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return str(path)


# ------------------------------------------------------------------------------------------------ panels


def r2_hist_panel(
    ax, r2: np.ndarray, title: str, threshold: float = 0.7, colour: str = BLUE, label: str | None = None
) -> None:
    """Histogram of finite R² values on [0, 1] with the threshold line; the title says count and share above."""
    x = np.asarray(r2, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        return
    ax.hist(x, bins=40, range=(0, 1), color=colour, alpha=0.85, edgecolor="white", linewidth=0.4, label=label)
    ax.axvline(threshold, color="black", ls="--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("R²")
    ax.set_ylabel("count")
    ax.set_title(
        f"{title}\nn = {x.size}, median {np.median(x):.2f}, {100 * (x > threshold).mean():.0f} % > {threshold:g}"
    )
    ax.grid(alpha=0.3)


def heatmap_panel(ax, tensors: Sequence[dict[str, Any]], title: str = "mean weight R² per layer and module") -> None:
    rows, cols, mat = heatmap_matrix(tensors)
    cmap = _plt().get_cmap("Blues").with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("layer")
    if mat.size <= 400:
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                if np.isfinite(mat[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{mat[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if mat[i, j] > 0.6 else "black",
                    )
    ax.set_title(title)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="R²")


def activation_panel(ax, per_layer: Sequence[np.ndarray], threshold: float = 0.7) -> None:
    data = [np.asarray(x)[np.isfinite(x)] for x in per_layer]
    if not any(d.size for d in data):
        ax.text(0.5, 0.5, "no activation data", ha="center", va="center", transform=ax.transAxes)
        return
    ax.boxplot([d if d.size else [np.nan] for d in data], showfliers=False)
    ax.set_xticks(range(1, len(data) + 1), ["emb"] + [str(i) for i in range(1, len(data))])
    ax.axhline(threshold, color="black", ls="--", lw=1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("hidden state (emb = embedding output, i = after block i)")
    ax.set_ylabel("R²")
    ax.set_title("activation R² per layer")
    ax.grid(alpha=0.3)


# ------------------------------------------------------------------------------------------------- files


def weights_histogram(path, r2, threshold=0.7) -> str:
    fig, ax = _plt().subplots(figsize=(6, 4))
    r2_hist_panel(ax, r2, "weight R² (sampled, moving elements)", threshold)
    return _save(fig, path)


def logprob_histogram(path, r2_moving, r2_all, threshold=0.7, change=0.2) -> str:
    fig, ax = _plt().subplots(figsize=(6, 4))
    all_ = np.asarray(r2_all, dtype=float)
    all_ = all_[np.isfinite(all_)]
    if all_.size:
        ax.hist(all_, bins=40, range=(0, 1), color=GREY, alpha=0.35, label=f"all tokens ({all_.size})")
    r2_hist_panel(
        ax, r2_moving, f"token log-prob R² (tokens whose log-prob moved ≥ {change:g})", threshold, label="moved tokens"
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def weights_heatmap(path, tensors) -> str:
    rows, cols, _ = heatmap_matrix(tensors)
    fig, ax = _plt().subplots(figsize=(max(5, 1.0 * len(cols) + 3), max(3.5, 0.35 * len(rows) + 1.5)))
    heatmap_panel(ax, tensors)
    return _save(fig, path)


def _short(name: str) -> str:
    return name.replace("model.", "").replace("layers.", "L").replace("self_attn.", "").replace("mlp.", "")


def trajectories(path, examples: Sequence[dict[str, Any]], title: str = "sampled weights and their linear fits") -> str:
    """Points (step, value) and the fitted line of each example (dicts with steps, values, slope, intercept, r2)."""
    n = max(1, len(examples))
    cols = min(3, n)
    rows = int(np.ceil(n / cols))
    fig, axes = _plt().subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, ex in zip(axes.flat, examples):
        t = np.asarray(ex["steps"])
        ax.scatter(t, ex["values"], color=BLUE, s=22, zorder=3, label="checkpoint")
        ax.plot(t, ex["intercept"] + ex["slope"] * t, color=RED, ls="--", lw=1.5, label="least-squares line")
        ax.set_title(f"{_short(ex['label'])}[{ex['index']}]\nR² = {ex['r2']:.3f}", fontsize=9)
        ax.set_xlabel("RL step")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(examples) :]:
        ax.axis("off")
    if examples:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def token_groups_figure(
    path,
    groups: dict[str, dict[str, Any]],
    r2: np.ndarray,
    change: np.ndarray,
    group_of: np.ndarray,
    change_threshold: float,
    r2_threshold: float,
) -> str:
    """Fig. 9: per group, example token log-prob trajectories with their lines; last panel change vs R²."""
    fig, axes = _plt().subplots(1, 4, figsize=(18, 4))
    for ax, g in zip(axes, TOKEN_GROUPS):
        info = groups.get(g, {})
        for ex in info.get("examples", []):
            t = np.asarray(ex["steps"])
            line = ax.plot(t, ex["values"], marker="o", ms=3, lw=1, label=f"{ex['token']!r} (R² {ex['r2']:.2f})")
            ax.plot(t, ex["intercept"] + ex["slope"] * t, ls=":", lw=1, color=line[0].get_color())
        ax.set_title(
            f"{GROUP_TITLES[g]}: {info.get('count', 0)} tokens ({100 * info.get('frac', 0):.0f} %)", fontsize=10
        )
        ax.set_xlabel("RL step")
        ax.set_ylabel("log-prob")
        ax.grid(alpha=0.3)
        if info.get("examples"):
            ax.legend(fontsize=7)
    ax = axes[3]
    for k, g in enumerate(TOKEN_GROUPS):
        m = group_of == k
        ax.scatter(
            np.maximum(change[m], 1e-4),
            np.nan_to_num(r2[m], nan=0.0),
            s=6,
            alpha=0.5,
            color=GROUP_COLOURS[g],
            label=GROUP_TITLES[g],
        )
    ax.axvline(change_threshold, color="black", ls="--", lw=0.8)
    ax.axhline(r2_threshold, color="black", ls="--", lw=0.8)
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("log-prob change, max − min (nats)")
    ax.set_ylabel("R²")
    ax.set_title("every probe token")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def activations_figure(path, per_layer, threshold=0.7) -> str:
    fig, ax = _plt().subplots(figsize=(max(5, 0.6 * len(per_layer) + 3), 4))
    activation_panel(ax, per_layer, threshold)
    return _save(fig, path)


def overview(path, weight_r2, tensors, logprob_r2=None, activation_r2=None, threshold=0.7, title=None) -> str:
    """The 2 × 2 summary: weight R², token log-prob R², heatmap, activations (or a note when there were no probes)."""
    fig, axes = _plt().subplots(2, 2, figsize=(13, 9))
    r2_hist_panel(axes[0, 0], weight_r2, "weights", threshold)
    if logprob_r2 is not None:
        r2_hist_panel(axes[0, 1], logprob_r2, "token log-probs (moved tokens)", threshold, colour=GREEN)
    else:
        axes[0, 1].text(0.5, 0.5, "no probes: log-prob analysis skipped", ha="center", va="center")
        axes[0, 1].axis("off")
    heatmap_panel(axes[1, 0], tensors)
    if activation_r2 is not None:
        activation_panel(axes[1, 1], activation_r2, threshold)
    else:
        axes[1, 1].axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
