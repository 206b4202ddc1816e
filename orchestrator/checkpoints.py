"""Checkpoints on disk: the job's layout, and (below) the safetensors reader every tool shares.

The training job writes, per saved RL step:

    <output_dir>/checkpoints/rl_step_<N>/
        hf/                      the model as a Hugging Face save_pretrained directory (rank 0)
        rlextra_state.json       the job's position: step counters, data position, schedule, RNG, MLflow run
        rollout_in_flight.json   trainer.off_policy_steps=1: the next step's scored batch, already generated
        ...                      DeepSpeed's per-rank model and optimizer state, RL-Extra anchors per rank

`rlextra_state.json` is written last, atomically: a checkpoint without it is incomplete and never resumed from.
Resume, learner-group recovery, `orchestrator.evaluate` and `orchestrator.analyze` all read this layout through
the functions here.

Standard library only (no torch): importing this module and reading headers is cheap.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"
HF_DIR = "hf"
STATE_FILE = "rlextra_state.json"
IN_FLIGHT_FILE = "rollout_in_flight.json"

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


# ------------------------------------------------------------------------------------ safetensors headers

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 2**20  # the limit safetensors itself enforces

# What can be wrong with a checkpoint's weights, worded for "<path>: <problem>" (`path` is the directory, its
# index or one of its files). A caller that words a problem its own way looks it up by key.
PROBLEMS = {
    "unreadable": "cannot read ({reason})",
    "too_short": "not a safetensors file (shorter than 8 bytes)",
    "header_length": "not a safetensors file (bad header length {length})",
    "header_not_json": "not a safetensors file (header is not JSON)",
    "header_not_object": "not a safetensors file (header is not a JSON object)",
    "bad_entry": "not a safetensors file (bad entry for tensor {name!r})",
    "outside_file": "truncated or corrupt (tensor {name!r} lies outside the file)",
    "no_weights": f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} (only safetensors checkpoints are supported)",
    "bad_index": "not a valid index (expected a JSON object with a 'weight_map')",
    "bad_shard_name": "bad shard file name {name!r}",
    "missing_shard": f"missing (listed in {SAFE_WEIGHTS_INDEX_NAME})",
    "stored_twice": "tensor {name!r} is stored in both {first} and {second}",
    "not_in_shard": "lists tensor {name!r} in {file}, which does not contain it",
}


class SafetensorsError(ValueError):
    """A checkpoint whose weights cannot be read: `problem` (a key of PROBLEMS) at `path`, `details` the values
    its wording names."""

    def __init__(self, problem: str, path: str | os.PathLike, **details):
        self.problem, self.path, self.details = problem, Path(path), details
        super().__init__(f"{self.path}: {PROBLEMS[problem].format(**details)}")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live: `nbytes` bytes from the absolute byte `offset` of `file`."""

    name: str
    dtype: str  # safetensors dtype code: F32, BF16, I64, ...
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsFile:
    path: Path
    metadata: dict[str, str] | None  # the header's __metadata__
    tensors: dict[str, TensorEntry]  # in file order (by offset)


@dataclass(frozen=True)
class SafetensorsCheckpoint:
    """The weights of a checkpoint directory, from the files' headers only."""

    path: Path
    files: dict[str, SafetensorsFile]  # by file name, in file-name order
    sharded: bool  # read through model.safetensors.index.json
    index_metadata: dict = field(default_factory=dict)  # the index's `metadata`

    @functools.cached_property
    def tensors(self) -> dict[str, TensorEntry]:
        """Every tensor by name."""
        return {name: t for f in self.files.values() for name, t in f.tensors.items()}


def read_safetensors_file(path: str | os.PathLike) -> SafetensorsFile:
    """Parse one safetensors file's header: names, dtypes, shapes, byte offsets (checked to lie inside the file)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError("too_short", path)
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise SafetensorsError("header_length", path, length=n)
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise SafetensorsError("unreadable", path, reason=e.strerror or e) from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SafetensorsError("header_not_json", path) from None
    if not isinstance(header, dict):
        raise SafetensorsError("header_not_object", path)
    metadata = header.pop("__metadata__", None)
    data_start = 8 + n
    spans = {}
    for name, t in header.items():
        try:
            begin, end = (int(x) for x in t["data_offsets"])
            spans[name] = (str(t["dtype"]), tuple(int(d) for d in t["shape"]), begin, end)
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError("bad_entry", path, name=name) from None
        if not 0 <= begin <= end or data_start + end > size:
            raise SafetensorsError("outside_file", path, name=name)
    tensors = {
        name: TensorEntry(name, dtype, shape, path, data_start + begin, end - begin)
        for name, (dtype, shape, begin, end) in sorted(spans.items(), key=lambda kv: (kv[1][2], kv[0]))
    }
    return SafetensorsFile(path, metadata if isinstance(metadata, dict) else None, tensors)


def read_safetensors_checkpoint(ckpt_dir: str | os.PathLike) -> SafetensorsCheckpoint:
    """The headers of a checkpoint directory's weights: ``model.safetensors`` (looked for first, as transformers
    does), the shards of ``model.safetensors.index.json`` (which must agree with the index), or else the
    directory's only ``*.safetensors`` file."""
    d = Path(ckpt_dir)
    single, index = d / SAFE_WEIGHTS_NAME, d / SAFE_WEIGHTS_INDEX_NAME
    if single.is_file():
        return SafetensorsCheckpoint(d, {single.name: read_safetensors_file(single)}, sharded=False)
    if index.is_file():
        return _read_sharded(d, index)
    found = sorted(d.glob("*.safetensors")) if d.is_dir() else []
    if len(found) != 1:
        raise SafetensorsError("no_weights", d, found=len(found))
    return SafetensorsCheckpoint(d, {found[0].name: read_safetensors_file(found[0])}, sharded=False)


def _read_sharded(d: Path, index: Path) -> SafetensorsCheckpoint:
    try:
        idx = json.loads(index.read_text())
        weight_map = idx["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise SafetensorsError("bad_index", index) from None
    files = {}
    for fname in sorted(set(weight_map.values())):
        if not isinstance(fname, str) or Path(fname).name != fname:
            raise SafetensorsError("bad_shard_name", index, name=fname)
        if not (d / fname).is_file():
            raise SafetensorsError("missing_shard", d / fname)
        files[fname] = read_safetensors_file(d / fname)
    where: dict[str, str] = {}
    for fname, shard in files.items():
        for name in shard.tensors:
            if name in where:
                raise SafetensorsError("stored_twice", d, name=name, first=where[name], second=fname)
            where[name] = fname
    for name, fname in weight_map.items():
        if where.get(name) != fname:
            raise SafetensorsError("not_in_shard", index, name=name, file=fname)
    return SafetensorsCheckpoint(d, files, sharded=True, index_metadata=dict(idx.get("metadata") or {}))
