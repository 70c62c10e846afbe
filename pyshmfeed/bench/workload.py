"""The published workload: what a producer does per batch, and how the training loop measures waits.

The article's producer makes each batch by simulating I/O (``time.sleep``), a
little Python work (a counting loop) and then building ``x``, a float32 array
(``np.random.rand(...).astype(np.float32)``: a float64 array, then a converted
copy) and ``y``, float32 labels. Its training loop measures how long it waits
for each next batch, then simulates a step.

Every pipeline of the bench runs these same functions: ``make_batch`` (the
article's producer as it is) or ``fill_batch`` (the same batch written in
place, for pyshmfeed's zero-copy source), and ``measure`` on the consumer side.
Everything here is module-level and picklable so that producer processes,
Ray actors and tf.data threads all run the identical code.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

DEFAULT_SHAPE = (4, 250_000, 3)
ARTICLE_SHAPE = (4, 1_000_000, 3)
LABEL_SHAPE = (4, 1)


@dataclass(frozen=True)
class Workload:
    """One bench run's parameters; every pipeline gets the same.

    ``batches`` is the epoch length for pipelines with several producers;
    ``serial_batches`` for those with a single producer (the sequential
    generator, tf.data over one generator), whose steady state is one
    producer's pace and shows after a few batches: running them as long would
    only add minutes. The first ``warmup`` batches of each run are start-up,
    not steady state: ``time_to_first_batch`` reports the first one and the
    steady-state figures exclude them all.
    """

    workers: int = 6
    batches: int = 80
    serial_batches: int = 12
    warmup: int = 8
    shape: tuple[int, ...] = DEFAULT_SHAPE
    label_shape: tuple[int, ...] = LABEL_SHAPE
    io_sleep: float = 0.5
    work: int = 10_000
    step: float = 0.1
    seed: int = 0
    # "random": the article's random data; "index": x filled with the batch index (nearly free, so the
    # transport presets measure the hand-off, not numpy's random generator).
    data: str = "random"
    touch: bool = False  # the loop reads every page of x (the transport presets' "large")
    preset: str | None = None  # the named workload these values came from ("small", "large")

    def __post_init__(self) -> None:
        for name in ("workers", "batches", "serial_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "work"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("io_sleep", "step"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")
        if not self.shape or any(d < 1 for d in self.shape):
            raise ValueError(f"shape must be positive dimensions, got {self.shape}")
        if self.data not in ("random", "index"):
            raise ValueError(f"data must be 'random' or 'index', got {self.data!r}")

    @property
    def batch_bytes(self) -> int:
        return 4 * (math.prod(self.shape) + math.prod(self.label_shape))

    def length(self, serial: bool) -> int:
        return self.serial_batches if serial else self.batches

    def shard(self, worker: int, num_workers: int, length: int) -> range:
        """The batch indices producer ``worker`` of ``num_workers`` makes: every num_workers-th."""
        return range(worker, length, num_workers)

    def describe(self) -> str:
        mb = self.batch_bytes / 1e6
        data = "random" if self.data == "random" else "filled with its index"
        touch = " (the loop reads every page of x)" if self.touch else ""
        return (f"{self.workers} producers; each batch: {self.io_sleep:g} s simulated I/O + a "
                f"{self.work}-iteration Python loop + x float32 {tuple(self.shape)} ({mb:.1f} MB, {data}) and "
                f"y float32 {tuple(self.label_shape)}; training step {self.step:g} s{touch}; "
                f"{self.batches} batches per run ({self.serial_batches} for single-producer pipelines), "
                f"the first {self.warmup} excluded from steady state")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["label_shape"] = list(self.label_shape)
        d["batch_bytes"] = self.batch_bytes
        return d


def _simulate_io_and_work(w: Workload) -> int:
    if w.io_sleep:
        time.sleep(w.io_sleep)
    total = 0
    for i in range(w.work):  # the article's "little Python work": holds the GIL on purpose
        total += i
    return total


def _rng(w: Workload, index: int) -> np.random.Generator:
    return np.random.default_rng([w.seed, index])


def make_batch(index: int, w: Workload) -> tuple[np.ndarray, np.ndarray]:
    """The article's producer for one batch, as it is: float64 random data, then ``astype``."""
    _simulate_io_and_work(w)
    if w.data == "index":
        return np.full(w.shape, index, np.float32), np.full(w.label_shape, index, np.float32)
    rng = _rng(w, index)
    x = rng.random(w.shape).astype(np.float32)
    y = rng.random(w.label_shape).astype(np.float32)
    return x, y


def fill_batch(index: int, x: np.ndarray, y: np.ndarray, w: Workload) -> None:
    """The same batch written in place: float32 random numbers straight into ``x`` and ``y``.

    This is what the in-place source removes compared with ``make_batch``: the
    float64 temporary, the ``astype`` copy, and the copy into the slot.
    """
    _simulate_io_and_work(w)
    if w.data == "index":
        x.fill(index)
        y.fill(index)
        return
    rng = _rng(w, index)
    rng.random(out=x, dtype=np.float32)
    rng.random(out=y, dtype=np.float32)


def shard_batches(worker: int, num_workers: int, length: int, w: Workload) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A classic generator pipeline's per-worker generator (``yield x, y``)."""
    for index in w.shard(worker, num_workers, length):
        yield make_batch(index, w)


@dataclass
class Trace:
    """What the training loop saw: one wait per batch, and when things happened.

    ``start`` is when the pipeline began to be built (before any process,
    actor or dataset existed); ``first`` when the loop held its first batch.
    """

    start: float
    waits: list[float] = field(default_factory=list)
    first: float | None = None
    end: float | None = None
    steady_start: float | None = None  # when the loop asked for the first steady-state batch
    steady_cpu: float | None = None    # this process's CPU time then (all its threads)
    end_cpu: float | None = None


def measure(batches: Iterable[Sequence[Any]], w: Workload, length: int, start: float,
            train_step: Callable[[Any, Any], None] | None = None,
            on_batch: Callable[[int], None] | None = None) -> Trace:
    """Run the training loop over ``length`` batches, timing each wait for the next batch.

    The loop drops its reference to a batch before asking for the next one, as
    a real loop does (pyshmfeed's views are valid until then; Ray frees an
    object when its last reference goes).
    """
    step = train_step or _default_step(w)
    trace = Trace(start=start)
    iterator = iter(batches)
    warm = min(w.warmup, length - 1)
    for i in range(length):
        if i == warm:
            trace.steady_start = time.perf_counter()
            trace.steady_cpu = time.process_time()
        t0 = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            raise RuntimeError(f"the pipeline ended after {i} batches; {length} were expected") from None
        t1 = time.perf_counter()
        trace.waits.append(t1 - t0)
        if trace.first is None:
            trace.first = t1
        x, y = batch[0], batch[1]
        del batch
        step(x, y)
        del x, y
        if on_batch is not None:
            on_batch(i + 1)
    trace.end = time.perf_counter()
    trace.end_cpu = time.process_time()
    close = getattr(iterator, "close", None)
    if close is not None:
        close()
    return trace


def _touch_every_page(x: Any) -> float:
    """Read one float of every 4 KiB page of x: the consumer really reads the batch."""
    return float(np.asarray(x).reshape(-1)[::1024].sum())


def _default_step(w: Workload) -> Callable[[Any, Any], None]:
    def step(x: Any, y: Any) -> None:
        if w.touch:
            _touch_every_page(x)
        if w.step:
            time.sleep(w.step)
    return step


def summarize(trace: Trace, w: Workload) -> dict[str, float | int]:
    """The figures of one run: start-up apart, then the steady state after ``warmup`` batches."""
    assert trace.first is not None and trace.end is not None and trace.steady_start is not None  # set by measure()
    waits = np.asarray(trace.waits)
    n = len(waits)
    warm = min(w.warmup, n - 1)
    steady = waits[warm:]
    steady_wall = trace.end - trace.steady_start
    return {
        "batches": n,
        "steady_batches": int(steady.size),
        "time_to_first_batch_s": trace.first - trace.start,
        "wall_s": trace.end - trace.start,
        "wait_mean_s": float(steady.mean()),
        "wait_p50_s": float(np.percentile(steady, 50)),
        "wait_p99_s": float(np.percentile(steady, 99)),
        "wait_max_s": float(steady.max()),
        "wait_mean_all_s": float(waits.mean()),
        "stall_fraction": float(steady.sum() / steady_wall) if steady_wall > 0 else 0.0,
        "batches_per_s": float(steady.size / steady_wall) if steady_wall > 0 else float("inf"),
        # The training process's CPU (every thread of it) per 1,000 steady-state batches.
        "cpu_ms_per_1000": (1e6 * (trace.end_cpu - trace.steady_cpu) / steady.size
                            if steady.size and trace.end_cpu is not None and trace.steady_cpu is not None
                            else float("nan")),
    }


def machine() -> dict[str, Any]:
    """Where the figures were measured (absolute times from shared 2-core machines are noise)."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    try:
        load = os.getloadavg()[0]  # other work on the machine skews every figure: say how much there was
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "platform": platform.platform(),
            "python": platform.python_version(), "load_average_1m": load}


def wait_quiet(busy_cores: float = 0.25, window: float = 0.2, timeout: float = 10.0) -> float:
    """Wait until the machine uses fewer than ``busy_cores`` cores over a ``window``; returns seconds waited.

    Each row starts on a machine at rest, as the bare ring (run first) does:
    what a row leaves running (Ray replacing the worker processes an actor
    took, a killed process's exit, tf.data's threads winding down) would
    otherwise be charged to the next row's start-up. Gives up after
    ``timeout``: a machine busy with other work is reported by its load average.
    """
    from ..autotune import IdleCores

    t0 = time.monotonic()
    idle = IdleCores()
    while time.monotonic() - t0 < timeout:
        time.sleep(window)
        if (os.cpu_count() or 1) - idle.sample() < busy_cores:  # (off Linux: all idle, no wait)
            break
    return time.monotonic() - t0


def _probe(buf: np.ndarray) -> float:
    """A fixed few microseconds of Python and numpy: about what taking a batch costs when all is hot."""
    total = float(buf[:4].sum())
    for i in range(100):
        total += i
    return total


def wake_floor(step: float, rounds: int = 20) -> dict[str, float]:
    """What the same small piece of code costs back to back, and right after a ``step``-long sleep.

    On a shared VM the second is many times the first (cold caches, vCPU
    scheduling): that difference is in every pipeline's wait per batch and
    no pipeline can remove it, so the report shows it beside the table.
    """
    buf = np.ones(1024, np.float32)
    hot, cold = [], []
    for _ in range(rounds):
        _probe(buf)  # warm: the timed run follows immediately
        t0 = time.perf_counter()
        _probe(buf)
        hot.append(time.perf_counter() - t0)
    for _ in range(rounds):
        time.sleep(step)
        t0 = time.perf_counter()
        _probe(buf)
        cold.append(time.perf_counter() - t0)
    return {"step_s": step, "hot_s": float(np.median(hot)), "after_step_s": float(np.median(cold))}
