"""How every entry point fails on bad input: one line on stderr, exit code 2, no traceback.

    error: <field>: expected ..., got ...                    a config value (ConfigError)
    error: <path>[:<line>]: expected ..., found ...          a file or folder it points at (InputError)

Hydra reports a composition error (an unknown key, a value of the wrong type, a missing group option) over several
lines and exits 1, and prints "Error executing job ..." before a task's own exception. `hydra_cli` (train,
evaluate) turns both the composition errors and the task's `ConfigError`s into the line above. The argparse tools
(extrapolate, analyze) use `OneLineArgumentParser` and `report_errors` for the same line. `HYDRA_FULL_ERROR=1` shows
the traceback instead, for all four.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from orchestrator.config import CONF_DIR, ConfigError, unknown_field_message

_TYPE_WORDS = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def hydra_cli(config_name: str, schema: type) -> Callable[[Callable[[DictConfig], None]], Callable[[], None]]:
    """Decorator: the task becomes a console entry point over `conf/<config_name>.yaml` (typed by `schema`)."""

    def decorate(task: Callable[[DictConfig], None]) -> Callable[[], None]:
        failed: list[ConfigError] = []

        @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
        def composed(cfg: DictConfig) -> None:
            try:
                task(cfg)
            except ConfigError as exc:  # reported below, without Hydra's "Error executing job" line
                failed.append(exc)

        @functools.wraps(task)
        def main() -> None:
            wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
            os.environ["HYDRA_FULL_ERROR"] = "1"  # let composition errors reach us instead of Hydra's report
            try:
                composed()
                if failed:
                    raise failed[0]
            except Exception as exc:
                line = describe_config_error(exc, schema)
                if line is None or wants_traceback:
                    raise
                print_error(line)
                sys.exit(2)

        return main

    return decorate


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none): the detail of an error line that
    wraps another library's error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def print_error(message: str) -> None:
    """The one `error: ...` line on stderr."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse's usage errors as the one `error: ...` line (its default prints the usage block first)."""

    def error(self, message: str):
        print_error(f"{message} (see --help)")
        sys.exit(2)


def report_errors(*kinds: type[Exception]) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorator for an argparse tool's `main(argv) -> int`: a ConfigError or an exception of `kinds` (the tool's
    own bad-input errors) is printed as the one `error: ...` line and main returns 2; with HYDRA_FULL_ERROR=1 it
    is raised (a traceback) instead."""

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except (ConfigError, *kinds) as exc:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print_error(str(exc))
                return 2

        return wrapped

    return decorate


def describe_config_error(exc: BaseException, schema: type) -> str | None:
    """One line for a bad config (None when `exc` is not about the config)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, MissingConfigException):
        return _missing_option(str(exc))
    if isinstance(exc, OverrideParseException):
        return " ".join(str(exc).split())
    if isinstance(exc, ConfigCompositionException):
        cause = exc.__cause__
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
            return unknown_field_message(cause.full_key, schema)
        if isinstance(cause, ValidationError) and cause.full_key:
            return _wrong_type(cause.full_key, str(cause.msg))
        return str(exc).strip().splitlines()[0]
    return None


def _missing_option(message: str) -> str:
    """`model=xyz` → `model: expected one of ['hf', 'tiny'], got 'xyz'`."""
    found = re.search(r"Could not find '([^']+)/([^']+)'", message)
    if not found:
        return message.strip().splitlines()[0]
    group, name = found.groups()
    options = re.findall(r"^\t(\S+)$", message.split("Config search path")[0], flags=re.M)
    return f"{group.replace('/', '.')}: expected one of {options}, got {name!r}"


def _wrong_type(full_key: str, message: str) -> str:
    """`learner.zero_stage=abc` → `learner.zero_stage: expected an integer, got 'abc'`."""
    value = re.search(r"Value '(.*)' of type", message)
    target = re.search(r"could not be converted to (\w+)", message)
    what = _TYPE_WORDS.get(target.group(1), target.group(1)) if target else None
    if what and value:
        return f"{full_key}: expected {what}, got {value.group(1)!r}"
    return f"{full_key}: {message.strip().splitlines()[0]}"
