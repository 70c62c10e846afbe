"""The ring microbenchmarks (bench/) still run: every workload, a few rounds, numbers out.

No timing is asserted here (shared CI machines); only that each measurement
runs end to end across processes, checks what it measured, returns figures,
and leaves no process or segment behind. The real run is
``pytest bench/test_ring_bench.py --benchmark-only``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SLOT = 4096  # the smallest benchmarked slot size: the workloads are the same at every size


@pytest.fixture
def rw(monkeypatch):
    """bench/ring_workloads.py; bench/ stays on sys.path so spawned producers import it too."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("ring_workloads")


def timed_rounds(workload, rounds: int) -> list[float]:
    """What pytest-benchmark's pedantic mode does: untimed prepare(), timed step()."""
    times = []
    for _ in range(rounds):
        workload.prepare()
        start = time.perf_counter()
        workload.step()
        times.append(time.perf_counter() - start)
    return times


def test_the_benchmark_module_and_its_conftest_import(rw):
    for name in ("conftest", "test_ring_bench"):
        spec = importlib.util.spec_from_file_location(f"_bench_ring_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    assert set(module.CONSUMERS) >= {"ring-asleep", "ring-prefilled", "mp.Queue", "shared_memory"}
    assert set(module.STREAMS) >= {"np.copyto", "ring", "mp.Queue", "shared_memory"}


@pytest.mark.parametrize("kind", ["ring-asleep", "ring-prefilled", "mp.Queue", "shared_memory"])
def test_consumer_cost_workload_runs(rw, kind):
    make = {
        "ring-asleep": lambda: rw.RingConsumerCost(SLOT, producer="asleep"),
        "ring-prefilled": lambda: rw.RingConsumerCost(SLOT, producer="prefilled"),
        "mp.Queue": lambda: rw.QueueConsumerCost(SLOT),
        "shared_memory": lambda: rw.ShmConsumerCost(SLOT),
    }[kind]
    with make() as workload:
        times = timed_rounds(workload, 2 * rw.SLOTS + 1)  # the pre-filled ring refills twice
        figures = workload.check()  # a ring acquire that waited raises here
    assert len(times) == 2 * rw.SLOTS + 1 and all(t > 0 for t in times)
    if kind.startswith("ring"):
        assert figures == {"acquires": 2 * rw.SLOTS + 1, "acquires_that_waited": 0}


@pytest.mark.parametrize("kind", ["ring", "os.pipe"])
def test_wake_latency_workload_runs(rw, kind):
    make = {"ring": rw.RingWakeLatency, "os.pipe": rw.PipeWakeLatency}[kind]
    with make(SLOT, handoffs=20, gap_s=0.002) as workload:
        figures = workload.run()
    assert figures["woken_handoffs"] + figures["handoffs_not_asleep"] == 20
    assert figures["woken_handoffs"] >= 1
    for key in ("p50_us", "p99_us", "max_us"):
        assert math.isfinite(figures[key]) and figures[key] > 0


@pytest.mark.parametrize("kind", ["np.copyto", "ring", "mp.Queue", "shared_memory"])
def test_throughput_workload_runs(rw, kind):
    make = {"np.copyto": rw.CopyBaseline, "ring": rw.RingStream,
            "mp.Queue": rw.QueueStream, "shared_memory": rw.ShmStream}[kind]
    batches = 2 * rw.SLOTS  # more than fit at once: the producer has to wait for the consumer
    with make(SLOT, batches) as workload:
        times = timed_rounds(workload, 2)
        figures = workload.check()
    assert figures["batches_per_step"] == batches
    assert all(batches * SLOT / t > 0 for t in times)
