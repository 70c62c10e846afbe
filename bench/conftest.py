"""Shared fixtures of the ring microbenchmarks, and the summary they print at the end.

The producer processes and consumer workloads themselves live in
``ring_workloads.py`` (importable without pytest, so the smoke test in
``tests/`` can run them). Here: ``ring_figures``, where each benchmark records
the figure it measured, and a terminal summary that puts them side by side with
the ratios and targets of the issue "The ring". The summary always prints, also
under ``-q``, and also notes the load average, because these 2-core machines are
shared and a busy neighbour shows up in every figure.
"""

from __future__ import annotations

import os

import pytest
from ring_workloads import SLOT_SIZES

# (measure, transport, size) -> figure; see test_ring_bench.py for what each one is.
_FIGURES: dict[tuple, object] = {}
_LOAD: dict[str, tuple[float, float, float]] = {}

CONSUMER_ROWS = [
    ("ring-asleep", "ring, producer asleep in claim (release wakes it)"),
    ("ring-prefilled", "ring, pre-filled (release wakes nobody)"),
    ("mp.Queue", "multiprocessing.Queue (pickled)"),
    ("shared_memory", "shared_memory + queue of names"),
]
THROUGHPUT_ROWS = [
    ("np.copyto", "np.copyto, one process (the floor)"),
    ("ring", "ring (producer np.copyto's into the slot)"),
    ("mp.Queue", "multiprocessing.Queue (pickled)"),
    ("shared_memory", "shared_memory + queue of names"),
]
CONSUMER_TARGET_US = 5.0
LATENCY_TARGETS_US = (20.0, 200.0)  # p50, p99
THROUGHPUT_TARGET_RATIO = 0.8


@pytest.fixture(scope="session")
def ring_figures() -> dict[tuple, object]:
    return _FIGURES


def pytest_sessionstart(session: pytest.Session) -> None:
    _LOAD["start"] = os.getloadavg()


def _row(label: str, cells: list[str]) -> str:
    return f"  {label:<52}" + "".join(f"{c:>16}" for c in cells)


def pytest_terminal_summary(terminalreporter) -> None:
    if not _FIGURES:
        return
    sizes = list(SLOT_SIZES)
    write = terminalreporter.write_line
    terminalreporter.section("ring microbenchmarks: summary (cross-process, same run)")
    write(f"  load average at start {_LOAD['start'][0]:.2f}, at end {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs")
    write(_row("slot size", sizes))

    write(f"consumer cost per batch, median [us] (target <= {CONSUMER_TARGET_US:g}, flat across sizes)")
    for key, label in CONSUMER_ROWS:
        cells = []
        for size in sizes:
            t = _FIGURES.get(("consumer", key, size))
            cells.append("-" if t is None else f"{t * 1e6:.2f}")
        write(_row(label, cells))
    for ref in ("mp.Queue", "shared_memory"):
        cells = []
        for size in sizes:
            ring, other = _FIGURES.get(("consumer", "ring-prefilled", size)), _FIGURES.get(("consumer", ref, size))
            cells.append("-" if ring is None or other is None else f"{other / ring:.1f}x")
        write(_row(f"{ref} / ring pre-filled", cells))

    p50_target, p99_target = LATENCY_TARGETS_US
    write(f"commit-to-wake latency [us] p50 / p99 (targets <= {p50_target:g} / <= {p99_target:g})")
    cells = []
    for size in sizes:
        lat = _FIGURES.get(("latency", "ring", size))
        cells.append("-" if lat is None else f"{lat['p50_us']:.1f} / {lat['p99_us']:.1f}")
    write(_row("ring (consumer asleep in acquire)", cells))
    pipe = _FIGURES.get(("latency", "os.pipe", None))
    if pipe is not None:
        write(f"  reference, os.pipe wake of a sleeping process (8-byte stamp): "
              f"{pipe['p50_us']:.1f} / {pipe['p99_us']:.1f}")

    write(f"throughput, median [GB/s] and ratio to np.copyto (ring target >= {THROUGHPUT_TARGET_RATIO:g})")
    for key, label in THROUGHPUT_ROWS:
        cells = []
        for size in sizes:
            rate = _FIGURES.get(("throughput", key, size))
            floor = _FIGURES.get(("throughput", "np.copyto", size))
            if rate is None:
                cells.append("-")
            elif floor is None or key == "np.copyto":
                cells.append(f"{rate / 1e9:.2f}")
            else:
                cells.append(f"{rate / 1e9:.2f} ({rate / floor:.2f})")
        write(_row(label, cells))


def pytest_collection_modifyitems(items: list) -> None:
    """test_loader_bench.py: every torch row first (torch's workers fork this process, which must not be a Ray
    driver yet), then pyshmfeed's rows, then the summaries; file order otherwise."""
    def rank(item) -> int:
        if item.path.name != "test_loader_bench.py":
            return 0
        if item.name.endswith("[torch]"):
            return 0
        return 2 if "[" not in item.name else 1
    items.sort(key=rank)
