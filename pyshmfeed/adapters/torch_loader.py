"""``DataLoader``: torch's own DataLoader class, with its worker processes replaced by pyshmfeed producers.

It subclasses ``torch.utils.data.DataLoader``, so construction is torch's:
the same arguments, defaults, checks, error messages and warnings, the same
``len()``, ``DataLoader[T]``, and the same refusal to reassign ``batch_size``,
``sampler``... after construction. Only the iterator differs, and only with
``num_workers > 0`` (``num_workers=0`` is torch's own single-process iterator:
no Ray, no pickling). Our iterator is a ``_BaseDataLoaderIter`` too, so the
sampler, the base seed, the IterDataPipe shared seed and the IterableDataset
length warnings come from torch's code, in torch's order.

NOTE [loader lifecycle]
  iter       The iterator borrows a producer set (``_Producers``: a feed, its
             plan actor, a Ray lease) from the loader, or makes one without
             starting it, and puts ``(dataset, worker_init_fn, collate_fn)``
             in Ray's object store: the state torch's workers would start
             from. Nothing of the dataset runs in the training process: no
             ``dataset[0]``, no ``worker_init_fn``.
  first next If the set has no feed yet: the layout probe, a Ray task that
             plays worker 0's first batch (torch_worker.probe), sizes the
             slots (``slot_bytes=`` skips it), then the feed starts:
             ``num_workers`` producers, round-robin assignment, no restarts
             (a dead worker is an error in torch too). Later iterators reuse
             the set and its slot size. Map-style, the probe also sends its
             batch (torch_worker.probe_first_batch): the loop returns it as
             batch 0 at once while the feed starts on a thread, and drops
             producer 0's own batch 0, which producer 0 still makes so that
             its random and dataset state go on as torch's worker 0's. So
             the first batch costs the probe (a warm Ray task worker after
             the first loader of a process), not the producers' start.
  next       Each loader epoch runs as chunks (NOTE [worker emulation] in
             torch_worker.py): the loop pulls a chunk of index lists from the
             sampler, posts its plan, and reads the chunk's slots in order.
             Each slot holds a batch, an exception (re-raised here, with its
             type; the epoch goes on), or a marker (torch_slot.py). The batch
             is copied out into tensors the loop owns (default: one copy, the
             slot goes back at once), or lent as views until the next batch
             (``zero_copy=True``), or copied to ``device``.
  end        An exhausted iterator without persistent workers gives its set
             back to the loader (which keeps one idle set for the next
             iterator and closes any other); with persistent workers the set
             stays with the iterator. An iterator dropped mid-epoch abandons
             its chunk (the feed drains it). ``loader.close()`` or garbage
             collection closes every set: plan actor, feed (producers, ring),
             Ray lease. Every iterator holds its loader, so a loader dropped
             while an iterator lives (``next(iter(DataLoader(...)))``) lives
             until that iterator goes.
"""

from __future__ import annotations

import contextlib
import functools
import math
import pickle
import threading
import time
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader as _TorchDataLoader
from torch.utils.data import IterDataPipe, MapDataPipe
from torch.utils.data.dataloader import _BaseDataLoaderIter, _DatasetKind, _SingleProcessDataLoaderIter, \
    _sharding_worker_init_fn

from .. import errors, raylife
from ..spec import BatchSpec
from . import torch_slot, torch_worker

_MAX_CHUNK_BATCHES = 1024   # batches per chunk (the feed's length), rounded up to a multiple of num_workers
_ITERABLE_CHUNK_BATCHES = 256
_MAX_CHUNK_KEYS = 1 << 20   # sample indices per chunk: a plan stays a few MB however large the batches
_MIN_SLOT_BYTES = 64 << 10
_UNKNOWN_SLOT_BYTES = 1 << 20  # when the probe learnt nothing (the first batch raised): batches that
                               # do not fit are stashed, never lost
_SLOT_HEADROOM = 1.25          # batches a little larger than the first still fit in their slot
_COLD_PROBE_S = 30.0           # the first probe of a process also starts a Ray worker and imports torch there:
                               # that much more than ``timeout`` (the dataset's time) before it times out
_probed_once = False


_T_co = TypeVar("_T_co", covariant=True)


class DataLoader(_TorchDataLoader[_T_co]):
    """``torch.utils.data.DataLoader``, with ``num_workers`` pyshmfeed producers writing batches into a ring.

    Arguments, defaults and errors are torch's (this class subclasses it).
    With ``num_workers > 0`` the workers are Ray actors: worker ``w`` is seeded
    and initialised as torch seeds and initialises its worker ``w``, and makes
    batch k when ``k % num_workers == w``, as torch's does, so a seeded loader
    gives torch's batches, random augmentation included. Each batch is made,
    collated straight into a shared-memory slot, and copied once into tensors
    the loop owns. ``num_workers=0`` is torch's own in-process loading.

    pyshmfeed's own keyword options: ``zero_copy`` (tensors viewing the slot,
    valid until the next batch: no copy), ``device`` (e.g. "cuda": batches
    arrive on the device, copied from the page-locked slot), ``seed`` (an int
    instead of ``generator``), ``slot_bytes`` (the slot size; default: probed
    from the first batch), ``feed_options`` (passed to ``Feed``: ``num_cpus``,
    ``address``, ``lease``, ``max_restarts``...). Use ``close()`` (or ``with``)
    to stop the producers now rather than at garbage collection.

    Differences from torch's loader are listed in docs/adapters.md.
    """

    def __init__(self, dataset: Any, batch_size: int | None = 1, shuffle: bool | None = None, sampler: Any = None,
                 batch_sampler: Any = None, num_workers: int = 0, collate_fn: Any = None, pin_memory: bool = False,
                 drop_last: bool = False, timeout: float = 0, worker_init_fn: Any = None,
                 multiprocessing_context: Any = None, generator: Any = None, *, prefetch_factor: int | None = None,
                 persistent_workers: bool = False, pin_memory_device: str = "", in_order: bool = True,
                 zero_copy: bool = False, device: Any = None, seed: int | None = None,
                 slot_bytes: int | None = None, feed_options: dict | None = None) -> None:
        if seed is not None:
            if generator is not None:
                raise ValueError("give seed= or generator=, not both")
            generator = torch.Generator().manual_seed(int(seed))
        if slot_bytes is not None and not (isinstance(slot_bytes, int) and slot_bytes >= _MIN_SLOT_BYTES):
            raise ValueError(f"slot_bytes must be an int >= {_MIN_SLOT_BYTES}, got {slot_bytes!r}")
        self.zero_copy = bool(zero_copy)
        self.device = _check_device(device)
        self.slot_bytes = slot_bytes
        self.feed_options = dict(feed_options or {})
        self._producer_sets: list[_Producers] = []
        self._idle: _Producers | None = None
        self._latest: _Producers | None = None
        self._known_slot_bytes: int | None = slot_bytes
        self._closed = False
        super().__init__(dataset, batch_size, shuffle, sampler, batch_sampler, num_workers, collate_fn, pin_memory,
                         drop_last, timeout, worker_init_fn, multiprocessing_context, generator,
                         prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                         pin_memory_device=pin_memory_device, in_order=in_order)

    def _get_iterator(self) -> _BaseDataLoaderIter:
        if self._closed:
            raise ValueError("this DataLoader is closed")
        if self.num_workers == 0:
            if self.device is not None:
                return _SingleProcessToDevice(self, self.device)
            return _SingleProcessDataLoaderIter(self)
        self.check_worker_number_rationality()
        return _RingLoaderIter(self)

    # ---- producer sets (NOTE [loader lifecycle]) ----------------------------------------

    def _take_producers(self) -> "_Producers":
        if self._closed:
            raise ValueError("this DataLoader is closed")
        if self._idle is not None:
            producers, self._idle = self._idle, None
            return producers
        producers = _Producers(self)
        self._producer_sets.append(producers)
        return producers

    def _give_back(self, producers: "_Producers") -> None:
        """An iterator is done with ``producers``: keep them for the next iterator, or close them."""
        if producers.closed:
            self._forget(producers)
        elif self._closed or self._idle is not None or not producers.reusable:
            self._close_producers(producers)
        else:
            self._idle = producers

    def _close_producers(self, producers: "_Producers") -> None:
        try:
            producers.close()
        finally:
            self._forget(producers)

    def _forget(self, producers: "_Producers") -> None:
        if producers in self._producer_sets:
            self._producer_sets.remove(producers)
        if self._idle is producers:
            self._idle = None

    @property
    def feed(self):
        """The ``Feed`` of the producers started last (None before the first batch)."""
        latest = self._latest
        if latest is not None and latest.starting:  # started on a thread while the loop has batch 0
            with contextlib.suppress(Exception):   # a failed start is the iterator's to raise
                latest.wait_started()
        return latest.feed if latest is not None and not latest.closed else None

    def stats(self) -> dict[str, Any]:
        """The feed's figures (``Feed.stats()``) plus how the loop takes batches: copies, slot size, stashes."""
        if self.feed is None:
            return {}
        latest = self._latest
        if latest is None or latest.feed is None or latest.closed:
            return {}
        s = latest.feed.stats()
        if self.device is not None:
            path, copies = f"{self.device}: from the page-locked slot", 0
        elif self.zero_copy:
            path, copies = "torch-cpu views over the slot (zero copy)", 0
        else:
            path, copies = "torch-cpu, one copy into owned tensors", 1
        s.update({"staging": path, "staging_host_copies": copies, "slot_bytes": latest.slot_bytes,
                  "stashed_batches": latest.stashed})
        return s

    def close(self) -> None:
        """Stop every producer and free every ring now. Idempotent; also at garbage collection."""
        self._closed = True
        failure = None
        for producers in list(getattr(self, "_producer_sets", ())):
            try:
                self._close_producers(producers)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def __enter__(self) -> "DataLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _check_device(device: Any):
    if device is None or str(device) == "cpu":
        return None
    from ..stage import check_cuda_device

    return check_cuda_device(device)


class _Producers:
    """One producer set: a feed (started at the first batch), its plan actor, and the Ray lease under both."""

    def __init__(self, loader: DataLoader) -> None:
        import ray

        self.num_workers = loader.num_workers
        self.options = dict(loader.feed_options)
        # Workers reserve no Ray CPUs (torch's reserve nothing either): with a fraction each, a few live
        # loaders would exhaust a small cluster and a new loader's producers would wait for CPUs forever.
        self.options.setdefault("num_cpus", 0)
        self.lease = raylife.acquire(self.options.get("address"), self.num_workers, self.options["num_cpus"])
        try:
            self.plans = torch_worker.plans_actor_class().remote()
        except BaseException:
            self.lease.release()
            raise
        self._ray = ray
        self.feed = None
        self.length: int | None = None   # tasks per chunk (the feed's length)
        self.slot_bytes: int | None = None
        self.registration = None         # the ring page-locked for a CUDA device
        self.closed = False
        self.reusable = True              # False once an epoch ended in a way that may leave producers busy
        self.stashed = 0
        self._starting: threading.Thread | None = None  # start_in_background's thread, until wait_started
        self._start_error: BaseException | None = None
        self._feed_epoch = 0
        self._loader_epoch = 0

    def next_loader_epoch(self) -> int:
        self._loader_epoch += 1
        return self._loader_epoch

    def next_feed_epoch(self) -> int:
        self._feed_epoch += 1
        return self._feed_epoch

    def snapshot(self, state: tuple) -> list:
        """``state`` in Ray's object store, as a nested reference (a plan carries it unresolved)."""
        try:
            return [self._ray.put(state)]
        except Exception as exc:
            exc.add_note("pyshmfeed's DataLoader sends the dataset, worker_init_fn and collate_fn to its producer "
                         "processes by pickling them (as torch does with the 'spawn' start method); make them "
                         "picklable, or use num_workers=0")
            raise

    def probe(self, plan: torch_worker.Plan, loader: DataLoader, wait_s: float | None,
              first_batch: bool = False) -> tuple[int | None, bytes | None, float]:
        """(bytes a slot needs, or None; with ``first_batch``, worker 0's first batch pickled, or None;
        and the seconds worker 0 took for it, 0.0 if unknown)."""
        task = torch_worker.probe_first_batch_task() if first_batch else torch_worker.probe_task()
        ref = task.remote(plan.payload, plan, self.num_workers, loader._dataset_kind, loader._auto_collation,
                          loader.batch_size, loader.drop_last)
        try:
            if wait_s is None:  # no loader timeout: wait as long as the dataset takes, in bounded slices
                while True:
                    ready, _ = self._ray.wait([ref], timeout=1.0)
                    if ready:
                        break
            found = self._ray.get(ref, timeout=wait_s)
        except self._ray.exceptions.GetTimeoutError:
            self._ray.cancel(ref, force=True)
            raise
        except self._ray.exceptions.RayError:
            return None, None, 0.0  # the producers meet the same failure and report it at its batch
        if isinstance(found, tuple):
            return found
        return found, None, 0.0

    def start(self, loader: DataLoader, slot_bytes: int, length: int) -> None:
        from ..feed import Feed

        workers = self.num_workers
        options = {"workers": workers, "slots": max(2, workers * loader.prefetch_factor) + 1, "prefetch": 0,
                   "ordered": loader.in_order, "lease": None, "max_restarts": 0}
        options.update(self.options)
        source = torch_worker.LoaderSource(self.plans, workers, loader._dataset_kind, loader._auto_collation,
                                           loader.batch_size, loader.drop_last)
        self.feed = Feed(BatchSpec([((slot_bytes,), "uint8")]), fill=source, length=length,
                         assignment="round_robin", **options)
        self.slot_bytes = slot_bytes
        self.length = length
        if loader.device is not None:
            from ..stage import HostRegistration

            ring = self.feed.ring
            self.registration = HostRegistration(ring.data_address, ring.data_nbytes)

    @property
    def starting(self) -> bool:
        """``start_in_background`` ran and nobody has waited for it yet."""
        return self._starting is not None

    def start_in_background(self, loader: DataLoader, slot_bytes: int, length: int) -> None:
        """``start`` on a thread: the loop serves the probe's batch meanwhile (``wait_started`` joins it)."""
        def run() -> None:
            try:
                self.start(loader, slot_bytes, length)
            except BaseException as exc:  # re-raised by wait_started, in the loop's thread
                self._start_error = exc

        self._starting = threading.Thread(target=run, name="pyshmfeed-loader-start", daemon=True)
        self._starting.start()

    def wait_started(self) -> None:
        thread = self._starting
        if thread is not None:
            thread.join()
            self._starting = None
        if self._start_error is not None:
            self.reusable = False
            raise self._start_error

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._starting is not None:  # the feed it is making is closed below, once made
            self._starting.join()
            self._starting = None
        try:
            if self.registration is not None:
                self.registration.close()  # before the ring is unmapped
        finally:
            try:
                if self.feed is not None:
                    self.feed.close()
            finally:
                # Not ray.kill: it can block in Ray's C++ for good (no timeout, no signal gets through).
                # Ray ends an unnamed actor once its last handle is gone: this one, and the producers'.
                self.plans = None
                self.lease.release()


class _RingLoaderIter(_BaseDataLoaderIter):
    """One (or, with persistent workers, every) epoch of a ``DataLoader`` with ``num_workers > 0``."""

    def __init__(self, loader: DataLoader) -> None:
        super().__init__(loader)  # torch's: shared seed (IterDataPipe), base seed, sampler iterator
        if loader.prefetch_factor <= 0:
            raise AssertionError("prefetch_factor must be greater than 0 for MultiProcessingDataLoaderIter")
        self._loader = loader  # the loader, and so its producers, live as long as this iterator
        self._in_order = loader.in_order
        self._zero_copy = loader.zero_copy
        self._device = loader.device
        self._worker_shared_seed = self._shared_seed  # torch's workers start with this one; its _reset draws another
        self._producers: _Producers | None = loader._take_producers()
        try:
            self._payload = self._producers.snapshot((self._dataset, self._worker_init_fn_for(loader),
                                                      self._collate_fn))
        except BaseException:
            loader._give_back(self._producers)
            self._producers = None
            raise
        self._slots = None               # the open chunk's slots_of generator
        self._pending_epoch: int | None = None  # its feed epoch while the producers start (then: _slots)
        self._pending_post: Any = None   # ... and the ObjectRef of its plan's posting
        self._early: Any = None          # the probe's batch 0, served while the producers start
        self._drop_first = False         # ... so producer 0's own batch 0 is dropped
        self._plan: torch_worker.Plan | None = None
        self._held = None                # zero_copy: the slot the loop's batch views
        self._pending: list = []         # device: (CUDA event, slot) until the copy has read the slot
        self._deadline: float | None = None
        self._timed_out = False
        self._done = True
        self._reset(loader, first_iter=True)

    # ---- epochs -------------------------------------------------------------------------------

    def _reset(self, loader: DataLoader, first_iter: bool = False) -> None:
        if not first_iter:
            self._end_chunk()  # torch discards what is left of an unfinished epoch too
        super()._reset(loader, first_iter)
        if self._producers is None:  # shut down (``_shutdown_workers``): persistent workers start again
            self._producers = loader._take_producers()
            self._payload = self._producers.snapshot((self._dataset, self._worker_init_fn_for(loader),
                                                      self._collate_fn))
            first_iter = True
        self._drop_first = False
        self._epoch_shared_seed = self._worker_shared_seed if first_iter else self._shared_seed
        self._fresh = first_iter or not self._persistent_workers
        self._loader_epoch = self._producers.next_loader_epoch()
        self._batch_no = 0
        self._sampler_done = False
        self._exhausted: set[int] = set()
        self._timed_out = False
        self._done = False

    def _worker_init_fn_for(self, loader: DataLoader):
        init_fn = loader.worker_init_fn
        if isinstance(self._dataset, (IterDataPipe, MapDataPipe)):
            init_fn = functools.partial(_sharding_worker_init_fn, init_fn, self._world_size, self._rank)
        return init_fn

    def _chunk_length(self) -> int:
        workers = self._num_workers
        if self._dataset_kind == _DatasetKind.Iterable:
            n = _ITERABLE_CHUNK_BATCHES
        else:
            try:
                n = len(self._index_sampler)
            except TypeError:
                n = _MAX_CHUNK_BATCHES
        n = min(max(n, 1), _MAX_CHUNK_BATCHES)
        return -(-n // workers) * workers

    def _open_chunk(self) -> bool:
        """Post the next chunk of this epoch; False when the sampler has nothing left."""
        p = self._producers
        length = p.length or self._chunk_length()
        plan_fields = dict(loader_epoch=self._loader_epoch, first=self._batch_no, base_seed=self._base_seed,
                           shared_seed=self._epoch_shared_seed, fresh=self._fresh, payload=self._payload)
        if self._dataset_kind == _DatasetKind.Iterable:
            plan = torch_worker.Plan(count=length, **plan_fields)
        else:
            if self._sampler_done:
                return False
            batches, nkeys = [], 0
            for b in self._sampler_iter:
                batches.append(b)
                nkeys += len(b) if self._auto_collation else 1
                if len(batches) >= length or nkeys >= _MAX_CHUNK_KEYS:
                    break
            else:
                self._sampler_done = True
            if not batches:
                return False
            plan = torch_worker.Plan(count=len(batches), **plan_fields, **_index_table(batches, self._auto_collation))
        if p.feed is None and not p.starting:
            self._start_producers(plan, batches if self._dataset_kind == _DatasetKind.Map else None, length)
        feed_epoch = p.next_feed_epoch()
        posted = p.plans.put.remote(feed_epoch, plan)
        self._plan = plan
        self._taken = 0
        self._batch_no += plan.count
        if p.starting:  # the plan actor may still be starting too: the producers need the plan only later
            self._pending_epoch, self._pending_post = feed_epoch, posted
        else:
            torch_worker.ray_get(posted, f"posting the plan of chunk {feed_epoch}")
            self._slots = p.feed.slots_of(feed_epoch, stop=self._should_stop)
        return True

    def _await_producers(self) -> None:
        """The producers started in the background (while the loop had the probe's batch): open the chunk."""
        p = self._producers
        try:
            p.wait_started()
        except BaseException:
            self._pending_epoch = None
            self._done = True
            raise
        self._loader._latest = p
        if self._timeout > 0:  # pyshmfeed's own start-up is not the dataset's time
            self._deadline = time.monotonic() + self._timeout
        epoch, self._pending_epoch = self._pending_epoch, None
        posted, self._pending_post = self._pending_post, None
        torch_worker.ray_get(posted, f"posting the plan of chunk {epoch}")
        self._slots = p.feed.slots_of(epoch, stop=self._should_stop)

    def _start_producers(self, plan: torch_worker.Plan, batches: list | None, length: int) -> None:
        loader, p = self._loader, self._producers
        slot_bytes = loader._known_slot_bytes
        early, took = None, 0.0
        if slot_bytes is None:
            global _probed_once
            wait_s = None if self._deadline is None else max(self._deadline - time.monotonic(), 0.001)
            if wait_s is not None and not _probed_once:
                wait_s += _COLD_PROBE_S
            # Map-style, the epoch's first batch: the probe's batch is served as batch 0 (NOTE [loader lifecycle])
            # (not with zero_copy: its batches are views of the slots, and the probe's is not)
            serve = self._dataset_kind == _DatasetKind.Map and plan.first == 0 and not self._zero_copy
            try:
                needed, early, took = p.probe(plan, loader, wait_s, first_batch=serve)
            except p._ray.exceptions.GetTimeoutError:
                self._timed_out = True
                raise RuntimeError(f"DataLoader timed out after {self._timeout} seconds") from None
            _probed_once = True
            slot_bytes = _slot_bytes_for(needed, batches, self._auto_collation)
            loader._known_slot_bytes = slot_bytes
        if early is not None and self._timeout > 0 and took > self._timeout:
            # torch's worker 0 would have taken that long for batch 0 (its start and worker_init_fn included)
            self._timed_out = True
            raise RuntimeError(f"DataLoader timed out after {self._timeout} seconds")
        if early is not None:
            data = pickle.loads(early)
            if self._device is not None:
                data = _to_device(data, self._device)
            elif self._pin_memory:
                data = _pin(data)
            self._early, self._drop_first = data, True
            p.start_in_background(loader, slot_bytes, length)
            loader._latest = p
            return
        p.start(loader, slot_bytes, length)
        loader._latest = p
        if self._timeout > 0:  # pyshmfeed's own start-up is not the dataset's time
            self._deadline = time.monotonic() + self._timeout

    def _end_chunk(self) -> None:
        """Close the open chunk: finished, or abandoned (the feed drains what producers still hold)."""
        self._release_held()
        self._pending_epoch = self._pending_post = None  # producers still starting: no job yet, nothing to drain
        self._early = None
        slots, self._slots = self._slots, None
        if slots is None:
            return
        try:
            if self._plan is not None and self._taken >= self._plan.count == self._producers.length:
                next(slots, None)  # every task was real and delivered: let the epoch end as finished
        finally:
            slots.close()

    def _finish(self) -> None:
        """The epoch is over: torch shuts non-persistent workers down here; we give them back to the loader."""
        self._end_chunk()
        self._done = True
        if not self._persistent_workers and self._producers is not None:
            self._settle_device_copies()
            producers, self._producers = self._producers, None
            self._loader._give_back(producers)

    def _should_stop(self) -> bool:
        if self._deadline is not None and time.monotonic() > self._deadline:
            self._timed_out = True
            return True
        return False

    # ---- batches ------------------------------------------------------------------------------

    def _next_data(self) -> Any:
        self._release_held()
        self._release_device_copies()
        if self._timed_out:
            raise RuntimeError(f"DataLoader timed out after {self._timeout} seconds")
        self._deadline = time.monotonic() + self._timeout if self._timeout > 0 else None
        while True:
            if self._done or self._producers is None:
                raise StopIteration
            if self._producers.closed:
                self._slots = None
                raise errors.RingClosed("this DataLoader was closed while the iterator was in use")
            if self._slots is not None and self._taken >= self._plan.count:
                self._end_chunk()
                if self._dataset_kind == _DatasetKind.Map and self._sampler_done:
                    self._finish()
                    continue
            if self._slots is None and self._pending_epoch is None and not self._open_chunk():
                self._finish()
                continue
            if self._early is not None:  # the probe's batch 0, while the producers start
                data, self._early = self._early, None
                return data
            if self._pending_epoch is not None:
                self._await_producers()
            try:
                slot, batch = next(self._slots)
            except StopIteration:
                self._slots = None
                continue
            except errors.RingClosed:
                self._slots = None
                if self._timed_out:
                    self._done = True
                    raise RuntimeError(f"DataLoader timed out after {self._timeout} seconds") from None
                raise
            except errors.ProducerLost as exc:
                self._slots = None
                self._done = True
                raise RuntimeError(_worker_death_message(exc)) from exc
            arena = batch[0].view()
            arena.flags.writeable = True  # the loop's batch may be written; the slot is its own until released
            try:
                kind = torch_slot.read_header(arena)[0]
            except BaseException:
                slot.release()
                raise
            if kind == torch_slot.PAST_END:
                slot.release()
                continue
            self._taken += 1
            if self._drop_first and batch.index == 0:  # served already: the probe's copy of it
                self._drop_first = False
                self._drop(kind, slot, arena)
                continue
            if kind == torch_slot.EXHAUSTED:
                slot.release()
                self._exhausted.add(batch.worker)
                if len(self._exhausted) == self._num_workers:
                    self._finish()
                continue
            return self._take(kind, slot, arena)

    def _drop(self, kind: int, slot: Any, arena: np.ndarray) -> None:
        """Let a slot go unread (a stashed batch is taken from the plan actor and thrown away)."""
        try:
            key = torch_slot.read_value(arena) if kind == torch_slot.STASHED else None
        finally:
            slot.release()
        if key is not None:
            self._producers.plans.unstash.remote(key)

    def _take(self, kind: int, slot: Any, arena: np.ndarray) -> Any:
        """The batch (or the exception) in an acquired slot; the slot goes back as soon as nothing reads it."""
        if kind == torch_slot.ERROR:
            try:
                error = torch_slot.read_value(arena)
            finally:
                slot.release()
            error.reraise()
        if kind == torch_slot.STASHED:
            try:
                key = torch_slot.read_value(arena)
            finally:
                slot.release()
            p = self._producers
            p.stashed += 1
            data = pickle.loads(torch_worker.ray_get(p.plans.unstash.remote(key), f"taking stashed batch {key}"))
            if self._device is not None:
                return _to_device(data, self._device)
            return _pin(data) if self._pin_memory else data
        if self._device is not None:
            return self._to_device(slot, arena)
        if self._zero_copy:
            self._held = slot
            return torch_slot.read_batch(arena, mode="view")
        try:
            return torch_slot.read_batch(arena, mode="copy", pin=self._pin_memory)
        finally:
            slot.release()

    def _to_device(self, slot: Any, arena: np.ndarray) -> Any:
        """Copy the batch to the CUDA device straight from the (page-locked) slot; release it after the copy."""
        data = torch_slot.read_batch(arena, mode="view")
        if not _plain(data):  # tensors inside objects we cannot walk: copy out of the slot first
            data = torch_slot.read_batch(arena, mode="copy")
            slot.release()
            return _to_device(data, self._device)
        registered = self._producers.registration is not None and self._producers.registration.ok
        moved = _to_device(data, self._device, non_blocking=registered)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self._device))
        self._pending.append((event, slot))
        return moved

    def _release_device_copies(self) -> None:
        limit = max(1, self._prefetch_factor_slots() - 2)
        while self._pending and (self._pending[0][0].query() or len(self._pending) > limit):
            event, slot = self._pending.pop(0)
            event.synchronize()
            slot.release()

    def _settle_device_copies(self) -> None:
        while self._pending:
            event, slot = self._pending.pop(0)
            event.synchronize()
            slot.release()

    def _prefetch_factor_slots(self) -> int:
        feed = self._producers.feed if self._producers is not None else None
        return feed.slots if feed is not None else 2

    def _release_held(self) -> None:
        held, self._held = self._held, None
        if held is not None and not held.released:
            held.release()

    # ---- shutdown -----------------------------------------------------------------------------

    def _shutdown_workers(self) -> None:
        """Stop this iterator's producers now (torch's name for it)."""
        self._done = True
        producers, self._producers = self._producers, None
        try:
            self._end_chunk()
            self._settle_device_copies()
        finally:
            if producers is not None:
                self._loader._close_producers(producers)

    def __del__(self) -> None:
        producers = getattr(self, "_producers", None)
        if producers is None:
            return
        self._producers = None
        try:
            self._end_chunk()
            self._settle_device_copies()
        except Exception:
            producers.reusable = False
        with contextlib.suppress(Exception):
            self._loader._give_back(producers)


def _worker_death_message(exc: errors.ProducerLost) -> str:
    """torch's words for a dead worker (its pid, and the signal when it died of one), then ours."""
    if exc.pid is not None and exc.signal is not None:
        import signal

        description = signal.strsignal(exc.signal) or f"signal {exc.signal}"
        return f"DataLoader worker (pid {exc.pid}) is killed by signal: {description}. ({exc})"
    if exc.pid is not None:
        return f"DataLoader worker (pid(s) {exc.pid}) exited unexpectedly ({exc})"
    return f"DataLoader worker exited unexpectedly ({exc})"


def _index_table(batches: list, auto_collation: bool) -> dict[str, Any]:
    """A chunk's sample indices for its plan: one flat int64 array when they are all ints, else as given."""
    if auto_collation and all(type(i) is int for b in batches for i in b):
        offsets = np.zeros(len(batches) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in batches], out=offsets[1:])
        flat = np.fromiter((i for b in batches for i in b), dtype=np.int64, count=int(offsets[-1]))
        return {"flat": flat, "offsets": offsets}
    return {"keys": list(batches)}


def _slot_bytes_for(needed: int | None, batches: list | None, auto_collation: bool) -> int:
    """The slot size from the probe's first batch: room for the longest batch of the chunk, and headroom."""
    if needed is None:
        return _UNKNOWN_SLOT_BYTES
    scale = 1.0
    if batches and auto_collation:
        first = max(len(batches[0]), 1)
        scale = max(len(b) for b in batches) / first
    return max(_MIN_SLOT_BYTES, int(math.ceil(needed * scale * _SLOT_HEADROOM)) + 4096)


def _plain(data: Any) -> bool:
    """Tensors held only by dicts, lists and tuples (namedtuples too), and leaves that hold no tensor."""
    if isinstance(data, torch.Tensor):
        return True
    if isinstance(data, dict):
        return all(_plain(v) for v in data.values())
    if isinstance(data, (list, tuple)):
        return all(_plain(v) for v in data)
    return isinstance(data, (str, bytes, int, float, bool, complex, type(None), np.generic))


def _to_device(data: Any, device: Any, non_blocking: bool = False) -> Any:
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=non_blocking)
    if isinstance(data, dict):
        moved = {k: _to_device(v, device, non_blocking) for k, v in data.items()}
        return moved if type(data) is dict else type(data)(moved)
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(_to_device(v, device, non_blocking) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(_to_device(v, device, non_blocking) for v in data)
    if hasattr(data, "to") and callable(data.to):
        return data.to(device)
    return data


def _pin(data: Any) -> Any:
    from torch.utils.data._utils.pin_memory import pin_memory

    return pin_memory(data)


class _SingleProcessToDevice(_SingleProcessDataLoaderIter):
    """torch's in-process loading (``num_workers=0``), each batch then copied to ``device``."""

    def __init__(self, loader: DataLoader, device: Any) -> None:
        super().__init__(loader)
        self._target_device = device

    def _next_data(self) -> Any:
        return _to_device(super()._next_data(), self._target_device)


__all__ = ["DataLoader"]
