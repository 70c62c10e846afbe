"""``torch.utils.data.DataLoader`` over an iterable dataset sharded by worker.

Workers put each batch's tensors into shared memory (one copy in the worker,
``share_memory_``) and send a file descriptor; the training process maps it.
With CUDA, ``pin_memory=True`` adds a copy into pinned memory on a thread.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..workload import Workload, make_batch
from . import RunContext


class ShardedBatches(IterableDataset):
    """Worker k of W makes batches k, k+W, ...: the usual way to shard an iterable dataset."""

    def __init__(self, w: Workload, length: int) -> None:
        self.w = w
        self.length = length

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in self.w.shard(worker, num_workers, self.length):
            yield make_batch(index, self.w)


@contextmanager
def open_dataloader(w: Workload, length: int, run: RunContext) -> Iterator[Iterator[Any]]:
    with warnings.catch_warnings():
        # More workers than cores is deliberate: the producers sleep on (simulated) I/O.
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        loader = DataLoader(ShardedBatches(w, length), batch_size=None, num_workers=w.workers,
                            prefetch_factor=2, pin_memory=torch.cuda.is_available())
        iterator = iter(loader)
    run.extra["pin_memory"] = loader.pin_memory
    try:
        yield ((x.numpy(), y.numpy()) for x, y in iterator)
    finally:
        # Not exhausted (the loop takes exactly `length`): stop the workers now, not at garbage collection.
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        del iterator
