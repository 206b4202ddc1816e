"""Console output of the entry points: one prefixed, flushed line per message."""

from __future__ import annotations


def console(msg: str) -> None:
    print(f"[rlextra] {msg}", flush=True)
