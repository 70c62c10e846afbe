"""Producer processes from the feed's side: making sure one is gone before its work is re-issued."""

from __future__ import annotations

import os
import signal
import time

from .registry import is_alive


def wait_dead(pid: int | None, polite_s: float = 1.0) -> None:
    """Make sure a producer process is gone: wait ``polite_s`` for it to exit, then SIGKILL it.

    A paused (SIGSTOPped) producer ignores polite requests, and one Ray calls dead
    may still be running: either could commit after its work was re-issued.
    """
    if pid is None:
        return
    deadline = time.monotonic() + polite_s
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if is_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
    deadline = time.monotonic() + 10
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
