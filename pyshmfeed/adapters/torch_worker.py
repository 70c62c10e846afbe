"""The producer side of the DataLoader drop-in: producer ``w`` plays torch's DataLoader worker ``w``.

NOTE [worker emulation]
  plan     The loop splits each loader epoch into *chunks* of at most
           ``length`` batches, one feed epoch each, and posts a ``Plan`` per
           chunk to the loader's plan actor (``Plans``, a Ray actor: a few KB
           per chunk, never per batch): the loader epoch, the batch number of
           the chunk's task 0, how many of its tasks are real batches, their
           sample indices (map-style), the epoch's base seed and IterDataPipe
           shared seed, whether workers start fresh this epoch, and the
           pickled ``(dataset, worker_init_fn, collate_fn)`` - one pickle, so
           a ``worker_init_fn`` bound to the dataset still sees the producer's
           copy of it. A producer fetches a plan at its first task of a chunk.
  start    At its first task of a loader epoch a producer starting fresh
           (every epoch without ``persistent_workers``; the first one with)
           does what torch's ``_worker_loop`` does before serving: one
           intra-op thread; ``random``, torch and numpy seeded from
           ``base_seed + worker`` exactly as torch seeds them; an IterDataPipe
           re-seeded from the shared seed and sharded; ``get_worker_info()``
           set; ``worker_init_fn(worker)``; the fetcher made. An exception
           there becomes the result of its first batch, as in torch.
           Persistent workers only re-seed an IterDataPipe and make a new
           fetcher (torch's ``_ResumeIteration``).
  task     Task k of a chunk is loader batch ``first + k``, made by producer
           ``k % workers`` only (the feed's round-robin assignment; chunks
           are a multiple of ``workers`` long): each producer makes the
           batches torch's worker of that number makes, in the same order,
           with the same random state and dataset state.
  results  Every outcome is written into the slot (torch_slot.py): the batch,
           stacked straight into the slot by the default collate; or the
           exception (torch's ``ExceptionWrapper``, re-raised by the loop at
           that batch's ``next()``, and the epoch goes on, as in torch); or
           EXHAUSTED (an iterable dataset's worker ran out: the loop skips the
           batch, as torch does); or PAST_END (tasks after the epoch's last
           batch: no dataset call, no random draw). A batch too large for the
           slot goes through the plan actor instead (STASHED).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import torch_slot

MAP, ITERABLE = 0, 1  # torch's _DatasetKind values


@dataclass(frozen=True)
class Plan:
    """One chunk of a loader epoch: what its tasks make (NOTE [worker emulation], plan)."""

    loader_epoch: int
    first: int                      # loader batch number of task 0
    count: int                      # real batches; tasks from here on are PAST_END
    flat: Any = None                # map-style, int keys: the chunk's sample indices, concatenated ...
    offsets: Any = None             # ... and where each batch's start (np.int64, count + 1)
    keys: Any = None                # map-style, other keys: a list with one entry per batch
    base_seed: int = 0
    shared_seed: int | None = None  # IterDataPipe only
    fresh: bool = True              # this loader epoch starts fresh workers (no persistent_workers, or the first)
    payload: Any = None             # [ObjectRef] of (dataset, worker_init_fn, collate_fn), nested: not resolved

    def index(self, k: int) -> Any:
        """What the fetcher gets for task ``k``: a list of keys (auto-collation) or one key."""
        if self.flat is not None:
            return self.flat[self.offsets[k]: self.offsets[k + 1]].tolist()
        return self.keys[k]


class Plans:
    """The loader's plan actor: chunk plans, and batches too large for a slot (the control plane)."""

    def __init__(self) -> None:
        self._plans: dict[int, Plan] = {}
        self._stash: dict[Any, bytes] = {}

    def put(self, feed_epoch: int, plan: Plan) -> None:
        self._plans[feed_epoch] = plan
        for old in [e for e in self._plans if e < feed_epoch - 4]:
            del self._plans[old]

    def get(self, feed_epoch: int) -> Plan:
        return self._plans[feed_epoch]

    def stash(self, key: Any, blob: bytes) -> None:
        self._stash[key] = blob

    def unstash(self, key: Any) -> bytes:
        return self._stash.pop(key)


RAY_CALL_S = 300.0    # a plan actor that has not answered by then is gone: say so, never hang
_RAY_SLICE_S = 1.0    # waits in slices, so Ctrl-C and signal handlers get through


def ray_get(ref: Any, what: str, timeout: float = RAY_CALL_S) -> Any:
    """``ray.get(ref)``, in slices, raising ``ShmfeedError`` naming ``what`` after ``timeout`` seconds."""
    import time

    import ray

    from ..errors import ShmfeedError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get(ref, timeout=min(_RAY_SLICE_S, max(deadline - time.monotonic(), 0.001)))
        except ray.exceptions.GetTimeoutError:
            if time.monotonic() >= deadline:
                raise ShmfeedError(f"{what}: no answer from Ray within {timeout:g} s (the loader's plan actor "
                                   "or the Ray cluster is gone; see the Ray logs)") from None


_PLANS_ACTOR = None


def plans_actor_class():
    """``Plans`` as a Ray actor class, made once per process (each ``ray.remote`` exports it again)."""
    global _PLANS_ACTOR
    if _PLANS_ACTOR is None:
        import ray

        _PLANS_ACTOR = ray.remote(num_cpus=0, max_restarts=0)(Plans)
    return _PLANS_ACTOR


def collate_into(worker: "Worker", batch: list) -> Any:
    """torch's ``default_collate``, with each stacked tensor written straight into the slot."""
    from torch.utils.data._utils.collate import collate

    return collate(batch, collate_fn_map=worker.collate_map)


def _stack_into_slot(worker: "Worker", batch, *, collate_fn_map=None):
    """``collate_tensor_fn`` with the slot as ``out``; anything unusual goes to torch's own."""
    import torch
    from torch.utils.data._utils.collate import collate_tensor_fn

    elem = batch[0]
    arena = worker.arena
    if arena is None or arena.measuring or elem.is_nested or elem.layout is not torch.strided or \
            elem.device.type != "cpu" or any(t.dtype != elem.dtype for t in batch):
        return collate_tensor_fn(batch, collate_fn_map=collate_fn_map)
    try:
        out = arena.tensor((len(batch), *elem.shape), elem.dtype)
    except torch_slot.ArenaFull:
        return collate_tensor_fn(batch, collate_fn_map=collate_fn_map)
    return torch.stack(batch, 0, out=out)


class Worker:
    """One producer's torch worker: its dataset copy, random state, fetcher (NOTE [worker emulation], start)."""

    def __init__(self, worker: int, num_workers: int, kind: int, auto_collation: bool, drop_last: bool) -> None:
        self.id = worker
        self.num_workers = num_workers
        self.kind = kind
        self.auto_collation = auto_collation
        self.drop_last = drop_last
        self.loader_epoch: int | None = None
        self.dataset = None
        self.collate_fn = None
        self.fetcher = None
        self.init_error = None     # ExceptionWrapper: the result of the first batch
        self.exhausted = False
        self.started = False       # has run a fresh start (persistent workers resume after it)
        self.arena: torch_slot.Arena | None = None
        import torch
        from torch.utils.data._utils.collate import default_collate_fn_map

        self.collate_map = dict(default_collate_fn_map)
        self.collate_map[torch.Tensor] = functools.partial(_stack_into_slot, self)

    def start(self, plan: Plan) -> None:
        """Begin ``plan.loader_epoch``: fresh, like a newly started torch worker, or resumed (persistent)."""
        import torch
        from torch._utils import ExceptionWrapper
        from torch.utils.data import IterDataPipe
        from torch.utils.data._utils import worker as torch_worker
        from torch.utils.data.graph_settings import apply_random_seed

        self.loader_epoch = plan.loader_epoch
        self.exhausted = False
        self.init_error = None
        where = f"in DataLoader worker process {self.id}"
        if not plan.fresh and self.started:  # torch's _ResumeIteration
            try:
                if isinstance(self.dataset, IterDataPipe):
                    self.dataset = apply_random_seed(self.dataset, torch.Generator().manual_seed(plan.shared_seed))
                self.fetcher = self._make_fetcher()
            except Exception:
                self.fetcher = None
                self.init_error = ExceptionWrapper(where=where)
            return
        self.started = True
        self.dataset = self.collate_fn = self.fetcher = None
        try:
            dataset, init_fn, collate_fn = ray_get(plan.payload[0], "fetching the dataset")
        except Exception:  # the dataset does not unpickle here (a class this process cannot import...)
            self.init_error = ExceptionWrapper(where=where)
            return
        torch.set_num_threads(1)
        seed = plan.base_seed + self.id
        random.seed(seed)
        torch.manual_seed(seed)
        np.random.seed(torch_worker._generate_state(plan.base_seed, self.id))
        if isinstance(dataset, IterDataPipe):
            dataset = apply_random_seed(dataset, torch.Generator().manual_seed(plan.shared_seed))
        torch_worker._worker_info = torch_worker.WorkerInfo(id=self.id, num_workers=self.num_workers, seed=seed,
                                                            dataset=dataset)
        self.dataset, self.collate_fn, self.fetcher = dataset, collate_fn, None
        try:
            if init_fn is not None:
                init_fn(self.id)
            self.fetcher = self._make_fetcher()
        except Exception:
            self.init_error = ExceptionWrapper(where=where)

    def _make_fetcher(self):
        from torch.utils.data._utils.collate import default_collate
        from torch.utils.data.dataloader import _DatasetKind

        collate = self.collate_fn
        if collate is default_collate:
            collate = functools.partial(collate_into, self)
        return _DatasetKind.create_fetcher(self.kind, self.dataset, self.auto_collation, collate, self.drop_last)

    def fetch(self, index: Any) -> Any:
        """The batch for ``index``, as torch's worker fetches it. StopIteration: this worker is exhausted."""
        if self.fetcher is None:
            raise RuntimeError(f"DataLoader worker {self.id} has no dataset fetcher: its set-up failed (the "
                               "epoch's first batch from this worker raised why)")
        return self.fetcher.fetch(index)


class LoaderSource:
    """The ``fill`` source of a loader's feed: a ``Worker`` per producer, driven by the chunk plans."""

    def __init__(self, plans: Any, num_workers: int, kind: int, auto_collation: bool, batch_size: int | None,
                 drop_last: bool) -> None:
        self.plans = plans
        self.num_workers = num_workers
        self.kind = kind
        self.auto_collation = auto_collation
        self.batch_size = batch_size
        self.drop_last = drop_last
        self._plan_cache: dict[int, Plan] = {}
        self._worker: Worker | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_plan_cache"], state["_worker"] = {}, None
        return state

    def _plan(self, feed_epoch: int) -> Plan:
        plan = self._plan_cache.get(feed_epoch)
        if plan is None:
            plan = ray_get(self.plans.get.remote(feed_epoch), f"fetching the plan of chunk {feed_epoch}")
            self._plan_cache = {e: p for e, p in self._plan_cache.items() if e > feed_epoch - 2}
            self._plan_cache[feed_epoch] = plan
        return plan

    def __call__(self, index: int, out: Any, ctx: Any) -> None:
        plan = self._plan(ctx.epoch)
        arena = torch_slot.Arena(out[0])
        if index >= plan.count:
            used = torch_slot.write_value(arena, torch_slot.PAST_END, None)
        else:
            used = self._make(plan, index, ctx, arena)
        out.resize(0, (used,))

    def _make(self, plan: Plan, k: int, ctx: Any, arena: torch_slot.Arena) -> int:
        from torch._utils import ExceptionWrapper

        w = self._worker
        if w is None:
            w = self._worker = Worker(ctx.worker, self.num_workers, self.kind, self.auto_collation, self.drop_last)
        if w.loader_epoch != plan.loader_epoch:
            w.start(plan)
        if w.init_error is not None:
            error, w.init_error = w.init_error, None
            return write_error(arena, error)
        if w.exhausted:
            return torch_slot.write_value(arena, torch_slot.EXHAUSTED, None)
        if self.kind == ITERABLE:
            index = [None] * self.batch_size if self.auto_collation else None
        else:
            index = plan.index(k)
        w.arena = arena
        try:
            data = w.fetch(index)
        except StopIteration:
            if self.kind != ITERABLE:
                return write_error(arena, ExceptionWrapper(where=f"in DataLoader worker process {w.id}"))
            w.exhausted = True
            return torch_slot.write_value(arena, torch_slot.EXHAUSTED, None)
        except Exception:
            return write_error(arena, ExceptionWrapper(where=f"in DataLoader worker process {w.id}"))
        finally:
            w.arena = None
        try:
            return torch_slot.write_batch(arena, data)
        except torch_slot.ArenaFull:
            return self._stash(arena, data, (ctx.epoch, k))
        except Exception:  # the batch does not pickle (a lock, a generator...)
            return write_error(arena, ExceptionWrapper(where=f"in DataLoader worker process {w.id}, sending "
                                                             "its batch"))

    def _stash(self, arena: torch_slot.Arena, data: Any, key: tuple) -> int:
        """A batch larger than the slot: pickled whole through the plan actor (slow, but never wrong)."""
        import pickle

        arena.pos = torch_slot.HEADER_BYTES  # whatever was stacked into the slot is pickled from where it is
        blob = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
        ray_get(self.plans.stash.remote(key, blob), f"stashing batch {key} (larger than the slot)")
        return torch_slot.write_value(arena, torch_slot.STASHED, key)


def write_error(arena: torch_slot.Arena, error: Any) -> int:
    """``error`` (an ExceptionWrapper) into the slot; a class that does not pickle travels as RuntimeError."""
    import pickle

    try:
        pickle.dumps(error.exc_type)
    except Exception:
        error.exc_msg = f"{error.exc_type.__name__}: {error.exc_msg}"
        error.exc_type = RuntimeError
    arena.pos = torch_slot.HEADER_BYTES
    try:
        return torch_slot.write_value(arena, torch_slot.ERROR, error)
    except torch_slot.ArenaFull:
        keep = max(256, arena.capacity // 2)
        error.exc_msg = error.exc_msg[:keep] + "\n... (message cut to fit the slot)"
        arena.pos = torch_slot.HEADER_BYTES
        return torch_slot.write_value(arena, torch_slot.ERROR, error)


def probe(payload: list, plan: Plan, num_workers: int, kind: int, auto_collation: bool, batch_size: int | None,
          drop_last: bool) -> int | None:
    """The bytes a slot needs, from the first batch a fresh worker makes (a Ray task, never the training process).

    Map-style: worker 0's first batch. Iterable: the first worker with any
    data. None when that batch raises or no worker has data: the producers
    then meet the same outcome and report it at that batch, as torch would.
    """
    for worker in range(num_workers if kind == ITERABLE else 1):
        w = Worker(worker, num_workers, kind, auto_collation, drop_last)
        w.start(plan)
        if w.init_error is not None:
            return None
        index = ([None] * batch_size if auto_collation else None) if kind == ITERABLE else plan.index(0)
        try:
            data = w.fetch(index)
        except StopIteration:
            continue
        except Exception:
            return None
        try:
            return torch_slot.measure(data)
        except Exception:
            return None
    return None


def _without_worker_info(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a Ray task's process, which Ray reuses: leave no worker info behind."""
    from torch.utils.data._utils import worker as torch_worker

    try:
        return fn(*args)
    finally:
        torch_worker._worker_info = None


_TASKS: dict[str, Any] = {}


def _as_task(fn: Any) -> Any:
    """``fn`` as a Ray task with no CPU and no retry, run without leftover worker info (made once per process)."""
    task = _TASKS.get(fn.__name__)
    if task is None:
        import ray

        def run(*args: Any) -> Any:
            return _without_worker_info(fn, *args)

        run.__name__ = run.__qualname__ = f"{fn.__name__}_in_task"  # the name Ray shows for it
        task = _TASKS[fn.__name__] = ray.remote(num_cpus=0, max_retries=0)(run)
    return task


def probe_task() -> Any:
    """``probe`` as a Ray task."""
    return _as_task(probe)


def probe_first_batch(payload: list, plan: Plan, num_workers: int, kind: int, auto_collation: bool,
                      batch_size: int | None, drop_last: bool) -> tuple[int, bytes | None, float] | None:
    """Map-style: ``probe``, and worker 0's first batch itself, pickled, for the loop to serve at once.

    Returns (bytes a slot needs, the batch pickled, seconds worker 0 took
    from its start to the batch: what a torch worker's first batch costs,
    without this process's own start). The loop returns that batch as batch
    0 while the producers start, and drops the copy producer 0 makes again
    (it makes it all the same, so its random and dataset state then go on
    exactly as torch's worker 0's). The batch is None when it does not
    pickle: the loop then waits for producer 0's.
    """
    import pickle
    import time

    t0 = time.monotonic()
    w = Worker(0, num_workers, kind, auto_collation, drop_last)
    w.start(plan)
    if w.init_error is not None:
        return None
    try:
        data = w.fetch(plan.index(0))
    except Exception:
        return None
    try:
        needed = torch_slot.measure(data)
    except Exception:
        return None
    elapsed = time.monotonic() - t0
    try:
        blob: bytes | None = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        blob = None
    return needed, blob, elapsed


def probe_first_batch_task() -> Any:
    """``probe_first_batch`` as a Ray task."""
    return _as_task(probe_first_batch)
