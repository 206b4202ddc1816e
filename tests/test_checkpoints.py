"""The checkpoint layout (naming, steps, the completeness marker) and the shared safetensors header reader, on
small files written here: no Ray, no models."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from orchestrator.checkpoints import (
    STATE_KEYS,
    SafetensorsError,
    checkpoint_problem,
    checkpoint_step,
    checkpoint_tag,
    complete_checkpoints,
    newest_usable_checkpoint,
    publish_checkpoint,
    read_safetensors_checkpoint,
    staging_dir,
    step_from_path,
    step_of_tag,
    write_state,
)

# ------------------------------------------------------------------------------------------------ layout


def test_tags_and_steps():
    assert checkpoint_tag(40) == "rl_step_40" and step_of_tag("rl_step_40") == 40
    assert step_of_tag("rl_step_40.tmp") is None and step_of_tag("global_step_40") is None
    assert step_from_path("run/checkpoints/rl_step_50/hf") == 50
    assert step_from_path("verl/global_step_100/actor") == 100 and step_from_path("out/checkpoint-200") == 200
    assert step_from_path("base") is None


def test_checkpoint_step(tmp_path):
    (tmp_path / "run" / "checkpoints" / "rl_step_40" / "hf").mkdir(parents=True)
    assert checkpoint_step(str(tmp_path / "run" / "checkpoints" / "rl_step_40" / "hf")) == 40
    (tmp_path / "run" / "checkpoints" / "rl_step_40" / "rlextra_state.json").write_text(json.dumps({"rl_step": 41}))
    assert checkpoint_step(str(tmp_path / "run" / "checkpoints" / "rl_step_40" / "hf")) == 41  # the state file wins
    assert checkpoint_step(str(tmp_path)) is None


def test_only_checkpoints_with_their_state_written_count(tmp_path):
    for step in (10, 2, 30):
        (tmp_path / checkpoint_tag(step)).mkdir()
    write_state(tmp_path / "rl_step_2", {"rl_step": 2})
    write_state(tmp_path / "rl_step_10", {"rl_step": 10})  # rl_step_30: still being written
    (tmp_path / "notes").mkdir()
    assert complete_checkpoints(tmp_path) == ["rl_step_2", "rl_step_10"]  # by step, not by name
    assert not list(tmp_path.glob("*/*.tmp"))
    assert newest_usable_checkpoint(tmp_path / "missing", 1) == (None, None, [])


def _write_checkpoint(root: Path, step: int, world_size: int = 2, zero_stage: int = 2) -> Path:
    """What a job writes for one step, in miniature: DeepSpeed's per-rank files (torch zip archives), RL-Extra's
    per-rank state, the HF export and the state file; staged and published as the job does."""
    tag = checkpoint_tag(step)
    d = Path(staging_dir(root, tag))
    (d / "hf").mkdir(parents=True)
    save_file({"w": torch.full((1024,), float(step))}, str(d / "hf" / "model.safetensors"))
    for rank in range(world_size):
        torch.save({"rank": rank}, d / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        torch.save({"rank": rank}, d / f"rl_extra_rank{rank}.pt")
        if zero_stage == 3:
            torch.save({"rank": rank}, d / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    if zero_stage != 3:
        torch.save({}, d / "mp_rank_00_model_states.pt")
    write_state(d, {**{k: 0 for k in STATE_KEYS}, "rl_step": step, "schedule": {"cycle": 1}, "world_size": world_size})
    return Path(publish_checkpoint(root, tag))


def test_staged_checkpoints_appear_whole_and_replace_their_step(tmp_path):
    first = _write_checkpoint(tmp_path, 4)
    assert first == tmp_path / "rl_step_4" and (tmp_path / "latest").read_text() == "rl_step_4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "rl_step_4"]  # no staging folder left
    again = _write_checkpoint(tmp_path, 4)  # the same step saved again (a finished job run once more)
    assert again == first and sorted(p.name for p in tmp_path.iterdir()) == ["latest", "rl_step_4"]
    (tmp_path / ".tmp-rl_step_6" / "hf").mkdir(parents=True)  # a save killed half-way
    assert complete_checkpoints(tmp_path) == ["rl_step_4"]
    assert not Path(staging_dir(tmp_path, "rl_step_6")).exists(), "the next save of that step starts clean"


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_whole_checkpoint_passes_and_a_missing_rank_file_is_named(tmp_path, zero_stage):
    ckpt = _write_checkpoint(tmp_path, 2, world_size=2, zero_stage=zero_stage)
    assert checkpoint_problem(ckpt, world_size=2) is None
    assert checkpoint_problem(ckpt, world_size=None) is None
    (ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert checkpoint_problem(ckpt, world_size=2) == (
        f"{ckpt}: expected zero_pp_rank_1_mp_rank_00_optim_states.pt or bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt "
        "(learner rank 1 of 2), found none"
    )


def test_a_checkpoint_of_another_world_size_is_an_input_error_not_a_torn_one(tmp_path):
    """Resuming with another learner.world_size must not set aside every checkpoint of the run."""
    from orchestrator.config import InputError

    _write_checkpoint(tmp_path, 2, world_size=2)
    with pytest.raises(
        InputError, match=r"rl_step_2/rlextra_state.json: expected a checkpoint of learner.world_size=1"
    ):
        newest_usable_checkpoint(tmp_path, world_size=1)
    assert complete_checkpoints(tmp_path) == ["rl_step_2"]


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize(
    "tear, problem",
    [
        (lambda d: _truncate(d / "hf" / "model.safetensors"), "hf/model.safetensors: expected every tensor inside"),
        (lambda d: _truncate(d / "zero_pp_rank_1_mp_rank_00_optim_states.pt"), "found a truncated or corrupt file"),
        (lambda d: (d / "rl_extra_rank1.pt").unlink(), "expected rl_extra_rank1.pt (learner rank 1 of 2), found none"),
        (lambda d: (d / "rlextra_state.json").write_text("{"), "rlextra_state.json: expected JSON, found unparsable"),
        (
            lambda d: (d / "rlextra_state.json").write_text('{"rl_step": 4}'),
            "found none of data_position, weight_version, mlflow_run_id, eval_before, python_rng",
        ),
    ],
)
def test_a_torn_newest_checkpoint_is_set_aside_for_the_previous_one(tmp_path, tear, problem):
    for step in (2, 4):
        _write_checkpoint(tmp_path, step)
    tear(tmp_path / "rl_step_4")
    tag, state, torn = newest_usable_checkpoint(tmp_path, world_size=2)
    assert tag == "rl_step_2" and state["rl_step"] == 2
    assert len(torn) == 1 and problem in torn[0][1] and torn[0][1].startswith("checkpoint rl_step_4 is torn, skipped")
    aside = tmp_path / torn[0][0]
    assert aside.is_dir() and aside.name.startswith("rl_step_4.torn-") and not (tmp_path / "rl_step_4").exists()
    assert complete_checkpoints(tmp_path) == ["rl_step_2"], "a set-aside checkpoint is never listed (nor pruned)"


# ------------------------------------------------------------------------------------------------ reader


def _tensors() -> dict[str, torch.Tensor]:
    return {
        "model.embed_tokens.weight": torch.randn(8, 4),
        "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4).to(torch.bfloat16),
        "model.norm.weight": torch.ones(4, dtype=torch.float16),
        "steps": torch.tensor([3], dtype=torch.int64),
    }


def _write_sharded(d: Path, tensors: dict, shards: dict[str, list[str]]) -> None:
    d.mkdir(parents=True)
    for fname, names in shards.items():
        save_file({n: tensors[n] for n in names}, str(d / fname))
    weight_map = {n: fname for fname, names in shards.items() for n in names}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"x": 1}, "weight_map": weight_map}))


def test_header_offsets_address_each_tensors_bytes(tmp_path):
    tensors = _tensors()
    shards = {"model-00001-of-00002.safetensors": ["model.norm.weight", "steps"]}
    shards["model-00002-of-00002.safetensors"] = [n for n in tensors if n not in shards[next(iter(shards))]]
    _write_sharded(tmp_path / "sharded", tensors, shards)
    ck = read_safetensors_checkpoint(tmp_path / "sharded")
    assert ck.sharded and ck.index_metadata == {"x": 1} and list(ck.files) == sorted(shards)
    assert set(ck.tensors) == set(tensors)
    for name, t in tensors.items():
        e = ck.tensors[name]
        assert e.shape == tuple(t.shape) and e.numel == t.numel() and e.nbytes == t.numel() * t.element_size()
        with open(e.file, "rb") as f:
            f.seek(e.offset)
            assert f.read(e.nbytes) == t.contiguous().view(torch.uint8).numpy().tobytes(), name

    save_file(tensors, str(tmp_path / "sharded" / "model.safetensors"))  # looked for first, as transformers does
    single = read_safetensors_checkpoint(tmp_path / "sharded")
    assert not single.sharded and list(single.files) == ["model.safetensors"]


def test_problems_name_the_file_at_fault(tmp_path):
    def problem(d: Path) -> tuple[str, Path]:
        with pytest.raises(SafetensorsError) as info:
            read_safetensors_checkpoint(d)
        assert "\n" not in str(info.value) and str(info.value).startswith(f"{info.value.path}: ")
        return info.value.problem, info.value.path

    (tmp_path / "empty").mkdir()
    assert problem(tmp_path / "empty") == ("no_weights", tmp_path / "empty")
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "model.safetensors").write_bytes(b"abc")
    assert problem(tmp_path / "short") == ("too_short", tmp_path / "short" / "model.safetensors")
    (tmp_path / "cut").mkdir()
    header = b'{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}'
    (tmp_path / "cut" / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    assert problem(tmp_path / "cut")[0] == "outside_file"
    tensors = _tensors()
    _write_sharded(tmp_path / "lost", tensors, {"a.safetensors": ["steps"], "b.safetensors": ["model.norm.weight"]})
    (tmp_path / "lost" / "b.safetensors").unlink()
    assert problem(tmp_path / "lost") == ("missing_shard", tmp_path / "lost" / "b.safetensors")
    _write_sharded(tmp_path / "twice", tensors, {"a.safetensors": ["steps"], "b.safetensors": ["model.norm.weight"]})
    save_file({n: tensors[n] for n in ("steps", "model.norm.weight")}, str(tmp_path / "twice" / "b.safetensors"))
    assert problem(tmp_path / "twice") == ("stored_twice", tmp_path / "twice")
