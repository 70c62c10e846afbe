"""The Feed path on transport-bound work (issue "Ray off the data path"), as pytest-benchmark cases.

    .venv/bin/python -m pytest bench/test_feed_bench.py --benchmark-only -q

The ``--preset small`` workload of ``pyshmfeed bench`` (64 KiB batches filled with their
index, 2 producers, no I/O, no training step), run through the bench's own pipelines: the
bare shared-memory ring (the limit), ``multiprocessing.Queue`` and ``Feed(fill=...)``. One
round = one whole run of BATCHES batches, start-up included; ``extra_info`` holds the
steady-state batches/s and the training process's CPU per 1,000 batches, and the summary
in ``conftest.py``'s style prints the ratios to the bare ring. Benchmarks, not timed tests:
each asserts it received every batch, none asserts a time.
"""

from __future__ import annotations

import time

import pytest

from pyshmfeed.bench.command import PRESETS
from pyshmfeed.bench.pipelines import RunContext, select
from pyshmfeed.bench.workload import Workload, measure, summarize

BATCHES = 3000
PIPELINES = ["bare-ring", "mpqueue", "pyshmfeed-fill"]
_RATES: dict[str, dict] = {}


@pytest.fixture(scope="module")
def ray_running():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="error")
    yield
    if started:
        ray.shutdown()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("key", PIPELINES)
def test_small_batches_through_each_transport(benchmark, ray_running, key):
    w = Workload(**{**PRESETS["small"], "batches": BATCHES, "warmup": 200}, preset="small")
    pipeline = select([key])[0]
    opener = pipeline.load()
    figures = {}

    def run_once():
        run = RunContext(cpus=2, ray_cpus=2.0)
        start = time.perf_counter()
        with opener(w, BATCHES, run) as batches:
            trace = measure(batches, w, BATCHES, start)
        figures.update(summarize(trace, w))

    benchmark.group = "small batches (64 KiB x 3,000, 2 producers): whole run"
    benchmark.pedantic(run_once, rounds=1, iterations=1)
    assert figures["batches"] == BATCHES
    benchmark.extra_info.update(batches_per_s=figures["batches_per_s"], cpu_ms_per_1000=figures["cpu_ms_per_1000"])
    _RATES[key] = figures
    if len(_RATES) == len(PIPELINES):
        limit = _RATES["bare-ring"]["batches_per_s"]
        for k, f in _RATES.items():
            print(f"\n  {k:<16} {f['batches_per_s']:9.0f} batches/s  ({f['batches_per_s'] / limit:.2f} x bare ring), "
                  f"training-process CPU {f['cpu_ms_per_1000']:.0f} ms / 1,000 batches", end="")
