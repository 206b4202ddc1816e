"""bench/task_curves.py's arithmetic: the seed-mean curve, the step it reaches 90 % of its rise, and its plot."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from task_curves import plot, summarise  # noqa: E402  (bench/ is not a package: it is put on the path above)


def run(accs: list[float], every: int = 10) -> dict:
    return {"curve": [(i * every, a) for i, a in enumerate(accs)], "mean_step_s": 0.5, "monitor": [(10, 0.8, 0.9)]}


def test_rise_is_read_off_the_seed_mean_curve_not_any_one_seed():
    # seed a rises early, seed b late; the mean is [0.1, 0.3, 0.55, 0.75, 0.8]: start 0.1, top 0.8, 90 % at 0.73
    a, b = run([0.1, 0.5, 0.8, 0.8, 0.8]), run([0.1, 0.1, 0.3, 0.7, 0.8])
    row = summarise([a, b])
    assert row["curve"] == [[0, 0.1], [10, 0.3], [20, 0.55], [30, 0.75], [40, 0.8]]
    assert (row["start"], row["best"], row["final"]) == (0.1, 0.8, 0.8)
    assert row["step_to_90pct_of_rise"] == 30  # seed a alone: 20, seed b alone: 40
    assert row["final_per_seed"] == [0.8, 0.8]


def test_a_curve_that_never_rises_has_no_rise_step():
    assert summarise([run([0.3, 0.2, 0.1])])["step_to_90pct_of_rise"] is None


def test_plot_writes_a_png_of_every_lr(tmp_path):
    runs = {"1e-4": [run([0.1, 0.4, 0.6]), run([0.1, 0.2, 0.5])], "4e-4": [run([0.1, 0.5, 0.4]), run([0.1, 0.6, 0.5])]}
    per_lr = {lr: summarise(rs) for lr, rs in runs.items()}
    path = tmp_path / "img" / "curves.png"
    plot(path, "toy_skills", per_lr, runs, best_lr="1e-4")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
