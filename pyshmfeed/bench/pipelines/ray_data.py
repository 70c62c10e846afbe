"""Ray Data: ``map_batches`` makes the batches in Ray tasks; ``iter_batches`` prefetches them.

Blocks travel through the object store as Arrow tensor columns; each batch
is one row (one block), made by one task. Two settings matter on a small
machine: each task's ``num_cpus`` (the default, 1, runs one task per core:
two sleeping producers on two cores) and the operator resource reservation,
which with its default holds back part of the CPUs for downstream operators
that do not exist here. With both defaults, on 2 cores, Ray Data runs at
about sequential speed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import ray
import ray.data

from ..workload import Workload, make_batch
from . import RunContext


def _make_rows(rows: dict[str, np.ndarray], w: Workload) -> dict[str, np.ndarray]:
    xs, ys = zip(*(make_batch(int(index), w) for index in rows["id"]))
    return {"x": np.stack(xs), "y": np.stack(ys)}


@contextmanager
def open_ray_data(w: Workload, length: int, run: RunContext) -> Iterator[Iterator[Any]]:
    context = ray.data.DataContext.get_current()
    saved = (context.op_resource_reservation_enabled, context.enable_progress_bars)
    context.op_resource_reservation_enabled = False
    context.enable_progress_bars = False
    data_logger = logging.getLogger("ray.data")
    saved_level = data_logger.level
    data_logger.setLevel(logging.WARNING)
    cpus = run.producer_cpus(w.workers)
    run.extra["task_num_cpus"] = cpus
    ds = ray.data.range(length, override_num_blocks=length).map_batches(
        _make_rows, fn_kwargs={"w": w}, batch_size=1, num_cpus=cpus,
        compute=ray.data.TaskPoolStrategy(size=w.workers))
    iterator = ds.iter_batches(batch_size=1, prefetch_batches=w.workers, batch_format="numpy")
    try:
        yield ((b["x"][0], b["y"][0]) for b in iterator)
    finally:
        del iterator
        context.op_resource_reservation_enabled, context.enable_progress_bars = saved
        data_logger.setLevel(saved_level)
