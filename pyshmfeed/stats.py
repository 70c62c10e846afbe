"""What the training loop experienced: per-batch waits, stall fraction, throughput, occupancy.

These are the numbers that tell a user whether the GPU is starved: a stall
fraction near 0 means the producers keep up; near 1 means the loop mostly
waits for data.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


class FeedStats:
    """Accumulates one feed's consumer-side measurements (single-threaded: the loop's thread)."""

    def __init__(self, batch_bytes: int) -> None:
        self.created = time.perf_counter()
        self.batch_bytes = batch_bytes
        self.startup_s = 0.0
        self.first_batch_s: float | None = None
        self.waits: list[float] = []
        self.bytes = 0
        self.occupancy_sum = 0
        self.wall_s = 0.0
        self.wait_total_s = 0.0  # running sums, read by the autotune controller from its thread

    def add_batch(self, wait_s: float, nbytes: int, ready_slots: int) -> None:
        if self.first_batch_s is None:
            self.first_batch_s = time.perf_counter() - self.created
        self.waits.append(wait_s)
        self.wait_total_s += wait_s
        self.bytes += nbytes
        self.occupancy_sum += ready_slots

    def counts(self) -> tuple[int, float]:
        """Batches delivered so far and the loop's total wait for them (cheap; any thread)."""
        return len(self.waits), self.wait_total_s

    def add_wall(self, seconds: float) -> None:
        self.wall_s += seconds

    def summary(self) -> dict[str, Any]:
        n = len(self.waits)
        waits = np.asarray(self.waits) if n else np.zeros(1)
        total_wait = float(waits.sum()) if n else 0.0
        return {
            "batches": n,
            "bytes": self.bytes,
            "wait_mean_s": float(waits.mean()) if n else 0.0,
            "wait_p50_s": float(np.percentile(waits, 50)) if n else 0.0,
            "wait_p99_s": float(np.percentile(waits, 99)) if n else 0.0,
            "wait_total_s": total_wait,
            "stall_fraction": total_wait / self.wall_s if self.wall_s > 0 else 0.0,
            "batches_per_s": n / self.wall_s if self.wall_s > 0 else 0.0,
            "gb_per_s": self.bytes / self.wall_s / 1e9 if self.wall_s > 0 else 0.0,
            "mean_occupancy": self.occupancy_sum / n if n else 0.0,
            "startup_s": self.startup_s,
            "time_to_first_batch_s": self.first_batch_s if self.first_batch_s is not None else float("nan"),
        }
