"""Offline weight extrapolation (``orchestrator.extrapolate``) and the shared selection rules.

Checkpoint pairs are built from the tiny toy model: t0 is the warm start (or a re-save of it), t1 the same
weights plus deterministic noise on *every* tensor (norms included, so "copied from t1" is observable).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from linearity.projection import project_
from linearity.selection import DEFAULT_EXCLUDE, TensorSelector
from orchestrator.extrapolate import ExtrapolationError, beta_from_steps, extrapolate_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NORMS = {
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.1.post_attention_layernorm.weight",
    "model.norm.weight",
}


# ----------------------------------------------------------------------------------------------- helpers


def _load_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _expected(t0: Path, t1: Path, beta: float, selector: TensorSelector) -> dict[str, torch.Tensor]:
    """The in-loop formula on the loaded tensors: project_ in fp32 on t1 with anchor t0, cast back."""
    a_all, w_all = _load_tensors(t0), _load_tensors(t1)
    exp = {}
    for name, w in w_all.items():
        if selector.selected(name) and w.is_floating_point():
            w32 = w.to(torch.float32, copy=True)
            project_(w32, a_all[name].to(torch.float32), beta)
            exp[name] = w32.to(w.dtype)
        else:
            exp[name] = w
    return exp


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.extrapolate", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def ckpts(toy_model_path, tmp_path_factory) -> dict[str, Path]:
    """t0/t1 pairs: fp32 single file, both sharded, mixed layouts, bf16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("extrapolate-ckpts")
    tok = AutoTokenizer.from_pretrained(toy_model_path)
    m0 = AutoModelForCausalLM.from_pretrained(toy_model_path, dtype=torch.float32)
    m1 = AutoModelForCausalLM.from_pretrained(toy_model_path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m1.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)

    paths = {"t0": Path(toy_model_path)}

    def save(model, name, **kw):
        paths[name] = root / name
        model.save_pretrained(paths[name], **kw)
        tok.save_pretrained(paths[name])

    save(m1, "t1")
    save(m0, "t0_sharded", max_shard_size="300KB")
    save(m1, "t1_sharded", max_shard_size="300KB")
    save(m0.to(torch.bfloat16), "t0_bf16")
    save(m1.to(torch.bfloat16), "t1_bf16")
    assert (paths["t1_sharded"] / "model.safetensors.index.json").is_file()
    assert len(list(paths["t1_sharded"].glob("*.safetensors"))) >= 3
    return paths


# --------------------------------------------------------------------------------------------- selection


def test_selector_defaults_exclude_norm_layers():
    sel = TensorSelector()
    for name in [
        "model.layers.0.input_layernorm.weight", "model.layers.3.post_attention_layernorm.weight",
        "model.norm.weight", "transformer.ln_f.weight", "ln_f.bias", "transformer.h.0.ln_1.weight",
        "encoder.layer.0.attention.output.LayerNorm.weight", "model.layers.0.self_attn.q_norm.weight",
        "decoder.layer_norm.weight", "module.model.norm.weight",
    ]:  # fmt: skip
        assert not sel.selected(name), name
    for name in [
        "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
        "lm_head.weight", "transformer.h.0.attn.c_attn.weight",
    ]:  # fmt: skip
        assert sel.selected(name), name
    assert sel.exclude == DEFAULT_EXCLUDE and sel.include == ("*",)


def test_selector_patterns_and_errors():
    sel = TensorSelector(include=["model.layers.1.*", "lm_head.*"], exclude=["*.bias"])
    assert sel.selected("model.layers.1.self_attn.q_proj.weight")
    assert not sel.selected("model.layers.1.self_attn.q_proj.bias")  # exclude wins
    assert not sel.selected("model.layers.0.self_attn.q_proj.weight")
    assert sel.selected("model.layers.1.input_layernorm.weight")  # --exclude replaced the default list
    assert sel.split(["lm_head.weight", "x"]) == (["lm_head.weight"], ["x"])
    assert TensorSelector(include="*proj*").include == ("*proj*",)  # a bare string is one pattern
    assert not TensorSelector(include=[]).selected("anything")
    assert TensorSelector(exclude=[]).selected("model.norm.weight")
    assert TensorSelector(exclude=["[n]orm*"]).selected("xnorm") and not TensorSelector(exclude=["[n]orm*"]).selected(
        "norm"
    )
    for kw, what in [({"exclude": ["[ab"]}, "exclude pattern '[ab'"), ({"include": [""]}, "include pattern ''"),
                     ({"include": [3]}, "include pattern 3")]:  # fmt: skip
        with pytest.raises(ValueError) as e:
            TensorSelector(**kw)
        assert what in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------ output correctness


def test_cli_steps_output_matches_in_loop_formula_and_loads(ckpts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    r = _run_cli("--t0-path", ckpts["t0"], "--t1-path", ckpts["t1"], "--t0", 100, "--t1", 200, "--target", 500,
                 "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "β = 4" in r.stdout and not _leftovers(tmp_path)

    log = json.loads((out / "extrapolation_log.json").read_text())
    assert (log["beta"], log["t0"], log["t1"], log["target"]) == (4.0, 100, 200, 500)
    assert set(log["copied"]) == NORMS and NORMS.isdisjoint(log["projected"])
    assert "lm_head.weight" not in log["tensors"]  # tied: absent from the files, absent from the output
    assert log["selection"] == TensorSelector().to_dict()

    a, w, got = _load_tensors(ckpts["t0"]), _load_tensors(ckpts["t1"]), _load_tensors(out)
    exp = _expected(ckpts["t0"], ckpts["t1"], 4.0, TensorSelector())
    assert set(got) == set(w) == set(log["tensors"])
    for name in got:
        assert got[name].dtype == w[name].dtype and got[name].shape == w[name].shape
        assert torch.equal(got[name], exp[name]), name  # bit-identical to project_
        if name in NORMS:
            assert torch.equal(got[name], w[name]) and not torch.equal(got[name], a[name])
        else:  # and the paper's formula, computed independently in fp64
            ref = a[name].double() + 4.0 * (w[name].double() - a[name].double())
            torch.testing.assert_close(got[name].double(), ref, rtol=1e-6, atol=1e-6)
        disp = torch.linalg.vector_norm(w[name].double() - a[name].double()).item()
        assert math.isclose(log["tensors"][name]["displacement_norm"], disp, rel_tol=1e-5)

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(model.model.embed_tokens.weight, got["model.embed_tokens.weight"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    tok, tok1 = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(ckpts["t1"])
    ids = tok("12+7=", return_tensors="pt")
    assert ids["input_ids"].tolist() == tok1("12+7=", return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (ckpts["t1"] / f).read_bytes()


@pytest.mark.parametrize(
    "t0, t1",
    [("t0_sharded", "t1_sharded"), ("t0", "t1_sharded"), ("t0_sharded", "t1"), ("t0_bf16", "t1_bf16")],
)
def test_layouts_and_dtypes(ckpts, tmp_path, t0, t1):
    sel = TensorSelector(exclude=["*norm*", "*.mlp.*"])
    out = tmp_path / "out"
    log = extrapolate_checkpoint(ckpts[t0], ckpts[t1], out, beta=2.5, selector=sel, t0_step=10, t1_step=20)
    assert log["target"] == 35 and log["beta"] == 2.5
    exp, got = _expected(ckpts[t0], ckpts[t1], 2.5, sel), _load_tensors(out)
    assert set(got) == set(exp)
    for name in got:
        assert got[name].dtype == exp[name].dtype, name
        assert torch.equal(got[name], exp[name]), name
    assert sorted(log["copied"]) == sorted(n for n in got if not sel.selected(n))
    # The output follows t1's layout: same shard files, same placement, an index when t1 has one.
    src_files = sorted(p.name for p in ckpts[t1].glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == src_files
    if (ckpts[t1] / "model.safetensors.index.json").exists():
        idx = json.loads((out / "model.safetensors.index.json").read_text())
        src = json.loads((ckpts[t1] / "model.safetensors.index.json").read_text())
        assert idx["weight_map"] == src["weight_map"]
        assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    else:
        assert not (out / "model.safetensors.index.json").exists()
    if "bf16" in t1:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out)
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16
        assert torch.equal(model.model.embed_tokens.weight, got["model.embed_tokens.weight"])


def test_beta_from_steps_and_function_errors(ckpts, tmp_path):
    assert beta_from_steps(0, 300, 900) == 3.0 and beta_from_steps(100, 200, 150) == 0.5
    with pytest.raises(ExtrapolationError, match="--t1"):
        beta_from_steps(5, 5, 10)
    with pytest.raises(ExtrapolationError, match="--beta"):
        extrapolate_checkpoint(ckpts["t0"], ckpts["t1"], tmp_path / "o", beta=float("inf"))
    # β = 1 reproduces t1 bit for bit, β = 0 gives t0 on the selected tensors.
    extrapolate_checkpoint(ckpts["t0"], ckpts["t1"], tmp_path / "b1", beta=1.0)
    extrapolate_checkpoint(ckpts["t0"], ckpts["t1"], tmp_path / "b0", beta=0.0)
    a, w = _load_tensors(ckpts["t0"]), _load_tensors(ckpts["t1"])
    b1, b0 = _load_tensors(tmp_path / "b1"), _load_tensors(tmp_path / "b0")
    for name in w:
        assert torch.equal(b1[name], w[name])
        assert torch.equal(b0[name], w[name] if name in NORMS else a[name])


# ----------------------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def bad_ckpts(ckpts, tmp_path_factory) -> dict[str, Path]:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("extrapolate-bad")
    tensors = _load_tensors(ckpts["t0"])
    d = {}

    def make(name, tensors_or_none, *, files=("config.json",)):
        d[name] = root / name
        d[name].mkdir()
        for f in files:
            shutil.copy(ckpts["t0"] / f, d[name] / f)
        if tensors_or_none is not None:
            save_file(tensors_or_none, str(d[name] / "model.safetensors"), metadata={"format": "pt"})

    make("no_weights", None)
    make("extra", {**tensors, "extra.weight": torch.zeros(3)})
    make("shape", {**tensors, "model.embed_tokens.weight": tensors["model.embed_tokens.weight"][:-1].clone()})
    d["missing_shard"] = root / "missing_shard"
    shutil.copytree(ckpts["t0_sharded"], d["missing_shard"])
    victim = sorted(d["missing_shard"].glob("model-*.safetensors"))[1]
    victim.unlink()
    d["missing_shard_name"] = Path(victim.name)
    make("corrupt", None)
    (d["corrupt"] / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    d["full_out"] = root / "full_out"
    d["full_out"].mkdir()
    (d["full_out"] / "keep.txt").write_text("keep")
    return d


def _error_cases(c, b, out):
    base = ["--t0-path", c["t0"], "--t1-path", c["t1"]]
    b2 = ["--beta", 2, "--out", out]  # beta 2 into the output folder
    return {
        "missing_t0_dir": (["--t0-path", b["no_weights"] / "nope", "--t1-path", c["t1"], *b2], "--t0-path"),
        "t1_no_safetensors": (["--t0-path", c["t0"], "--t1-path", b["no_weights"], *b2], "--t1-path"),
        "missing_shard": (["--t0-path", b["missing_shard"], "--t1-path", c["t1"], *b2], str(b["missing_shard_name"])),
        "corrupt_file": (["--t0-path", b["corrupt"], "--t1-path", c["t1"], *b2], "expected a safetensors file"),
        "names_differ": (["--t0-path", c["t0"], "--t1-path", b["extra"], *b2], "'extra.weight'"),
        "shapes_differ": ([*base[:2], "--t1-path", b["shape"], *b2], "'model.embed_tokens.weight' has shape"),
        "t1_equals_t0": ([*base, "--t0", 5, "--t1", 5, "--target", 10, "--out", out], "--t1"),
        "both_target_and_beta": ([*base, "--t0", 0, "--t1", 5, "--target", 10, *b2], "--target/--beta"),
        "neither_target_nor_beta": ([*base, "--out", out], "--target/--beta"),
        "target_without_steps": ([*base, "--target", 10, "--out", out], "--target: needs --t0 and --t1"),
        "beta_not_finite": ([*base, "--beta", "nan", "--out", out], "--beta"),
        "beta_not_a_number": ([*base, "--beta", "two", "--out", out], "--beta"),
        "out_not_empty": ([*base, "--beta", 2, "--out", b["full_out"]], "--overwrite"),
        "out_is_input": ([*base, "--beta", 2, "--out", c["t1"], "--overwrite"], "--out"),
        "out_contains_input": ([*base, "--beta", 2, "--out", c["t1"].parent, "--overwrite"], "--out"),
        "bad_pattern": ([*base, "--beta", 2, "--out", out, "--exclude", "*norm*", "[ab"], "--exclude"),
        "missing_required": ([*base, "--beta", 2], "--out"),
    }  # fmt: skip


_BROKEN = ("no_weights", "extra", "shape", "missing_shard", "missing_shard_name", "corrupt", "full_out")
ERROR_CASES = list(_error_cases({"t0": Path(), "t1": Path()}, {k: Path() for k in _BROKEN}, Path()))


@pytest.mark.parametrize("case", ERROR_CASES)
def test_cli_errors_are_one_line_exit_2(ckpts, bad_ckpts, tmp_path, case):
    out = tmp_path / "out"
    args, needle = _error_cases(ckpts, bad_ckpts, out)[case]
    r = _run_cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0], lines[0]
    assert not out.exists() and not _leftovers(tmp_path) and not _leftovers(bad_ckpts["full_out"].parent)
    assert (bad_ckpts["full_out"] / "keep.txt").read_text() == "keep"


def _failing_safe_open(monkeypatch, fail_after: int):
    import safetensors

    real, calls = safetensors.safe_open, [0]

    class Handle:
        def __init__(self, h):
            self._h = h

        def get_tensor(self, name):
            calls[0] += 1
            if calls[0] > fail_after:
                raise RuntimeError("simulated crash while reading")
            return self._h.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: Handle(real(*a, **k)))


def test_failure_mid_write_leaves_nothing_behind(ckpts, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _failing_safe_open(monkeypatch, fail_after=7)
    with pytest.raises(RuntimeError, match="simulated"):
        extrapolate_checkpoint(ckpts["t0_sharded"], ckpts["t1_sharded"], out, beta=2.0)
    assert not out.exists() and not _leftovers(tmp_path)
    # With --overwrite, a failed run keeps the old output; a successful one replaces it.
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="simulated"):
        extrapolate_checkpoint(ckpts["t0"], ckpts["t1"], out, beta=2.0, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"] and not _leftovers(tmp_path)
    monkeypatch.undo()
    extrapolate_checkpoint(ckpts["t0"], ckpts["t1"], out, beta=2.0, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file() and not _leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------- streaming


class _LiveTensorCounter:
    """Wraps safetensors.safe_open; counts the tensors returned by get_tensor that are still alive."""

    def __init__(self, monkeypatch):
        import safetensors

        self.alive = self.peak = self.reads = 0
        real = safetensors.safe_open
        counter = self

        class Handle:
            def __init__(self, h):
                self._h = h

            def get_tensor(self, name):
                t = self._h.get_tensor(name)
                counter.reads += 1
                counter.alive += 1
                counter.peak = max(counter.peak, counter.alive)
                weakref.finalize(t, counter._dead)
                return t

            def __getattr__(self, item):
                return getattr(self._h, item)

        monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: Handle(real(*a, **k)))

    def _dead(self):
        self.alive -= 1


def _synthetic_pair(root: Path, n: int) -> tuple[Path, Path]:
    """Two checkpoints with n float matrices, a 0-d scalar, an int64 buffer and a t0-fp32/t1-bf16 tensor."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(n)
    dirs = []
    for k in (0, 1):
        d = root / f"syn{n}_t{k}"
        d.mkdir()
        (d / "config.json").write_text("{}")
        t = {f"layers.{i}.proj.weight": torch.randn(16, 8, generator=g) for i in range(n)}
        t["scale"] = torch.tensor(1.0 + k)
        t["position_ids"] = torch.arange(10, dtype=torch.int64)
        t["mixed.weight"] = torch.randn(4, 4, generator=g).to(torch.float32 if k == 0 else torch.bfloat16)
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
        dirs.append(d)
    return dirs[0], dirs[1]


def test_streaming_holds_at_most_one_tensor_per_input(ckpts, tmp_path, monkeypatch):
    peaks = {}
    for label, (t0, t1) in {
        "toy": (ckpts["t0"], ckpts["t1"]),
        "toy_sharded": (ckpts["t0_sharded"], ckpts["t1_sharded"]),
        "syn20": _synthetic_pair(tmp_path, 20),
        "syn200": _synthetic_pair(tmp_path, 200),
    }.items():
        counter = _LiveTensorCounter(monkeypatch)
        log = extrapolate_checkpoint(t0, t1, tmp_path / f"out_{label}", beta=3.0)
        monkeypatch.undo()
        n_float = sum(1 for e in log["tensors"].values() if "displacement_norm" in e)
        assert counter.reads == 2 * n_float  # every float tensor read once from each input, nothing else
        assert counter.alive == 0
        peaks[label] = counter.peak
    assert all(p == 2 for p in peaks.values()), peaks  # one tensor of t0 + one of t1, whatever the model size

    # The synthetic pair's edge cases came out right too.
    out, (t0, t1) = tmp_path / "out_syn200", (tmp_path / "syn200_t0", tmp_path / "syn200_t1")
    got, a, w = _load_tensors(out), _load_tensors(t0), _load_tensors(t1)
    assert torch.equal(got["position_ids"], w["position_ids"])  # int: raw copy from t1
    assert got["scale"].shape == () and got["scale"].item() == 1.0 + 3.0 * (2.0 - 1.0)
    assert got["mixed.weight"].dtype == torch.bfloat16  # t1's dtype
    ref = a["mixed.weight"] + 3.0 * (w["mixed.weight"].float() - a["mixed.weight"])
    assert torch.equal(got["mixed.weight"], ref.to(torch.bfloat16)) or torch.allclose(
        got["mixed.weight"].float(), ref, rtol=2**-7, atol=1e-6
    )
    log = json.loads((out / "extrapolation_log.json").read_text())
    assert log["tensors"]["position_ids"]["action"] == "copied" and "I64" in log["tensors"]["position_ids"]["reason"]
    assert log["tensors"]["mixed.weight"]["t0_dtype"] == "F32"
