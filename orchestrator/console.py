"""The driver's console: one `[rlextra] …` line per event, flushed at once so it lands between progress-bar
updates. Every entry point (train, evaluate) and the actor groups log through it."""

from __future__ import annotations


def console(msg: str) -> None:
    print(f"[rlextra] {msg}", flush=True)
