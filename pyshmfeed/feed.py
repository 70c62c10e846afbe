"""Orchestration: ``Feed`` owns the ring, starts Ray producer actors, hands out work, keeps order.

NOTE [producer lifecycle]
  start    ``Feed.__init__`` validates every argument, creates the ring (so a
           spec that does not fit in memory fails before anything starts),
           takes a lease on the process's one Ray (raylife.py), and starts
           ``workers`` producer actors pinned to this node (the ring is
           node-local). Producers stay up across epochs: start-up is paid once
           per feed.
  work     Indexed sources (fill/make) on this node: the feed posts each
           epoch as a job in the segment and producers take its tasks
           themselves (NOTE [work hand-out] in csrc/work.c; supervision in
           supervisor.py): nothing per batch goes through Ray. Generator
           shards and producers on other nodes are still handed their work
           through Ray by the dispatcher (dispatch.py), once per epoch
           (shards) or per chunk (remote). Ordered rings put batch ``seq`` in
           slot ``seq mod slots``; tasks are taken in increasing ``seq`` and
           only once their slot is free, so no producer waits holding one.
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
           waiter wakes), stop the supervisor, kill the actors, wait for their
           processes to exit, detach the ring, and give back the Ray lease
           (Ray stops with the last lease, if pyshmfeed started it). Nothing
           outlives the feed. ``close`` can be retried until it has finished
           (a second Ctrl-C inside it), and does nothing in a forked child.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import time
import weakref
from collections.abc import Generator, Iterator
from typing import Any, Callable

import numpy as np

from . import errors, raylife
from .ring import CLOSE_NORMAL, ConsumerSlot, Ring
from .source import FillSource, MakeSource, ShardsSource
from .spec import Batch, BatchSpec, SlotLayout
from .stats import FeedStats
from ._ffi import check, ffi, lib
from .autotune import parse_bytes, ring_slots
from .work import ASSIGNMENTS, MAX_PRODUCERS, TaskIndex, epoch_order, epoch_positions

STATE_VERSION = 1
_ACQUIRE_POLL_S = 0.2


class Feed:
    """Producers in Ray actors write batches into a shared-memory ring; iterate ``feed.epoch(e)``.

    Exactly one of the sources:

    - ``fill=fn(index, out, ctx)`` writes batch ``index`` in place (zero copy, fastest);
    - ``make=fn(index, ctx) -> batch`` returns the batch, copied once into the slot;
    - ``shards=fn(worker, num_workers, ctx) -> iterator of batches`` (generator pipelines).

    ``fill``/``make`` need ``length`` (batches per epoch). Options:
    ``workers`` producer actors (default 4; ``"auto"`` or ``(min, max)``, with
    ``min_workers``/``max_workers`` and ``memory_budget``, lets the feed
    choose and change the number while it runs, NOTE [autotune] in
    autotune.py: with ``placement="cluster"`` it adds producers on other
    nodes while this node has no idle core; a ``shards`` source keeps the
    number it starts with, as its shards split the data), ``slots`` in the
    ring (default ``max(2 * workers, prefetch + 2)``), ``ordered`` (default True:
    deterministic order for any number of workers; False: first ready, first
    served), ``shuffle`` (a per-epoch permutation of the *batch* indices,
    seeded by ``seed`` and the epoch: it reorders batches, not the samples
    inside them), ``seed``, ``prefetch`` (batches the consumer may hold
    ahead), ``num_cpus`` (Ray CPUs per producer, fractional by default so
    I/O-bound producers can outnumber cores), ``address`` (join a Ray
    cluster), ``lease`` (seconds a producer may spend on one batch (one chunk
    for remote producers) before it is presumed stuck, killed and its work
    re-issued), ``max_restarts``, ``chunk`` (indices per Ray call, for
    producers on other nodes), ``state`` (from ``state_dict()``, to resume),
    ``backing`` ("memfd" or "named"), ``placement`` ("node": producers on this
    node; "cluster" or a list of Ray node ids: producers anywhere, batches
    made elsewhere reach the ring through Ray's object store, see NOTE
    [remote producers] in remote.py), ``assignment`` ("any": each batch is
    made by whichever producer is free, the fastest; "round_robin": batch k
    of an epoch by producer ``k % workers`` only, as torch's DataLoader
    assigns them, so per-producer random state gives the same batches run
    after run), ``warm_producers`` (False: every feed starts its own producer
    processes and they end with it; True: it starts in warm ones an earlier
    feed of this process left, and leaves its own warm for the next feed with
    the same options, which saves a process start per producer, but
    module-level state of your source's modules then carries over from feed
    to feed; NOTE [warm producers] in hosts.py).

    Batches are read-only numpy views over ring memory, **valid until the loop
    asks for the next batch**; ``batch.copy()`` keeps one. Use as a context
    manager, or call ``close()``.
    """

    def __init__(self, spec: BatchSpec, *, fill: FillSource | None = None, make: MakeSource | None = None,
                 shards: ShardsSource | None = None, length: int | None = None,
                 workers: int | str | tuple[int, int] = 4, min_workers: int | None = None,
                 max_workers: int | None = None, memory_budget: int | str | None = None,
                 slots: int | None = None, ordered: bool = True, shuffle: bool = False, seed: int = 0,
                 prefetch: int = 2, num_cpus: float = 0.25, address: str | None = None,
                 lease: float | None = 600.0, max_restarts: int | None = None, chunk: int | None = None,
                 state: dict | None = None, backing: str = "memfd", device: str = "cpu",
                 rank: int = 0, world_size: int = 1, placement: str | list[str] | tuple[str, ...] = "node",
                 assignment: str = "any", warm_producers: bool = False,
                 _actor_options: dict | None = None) -> None:
        self._created = time.perf_counter()
        self._closed = False
        self._pid = os.getpid()  # close() acts only here: a forked child must not close our ring
        self._ring: Ring | None = None
        self._dispatcher: Any = None  # supervisor.Supervisor (segment hand-out) or dispatch.Dispatcher
        self._ray_lease: raylife.Lease | None = None
        self._final_summary: dict[str, Any] | None = None  # the supervisor's figures, kept at close()
        self._closers: list[Callable[[], None]] = []  # stages, then page-locking (on_close)
        self._staging_stats: Callable[[], dict] | None = None  # report_staging(stats=...)
        # Batches a stage took from the ring for the epoch but never handed to the loop: (index, worker).
        self._undelivered: Callable[[], list[tuple[int, int]]] | None = None  # report_staging(undelivered=...)
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
            if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
                raise errors.InvalidArgument(f"length= (batches per epoch) must be a positive int for a "
                                             f"{self.kind} source, got {length!r}")
        elif shuffle:
            raise errors.InvalidArgument("shuffle applies to indexed sources (fill/make); shuffle inside "
                                         "your shards generator instead")
        bounds = _autotune_bounds(workers, min_workers, max_workers)  # NOTE [autotune]
        if bounds is not None:
            workers = min(bounds[1], max(bounds[0], os.cpu_count() or 1))  # where the controller starts
        elif not isinstance(workers, int) or isinstance(workers, bool) or workers <= 0:
            raise errors.InvalidArgument(f"workers must be a positive int, 'auto' or (min, max), got {workers!r}")
        # A shards source keeps the number it starts with: its shards, fn(worker, num_workers), are
        # how the data is split. Others get max_workers positions for autotune to move producers in.
        positions = bounds[1] if bounds is not None and self.kind != "shards" else workers
        if not isinstance(prefetch, int) or prefetch < 0:
            raise errors.InvalidArgument(f"prefetch must be an int >= 0, got {prefetch!r}")
        budget = parse_bytes(memory_budget) if memory_budget is not None else None
        if slots is None:
            slots = ring_slots(slot_bytes=spec.slot_bytes, budget=budget, want=2 * positions, at_least=prefetch + 2,
                               size_for=lambda n: _ring_bytes(n, spec.slot_bytes))
        if not isinstance(slots, int) or slots < prefetch + 2:
            raise errors.InvalidArgument(f"slots={slots!r} must be an int >= prefetch + 2 = {prefetch + 2}: "
                                         "the loop holds one batch and prefetch more while producers fill the rest")
        if budget is not None and _ring_bytes(slots, spec.slot_bytes) > budget:
            raise errors.InvalidArgument(f"slots={slots} of {spec.slot_bytes} bytes need "
                                         f"{_ring_bytes(slots, spec.slot_bytes)} bytes, over memory_budget={budget}")
        if not (isinstance(num_cpus, (int, float)) and num_cpus >= 0):
            raise errors.InvalidArgument(f"num_cpus must be >= 0, got {num_cpus!r}")
        if lease is not None and not (isinstance(lease, (int, float)) and math.isfinite(lease) and lease > 0):
            raise errors.InvalidArgument(f"lease must be positive, finite seconds or None, got {lease!r}")
        if chunk is not None and not (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk > 0):
            raise errors.InvalidArgument(f"chunk must be a positive int or None, got {chunk!r}")
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
        # Indexed sources on this node take their work from the segment; shards and remote
        # producers are handed it through Ray (NOTE [producer lifecycle]).
        self._segment_handout = self.kind != "shards" and placement == "node"
        if assignment not in ASSIGNMENTS:
            raise errors.InvalidArgument(f"assignment={assignment!r}: use one of {', '.join(ASSIGNMENTS)}")
        if assignment == "round_robin" and not self._segment_handout:
            raise errors.InvalidArgument("assignment='round_robin' needs a fill or make source with "
                                         "placement='node'")
        self.assignment = assignment
        if not isinstance(warm_producers, bool):
            raise errors.InvalidArgument(f"warm_producers must be True or False, got {warm_producers!r}")
        if bounds is not None and assignment == "round_robin":
            raise errors.InvalidArgument("assignment='round_robin' fixes which producer makes each batch: "
                                         "give a fixed number of workers, not 'auto'")
        # Autotune moves producers in and out of the segment's records, or of the dispatcher's
        # positions for producers placed on the cluster.
        self._autotune = bounds if self.kind != "shards" else None
        if self._segment_handout and positions > MAX_PRODUCERS:
            raise errors.InvalidArgument(f"workers={positions}: a ring serves at most {MAX_PRODUCERS} producers "
                                         "on its node")
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
        self.memory_budget = budget
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
        # ---- start: the ring first (a bad shape or too little memory fails before anything
        # starts; creating it takes ~0.5 ms, its slots get their pages at their first claims),
        # then Ray, then the producers ----
        self._ring = ring = Ring.create(slots, spec.slot_bytes, ordered=ordered, backing=backing)
        try:
            self._layouts = [SlotLayout(spec, ring.slot_buffer(i), ring.slot_bytes)
                             for i in range(slots)]
            self._ray_lease = raylife.acquire(address, positions, num_cpus, closer=self.close)
            restarts = positions * 3 if max_restarts is None else max_restarts
            if self._segment_handout:
                from .supervisor import Supervisor

                skip = frozenset(int(i) for i in (self._resume or {}).get("delivered", ()))
                assert length is not None  # checked above for indexed sources
                task_index = TaskIndex(length, seed=self.seed, shuffle=shuffle, ordered=ordered, rank=rank,
                                       world_size=world_size, resume_skip=skip)
                self._dispatcher = Supervisor(
                    ring=ring, spec=spec, kind=self.kind, fn=self._fn, workers=positions, seed=self.seed,
                    task_index=task_index, ordered=ordered, num_cpus=num_cpus, lease=lease,
                    max_restarts=restarts, actor_options=_actor_options or {},
                    delivered=_weak_call(self._delivered_now, set), active=workers, tuner=self._tuner(),
                    warm=warm_producers)
            else:
                from .dispatch import Dispatcher

                self._dispatcher = Dispatcher(
                    ring=ring, spec=spec, kind=self.kind, fn=self._fn, workers=positions, seed=self.seed,
                    ordered=ordered, chunk=self.chunk, placement=placement, num_cpus=num_cpus, lease=lease,
                    max_restarts=restarts, actor_options=_actor_options or {},
                    delivered=_weak_call(self._delivered_now, set), active=workers, tuner=self._tuner())
            self._dispatcher.start()
        except BaseException:
            self.close()
            raise
        self._stats.startup_s = time.perf_counter() - self._created

    def _tuner(self) -> Any:
        """The autotune controller on this feed's counters (NOTE [autotune]), or None: a fixed count."""
        if self._autotune is None:
            return None
        from .autotune import Controller, Tuner

        return Tuner(Controller(*self._autotune), self._stats.counts)

    @classmethod
    def from_ray_dataset(cls, ds: Any, spec: BatchSpec, **options: Any) -> "Feed":
        """A feed of a ``ray.data.Dataset``'s batches; options in ``pyshmfeed.raydata.dataset_source``."""
        from .raydata import dataset_source  # a source below the feed: it checks ds and spec, makes shards

        return cls(spec, **dataset_source(ds, spec, **options))

    # ---- iteration ----------------------------------------------------------

    def epoch(self, epoch: int = 0) -> Generator[Batch, None, None]:
        """Iterate the batches of ``epoch`` (numpy views valid until the next batch is requested).

        With a CUDA ``device``: torch CUDA tensors, staged from the ring by a
        consumer thread (NOTE [stage lifecycle] in stage/core.py); they stay valid.
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

    def __iter__(self) -> Generator[Batch, None, None]:
        """Epoch after epoch, forever (or from the resumed epoch on)."""
        e = self._resume["epoch"] if self._resume else 0
        while True:
            yield from self.epoch(e)
            e += 1

    def slots_of(self, epoch: int, *, stop: Callable[[], bool] | None = None
                 ) -> Generator[tuple[ConsumerSlot, Batch], None, None]:
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
                if self._segment_handout:
                    self._dispatcher.abandon()
                else:
                    self._dispatcher.cancel_pending()
                self._drain_needed = True

    def _indexed_slots(self, epoch: int, stop: Callable[[], bool] | None = None
                       ) -> Iterator[tuple[ConsumerSlot, Batch]]:
        order = self.epoch_order(epoch)
        start, resume = 0, False
        done: frozenset[int] = frozenset()
        if self._resume and self._resume["epoch"] == epoch:
            start = self._resume["position"] if self.ordered else 0
            done = frozenset(int(i) for i in self._resume.get("delivered", ()))
            resume = True
            self._resume = None
        todo = epoch_positions(order, start=start, ordered=self.ordered, skip=done)
        self._position = start if self.ordered else 0
        self._delivered_indices = set(done)
        base = self._next_seq
        self._next_seq = base + len(todo)
        if self._segment_handout:
            self._delivered_seqs = set()  # the supervisor knows every earlier job was drained
            self._dispatcher.post(epoch, base, len(todo), start=start, resume=resume,
                                  round_robin=self.assignment == "round_robin")
        else:
            # Not emptied: a producer whose call had not returned when the last epoch ended may yet be
            # reported dead, and a batch of it delivered then must not be re-issued (made twice).
            self._delivered_seqs = self._dispatcher.still_in_flight(self._delivered_seqs)
            self._dispatcher.submit([(base + k, int(order[p]), epoch) for k, p in enumerate(todo)])
        for _ in range(len(todo)):
            slot, batch = self._next_batch(stop=stop)
            if self.ordered:
                self._position += 1
            else:
                self._position = len(self._delivered_indices) + 1
            self._delivered_indices.add(batch.index)
            self._delivered_seqs.add(slot.seq)
            yield slot, batch

    def _shard_slots(self, epoch: int, stop: Callable[[], bool] | None = None
                     ) -> Iterator[tuple[ConsumerSlot, Batch]]:
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
        ring = self._ring
        assert ring is not None  # set in __init__ (None only if creating it failed)
        while True:
            try:
                slot = ring.acquire(timeout=_ACQUIRE_POLL_S, stop=stop)
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
            self._stats.add_batch(time.perf_counter() - t0, array_bytes, ring.ready_slots())
        batch = Batch(self.spec.names, views, positional=self.spec.positional, index=ident["index"],
                      epoch=ident["epoch"], worker=ident["worker"], meta=meta, seq=slot.seq)
        return slot, batch

    def _drain(self) -> None:
        """After an abandoned epoch: consume the batches already handed out, so the next starts clean."""
        ring = self._ring
        assert ring is not None
        if self.kind == "shards":
            # A shard makes its whole epoch in one producer call that nothing can cut short: drop
            # what it still makes (else the ring fills and blocks it for good) until every shard
            # started in the abandoned epoch has returned.
            while True:
                unfinished = self._dispatcher.shards_unfinished()
                try:
                    ring.acquire(timeout=_ACQUIRE_POLL_S if unfinished else 0).release()
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
            self._next_seq = ring.counters()["consumer_head"]
        self._drain_needed = False

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The indices this rank delivers in ``epoch``, in order (``work.epoch_order``: shuffle, ranks)."""
        if self.length is None:
            raise errors.InvalidArgument("epoch_order: a shards source has no batch indices (fill/make only)")
        return epoch_order(self.length, epoch, seed=self.seed, shuffle=self.shuffle, rank=self.rank,
                           world_size=self.world_size)

    def _delivered_now(self) -> set[int]:
        """A snapshot of this epoch's delivered sequences (read by the supervisor's or dispatcher's thread)."""
        while True:
            try:
                return set(self._delivered_seqs)
            except RuntimeError:  # resized by the loop while copied: copy again
                continue

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
        s.update({"workers": self.workers, "slots": self.slots, "ordered": self.ordered,
                  "source": self.kind, "staging": "cpu-view (zero copy)",
                  "ring_bytes": _ring_bytes(self.slots, self.spec.slot_bytes), "memory_budget": self.memory_budget})
        d = self._dispatcher
        if d is not None:
            s.update(d.summary())  # the workers running now, under autotune
        elif self._final_summary:
            s.update(self._final_summary)
        if d is not None and s.get("producer_wall_s"):
            s["producer_busy_fraction"] = min(1.0, s["producer_busy_s"] / (self.workers * s["producer_wall_s"]))
        if self._staging_stats is not None:
            s.update(self._staging_stats())  # which staging path is active, and its figures
        return s

    def producers(self) -> dict[str, int]:
        """Producers now: ``running`` (started, making batches) and ``starting`` (Ray is starting them).

        Cheap (no figures computed): for progress displays and for watching autotune work.
        """
        d = self._dispatcher
        return d.producer_counts() if d is not None else {"running": 0, "starting": 0}

    @property
    def ring(self) -> Ring:
        """The underlying ring (for adapters and inspection)."""
        self._check_open()
        assert self._ring is not None
        return self._ring

    def _check_open(self) -> None:
        if self._closed:
            raise errors.RingClosed("the feed is closed")

    def close(self) -> None:
        """Stop producers, free the ring, give back the Ray lease. Idempotent; retry if interrupted.

        Each step runs once and is marked done only when it finished, so a
        Ctrl-C inside ``close`` leaves a feed that ``close()`` finishes later.
        In a forked child the feed is the parent's: close there only forgets it.
        """
        if os.getpid() != self._pid:
            self._closed = True
            return
        ring_mapped = self._ring is not None and self._ring.attached
        if self._closed and not ring_mapped and self._dispatcher is None and self._ray_lease is None:
            return
        self._closed = True  # from here on, iteration refuses; the steps below may be retried
        if self._ring is not None and self._ring.attached:
            self._ring.close("the feed was closed", code=CLOSE_NORMAL)
        closer_error = None
        while self._closers:  # stages first, then page-locking: before the unmap
            fn = self._closers[-1]
            try:
                fn()
            except Exception as exc:
                closer_error = closer_error or exc
            self.remove_on_close(fn)
        if self._dispatcher is not None:
            self._dispatcher.stop()
            with contextlib.suppress(Exception):  # the ring is still mapped: its records can be read
                self._final_summary = self._dispatcher.summary()
            self._dispatcher = None
        if self._ring is not None:
            self._ring.detach()
        if self._ray_lease is not None:
            self._ray_lease.release()
            self._ray_lease = None
        if closer_error is not None:
            raise closer_error

    # ---- for consumers that take batches on a thread of their own (pyshmfeed.stage) ----------
    # Public methods rather than callables handed to each stage: a stage is made from a feed alone
    # by front ends (adapters, user code) after the feed exists, so these are all it may ask of it.

    def on_close(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` at ``close()``, after the ring is closed and before it is unmapped.

        The ring is closed by then (every wait on it ends) and its memory is
        still mapped, so ``fn`` may join threads that waited on it, release
        slots and unregister memory. The last
        added runs first; if one raises, the others and the rest of
        ``close()`` still run and ``close()`` raises the first error.
        """
        self._closers.append(fn)

    def remove_on_close(self, fn: Callable[[], None]) -> None:
        """Forget ``fn`` (a stage that closed by itself); nothing if it is not registered."""
        if fn in self._closers:
            self._closers.remove(fn)

    def report_staging(self, *, stats: Callable[[], dict[str, Any]] | None = None,
                       undelivered: Callable[[], list[tuple[int, int]]] | None = None) -> None:
        """How a consumer thread running ahead of the loop keeps ``stats()`` and ``state_dict()`` true.

        ``stats()`` returns figures merged into ``feed.stats()`` (the staging
        path and its counters). ``undelivered()`` returns ``(index, worker)``
        of each batch of the current epoch taken from the ring but not handed
        to the loop, which ``state_dict()`` then does not count as delivered;
        it is forgotten when the next epoch starts. Each one given replaces
        the one reported before; either may be called from any thread.
        """
        if stats is not None:
            self._staging_stats = stats
        if undelivered is not None:
            self._undelivered = undelivered

    def __enter__(self) -> "Feed":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _autotune_bounds(workers: Any, min_workers: Any, max_workers: Any) -> tuple[int, int] | None:
    """``(min, max)`` producers for ``workers="auto"`` or ``(min, max)``; None for a fixed number."""
    if isinstance(workers, tuple) and len(workers) == 2:
        if min_workers is not None or max_workers is not None:
            raise errors.InvalidArgument(f"workers={workers!r} and min_workers/max_workers: give one or the other")
        min_workers, max_workers = workers
    elif workers != "auto":
        if min_workers is not None or max_workers is not None:
            raise errors.InvalidArgument("min_workers/max_workers bound workers='auto'; with a fixed number of "
                                         f"workers ({workers!r}) leave them out")
        return None
    cores = os.cpu_count() or 1
    lo = 1 if min_workers is None else min_workers
    hi = min(MAX_PRODUCERS, max(16, 4 * cores)) if max_workers is None else max_workers
    for name, v in (("min_workers", lo), ("max_workers", hi)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise errors.InvalidArgument(f"{name}={v!r} must be a positive int")
    if lo > hi:
        raise errors.InvalidArgument(f"min_workers={lo} > max_workers={hi}")
    return lo, hi


def _ring_bytes(slots: int, slot_bytes: int) -> int:
    """The segment size of a ring of this shape (what memory_budget limits)."""
    out = ffi.new("uint64_t *")
    check(lib.shmfeed_ring_size_for(slots, slot_bytes, out), "sizing the ring")
    return int(out[0])


def _weak_call(method: Callable[[], Any], default: Callable[[], Any]) -> Callable[[], Any]:
    """``method`` without keeping its object alive: the supervisor's (or dispatcher's) thread must not keep a dropped
    feed from being garbage-collected (and so closed) — feeds made and dropped in a loop."""
    ref = weakref.WeakMethod(method)

    def call() -> Any:
        bound = ref()
        return default() if bound is None else bound()
    return call


def _check_state(state: dict, feed: Feed) -> dict:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise errors.InvalidArgument(f"state must come from Feed.state_dict() (version {STATE_VERSION}), "
                                     f"got {state!r:.200}")
    for key in ("kind", "length", "seed", "shuffle", "ordered", "rank", "world_size"):
        if state.get(key, 0 if key == "rank" else 1 if key == "world_size" else None) != getattr(feed, key):
            raise errors.InvalidArgument(f"cannot resume: state has {key}={state.get(key)!r}, this feed has "
                                         f"{getattr(feed, key)!r}")
    return dict(state)
