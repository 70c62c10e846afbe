"""The DataLoader drop-in against torch's own DataLoader, dropped in: same dataset, same arguments, same run.

Workload (the adapter benchmark's): a map-style dataset of float32 images,
32 x 64x64x3 per batch (1.5 MiB), ``num_workers=2``, every other argument at
its default - so pyshmfeed's batches are owned tensors (one copy out of the
slot), like torch's. Each round opens a new epoch on the same loader, takes
its first batch untimed (start-up is not the steady state) and times batches
2..N; the loop does nothing but check each batch, so the figure is what the
loader itself costs.

torch's rows run first, before anything starts Ray in this process: torch's
workers fork this process, and forking a Ray driver is unsafe. The last test
prints the ratio (pyshmfeed time / torch time, lower is faster) and stores
it in ``extra_info``.

Run: ``.venv/bin/pytest bench/test_loader_bench.py`` (``--benchmark-json``
keeps the figures). A benchmark, not a timed test: it asserts what it
received, never a time.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

BATCH = (32, 64, 64, 3)
BATCHES = 96
WORKERS = 2
ROUNDS = 5
_FIGURES: dict[str, float] = {}


class Images:
    """A map-style dataset of float32 images and int64 labels, the usual input of a DataLoader."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return np.full(BATCH[1:], i % 251, np.float32), np.int64(i)


@pytest.fixture(scope="module")
def ray_for_loader_bench():
    """A local Ray whose workers can import this module (the dataset class lives here); shut down after."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        here = os.path.dirname(os.path.abspath(__file__))
        pythonpath = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    yield ray
    if started:
        ray.shutdown()


def _loader(impl: str):
    dataset = Images(BATCHES * BATCH[0])
    if impl == "torch":
        return torch.utils.data.DataLoader(dataset, batch_size=BATCH[0], num_workers=WORKERS)
    from pyshmfeed.torch import DataLoader

    options = {"zero_copy": True} if impl == "pyshmfeed zero_copy" else {}
    return DataLoader(dataset, batch_size=BATCH[0], num_workers=WORKERS, **options)


def _check(i: int, batch) -> bool:
    x, y = batch
    return (x.shape == BATCH and int(y[0]) == i * BATCH[0] and float(x[-1, 0, 0, 0]) == float(y[-1] % 251)
            and x.dtype == torch.float32 and y.dtype == torch.int64)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("impl", ["torch", "pyshmfeed", "pyshmfeed zero_copy"])
def test_loader_batches_2_to_n(benchmark, request, impl):
    """Batches 2..N of an epoch, owned tensors (default) on both sides; zero_copy as an extra row."""
    if impl != "torch":
        request.getfixturevalue("ray_for_loader_bench")  # only now: torch's rows fork before Ray exists
    loader = _loader(impl)
    state: dict = {}
    ok: list[bool] = []

    def setup():
        state["it"] = it = iter(loader)
        ok.append(_check(0, next(it)))  # start-up and the first batch: not timed

    def rest():
        it = state.pop("it")
        for i, batch in enumerate(it, start=1):
            ok.append(_check(i, batch))
            del batch

    benchmark.group = f"DataLoader dropped in: batches 2-{BATCHES} of {BATCH} float32, num_workers={WORKERS}"
    benchmark.extra_info.update(batch_bytes=int(np.prod(BATCH)) * 4 + 8 * BATCH[0], impl=impl, cpus=os.cpu_count(),
                                load_average=os.getloadavg()[0])
    try:
        benchmark.pedantic(rest, setup=setup, rounds=ROUNDS, iterations=1)
    finally:
        close = getattr(loader, "close", None)
        if close is not None:
            close()
    assert len(ok) == ROUNDS * BATCHES and all(ok)
    if benchmark.stats is not None:
        _FIGURES[impl] = benchmark.stats.stats.median
        benchmark.extra_info["batches_per_s"] = (BATCHES - 1) / benchmark.stats.stats.median


def test_ratio_to_torch(capsys):
    """pyshmfeed's median over torch's (same run): below 1.0 is faster than torch's loader."""
    if "torch" not in _FIGURES or "pyshmfeed" not in _FIGURES:
        pytest.skip("needs the timed rows above (not under --benchmark-disable)")
    with capsys.disabled():
        for impl in ("pyshmfeed", "pyshmfeed zero_copy"):
            if impl in _FIGURES:
                print(f"\n{impl}: {_FIGURES[impl] * 1e3:.1f} ms vs torch {_FIGURES['torch'] * 1e3:.1f} ms for "
                      f"batches 2-{BATCHES}: ratio {_FIGURES[impl] / _FIGURES['torch']:.2f} "
                      f"(load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")
