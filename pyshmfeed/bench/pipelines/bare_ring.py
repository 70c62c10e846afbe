"""The limit: a bare shared-memory ring written in a few lines, with nothing else around it.

W forked producers write batches into the slots of one ``multiprocessing.shared_memory``
block; slot numbers travel through two ``multiprocessing`` queues (free slots to the
producers, filled slots to the loop). The loop gets numpy views of the slot and hands the
slot back when it asks for the next batch. No supervision, no ordering, no recovery, no
staging: what any ring (pyshmfeed's included) cannot beat on this machine.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from ..workload import Workload, fill_batch
from . import RunContext

_DONE = -1


def _views(buf, slot: int, w: Workload) -> tuple[np.ndarray, np.ndarray]:
    x_bytes = 4 * int(np.prod(w.shape))
    stride = x_bytes + 4 * int(np.prod(w.label_shape))
    x = np.ndarray(w.shape, np.float32, buffer=buf, offset=slot * stride)
    y = np.ndarray(w.label_shape, np.float32, buffer=buf, offset=slot * stride + x_bytes)
    return x, y


def _produce(name: str, free, ready, worker: int, num_workers: int, length: int, w: Workload) -> None:
    shm = shared_memory.SharedMemory(name=name)
    try:
        for index in w.shard(worker, num_workers, length):
            slot = free.get()
            if slot == _DONE:
                return
            x, y = _views(shm.buf, slot, w)
            fill_batch(index, x, y, w)
            del x, y
            ready.put(slot)
    finally:
        ready.put(_DONE)
        shm.close()


@contextmanager
def open_bare_ring(w: Workload, length: int, run: RunContext) -> Iterator[Iterator[Any]]:
    ctx = mp.get_context("fork")
    slots = 2 * w.workers
    stride = 4 * (int(np.prod(w.shape)) + int(np.prod(w.label_shape)))
    shm = shared_memory.SharedMemory(create=True, size=slots * stride)
    free, ready = ctx.Queue(), ctx.Queue()
    for s in range(slots):
        free.put(s)
    producers = [ctx.Process(target=_produce, args=(shm.name, free, ready, k, w.workers, length, w), daemon=True)
                 for k in range(w.workers)]
    for p in producers:
        p.start()
    run.extra.update(slots=slots)

    def take():
        done, held = 0, None
        while done < len(producers):
            try:
                slot = ready.get(timeout=60.0 + 10 * w.io_sleep)
            except queue_module.Empty:
                raise RuntimeError("no batch from the bare-ring producers in a minute") from None
            if held is not None:
                free.put(held)  # the loop asked for the next batch: the previous slot is free again
                held = None
            if slot == _DONE:
                done += 1
                continue
            held = slot
            yield _views(shm.buf, slot, w)

    try:
        yield take()
    finally:
        for _ in producers:
            free.put(_DONE)
        deadline = time.monotonic() + 10.0
        for p in producers:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join()
        free.close()
        ready.close()
        import gc

        gc.collect()  # views of the block must be gone before it closes
        try:
            shm.close()
        except BufferError:
            pass  # a view still alive somewhere: the mapping goes with the process
        shm.unlink()
