"""Ring microbenchmarks (issue "The ring"): hand-off cost, wake latency, throughput, and references.

    .venv/bin/python -m pytest bench/test_ring_bench.py --benchmark-only -q

Everything is cross-process: the consumer is this process, each producer a
spawned process. Slot sizes 4 KiB, 1 MiB and 64 MiB; rings of SLOTS slots. Figures:

1. ``test_consumer_cost``: the consumer's cost for one batch that is already
   there: ring acquire + numpy view of the whole payload + read of its last
   element + release. ``ring-asleep``: the producer keeps the ring full, so it
   sleeps in ``claim`` and each release wakes it; ``ring-prefilled``: the ring
   was filled before and nobody waits on it. Each ring measurement asserts that
   no measured acquire waited (the ring's own wait counter). References, the
   same consumer work: ``mp.Queue`` (``get()`` from a full bounded queue of
   pickled arrays) and ``shared_memory`` (``get()`` a name from a queue whose
   producer keeps it full, attach, view, read, close, give the name back).
2. ``test_commit_to_wake_latency``: the consumer sleeps in ``acquire``; the
   producer commits; latency = CLOCK_MONOTONIC after ``acquire()`` returns
   minus the slot's ``commit_ns``. A distribution, not a timing:
   pytest-benchmark's own time for this test is the whole series; the
   percentiles are in ``extra_info`` and in the summary at the end.
   ``test_wake_latency_reference_pipe``: the same paced hand-off of an 8-byte
   stamp through a plain ``os.pipe`` (the consumer asleep in ``os.read``): what
   waking a sleeping Python process costs on this machine, for comparison.
3. ``test_throughput``: bytes/s through each transport when the producer
   ``np.copyto``'s a full slot per batch, and the floor: ``np.copyto`` of the
   same bytes in one process. The summary prints each rate's ratio to it.

Figures go to ``extra_info`` (see ``--benchmark-json``) and to the summary
printed by ``conftest.py``.
"""

from __future__ import annotations

import pytest
import ring_workloads as rw

SIZES = list(rw.SLOT_SIZES)

# Rounds per measurement (pytest-benchmark pedantic mode: one batch per round,
# the preparation untimed). mp.Queue pickles the whole payload: fewer rounds.
CONSUMER_ROUNDS = {"4KiB": 2000, "1MiB": 2000, "64MiB": 2000}
QUEUE_ROUNDS = {"4KiB": 2000, "1MiB": 300, "64MiB": 15}
WARMUP_ROUNDS = 20
# Throughput: one round moves STREAM_BATCHES batches (about 8-512 MiB).
STREAM_BATCHES = {"4KiB": 2048, "1MiB": 256, "64MiB": 8}
STREAM_ROUNDS = 5
LATENCY_HANDOFFS = 3000

CONSUMERS = {
    "ring-asleep": lambda size: rw.RingConsumerCost(rw.SLOT_SIZES[size], producer="asleep"),
    "ring-prefilled": lambda size: rw.RingConsumerCost(rw.SLOT_SIZES[size], producer="prefilled"),
    "mp.Queue": lambda size: rw.QueueConsumerCost(rw.SLOT_SIZES[size]),
    "shared_memory": lambda size: rw.ShmConsumerCost(rw.SLOT_SIZES[size]),
}
STREAMS = {
    "np.copyto": rw.CopyBaseline,
    "ring": rw.RingStream,
    "mp.Queue": rw.QueueStream,
    "shared_memory": rw.ShmStream,
}


@pytest.mark.parametrize("transport", list(CONSUMERS))
@pytest.mark.parametrize("size", SIZES)
def test_consumer_cost(benchmark, ring_figures, transport, size):
    benchmark.group = f"consumer cost per batch, {size} slots"
    rounds = QUEUE_ROUNDS[size] if transport == "mp.Queue" else CONSUMER_ROUNDS[size]
    with CONSUMERS[transport](size) as workload:
        benchmark.pedantic(workload.step, setup=workload.prepare, rounds=rounds,
                           warmup_rounds=min(WARMUP_ROUNDS, rounds))
        benchmark.extra_info.update(workload.check())
    median = benchmark.stats.stats.median
    benchmark.extra_info["median_us"] = median * 1e6
    ring_figures[("consumer", transport, size)] = median


@pytest.mark.parametrize("size", SIZES)
def test_commit_to_wake_latency(benchmark, ring_figures, size):
    benchmark.group = "commit-to-wake latency (time = whole series; percentiles in extra_info)"
    with rw.RingWakeLatency(rw.SLOT_SIZES[size], LATENCY_HANDOFFS) as workload:
        figures = benchmark.pedantic(workload.run, rounds=1, iterations=1)
    benchmark.extra_info.update(figures)
    ring_figures[("latency", "ring", size)] = figures
    print(f"\ncommit-to-wake {size}: p50 {figures['p50_us']:.1f} us, p99 {figures['p99_us']:.1f} us "
          f"over {figures['woken_handoffs']} wakes")


def test_wake_latency_reference_pipe(benchmark, ring_figures):
    benchmark.group = "commit-to-wake latency (time = whole series; percentiles in extra_info)"
    with rw.PipeWakeLatency(8, LATENCY_HANDOFFS) as workload:
        figures = benchmark.pedantic(workload.run, rounds=1, iterations=1)
    benchmark.extra_info.update(figures)
    ring_figures[("latency", "os.pipe", None)] = figures
    print(f"\nos.pipe wake: p50 {figures['p50_us']:.1f} us, p99 {figures['p99_us']:.1f} us "
          f"over {figures['woken_handoffs']} wakes")


@pytest.mark.parametrize("transport", list(STREAMS))
@pytest.mark.parametrize("size", SIZES)
def test_throughput(benchmark, ring_figures, transport, size):
    benchmark.group = f"throughput, {STREAM_BATCHES[size]} batches of {size}"
    batches = STREAM_BATCHES[size]
    with STREAMS[transport](rw.SLOT_SIZES[size], batches) as workload:
        benchmark.pedantic(workload.step, setup=workload.prepare, rounds=STREAM_ROUNDS, warmup_rounds=1)
        benchmark.extra_info.update(workload.check())
    rate = batches * rw.SLOT_SIZES[size] / benchmark.stats.stats.median
    benchmark.extra_info["GB_per_s"] = rate / 1e9
    floor = ring_figures.get(("throughput", "np.copyto", size))
    if floor:
        benchmark.extra_info["ratio_to_np_copyto"] = rate / floor
    ring_figures[("throughput", transport, size)] = rate
