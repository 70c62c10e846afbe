"""End-to-end benchmarks: each pyshmfeed figure beside its reference, measured in the same run.

- feed throughput: producers write real bytes, the loop reads them all —
  pyshmfeed vs ``multiprocessing.Queue`` vs Ray actors through the object store;
- consumer cost per batch, 4 KiB to 64 MiB: the time the training loop spends
  taking one batch that is already made (producers are ahead) — the hand-off
  itself. pyshmfeed's should be flat in the batch size; a queue's or the
  object store's grows with it;
- adapter overhead: ``pyshmfeed.adapters.torch`` / ``.tfdata`` against the
  framework's own loader on the same data (skipped where the framework is
  not installed).

Run: ``.venv/bin/pytest bench/test_e2e_bench.py`` (add ``--benchmark-json``
to keep the figures). Groups put each pyshmfeed row beside its references;
``extra_info`` carries bytes per batch and GB/s. These are benchmarks, not
timed tests: every one asserts what it received, none asserts a time.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import time
from collections import deque

import numpy as np
import pytest

import pyshmfeed as sf

KiB, MiB = 1 << 10, 1 << 20
CONSUMER_SIZES = [4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB]
THROUGHPUT_BATCH = 4 * MiB
THROUGHPUT_BATCHES = 48
WORKERS = 2


def _size_id(nbytes: int) -> str:
    return f"{nbytes // MiB}MiB" if nbytes >= MiB else f"{nbytes // KiB}KiB"


CONSUMER_ROUNDS = 30
CONSUMER_GAP_S = 0.05


def _gap() -> None:
    """Untimed pause before each timed take, as a training step: every producer has the next batch ready.

    The same for every size and pipeline, because it matters: on these shared
    VMs code that takes ~10 µs back to back takes ~50-200 µs after tens of
    milliseconds of anything else (cold caches, vCPU scheduling), whatever
    the pipeline. 50 ms is enough for the slowest producer here (Ray copying
    64 MiB into the object store).
    """
    time.sleep(CONSUMER_GAP_S)


@pytest.fixture(scope="session")
def ray_for_bench():
    """One local Ray for every benchmark here; shut down at the end if this started it."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        # Producer functions defined here must unpickle in Ray workers: put this folder on their path.
        here = os.path.dirname(os.path.abspath(__file__))
        pythonpath = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, logging_level="ERROR",
                 object_store_memory=1 << 30, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    yield ray
    if started:
        ray.shutdown()


# ---- sources shared by every pipeline ----------------------------------------------

def _stamp_fill(index, out, ctx):
    """Producer work that does not depend on the size: stamp the index (the consumer checks it)."""
    out["x"][0] = index


def _write_fill(index, out, ctx):
    """Producer work proportional to the size: write every byte."""
    out["x"].fill(index % 251)


def _spec(nbytes: int) -> sf.BatchSpec:
    return sf.BatchSpec(x=((nbytes // 4,), "float32"))


def _mp_produce(batches, stop, nbytes: int, count: int, start: int, step: int, write: bool) -> None:
    for index in range(start, count, step):
        if stop.is_set():
            break
        # A new array each time: put() pickles later, on the queue's feeder thread.
        if write:
            x = np.full(nbytes // 4, index % 251, np.float32)
        else:
            x = np.empty(nbytes // 4, np.float32)
            x[0] = index
        batches.put((index, x))
    batches.put(None)


class _MpQueueSource:
    """``workers`` processes putting batches into one bounded ``multiprocessing.Queue``."""

    def __init__(self, nbytes: int, count: int, workers: int, write: bool) -> None:
        ctx = mp.get_context()
        self.queue = ctx.Queue(maxsize=4)
        self.stop = ctx.Event()
        self.done = 0
        self.procs = [ctx.Process(target=_mp_produce, args=(self.queue, self.stop, nbytes, count, k, workers, write),
                                  daemon=True) for k in range(workers)]
        for p in self.procs:
            p.start()

    def take(self):
        while True:
            item = self.queue.get(timeout=60)
            if item is not None:
                return item
            self.done += 1  # one producer finished its share; others may still have batches
            if self.done == len(self.procs):
                raise RuntimeError("every producer finished: no batch left")

    def close(self) -> None:
        self.stop.set()
        deadline = time.monotonic() + 10
        while any(p.is_alive() for p in self.procs) and time.monotonic() < deadline:
            try:
                self.queue.get(timeout=0.05)
            except queue_module.Empty:
                pass
        for p in self.procs:
            if p.is_alive():
                p.terminate()
            p.join()
        self.queue.close()
        self.queue.join_thread()


class _RayArrays:
    """A Ray actor returning arrays through the object store (the loop keeps ``depth`` calls in flight)."""

    def __init__(self, nbytes: int) -> None:
        self.x = np.zeros(nbytes // 4, np.float32)

    def make(self, index: int, write: bool):
        if write:
            self.x.fill(index % 251)
        else:
            self.x[0] = index
        return index, self.x


class _RaySource:
    def __init__(self, ray, nbytes: int, count: int, workers: int, write: bool, depth: int = 4) -> None:
        self.ray = ray
        cls = ray.remote(num_cpus=0.25)(_RayArrays)
        self.actors = [cls.remote(nbytes) for _ in range(workers)]
        self.count, self.write, self.submitted = count, write, 0
        self.in_flight: deque = deque()
        while self.submitted < min(count, depth * workers):
            self._submit()

    def _submit(self) -> None:
        actor = self.actors[self.submitted % len(self.actors)]
        self.in_flight.append(actor.make.remote(self.submitted, self.write))
        self.submitted += 1

    def take(self):
        item = self.ray.get(self.in_flight.popleft(), timeout=60)
        if self.submitted < self.count:
            self._submit()
        return item

    def close(self) -> None:
        self.in_flight.clear()
        for a in self.actors:
            self.ray.kill(a)


class _FeedSource:
    def __init__(self, nbytes: int, count: int, workers: int, write: bool) -> None:
        self.feed = sf.Feed(_spec(nbytes), fill=_write_fill if write else _stamp_fill, length=count,
                            workers=workers, slots=8, num_cpus=0.25)
        self.batches = self.feed.epoch(0)

    def take(self):
        b = next(self.batches)
        return b.index, b["x"]

    def close(self) -> None:
        self.batches.close()
        self.feed.close()


def _open(kind: str, ray, nbytes: int, count: int, workers: int, write: bool):
    if kind == "pyshmfeed":
        return _FeedSource(nbytes, count, workers, write)
    if kind == "mp.Queue":
        return _MpQueueSource(nbytes, count, workers, write)
    return _RaySource(ray, nbytes, count, workers, write)


KINDS = ["pyshmfeed", "mp.Queue", "ray object store"]


# ---- consumer cost per batch ------------------------------------------------------

@pytest.mark.timeout(300)
@pytest.mark.parametrize("nbytes", CONSUMER_SIZES, ids=_size_id)
@pytest.mark.parametrize("kind", KINDS)
def test_consumer_cost_per_batch(benchmark, ray_for_bench, kind, nbytes):
    """Time for the loop to take one batch that is already made; pyshmfeed's is O(1) in the size."""
    rounds, warmup = CONSUMER_ROUNDS, 3
    source = _open(kind, ray_for_bench, nbytes, rounds + warmup + 2, 1, write=False)
    seen = []

    def take():
        index, x = source.take()
        seen.append(index == int(x[0]) and x.nbytes == nbytes)

    try:
        benchmark.group = f"consumer cost per batch, {_size_id(nbytes)}"
        benchmark.extra_info.update(batch_bytes=nbytes, kind=kind)
        benchmark.pedantic(take, setup=_gap, rounds=rounds,
                           warmup_rounds=warmup, iterations=1)
    finally:
        source.close()
    # (--benchmark-disable runs the take once: count what ran, not what was asked for)
    assert seen and all(seen), "a batch arrived with the wrong index or size"


# ---- epochs timed without their start-up ---------------------------------------------

class _Epochs:
    """Runs epochs for ``pedantic``: ``setup`` opens one and takes its first batch (start-up, untimed),
    the timed ``rest`` takes every other batch; the previous epoch is closed in the next setup."""

    def __init__(self, open_epoch, check) -> None:
        self.open_epoch, self.check = open_epoch, check
        self.iterator = self.closer = None
        self.ok: list[bool] = []
        self.epochs = 0

    def setup(self):
        self.close()
        self.epochs += 1
        self.iterator, self.closer = self.open_epoch()
        self.ok.append(self.check(0, next(self.iterator)))

    def rest(self) -> None:
        for i, batch in enumerate(self.iterator, start=1):
            self.ok.append(self.check(i, batch))

    def close(self) -> None:
        if self.closer is not None:
            self.closer()
        self.iterator = self.closer = None


# ---- end-to-end throughput ---------------------------------------------------------

@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", KINDS)
def test_feed_throughput(benchmark, ray_for_bench, kind):
    """Producers write every byte, the loop reads every byte: batches/s and GB/s after the first batch."""
    nbytes, count = THROUGHPUT_BATCH, THROUGHPUT_BATCHES

    def open_epoch():
        source = _open(kind, ray_for_bench, nbytes, count, WORKERS, write=True)
        return (source.take() for _ in range(count)), source.close

    def check(i, batch):
        index, x = batch
        x.sum()  # the loop reads the whole batch, as a training step would
        return float(x[-1]) == index % 251  # the last element: the producer wrote the whole batch

    epochs = _Epochs(open_epoch, check)
    benchmark.group = f"end-to-end throughput, batches 2-{count} of {_size_id(nbytes)}, {WORKERS} producers"
    benchmark.extra_info.update(batch_bytes=nbytes, batches=count - 1, workers=WORKERS, kind=kind)
    try:
        benchmark.pedantic(epochs.rest, setup=epochs.setup, rounds=3, iterations=1)
    finally:
        epochs.close()
    assert len(epochs.ok) == epochs.epochs * count and all(epochs.ok)
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    best = benchmark.stats.stats.min
    benchmark.extra_info.update(batches_per_s=(count - 1) / best, gb_per_s=(count - 1) * nbytes / best / 1e9)


# ---- adapter overhead --------------------------------------------------------------

ADAPTER_BATCHES = 64
ADAPTER_SHAPE = (32, 64, 64, 3)  # 32 images of 64x64x3 float32: 1.5 MiB per batch


def _adapter(module: str, *names: str):
    """The adapter's entry point (its framework is checked by the caller's importorskip: a missing
    adapter is a failure here, not a skip)."""
    mod = __import__(module, fromlist=["_"])
    for name in names:
        if hasattr(mod, name):
            return getattr(mod, name)
    raise AttributeError(f"{module} has none of {names}: update this benchmark to its API")


class _Images:
    """A map-style dataset of float32 images, the usual input of a DataLoader."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return np.full(ADAPTER_SHAPE[1:], i % 251, np.float32), np.int64(i)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("impl", ["pyshmfeed", "pyshmfeed zero_copy", "torch"])
def test_torch_adapter_overhead(benchmark, ray_for_bench, impl):
    """Batches 2..N of an epoch through pyshmfeed's DataLoader drop-in vs torch's own, same arguments.

    pyshmfeed's default hands out owned tensors (one copy out of the slot, as
    torch's workers' shared-memory tensors are owned); ``zero_copy=True``
    hands out views of the slot, valid until the next batch.
    """
    pytest.importorskip("torch")
    if impl == "torch":
        from torch.utils.data import DataLoader
        options = {}
    else:
        DataLoader = _adapter("pyshmfeed.adapters.torch", "DataLoader")
        options = {"zero_copy": impl.endswith("zero_copy"), "feed_options": {"num_cpus": 0.25}}
    dataset = _Images(ADAPTER_BATCHES * ADAPTER_SHAPE[0])

    def open_epoch():
        loader = DataLoader(dataset, batch_size=ADAPTER_SHAPE[0], num_workers=WORKERS, **options)
        iterator = iter(loader)

        def close():
            shutdown = getattr(iterator, "_shutdown_workers", None) or getattr(loader, "close", None)
            if shutdown is not None:
                shutdown()
        return iterator, close

    def check(i, batch):
        x, y = batch
        return int(y[0]) == i * ADAPTER_SHAPE[0] and float(x[-1, 0, 0, 0]) == float(y[-1] % 251)

    epochs = _Epochs(open_epoch, check)
    benchmark.group = f"torch DataLoader, batches 2-{ADAPTER_BATCHES} of {ADAPTER_SHAPE} float32"
    benchmark.extra_info.update(batch_bytes=int(np.prod(ADAPTER_SHAPE)) * 4, impl=impl)
    try:
        benchmark.pedantic(epochs.rest, setup=epochs.setup, rounds=3, iterations=1)
    finally:
        epochs.close()
    assert len(epochs.ok) == epochs.epochs * ADAPTER_BATCHES and all(epochs.ok)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("impl", ["pyshmfeed", "tf.data.from_generator"])
def test_tfdata_adapter_overhead(benchmark, ray_for_bench, impl):
    """Batches 2..N of an epoch: a feed as a tf.data.Dataset vs from_generator over arrays already in memory.

    Both prefetch 2; the adapter makes one aligned copy per array (its
    docstring says why), from_generator one copy into a tensor.
    """
    tf = pytest.importorskip("tensorflow")
    nbytes = int(np.prod(ADAPTER_SHAPE)) * 4
    if impl == "tf.data.from_generator":
        def open_epoch():
            def gen():
                x = np.zeros(nbytes // 4, np.float32)
                for i in range(ADAPTER_BATCHES):
                    x[0] = i
                    yield {"x": x}
            ds = tf.data.Dataset.from_generator(
                gen, output_signature={"x": tf.TensorSpec((nbytes // 4,), tf.float32)}).prefetch(2)
            return iter(ds), None
    else:
        to_dataset = _adapter("pyshmfeed.adapters.tfdata", "dataset")

        def open_epoch():
            feed = sf.Feed(_spec(nbytes), fill=_stamp_fill, length=ADAPTER_BATCHES, workers=WORKERS,
                           slots=8, num_cpus=0.25)
            return iter(to_dataset(feed, prefetch=2)), feed.close

    def check(i, batch):
        return float(batch["x"][0]) == i

    epochs = _Epochs(open_epoch, check)
    benchmark.group = f"tf.data, batches 2-{ADAPTER_BATCHES} of {_size_id(nbytes)}"
    benchmark.extra_info.update(batch_bytes=nbytes, impl=impl)
    try:
        benchmark.pedantic(epochs.rest, setup=epochs.setup, rounds=3, iterations=1)
    finally:
        epochs.close()
    assert len(epochs.ok) == epochs.epochs * ADAPTER_BATCHES and all(epochs.ok)
