"""pyshmfeed: Ray producers write each batch straight into a slot of a shared-memory ring.

Two sources over the same workload: ``make`` runs the article's producer as
it is and pyshmfeed copies the returned arrays into the slot (one copy, in
the producer); ``fill`` writes the same batch in place into the slot's arrays
(no float64 temporary, no ``astype``, no copy). The training loop gets numpy
views of slot memory: nothing is copied on the consumer side.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pyshmfeed as sf
from pyshmfeed.source import SlotArrays, SourceContext

from ..workload import Workload, fill_batch, make_batch, measure, wait_quiet
from . import RunContext


class MakeSource:
    """``make(index, ctx)``: the article's producer; its arrays are copied into the slot."""

    def __init__(self, w: Workload) -> None:
        self.w = w

    def __call__(self, index: int, ctx: SourceContext) -> dict:
        x, y = make_batch(index, self.w)
        return {"x": x, "y": y}


class FillSource:
    """``fill(index, out, ctx)``: the same batch, written in place into the slot."""

    def __init__(self, w: Workload) -> None:
        self.w = w

    def __call__(self, index: int, out: SlotArrays, ctx: SourceContext) -> None:
        fill_batch(index, out["x"], out["y"], self.w)


def spec_for(w: Workload) -> sf.BatchSpec:
    return sf.BatchSpec(x=(tuple(w.shape), "float32"), y=(tuple(w.label_shape), "float32"))


def slots_for(w: Workload) -> int:
    # A fill source holds its slot while it sleeps on I/O: W slots are always being written,
    # so 2W leaves W ready batches ahead of the loop (the same depth as the queue peers).
    return 2 * w.workers


def _feed(w: Workload, length: int, source: dict, num_cpus: float) -> sf.Feed:
    # warm_producers: a row's feed leaves its producers for the new Feed timed after it (NOTE [warm producers]).
    return sf.Feed(spec_for(w), length=length, workers=w.workers, slots=slots_for(w), seed=w.seed,
                   num_cpus=num_cpus, warm_producers=True, **source)


@contextmanager
def _open(w: Workload, length: int, run: RunContext, source: dict):
    num_cpus = run.producer_cpus(w.workers)
    run.extra.update(producer_num_cpus=num_cpus, slots=slots_for(w))
    # Every row starts its producer processes: none is warm from an earlier row (NOTE [warm producers]).
    sf.release_producers()
    with _feed(w, length, source, num_cpus) as feed:
        batches = feed.epoch(0)
        yield ((b["x"], b["y"]) for b in batches)
        # The loop took every batch; finish the epoch so that the next one may start.
        leftover = sum(1 for _ in batches)
        if leftover:
            raise RuntimeError(f"the feed delivered {leftover} batches more than length={length}")
        run.extra["feed_stats"] = feed.stats()
        # Producers stay warm across epochs: epoch 1's first batch pays no start-up.
        t0 = time.perf_counter()
        epoch1 = feed.epoch(1)
        next(epoch1)
        run.extra["next_epoch_time_to_first_batch_s"] = time.perf_counter() - t0
        epoch1.close()
    # A new feed right after: it runs in this one's producer processes, from the pool. On the
    # transport presets (short runs) it runs the whole workload again, so its wall time compares.
    # On a machine at rest, as every row starts: Ray replaces the prestarted worker processes
    # this row's producers took (~0.35 s of CPU each, wait_quiet's docstring).
    run.extra["warm_feed_quiet_wait_s"] = wait_quiet()
    t0 = time.perf_counter()
    with _feed(w, length, source, num_cpus) as again:
        if w.preset:
            trace = measure(((b["x"], b["y"]) for b in again.epoch(0)), w, length, t0)
            assert trace.first is not None and trace.end is not None  # set by measure()
            run.extra["warm_feed_time_to_first_batch_s"] = trace.first - t0
            run.extra["warm_feed_wall_s"] = trace.end - t0
        else:
            batches = again.epoch(0)
            next(batches)
            run.extra["warm_feed_time_to_first_batch_s"] = time.perf_counter() - t0
            batches.close()
    sf.release_producers()


def open_make(w: Workload, length: int, run: RunContext) -> AbstractContextManager[Iterator[Any]]:
    return _open(w, length, run, {"make": MakeSource(w)})


def open_fill(w: Workload, length: int, run: RunContext) -> AbstractContextManager[Iterator[Any]]:
    return _open(w, length, run, {"fill": FillSource(w)})


def first_batch(w: Workload) -> dict:
    """Time to first batch of a new fill feed, producer processes included.

    With no Ray running, the feed starts Ray itself and shuts it down when it closes (the
    cold start); with Ray running, it starts producers on it.
    """
    num_cpus = RunContext(cpus=os.cpu_count() or 1).producer_cpus(w.workers)
    t0 = time.perf_counter()
    with _feed(w, min(w.batches, w.workers), {"fill": FillSource(w)}, num_cpus) as feed:
        batches = feed.epoch(0)
        next(batches)
        first = time.perf_counter() - t0
        batches.close()
    return {"time_to_first_batch_s": first, "close_s": time.perf_counter() - t0 - first}
