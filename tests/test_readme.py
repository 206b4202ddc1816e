"""Every command line in the README that starts the job or the evaluation composes and passes the typed config's
checks, datasets included (files and checkpoints the examples name are not looked up: they are the reader's)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from orchestrator.config import EvaluateConfig, check_fields, compose, to_typed, validate

README = Path(__file__).resolve().parents[1] / "README.md"
ENTRY = {"orchestrator.train": "config", "orchestrator.evaluate": "evaluate"}


def readme_commands() -> list[tuple[str, list[str]]]:
    """(config name, overrides) for every `python -m orchestrator.train|evaluate` and `make run ARGS=...` line of the
    README's code blocks (continuation lines joined, `...` placeholders and comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    found = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            words = shlex.split(line) if line else []
            if words[:2] == ["make", "run"]:
                args = [w.removeprefix("ARGS=") for w in words if w.startswith("ARGS=")]
                found.append(("config", shlex.split(args[0]) if args else []))
                continue
            for module, config in ENTRY.items():
                if module in words:
                    rest = words[words.index(module) + 1 :]
                    found.append((config, [w for w in rest if "=" in w and not w.startswith("-") and w != "..."]))
    return found


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_check():
    assert sum(config == "config" for config, _ in COMMANDS) >= 8 and any(c == "evaluate" for c, _ in COMMANDS)


@pytest.mark.parametrize("config, overrides", COMMANDS, ids=[" ".join(o)[:80] or c for c, o in COMMANDS])
def test_readme_command_composes_and_validates(config, overrides, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    overrides = [o for o in overrides if not o.startswith("hydra.")]
    cfg = compose(overrides, config_name=config)
    if config == "config":
        validate(cfg)
    else:
        from orchestrator.evaluate import resolve_datasets

        evaluation = to_typed(cfg, EvaluateConfig)
        check_fields(evaluation, "")
        resolve_datasets(evaluation)
