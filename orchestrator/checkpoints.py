"""Checkpoints on disk: the job's layout, and (below) the safetensors reader every tool shares.

The training job writes, per saved RL step:

    <output_dir>/checkpoints/rl_step_<N>/
        hf/                      the model as a Hugging Face save_pretrained directory (rank 0)
        rlextra_state.json       the job's position: step counters, data position, schedule, RNG, MLflow run
        rollout_in_flight.json   trainer.off_policy_steps=1: the next step's scored batch, already generated
        ...                      DeepSpeed's per-rank model and optimizer state, RL-Extra anchors per rank

Every rank writes into `.tmp-rl_step_<N>/` (the staging folder), the driver writes `rlextra_state.json` there last,
atomically, and renames the folder into place: a `rl_step_<N>` folder appears whole or not at all, and one without
the state file (an older layout, killed mid-write) is incomplete and never resumed from.

A complete checkpoint can still be torn afterwards (a disk filling up, a partial copy): `checkpoint_problem` checks
what resuming needs — the state file's keys, the HF weights' safetensors headers against their file sizes, and
DeepSpeed's files for every rank — and `newest_usable_checkpoint` skips a torn one for the previous one. Resume,
learner-group recovery, `orchestrator.evaluate` and `orchestrator.analyze` all read this layout through the
functions here.

The standard library and the typed config's errors only (no torch): importing this module and reading headers is
cheap.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import struct
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.config import InputError

CHECKPOINTS_DIR = "checkpoints"
HF_DIR = "hf"
STATE_FILE = "rlextra_state.json"
# What resuming reads from the state file (orchestrator/train.py's restore).
STATE_KEYS = ("rl_step", "data_position", "weight_version", "mlflow_run_id", "eval_before", "python_rng")
STAGING_PREFIX = ".tmp-"
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


def staging_dir(root: str | os.PathLike, tag: str) -> str:
    """Where every rank writes checkpoint `tag` before `publish_checkpoint` renames it into place. Left over from
    a killed attempt, it is removed here (nothing in it was complete)."""
    path = os.path.join(root, STAGING_PREFIX + tag)
    shutil.rmtree(path, ignore_errors=True)
    return path


def write_state(checkpoint_dir: str | os.PathLike, state: dict) -> None:
    """Write the job's state into a checkpoint, last and atomically: from now on the checkpoint is complete."""
    tmp = os.path.join(checkpoint_dir, STATE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, os.path.join(checkpoint_dir, STATE_FILE))


def publish_checkpoint(root: str | os.PathLike, tag: str) -> str:
    """Rename the staging folder of `tag` (its state file written) to `root/tag`, replacing a checkpoint of the
    same step that is already there; point DeepSpeed's `latest` at it. Returns the checkpoint's path."""
    staging, final = os.path.join(root, STAGING_PREFIX + tag), os.path.join(root, tag)
    if os.path.exists(final):  # e.g. the final checkpoint of a finished job, run again
        old = os.path.join(root, f".old-{tag}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    latest = os.path.join(root, "latest")  # DeepSpeed wrote the staging tag there; its zero_to_fp32.py reads it
    with open(latest + ".tmp", "w") as f:
        f.write(tag)
    os.replace(latest + ".tmp", latest)
    return final


def is_complete(checkpoint_dir: str | os.PathLike) -> bool:
    return os.path.exists(os.path.join(checkpoint_dir, STATE_FILE))


def complete_checkpoints(root: str | os.PathLike) -> list[str]:
    """Checkpoint tags under `root` that finished writing, oldest first."""
    tags = [(step_of_tag(d), d) for d in os.listdir(root)]
    return [d for step, d in sorted(t for t in tags if t[0] is not None) if is_complete(os.path.join(root, d))]


def read_json_object(path: Path) -> dict:
    """A JSON file holding one object; InputError naming the file otherwise (unreadable, not JSON, not an object)."""
    try:
        value = json.loads(path.read_text())
    except OSError as e:
        raise InputError(f"{path}: expected a readable file, found {e.strerror or e}") from None
    except ValueError:  # also a UnicodeDecodeError
        raise InputError(f"{path}: expected JSON, found unparsable text") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def read_state(checkpoint_dir: str | os.PathLike) -> dict:
    """A checkpoint's `rlextra_state.json` with every key resuming reads; InputError naming the file otherwise."""
    path = Path(checkpoint_dir) / STATE_FILE
    state = read_json_object(path)
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise InputError(f"{path}: expected the keys {', '.join(STATE_KEYS)}, found none of {', '.join(missing)}")
    return state


def checkpoint_problem(checkpoint_dir: str | os.PathLike, world_size: int | None) -> str | None:
    """Why a complete checkpoint cannot be loaded (one line naming the file), or None.

    Checks the state file's keys, the HF export's safetensors headers against the files' sizes and, for
    `world_size` ranks (None: skip), DeepSpeed's model and optimizer files and the RL-Extra state of an
    `rl_extra` job, each a whole torch zip archive (a truncated one has lost its central directory).

    A checkpoint written by a learner group of another size is not torn but cannot be resumed by this job: that is
    an InputError (the job would otherwise set aside every checkpoint of the run)."""
    d = Path(checkpoint_dir)
    try:
        state = read_state(d)
        read_safetensors_checkpoint(d / HF_DIR)
    except (InputError, SafetensorsError) as e:
        return str(e)
    if world_size is None:
        return None
    saved = state.get("world_size", world_size)
    if saved != world_size:
        raise InputError(
            f"{d / STATE_FILE}: expected a checkpoint of learner.world_size={world_size} ranks, found one of {saved} "
            f"(resume with learner.world_size={saved}, or trainer.resume=never)"
        )
    names = set(os.listdir(d))
    for rank in range(world_size):
        wanted = [
            (f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"),
            ("mp_rank_00_model_states.pt", f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"),  # ZeRO 1-2 | 3
        ]
        if state.get("schedule"):
            wanted.append((f"rl_extra_rank{rank}.pt",))
        for options in wanted:
            found = [n for n in options if n in names]
            if not found:
                return f"{d}: expected {' or '.join(options)} (learner rank {rank} of {world_size}), found none"
            if not zipfile.is_zipfile(d / found[0]):
                return f"{d / found[0]}: expected a whole torch checkpoint, found a truncated or corrupt file"
    return None


def newest_usable_checkpoint(
    root: str | os.PathLike, world_size: int
) -> tuple[str | None, dict | None, list[tuple[str, str]]]:
    """(tag, state, torn) of the newest complete checkpoint under `root` that `checkpoint_problem` passes (tag
    and state None when there is none, also when `root` does not exist). Each newer torn one is renamed to
    `<tag>.torn-<unix time>` (kept for inspection, never listed, resumed from or pruned as a checkpoint again),
    and `torn` holds (that name, one line saying why) for each, for the caller to log."""
    torn = []
    for tag in reversed(complete_checkpoints(root) if os.path.isdir(root) else []):
        problem = checkpoint_problem(os.path.join(root, tag), world_size)
        if problem is None:
            return tag, read_state(os.path.join(root, tag)), torn
        aside = f"{tag}.torn-{int(time.time())}"
        os.replace(os.path.join(root, tag), os.path.join(root, aside))
        torn.append((aside, f"checkpoint {tag} is torn, skipped (kept as {aside}): {problem}"))
    return None, None, torn


# ------------------------------------------------------------------------------------ safetensors headers

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 2**20  # the limit safetensors itself enforces

# What can be wrong with a checkpoint's weights, worded for "<path>: <problem>" (`path` is the directory, its
# index or one of its files). A caller that words a problem its own way looks it up by key.
PROBLEMS = {
    "unreadable": "expected a readable file, found {reason}",
    "too_short": "expected a safetensors file, found fewer than 8 bytes",
    "header_length": "expected a safetensors file, found a header length of {length} bytes (truncated or corrupt)",
    "header_not_json": "expected a safetensors file, found a header that is not JSON",
    "header_not_object": "expected a safetensors file, found a header that is not a JSON object",
    "bad_entry": "expected a safetensors file, found a bad entry for tensor {name!r}",
    "outside_file": "expected every tensor inside the file, found tensor {name!r} past its end (truncated or corrupt)",
    "no_weights": f"expected {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} (safetensors), found {{found}} "
    ".safetensors files",
    "bad_index": "expected a JSON object with a 'weight_map', found something else",
    "bad_shard_name": "expected shard file names, found {name!r}",
    "missing_shard": f"expected this shard (listed in {SAFE_WEIGHTS_INDEX_NAME}), found no such file",
    "stored_twice": "expected each tensor in one shard, found tensor {name!r} in both {first} and {second}",
    "not_in_shard": "expected tensor {name!r} in {file}, found it is not there",
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
