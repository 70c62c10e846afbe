"""A progress bar on stderr, without dependencies: one redrawn line on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Shows which pipeline runs and how far it is; ``enabled=False`` shows nothing."""

    WIDTH = 28

    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._label = ""
        self._total = 0
        self._start = 0.0
        self._last_draw = 0.0

    def note(self, text: str) -> None:
        if self.enabled:
            self._clear()
            print(text, file=self.stream, flush=True)

    def begin(self, label: str, total: int) -> None:
        self._label, self._total, self._start = label, total, time.perf_counter()
        if self.tty:
            self.update(0)
        elif self.enabled:
            print(f"  {label}: {total} batches ...", file=self.stream, flush=True)

    def update(self, done: int) -> None:
        if not self.tty:
            return
        now = time.perf_counter()
        if done not in (0, self._total) and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        filled = self.WIDTH * done // max(self._total, 1)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        line = f"  {self._label:<34} [{bar}] {done:>4}/{self._total} {now - self._start:6.1f} s"
        self.stream.write("\r" + line[:118])
        self.stream.flush()

    def end(self, outcome: str) -> None:
        if not self.enabled:
            return
        self._clear()
        print(f"  {self._label:<34} {outcome}", file=self.stream, flush=True)

    def _clear(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K")
