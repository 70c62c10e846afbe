"""The pipelines the bench compares, one table: what each needs, how to install it, how it is set up.

Each family lives in its own module and imports its framework at the top; the
table below names them by ``module:function`` so that listing the pipelines,
or reporting one as not installed, imports no framework. A pipeline's
``open(w, length, run)`` is a context manager yielding an iterator of
``(x, y)`` batches (numpy arrays or tensors convertible by ``np.asarray``); on
exit it stops its producers and frees everything it started, and it may
record extra figures in ``run.extra``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from ..workload import Workload

Opener = Callable[[Workload, int, "RunContext"], AbstractContextManager[Iterator[Any]]]


@dataclass
class RunContext:
    """What a pipeline may know about the run: cores, Ray's CPUs if Ray runs, and a place for figures."""

    cpus: int
    ray_cpus: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def producer_cpus(self, workers: int) -> float:
        """The fractional CPU each of ``workers`` Ray producers asks for, so that all fit at once.

        I/O-bound producers need more processes than cores; rounded down to
        Ray's resource granularity (1e-4) so that ``workers`` of them never
        exceed the total by a rounding error.
        """
        total = self.ray_cpus or float(self.cpus)
        return min(1.0, int(total / workers * 1000) / 1000)


@dataclass(frozen=True)
class Pipeline:
    key: str            # what --only / --skip take
    label: str          # the table's row name
    opener: str         # "module:function", relative to this package
    requires: tuple[str, ...]
    install: str        # what to run when a requirement is missing
    how: str            # the configuration, as a competent user would choose it
    serial: bool = False    # a single producer: runs Workload.serial_batches
    uses_ray: bool = False
    forks: bool = False     # starts producers with fork(): run before Ray's threads exist
    # Leaves Ray busy after it ends (Ray Data's executor and idle task workers wind down for
    # seconds): run after the other Ray pipelines so that their start-up is not charged for it.
    run_last: bool = False

    def missing(self) -> list[str]:
        """The required modules that cannot be imported here."""
        out = []
        for name in self.requires:
            try:
                found = importlib.util.find_spec(name) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                out.append(name)
        return out

    def load(self) -> Opener:
        module, _, function = self.opener.partition(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), function)


PIPELINES: tuple[Pipeline, ...] = (
    Pipeline("bare-ring", "bare shared-memory ring (the limit)", "bare_ring:open_bare_ring", (), "",
             "W forked producers fill slots of one shared_memory block; slot numbers go through two "
             "multiprocessing queues; no supervision, ordering or recovery", forks=True),
    Pipeline("sequential", "sequential generator", "sequential:open_sequential", (), "",
             "one generator in the training process: each batch is made when the loop asks for it",
             serial=True),
    Pipeline("tfdata", "tf.data from_generator + prefetch", "tfdata:open_prefetch", ("tensorflow",),
             "pip install 'pyshmfeed[tf]'  (tensorflow-cpu)",
             "Dataset.from_generator(one generator, output_signature).prefetch(AUTOTUNE)",
             serial=True),
    Pipeline("tfdata-interleave", "tf.data interleave", "tfdata:open_interleave", ("tensorflow",),
             "pip install 'pyshmfeed[tf]'  (tensorflow-cpu)",
             "range(W).interleave(from_generator(shard k), cycle_length=W, num_parallel_calls=AUTOTUNE, "
             "deterministic=False).prefetch(AUTOTUNE), threading.private_threadpool_size=W+2"),
    Pipeline("mpqueue", "multiprocessing + Queue", "mpqueue:open_mpqueue", (), "",
             "W multiprocessing.Process producers, each putting its shard's batches into one "
             "multiprocessing.Queue(maxsize=2W)", forks=True),
    Pipeline("torch", "torch DataLoader", "torch_loader:open_dataloader", ("torch",),
             "pip install 'pyshmfeed[torch]'",
             "DataLoader(IterableDataset sharded by get_worker_info(), batch_size=None, num_workers=W, "
             "prefetch_factor=2, pin_memory=CUDA available)", forks=True),
    Pipeline("ray-actors", "Ray actors + object store", "ray_actors:open_ray_actors", ("ray",),
             "pip install ray",
             "W Ray actors (num_cpus=cores/W each) returning (x, y) through the object store; the loop "
             "keeps 2W calls in flight, round-robin, and ray.get()s them in order", uses_ray=True),
    Pipeline("ray-data", "Ray Data", "ray_data:open_ray_data", ("ray", "ray.data", "pandas", "pyarrow"),
             "pip install 'pyshmfeed[raydata]'  (ray[data]: pandas, pyarrow)",
             "range(N, override_num_blocks=N).map_batches(make, batch_size=1, num_cpus=cores/W, "
             "compute=TaskPoolStrategy(size=W)).iter_batches(batch_size=1, prefetch_batches=W); "
             "op_resource_reservation_enabled=False", uses_ray=True, run_last=True),
    Pipeline("pyshmfeed-make", "pyshmfeed (copying make)", "shmfeed:open_make", ("ray",),
             "pip install pyshmfeed",
             "Feed(spec, make=the article's producer, workers=W, slots=2W): one copy, into the slot",
             uses_ray=True),
    Pipeline("pyshmfeed-fill", "pyshmfeed (in-place fill)", "shmfeed:open_fill", ("ray",),
             "pip install pyshmfeed",
             "Feed(spec, fill=the same batch written in place, workers=W, slots=2W): zero copy",
             uses_ray=True),
)

KEYS = tuple(p.key for p in PIPELINES)


def select(only: list[str] | None = None, skip: list[str] | None = None) -> list[Pipeline]:
    """The pipelines to run, in table order. Keys may name a family prefix ('pyshmfeed', 'tfdata')."""
    def matches(p: Pipeline, names: list[str]) -> bool:
        return any(p.key == n or p.key.startswith(n + "-") for n in names)

    for name in (only or []) + (skip or []):
        if not any(p.key == name or p.key.startswith(name + "-") for p in PIPELINES):
            raise ValueError(f"unknown pipeline {name!r}; choose from {', '.join(KEYS)}")
    chosen = [p for p in PIPELINES if not only or matches(p, only)]
    return [p for p in chosen if not skip or not matches(p, skip)]
