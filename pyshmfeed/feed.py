"""Orchestration: ``Feed`` owns the ring, starts Ray producer actors, hands out work, keeps order.

NOTE [producer lifecycle]
  start    ``Feed.__init__`` validates every argument, creates the ring (so a
           spec that does not fit in memory fails before anything starts),
           starts or joins Ray, and starts ``workers`` producer actors pinned
           to this node (the ring is node-local). Producers stay up across
           epochs: start-up is paid once per feed.
  work     A dispatcher thread hands out ``(seq, index, epoch)`` tasks in
           chunks to whichever producer has fewer than two chunks in flight,
           so a slow producer holds nobody back. Ordered rings put batch
           ``seq`` in slot ``seq mod slots``; every producer runs its chunks in
           increasing ``seq``, and ``slots >= prefetch + 2``, which together
           rule out a deadlock between producers waiting for slots.
  death    A producer call that fails with an actor error (actor killed,
           process SIGKILLed) or that runs past ``lease`` seconds (the actor is
           then killed first, so it can never write again) triggers:
           reclaim(owner) in the ring → re-issue, at the front of the queue,
           every task of that producer not yet committed → start a
           replacement. Each batch is delivered exactly once, in order.
  errors   A source function that raises makes its producer return an error
           record; the dispatcher closes the ring with it, and the training
           loop raises ``ProducerError`` after the batches before it.
  stop     ``close()`` (also from ``with``, or an exception, Ctrl-C or
           ``break`` that leaves the ``with`` block): close the ring (every
           waiter wakes), stop the dispatcher, kill the actors, wait for their
           processes to exit, detach the ring, and shut Ray down if this feed
           started it. Nothing outlives the feed.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np

from . import errors
from .producer import Producer
from .ring import CLOSE_FAILED, CLOSE_NORMAL, CLOSE_PRODUCER_ERROR, ConsumerSlot, Ring, process_alive
from .spec import Batch, BatchSpec, SlotLayout
from .stats import FeedStats

STATE_VERSION = 1
_ACQUIRE_POLL_S = 0.2


class Feed:
    """Producers in Ray actors write batches into a shared-memory ring; iterate ``feed.epoch(e)``.

    Exactly one of the sources:

    - ``fill=fn(index, out, ctx)`` writes batch ``index`` in place (zero copy, fastest);
    - ``make=fn(index, ctx) -> batch`` returns the batch, copied once into the slot;
    - ``shards=fn(worker, num_workers, ctx) -> iterator of batches`` (generator pipelines).

    ``fill``/``make`` need ``length`` (batches per epoch). Options:
    ``workers`` producer actors (default 4), ``slots`` in the ring (default
    ``max(2 * workers, prefetch + 2)``), ``ordered`` (default True:
    deterministic order for any number of workers; False: first ready, first
    served), ``shuffle`` (per-epoch permutation seeded by ``seed`` and the
    epoch), ``seed``, ``prefetch`` (batches the consumer may hold ahead),
    ``num_cpus`` (Ray CPUs per producer, fractional by default so I/O-bound
    producers can outnumber cores), ``address`` (join a Ray cluster),
    ``lease`` (seconds a producer may spend on one chunk before it is
    presumed stuck, killed and its work re-issued), ``max_restarts``,
    ``chunk`` (indices per Ray call), ``state`` (from ``state_dict()``, to
    resume), ``backing`` ("memfd" or "named"), ``placement`` ("node":
    producers on this node; "cluster" or a list of Ray node ids: producers
    anywhere, batches made elsewhere reach the ring through Ray's object
    store, see NOTE [remote producers] in remote.py).

    Batches are read-only numpy views over ring memory, **valid until the loop
    asks for the next batch**; ``batch.copy()`` keeps one. Use as a context
    manager, or call ``close()``.
    """

    def __init__(self, spec: BatchSpec, *, fill: Callable | None = None, make: Callable | None = None,
                 shards: Callable | None = None, length: int | None = None, workers: int = 4,
                 slots: int | None = None, ordered: bool = True, shuffle: bool = False, seed: int = 0,
                 prefetch: int = 2, num_cpus: float = 0.25, address: str | None = None,
                 lease: float | None = 600.0, max_restarts: int | None = None, chunk: int | None = None,
                 state: dict | None = None, backing: str = "memfd", device: str = "cpu",
                 rank: int = 0, world_size: int = 1, placement: str | list[str] = "node",
                 _actor_options: dict | None = None) -> None:
        self._created = time.perf_counter()
        self._closed = False
        self._ring: Ring | None = None
        self._dispatcher: _Dispatcher | None = None
        self._started_ray = False
        self._closers: list[Callable[[], None]] = []  # stages, then page-locking (NOTE [stage lifecycle])
        self._staging_stats: Callable[[], dict] | None = None  # set by pyshmfeed.stage
        # Batches a stage took from the ring for the epoch but never handed to the loop: (index, worker).
        self._undelivered: Callable[[], list[tuple[int, int]]] | None = None
        # ---- validate everything before starting anything ------------------
        if not isinstance(spec, BatchSpec):
            raise errors.InvalidArgument(f"spec must be a BatchSpec, got {type(spec).__name__}")
        sources = {k: v for k, v in (("fill", fill), ("make", make), ("shards", shards)) if v is not None}
        if len(sources) != 1:
            raise errors.InvalidArgument("give exactly one source: fill=, make= or shards= "
                                         f"(got {sorted(sources) or 'none'})")
        (self.kind, self._fn), = sources.items()
        if not callable(self._fn):
            raise errors.InvalidArgument(f"{self.kind}= must be callable, got {self._fn!r}")
        if self.kind != "shards":
            if not isinstance(length, int) or length <= 0:
                raise errors.InvalidArgument(f"length= (batches per epoch) must be a positive int for a "
                                             f"{self.kind} source, got {length!r}")
        elif shuffle:
            raise errors.InvalidArgument("shuffle applies to indexed sources (fill/make); shuffle inside "
                                         "your shards generator instead")
        if not isinstance(workers, int) or workers <= 0:
            raise errors.InvalidArgument(f"workers must be a positive int, got {workers!r}")
        if not isinstance(prefetch, int) or prefetch < 0:
            raise errors.InvalidArgument(f"prefetch must be an int >= 0, got {prefetch!r}")
        slots = max(2 * workers, prefetch + 2) if slots is None else slots
        if not isinstance(slots, int) or slots < prefetch + 2:
            raise errors.InvalidArgument(f"slots={slots!r} must be an int >= prefetch + 2 = {prefetch + 2}: "
                                         "the loop holds one batch and prefetch more while producers fill the rest")
        if not (isinstance(num_cpus, (int, float)) and num_cpus >= 0):
            raise errors.InvalidArgument(f"num_cpus must be >= 0, got {num_cpus!r}")
        if lease is not None and lease <= 0:
            raise errors.InvalidArgument(f"lease must be positive seconds or None, got {lease!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int)
                and 0 <= rank < world_size):
            raise errors.InvalidArgument(f"rank={rank!r}, world_size={world_size!r}: need 0 <= rank < world_size")
        if world_size > 1 and self.kind == "shards":
            raise errors.InvalidArgument("rank/world_size split indexed sources (fill/make); a shards source "
                                         "must shard by rank itself")
        from .remote import check_placement  # placement != "node": NOTE [remote producers]

        placement = check_placement(placement)
        if device != "cpu":  # a CUDA device: epochs yield CUDA tensors staged by pyshmfeed.stage
            from .stage import check_cuda_device  # imports torch, only for a CUDA device

            device = check_cuda_device(device)
        self.device = device
        if self.kind == "shards":
            ordered = False  # generator shards are served first ready, first served
        self.spec = spec
        self.length = length
        self.rank = rank
        self.world_size = world_size
        self.placement = placement
        self.workers = workers
        self.slots = slots
        self.ordered = ordered
        self.shuffle = shuffle
        self.seed = int(seed)
        self.prefetch = prefetch
        self.chunk = chunk or (1 if self.kind == "shards" else max(1, min(8, slots // (2 * workers))))
        self._resume = _check_state(state, self) if state is not None else None
        self._stats = FeedStats(spec.batch_bytes)
        self._epoch_active: int | None = None
        self._position = 0
        self._delivered_indices: set[int] = set()
        self._delivered_seqs: set[int] = set()
        self._shard_delivered: collections.Counter[int] = collections.Counter()
        self._current_epoch: int | None = None
        self._epoch_finished = True
        self._next_seq = 0
        self._drain_needed = False
        # ---- start: ring first (memory), then Ray, then producers ---------------
        self._ring = Ring.create(slots, spec.slot_bytes, ordered=ordered, backing=backing)
        try:
            self._layouts = [SlotLayout(spec, self._ring.slot_buffer(i), self._ring.slot_bytes)
                             for i in range(slots)]
            self._started_ray = _ensure_ray(address, workers, num_cpus)
            self._dispatcher = _Dispatcher(self, num_cpus, lease,
                                           workers * 3 if max_restarts is None else max_restarts,
                                           _actor_options or {})
            self._dispatcher.start()
        except BaseException:
            self.close()
            raise
        self._stats.startup_s = time.perf_counter() - self._created

    @classmethod
    def from_ray_dataset(cls, ds: Any, spec: BatchSpec, **options: Any) -> "Feed":
        """A feed of a ``ray.data.Dataset``'s batches (see ``pyshmfeed.raydata.from_ray_dataset``)."""
        from .raydata import from_ray_dataset

        return from_ray_dataset(ds, spec, **options)

    # ---- iteration ----------------------------------------------------------

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """Iterate the batches of ``epoch`` (numpy views valid until the next batch is requested).

        With a CUDA ``device``: torch CUDA tensors, staged from the ring by a
        consumer thread (NOTE [stage lifecycle] in stage.py); they stay valid.
        """
        if self.device != "cpu":
            from .stage import staged_epoch

            yield from staged_epoch(self, epoch)
            return
        with contextlib.closing(self.slots_of(epoch)) as slots:  # close it now on break, not at GC
            for slot, batch in slots:
                try:
                    yield batch
                finally:
                    slot.release()

    def __iter__(self) -> Iterator[Batch]:
        """Epoch after epoch, forever (or from the resumed epoch on)."""
        e = self._resume["epoch"] if self._resume else 0
        while True:
            yield from self.epoch(e)
            e += 1

    def slots_of(self, epoch: int, *, stop: Callable[[], bool] | None = None
                 ) -> Iterator[tuple[ConsumerSlot, Batch]]:
        """Lower level than ``epoch``: yields ``(slot, batch)``; the caller releases each slot.

        For consumers that hold several batches at once (the staging thread):
        a slot may be released only when nothing can read its memory any more.
        ``stop()`` returning True ends a wait for the next batch with ``RingClosed``.
        """
        self._check_open()
        if self._epoch_active is not None:
            raise errors.InvalidArgument(f"epoch {self._epoch_active} is still being iterated; finish or "
                                         "close that iterator first")
        if self._drain_needed:
            self._drain()
        self._epoch_active = epoch
        self._current_epoch = epoch
        self._undelivered = None  # a stage of this epoch registers again
        self._epoch_finished = False
        wall0 = time.perf_counter()
        try:
            if self.kind == "shards":
                yield from self._shard_slots(epoch, stop)
            else:
                yield from self._indexed_slots(epoch, stop)
            self._epoch_finished = True
        finally:
            self._stats.add_wall(time.perf_counter() - wall0)
            self._epoch_active = None
            if not self._epoch_finished and not self._closed:
                self._dispatcher.cancel_pending()
                self._drain_needed = True

    def _indexed_slots(self, epoch: int, stop=None) -> Iterator[tuple[ConsumerSlot, Batch]]:
        order = self.epoch_order(epoch)
        start, done = 0, set()
        if self._resume and self._resume["epoch"] == epoch:
            start = self._resume["position"] if self.ordered else 0
            done = set(self._resume.get("delivered", ()))
            self._resume = None
        if self.ordered:
            todo = list(range(start, len(order)))
        else:
            todo = [p for p in range(len(order)) if int(order[p]) not in done]
        self._position = start if self.ordered else 0
        self._delivered_indices = set(done)
        # Not emptied: a producer whose call had not returned when the last epoch ended may yet be
        # reported dead, and a batch of it delivered then must not be re-issued (made twice).
        self._delivered_seqs = self._dispatcher.still_in_flight(self._delivered_seqs)
        base = self._next_seq
        tasks = [(base + k, int(order[p]), epoch) for k, p in enumerate(todo)]
        self._next_seq = base + len(tasks)
        self._dispatcher.submit(tasks)
        for _ in range(len(tasks)):
            slot, batch = self._next_batch(stop=stop)
            if self.ordered:
                self._position += 1
            else:
                self._position = len(self._delivered_indices) + 1
            self._delivered_indices.add(batch.index)
            self._delivered_seqs.add(slot.seq)
            yield slot, batch

    def _shard_slots(self, epoch: int, stop=None) -> Iterator[tuple[ConsumerSlot, Batch]]:
        skip = {}
        if self._resume and self._resume["epoch"] == epoch:
            skip = {int(k): v for k, v in self._resume.get("shard_delivered", {}).items()}
            self._resume = None
        self._shard_delivered = collections.Counter(skip)
        self._delivered_seqs = set()
        self._position = sum(skip.values())
        self._dispatcher.submit_shards(epoch, skip)
        while True:
            total = self._dispatcher.shard_total()
            if total is not None and self._position >= total:
                return
            slot, batch = self._next_batch(until_shards_done=True, stop=stop)
            if slot is None:
                return
            self._shard_delivered[batch.worker] += 1
            self._delivered_seqs.add(slot.seq)
            self._position += 1
            yield slot, batch

    def _next_batch(self, until_shards_done: bool = False, record: bool = True, stop=None):
        """Acquire the next ready slot, waiting in short slices so failures are noticed."""
        t0 = time.perf_counter()
        while True:
            try:
                slot = self._ring.acquire(timeout=_ACQUIRE_POLL_S, stop=stop)
                break
            except errors.Timeout:
                self._dispatcher.raise_if_failed()
                if until_shards_done:
                    total = self._dispatcher.shard_total()
                    if total is not None and self._position >= total:
                        return None, None
            except errors.RingClosed:
                self._dispatcher.raise_if_failed()
                raise
        try:
            ident, views, meta = self._layouts[slot.slot].read(slot.nbytes)
            if ident["seq"] != slot.seq:
                raise errors.CorruptSegment(f"slot {slot.slot} holds batch seq {ident['seq']}, the ring "
                                            f"says {slot.seq}")
        except BaseException:
            slot.release()
            raise
        if record:
            array_bytes = sum(v.nbytes for v in views)  # the data, not the slot header
            self._stats.add_batch(time.perf_counter() - t0, array_bytes, self._ring.ready_slots())
        batch = Batch(self.spec.names, views, positional=self.spec.positional, index=ident["index"],
                      epoch=ident["epoch"], worker=ident["worker"], meta=meta, seq=slot.seq)
        return slot, batch

    def _drain(self) -> None:
        """After an abandoned epoch: consume the batches already handed out, so the next starts clean."""
        if self.kind == "shards":
            # A shard makes its whole epoch in one producer call that nothing can cut short: drop
            # what it still makes (else the ring fills and blocks it for good) until every shard
            # started in the abandoned epoch has returned.
            while True:
                unfinished = self._dispatcher.shards_unfinished()
                try:
                    self._ring.acquire(timeout=_ACQUIRE_POLL_S if unfinished else 0).release()
                except (errors.Timeout, errors.WouldBlock):
                    if not unfinished:
                        break
                    self._dispatcher.raise_if_failed()
        for seq in self._dispatcher.outstanding(self._delivered_seqs):
            slot, _ = self._next_batch(record=False)
            slot.release()
        if self.ordered:
            # The abandoned epoch's undispatched sequences were never produced: an ordered ring
            # hands out batch `consumer_head` next, so the next epoch must start there.
            self._next_seq = self._ring.counters()["consumer_head"]
        self._drain_needed = False

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The indices this rank delivers in ``epoch``, in order.

        All ranks compute the same global order (a permutation seeded by
        ``seed`` and the epoch when ``shuffle``, else ``0..length-1``); rank r
        takes every ``world_size``-th index from position r. Like torch's
        DistributedSampler, the order is padded by wrapping around so every
        rank gets ``ceil(length / world_size)`` batches and none waits for the
        others at the end of an epoch.
        """
        if self.shuffle:
            order = np.random.default_rng(np.random.SeedSequence([self.seed & (2**63 - 1), epoch, 0x5F])) \
                .permutation(self.length)
        else:
            order = np.arange(self.length)
        if self.world_size == 1:
            return order
        per_rank = -(-self.length // self.world_size)
        padded = np.resize(order, per_rank * self.world_size)  # np.resize repeats from the start
        return padded[self.rank::self.world_size]

    # ---- state, stats, lifecycle -------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the loop is: pass to ``Feed(..., state=...)`` to resume at the next undelivered batch."""
        epoch = self._current_epoch if self._current_epoch is not None else (
            self._resume["epoch"] if self._resume else 0)
        finished = self._epoch_finished and self._current_epoch is not None
        # A staging thread runs ahead of the loop: what it took but did not hand over is not delivered.
        undelivered = self._undelivered() if self._undelivered is not None else []
        if undelivered:
            finished = False
        state = {"version": STATE_VERSION, "kind": self.kind, "length": self.length, "seed": self.seed,
                 "shuffle": self.shuffle, "ordered": self.ordered, "rank": self.rank,
                 "world_size": self.world_size,
                 "epoch": epoch + 1 if finished else epoch,
                 "position": 0 if finished else self._position - len(undelivered)}
        if not finished and not self.ordered and self.kind != "shards":
            state["delivered"] = sorted(self._delivered_indices - {index for index, _ in undelivered})
        if not finished and self.kind == "shards":
            shard_delivered = collections.Counter(self._shard_delivered)
            shard_delivered.subtract(worker for _, worker in undelivered)
            state["shard_delivered"] = {str(k): v for k, v in shard_delivered.items()}
        return state

    def stats(self) -> dict[str, Any]:
        """What the loop experienced: waits, stall fraction, throughput, producer busy, occupancy."""
        s = self._stats.summary()
        d = self._dispatcher
        if d is not None:
            s.update(d.summary())
        s.update({"workers": self.workers, "slots": self.slots, "ordered": self.ordered,
                  "source": self.kind, "staging": "cpu-view (zero copy)"})
        if d is not None and s.get("producer_wall_s"):
            s["producer_busy_fraction"] = min(1.0, s["producer_busy_s"] / (self.workers * s["producer_wall_s"]))
        if self._staging_stats is not None:
            s.update(self._staging_stats())  # which staging path is active, and its figures
        return s

    @property
    def ring(self) -> Ring:
        """The underlying ring (for adapters and inspection)."""
        self._check_open()
        return self._ring

    def _check_open(self) -> None:
        if self._closed:
            raise errors.RingClosed("the feed is closed")

    def close(self) -> None:
        """Stop producers, free the ring, shut Ray down if this feed started it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._ring is not None and self._ring.attached:
            self._ring.close("the feed was closed", code=CLOSE_NORMAL)
        closer_error = None
        for fn in reversed(list(self._closers)):  # stages first, then page-locking: before the unmap
            try:
                fn()
            except Exception as exc:
                closer_error = closer_error or exc
        if self._dispatcher is not None:
            self._dispatcher.stop()
        if self._ring is not None:
            self._ring.detach()
        if self._started_ray:
            import ray

            ray.shutdown()
        if closer_error is not None:
            raise closer_error

    def _add_closer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` at ``close()``, after the ring is closed and before it is unmapped (pyshmfeed.stage)."""
        self._closers.append(fn)

    def _remove_closer(self, fn: Callable[[], None]) -> None:
        if fn in self._closers:
            self._closers.remove(fn)

    def __enter__(self) -> "Feed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _check_state(state: dict, feed: Feed) -> dict:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise errors.InvalidArgument(f"state must come from Feed.state_dict() (version {STATE_VERSION}), "
                                     f"got {state!r:.200}")
    for key in ("kind", "length", "seed", "shuffle", "ordered", "rank", "world_size"):
        if state.get(key, 0 if key == "rank" else 1 if key == "world_size" else None) != getattr(feed, key):
            raise errors.InvalidArgument(f"cannot resume: state has {key}={state.get(key)!r}, this feed has "
                                         f"{getattr(feed, key)!r}")
    return dict(state)


def _ensure_ray(address: str | None, workers: int, num_cpus: float) -> bool:
    """Join ``address``, or use the running Ray, or start a local one. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address is not None:
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
        return True
    cpus = max(os.cpu_count() or 1, math.ceil(workers * num_cpus))
    # address="local": a new instance, even if a `ray start` cluster runs here (ray.init() would join
    # it, and refuse num_cpus); joining a cluster is what address= is for.
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, configure_logging=True,
             logging_level="warning")
    return True


class _ProducerSlot:
    """One producer position: the current actor incarnation and its calls in flight."""

    def __init__(self, worker: int) -> None:
        self.worker = worker
        self.actor = None
        self.identity: dict[str, int] | None = None
        self.ready_ref = None
        self.inflight: dict[Any, tuple[list, float]] = {}  # ref -> (tasks, start time)
        self.shard_ref = None
        self.shard_epoch: int | None = None
        self.shard_count: int | None = None
        self.pids: list[int] = []


class _Dispatcher(threading.Thread):
    """Hands out work to producer actors and handles their deaths (NOTE [producer lifecycle])."""

    def __init__(self, feed: Feed, num_cpus: float, lease: float | None, max_restarts: int,
                 actor_options: dict) -> None:
        super().__init__(name="pyshmfeed-dispatcher", daemon=True)
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._ray = ray
        self.feed = feed
        self.ring = feed._ring
        self.lease = lease
        self.restarts_left = max_restarts
        self.restarts = 0
        self.reissued = 0
        self._lock = threading.Lock()
        self._pending: collections.deque = collections.deque()
        self._max_dispatched = -1
        self._dispatched: set[int] = set()
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        # Ordered feeds: a source error waits here until the loop has every batch before it.
        self._deferred_error: tuple[errors.ProducerError, int] | None = None
        self._busy_s = 0.0
        self._t0 = time.perf_counter()
        self._shard_epoch: int | None = None
        self._shard_skip: dict[int, int] = {}
        options = {"num_cpus": num_cpus, "max_restarts": 0, "max_task_retries": 0,
                   "scheduling_strategy": NodeAffinitySchedulingStrategy(
                       node_id=ray.get_runtime_context().get_node_id(), soft=False)}
        options.update(actor_options)
        self._actor_cls = ray.remote(Producer).options(**options)
        self._cluster = None  # producers on other nodes: NOTE [remote producers] in remote.py
        if feed.placement != "node":
            from .remote import ClusterPlacement

            self._cluster = ClusterPlacement(self, options, actor_options)
        self.slots = [_ProducerSlot(w) for w in range(feed.workers)]
        for p in self.slots:
            self._start_actor(p)
        # Wait for the first producer to attach, so start-up errors (a source that does not
        # unpickle, a ring that cannot be attached) surface here, in __init__. The others join
        # as they come up (_on_started): the first batch need not wait for the slowest start.
        starting = {p.ready_ref: p for p in self.slots}
        done, _ = ray.wait(list(starting), num_returns=1, timeout=300)
        if not done:
            raise errors.ShmfeedError("no producer started within 300 s; is the Ray cluster out of CPUs? "
                                      f"(each producer asks for num_cpus={num_cpus})")
        p = starting[done[0]]
        try:
            ident = ray.get(done[0])
        except Exception as exc:
            raise errors.ShmfeedError(f"producers failed to start: {exc}") from exc
        p.identity, p.ready_ref = ident, None
        p.pids.append(ident["pid"])

    def _start_actor(self, p: _ProducerSlot) -> None:
        f = self.feed
        if self._cluster is not None:
            p.actor = self._cluster.start_actor(p)
        else:
            p.actor = self._actor_cls.remote(self.ring.handle, f.spec, f.kind, f._fn, p.worker, f.workers,
                                             f.seed, os.getpid())
        p.identity = None
        p.ready_ref = p.actor.identity.remote()

    # ---- called from the training thread -----------------------------------

    def submit(self, tasks: list[tuple[int, int, int]]) -> None:
        with self._lock:
            self._pending.extend(tasks)
            self._dispatched = set()

    def submit_shards(self, epoch: int, skip: dict[int, int]) -> None:
        with self._lock:
            self._shard_epoch = epoch
            self._shard_skip = dict(skip)
            for p in self.slots:
                p.shard_epoch, p.shard_count = epoch, None

    def shard_total(self) -> int | None:
        """Batches in this shard epoch, once every shard has finished; None before."""
        with self._lock:
            counts = [p.shard_count for p in self.slots]
        return None if any(c is None for c in counts) else sum(counts)

    def cancel_pending(self) -> None:
        """Drop work not yet handed out (the loop abandoned the epoch)."""
        with self._lock:
            self._pending = collections.deque(t for t in self._pending if t[0] in self._dispatched)
            for p in self.slots:
                if p.shard_epoch is not None and p.shard_ref is None:
                    p.shard_epoch = None

    def shards_unfinished(self) -> bool:
        """Whether a shard of the current shard epoch is running, or restarting after a death."""
        with self._lock:
            return any(p.shard_epoch is not None and p.shard_count is None for p in self.slots)

    def still_in_flight(self, seqs: set[int]) -> set[int]:
        """Those of ``seqs`` held by a producer call that has not returned (it may still be lost)."""
        with self._lock:
            return seqs & {t[0] for p in self.slots for ts, _ in p.inflight.values() for t in ts}

    def outstanding(self, delivered: set[int]) -> list[int]:
        """Sequences handed out to producers but not delivered (to drain)."""
        while True:
            with self._lock:
                shard_running = any(p.shard_ref is not None for p in self.slots)
                if not shard_running:
                    return sorted(self._dispatched - delivered)
            self.raise_if_failed()
            time.sleep(0.05)

    def raise_if_failed(self) -> None:
        if self._error is None and self._deferred_error is not None:
            exc, seq = self._deferred_error
            if self.ring.counters()["consumer_head"] >= seq:  # every batch before it was delivered
                self._fail(exc)
        if self._error is not None:
            raise self._error

    def summary(self) -> dict[str, Any]:
        s = {"restarts": self.restarts, "reissued": self.reissued, "producer_busy_s": self._busy_s,
             "producer_wall_s": time.perf_counter() - self._t0}
        if self._cluster is not None:
            s.update(self._cluster.summary())  # remote batches, ingest copy time
        return s

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=10)
        # Producers still starting: learn their pids, so we can make sure they are gone.
        pending = {p.ready_ref: p for p in self.slots if p.ready_ref is not None}
        if pending:
            done, _ = self._ray.wait(list(pending), num_returns=len(pending), timeout=10)
            for ref in done:
                try:
                    pending[ref].pids.append(self._ray.get(ref)["pid"])
                except Exception:
                    pass  # it died starting: nothing to wait for
        pids = [pid for p in self.slots for pid in p.pids if pid is not None]  # None: on another node
        for p in self.slots:
            if p.actor is not None:
                try:
                    self._ray.kill(p.actor, no_restart=True)
                except Exception:
                    pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(process_alive(pid) for pid in pids):
            time.sleep(0.05)
        if self._cluster is not None:
            self._cluster.stop()  # the ingest, once no producer can call it

    # ---- the dispatcher thread ----------------------------------------------

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._dispatch()
                self._collect()
        except BaseException as exc:  # never die silently: the loop raises it
            self._fail(errors.ShmfeedError(f"the feed's dispatcher failed: {exc!r}"), exc)

    def _fail(self, exc: BaseException, cause: BaseException | None = None) -> None:
        if cause is not None:
            exc.__cause__ = cause
        if self._error is None:
            self._error = exc
        code = CLOSE_PRODUCER_ERROR if isinstance(exc, errors.ProducerError) else CLOSE_FAILED
        try:
            self.ring.close(str(exc).splitlines()[0][:1500], code=code)
        except errors.ShmfeedError:
            pass
        self._stopping.set()

    def _dispatch(self) -> None:
        with self._lock:
            # Ordered: batch t needs slot t mod N, free once batch t - N is consumed. Hand t out only
            # when t - N is committed (below the lowest batch in flight or pending), so a producer
            # waits on the consumer alone, never on a batch a dead producer held: re-issued behind
            # that wait, it would stall the loop until a replacement producer has started.
            limit = None
            if self.feed.ordered and self._pending:
                in_flight = [t[0] for q in self.slots for ts, _ in q.inflight.values() for t in ts]
                limit = min(in_flight + [self._pending[0][0]]) + self.ring.slots
            for p in self.slots:
                if p.identity is None:
                    continue
                if p.shard_epoch is not None and p.shard_ref is None and p.shard_count is None:
                    skip = self._shard_skip.get(p.worker, 0)
                    p.shard_ref = p.actor.run_shard.remote(p.shard_epoch, skip, p.worker << 32)
                    p.inflight[p.shard_ref] = ([], time.monotonic())
                    continue
                while len(p.inflight) < 2 and self._pending:
                    # A producer runs its calls one after the other: never queue a (re-issued)
                    # earlier batch behind a later one of its own, which may be waiting for it.
                    held = max((t[0] for ts, _ in p.inflight.values() for t in ts), default=-1)
                    if self._pending[0][0] < held:
                        break
                    n = 0
                    while n < min(self.feed.chunk, len(self._pending)) and (
                            limit is None or self._pending[n][0] < limit):
                        n += 1
                    if n == 0:
                        break
                    tasks = [self._pending.popleft() for _ in range(n)]
                    for t in tasks:
                        self._dispatched.add(t[0])
                    ref = p.actor.run.remote(tasks)
                    p.inflight[ref] = (tasks, time.monotonic())

    def _collect(self) -> None:
        ray = self._ray
        by_ref = {ref: p for p in self.slots for ref in p.inflight}
        starting = {p.ready_ref: p for p in self.slots if p.ready_ref is not None}
        refs = list(by_ref) + list(starting)
        if not refs:
            self._stopping.wait(0.05)
            return
        done, _ = ray.wait(refs, num_returns=1, timeout=0.1)
        for ref in done:
            if ref in starting:
                self._on_started(starting[ref], ref)
            else:
                self._on_result(by_ref[ref], ref)
        self._check_leases()

    def _on_started(self, p: _ProducerSlot, ref) -> None:
        try:
            ident = self._ray.get(ref)
        except Exception:
            self._on_death(p)
            return
        with self._lock:
            p.identity, p.ready_ref = ident, None
            p.pids.append(ident["pid"])

    def _on_result(self, p: _ProducerSlot, ref) -> None:
        try:
            result = self._ray.get(ref)
        except Exception as exc:
            if _is_actor_death(self._ray, exc):
                self._on_death(p)
                return
            raise
        with self._lock:
            tasks, _ = p.inflight.pop(ref)
            if ref is p.shard_ref:
                p.shard_ref = None
                if "error" not in result and not result.get("closed"):
                    p.shard_count = result["count"]
        self._busy_s += result.get("busy_s", 0.0)
        if "error" in result:
            e = result["error"]
            exc = errors.ProducerError(
                f"the {self.feed.kind} source raised {e['type']}: {e['message']} (batch index {e['index']}, "
                f"producer {e['worker']})", index=e["index"], worker=e["worker"], traceback_text=e["traceback"])
            if self.feed.ordered and "seq" in e:
                # Batches before it may still be in the making: keep the ring open and producing
                # until the loop reaches this batch (raise_if_failed), so they are delivered first.
                with self._lock:
                    if self._deferred_error is None or e["seq"] < self._deferred_error[1]:
                        self._deferred_error = (exc, e["seq"])
            else:
                self._fail(exc)

    def _check_leases(self) -> None:
        if self.lease is None:
            return
        now = time.monotonic()
        for p in self.slots:
            if p.shard_ref is not None:
                continue  # a shard runs a whole epoch: no per-call lease
            if any(now - started > self.lease for _, started in p.inflight.values()):
                # Stuck (or paused): kill it first so it can never write again, then re-issue.
                self._ray.kill(p.actor, no_restart=True)
                _wait_dead(p.pids[-1] if p.pids else None)
                self._on_death(p)

    def _on_death(self, p: _ProducerSlot) -> None:
        """Reclaim a dead producer's slots, re-issue its unfinished work, start a replacement."""
        if p.identity is not None:
            # Ray may report an actor dead (ray.kill) before its process is gone: one that still
            # runs could commit after the reclaim below and its work be made twice.
            _wait_dead(p.identity.get("pid"))
        with self._lock:
            lost_tasks = [t for tasks, _ in p.inflight.values() for t in tasks]
            had_shard = p.shard_ref is not None
            p.inflight.clear()
            p.shard_ref = None
            if p.identity is not None:
                if self._cluster is not None:
                    self._cluster.reclaim(p.identity)  # a remote producer's writes: fenced at the ingest
                else:
                    self.ring.reclaim(p.identity["owner"])
            committed = self._committed_seqs() if not self.feed.ordered else None
            redo = [t for t in lost_tasks if not self._is_committed(t[0], committed)]
            self._pending = collections.deque(sorted([*redo, *self._pending]))  # several may die at once
            self.reissued += len(redo)
            if had_shard:
                # The replacement re-runs the shard and skips what was committed.
                skip = self._shard_committed(p.worker, committed)
                self._shard_skip[p.worker] = skip
                p.shard_count = None
            p.identity = None
        if self.restarts_left <= 0:
            self._fail(errors.ProducerLost(f"producer {p.worker} died and no restarts are left "
                                           f"({self.restarts} used); see the Ray logs for why it died"))
            return
        self.restarts_left -= 1
        self.restarts += 1
        self._start_actor(p)

    def _committed_seqs(self) -> set[int]:
        """Unordered rings: sequences committed = delivered ∪ ready/acquired in the ring now."""
        in_ring = set()
        for i in range(self.ring.slots):
            info = self.ring.slot_info(i)
            if info["state"] in ("ready", "acquired"):
                in_ring.add(info["seq"])
        return in_ring | set(self.feed._delivered_seqs)

    def _is_committed(self, seq: int, committed: set[int] | None) -> bool:
        return self.ring.seq_committed(seq) if committed is None else seq in committed

    def _shard_committed(self, worker: int, committed: set[int]) -> int:
        """How many leading batches of ``worker``'s shard are committed (a shard commits in order)."""
        base = worker << 32
        positions = [s - base for s in committed if base <= s < base + (1 << 32)]
        return max(self._shard_skip.get(worker, 0), max(positions) + 1 if positions else 0)


def _wait_dead(pid: int | None) -> None:
    """Make sure a producer process is gone (a SIGSTOPped one ignores polite requests)."""
    if pid is None:
        return
    deadline = time.monotonic() + 1.0
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if process_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _is_actor_death(ray, exc: BaseException) -> bool:
    from ray import exceptions as rex

    return isinstance(exc, (rex.RayActorError, rex.WorkerCrashedError, rex.ActorDiedError,
                            rex.ActorUnavailableError))
