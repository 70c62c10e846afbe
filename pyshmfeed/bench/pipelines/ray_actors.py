"""Ray producers returning batches through Ray's shared-memory object store.

Each batch is serialised by the actor into the object store (a copy) and
mapped read-only, zero copy, by ``ray.get`` in the training process. The
loop keeps a bounded number of calls in flight (2 per actor), round-robin,
and takes them in order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import ray

from ..workload import Workload, make_batch
from . import RunContext


class BatchProducer:
    """A Ray actor (wrapped with ``ray.remote`` at run time, with the run's CPU share)."""

    def __init__(self, w: Workload) -> None:
        self.w = w

    def make(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return make_batch(index, self.w)


@contextmanager
def open_ray_actors(w: Workload, length: int, run: RunContext) -> Iterator[Iterator[Any]]:
    cpus = run.producer_cpus(w.workers)
    run.extra["producer_num_cpus"] = cpus
    producer = ray.remote(num_cpus=cpus)(BatchProducer)
    actors = [producer.remote(w) for _ in range(w.workers)]
    in_flight_max = 2 * w.workers
    timeout = 60.0 + 10 * w.io_sleep

    def take():
        in_flight = deque()
        submitted = 0
        while submitted < min(length, in_flight_max):
            in_flight.append(actors[submitted % len(actors)].make.remote(submitted))
            submitted += 1
        while in_flight:
            batch = ray.get(in_flight.popleft(), timeout=timeout)
            if submitted < length:
                in_flight.append(actors[submitted % len(actors)].make.remote(submitted))
                submitted += 1
            yield batch

    try:
        yield take()
    finally:
        for actor in actors:
            ray.kill(actor)
