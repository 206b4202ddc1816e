"""Checkpoints on disk: the job's layout, and (below) the safetensors reader every tool shares.

The training job writes, per saved RL step:

    <output_dir>/checkpoints/rl_step_<N>/
        hf/                      the model as a Hugging Face save_pretrained directory (rank 0)
        rlextra_state.json       the job's position: step counters, data position, schedule, RNG, MLflow run
        ...                      DeepSpeed's per-rank model and optimizer state, RL-Extra anchors per rank

`rlextra_state.json` is written last, atomically: a checkpoint without it is incomplete and never resumed from.
Resume, learner-group recovery, `orchestrator.evaluate` and `orchestrator.analyze` all read this layout through
the functions here.

Standard library only (no torch): importing this module and reading headers is cheap.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"
HF_DIR = "hf"
STATE_FILE = "rlextra_state.json"

_TAG = re.compile(r"rl_step_(\d+)")
# Step-numbered folders of other trainers too (verl's global_step_N, HF Trainer's checkpoint-N), for the tools
# that read any series of checkpoints.
_ANY_STEP = re.compile(r"(?:rl_step|global_step|step|checkpoint)[_-](\d+)")


# ------------------------------------------------------------------------------------------------ layout


def checkpoint_root(output_dir: str | os.PathLike) -> str:
    """Where a job keeps its checkpoints."""
    return os.path.join(output_dir, CHECKPOINTS_DIR)


def checkpoint_tag(step: int) -> str:
    """The folder name of the checkpoint at RL step `step`."""
    return f"rl_step_{step}"


def step_of_tag(name: str) -> int | None:
    """The RL step of a checkpoint folder name (`rl_step_<N>`), or None for any other name."""
    m = _TAG.fullmatch(name)
    return int(m.group(1)) if m else None


def _last_step_in_path(path: str | os.PathLike, pattern: re.Pattern) -> int | None:
    for part in reversed(Path(path).parts):
        m = pattern.fullmatch(part)
        if m:
            return int(m.group(1))
    return None


def step_from_path(path: str | os.PathLike) -> int | None:
    """The step in a checkpoint path of this job or another trainer (``…/rl_step_50/hf``, ``global_step_100``,
    ``checkpoint-200``), or None."""
    return _last_step_in_path(path, _ANY_STEP)


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The RL step of a checkpoint: `rl_step` in a sibling/parent rlextra_state.json, else an `rl_step_<N>` folder."""
    p = Path(path)
    for state in (p / STATE_FILE, p.parent / STATE_FILE):
        if state.is_file():
            try:
                return int(json.loads(state.read_text())["rl_step"])
            except (ValueError, KeyError, TypeError):
                pass
    return _last_step_in_path(p, _TAG)


# ------------------------------------------------------------------------------------- complete or not


def write_state(checkpoint_dir: str | os.PathLike, state: dict) -> None:
    """Write the job's state into a checkpoint, last and atomically: from now on the checkpoint is complete."""
    tmp = os.path.join(checkpoint_dir, STATE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, os.path.join(checkpoint_dir, STATE_FILE))


def is_complete(checkpoint_dir: str | os.PathLike) -> bool:
    return os.path.exists(os.path.join(checkpoint_dir, STATE_FILE))


def complete_checkpoints(root: str | os.PathLike) -> list[str]:
    """Checkpoint tags under `root` that finished writing, oldest first."""
    tags = [(step_of_tag(d), d) for d in os.listdir(root)]
    return [d for step, d in sorted(t for t in tags if t[0] is not None) if is_complete(os.path.join(root, d))]


def newest_checkpoint(root: str | os.PathLike) -> tuple[str, dict] | None:
    """(tag, state) of the newest complete checkpoint under `root`, or None (also when `root` does not exist)."""
    tags = complete_checkpoints(root) if os.path.isdir(root) else []
    if not tags:
        return None
    with open(os.path.join(root, tags[-1], STATE_FILE)) as f:
        return tags[-1], json.load(f)
