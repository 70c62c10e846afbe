"""The article's multiprocessing pipeline: producer processes put batches into one ``multiprocessing.Queue``.

Each batch is pickled in the producer (a copy), written through a pipe (a
copy into the kernel and one out) and unpickled in the training process (a
copy): the per-batch cost that grows with the batch size.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..workload import Workload, make_batch
from . import RunContext

_DONE = None
_ERROR = "error"


def _produce(batches: mp.Queue, stop, worker: int, num_workers: int, length: int, w: Workload) -> None:
    try:
        for index in w.shard(worker, num_workers, length):
            if stop.is_set():
                return
            batches.put(make_batch(index, w))
    except BaseException:  # noqa: BLE001 -- forwarded to the loop, which raises it
        batches.put((_ERROR, f"producer {worker}: {traceback.format_exc()}"))
    finally:
        batches.put(_DONE)


@contextmanager
def open_mpqueue(w: Workload, length: int, run: RunContext) -> Iterator[Iterator[Any]]:
    ctx = mp.get_context()
    batches = ctx.Queue(maxsize=2 * w.workers)
    stop = ctx.Event()
    producers = [ctx.Process(target=_produce, args=(batches, stop, k, w.workers, length, w), daemon=True,
                             name=f"bench-mpqueue-{k}") for k in range(w.workers)]
    for p in producers:
        p.start()
    # A batch takes io_sleep plus compute; a producer silent for far longer than that is stuck.
    timeout = 60.0 + 10 * w.io_sleep

    def take():
        done = 0
        while done < len(producers):
            try:
                item = batches.get(timeout=timeout)
            except queue_module.Empty:
                raise RuntimeError(f"no batch from the multiprocessing producers in {timeout:.0f} s") from None
            if item is _DONE:
                done += 1
            elif isinstance(item[0], str):  # (_ERROR, traceback text)
                raise RuntimeError(item[1])
            else:
                yield item

    try:
        yield take()
    finally:
        # Producers blocked on a full queue exit only once it drains: drain until they are gone.
        stop.set()
        deadline = time.monotonic() + 10.0
        while any(p.is_alive() for p in producers) and time.monotonic() < deadline:
            try:
                batches.get(timeout=0.05)
            except queue_module.Empty:
                pass
        for p in producers:
            if p.is_alive():
                p.terminate()
            p.join()
        batches.close()
        batches.join_thread()
