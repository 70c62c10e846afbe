"""The work area of the segment: jobs, tasks, re-issue, producer records (NOTE [work hand-out] in csrc/work.c).

The feed posts one *job* per epoch (task ``k`` is batch ``base_seq + k``);
producers ``take`` tasks straight from shared memory, so no batch costs a Ray
call or any work in the training process. Which batch *index* a task makes is
``task_index``: the same pure function of the feed's settings in the feed and
in every producer, so nothing but the task number needs to travel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import errors
from ._ffi import check, ffi, lib
from .ring import Ring

MAX_PRODUCERS: int = lib.shmfeed_max_producers()
JOB_RESUME = lib.SHMFEED_JOB_RESUME
JOB_ROUND_ROBIN = lib.SHMFEED_JOB_ROUND_ROBIN
JOB_CARRY = lib.SHMFEED_JOB_CARRY
ASSIGNMENTS = ("any", "round_robin")


@dataclass(frozen=True)
class Job:
    epoch: int
    base_seq: int
    count: int
    start: int
    flags: int
    stride: int
    gen: int
    taken: int  # fresh tasks handed out so far (for post/freeze: by the job before; not round robin)

    @property
    def round_robin(self) -> bool:
        return bool(self.flags & JOB_ROUND_ROBIN)


@dataclass(frozen=True)
class Task:
    seq: int
    k: int
    epoch: int
    start: int
    flags: int
    reissued: bool


@dataclass(frozen=True)
class Record:
    owner: int
    task: int | None  # the seq it holds
    intent: bool      # a take is in progress: what it holds is not settled yet
    since_ns: int
    busy_ns: int
    batches: int
    pid: int
    next_gen: int  # round robin: the job generation and task number it takes next
    next_k: int
    stop: bool     # a stop was requested
    signal: int = 0  # the fatal signal its producer died of (watch_signals); 0: none


def _job(j) -> Job:
    return Job(int(j.epoch), int(j.base_seq), int(j.count), int(j.start), int(j.flags), int(j.stride), int(j.gen),
               int(j.taken))


class WorkArea:
    """The work area of ``ring`` (feed side and producer side)."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self._task = ffi.new("shmfeed_task *")
        self._record = ffi.new("shmfeed_record *")

    # ---- the feed's side ---------------------------------------------------

    def post(self, epoch: int, base_seq: int, count: int, *, start: int = 0, resume: bool = False,
             round_robin: int = 0, carry_gen: int | None = None) -> Job:
        """Publish a job; producers start on it at once. Returns it (``taken``: by the previous job).

        ``round_robin=W``: task k is made by the producer at record ``k % W`` only;
        ``carry_gen``: the same round-robin job again (smaller ``count``), each
        record going on from where it was in generation ``carry_gen``.
        """
        flags = (JOB_RESUME if resume else 0) | (JOB_ROUND_ROBIN if round_robin else 0) | (
            JOB_CARRY if carry_gen is not None else 0)
        j = ffi.new("shmfeed_job *", {"epoch": epoch, "base_seq": base_seq, "count": count, "start": start,
                                      "flags": flags, "stride": round_robin, "carry_gen": carry_gen or 0})
        check(lib.shmfeed_job_post(self.ring.c_handle(), j), f"posting the work of epoch {epoch}")
        return _job(j)

    def freeze(self) -> Job:
        """Hand out nothing fresh of the current job (re-issued tasks still go); ``taken``: how many went."""
        j = ffi.new("shmfeed_job *")
        check(lib.shmfeed_job_freeze(self.ring.c_handle(), j), "freezing the current job")
        return _job(j)

    def current(self) -> Job:
        j = ffi.new("shmfeed_job *")
        check(lib.shmfeed_job_read(self.ring.c_handle(), j), "reading the current job")
        return _job(j)

    def reissue(self, seq: int) -> None:
        """Put a lost task back: the next free producer makes it before anything fresh."""
        check(lib.shmfeed_reissue(self.ring.c_handle(), seq), f"re-issuing batch {seq}")

    def queued(self) -> list[int]:
        seqs = ffi.new("uint64_t[]", 256)
        n = ffi.new("uint32_t *")
        check(lib.shmfeed_reissue_read(self.ring.c_handle(), seqs, 256, n), "reading the re-issue queue")
        return [int(seqs[i]) for i in range(n[0])]

    def record(self, rec: int) -> Record:
        r = self._record
        check(lib.shmfeed_record_read(self.ring.c_handle(), rec, r), f"reading producer record {rec}")
        return Record(int(r.owner), int(r.task) - 1 if r.task else None, bool(r.intent), int(r.since_ns),
                      int(r.busy_ns), int(r.batches), int(r.pid), int(r.next_gen), int(r.next_k), bool(r.stop),
                      int(r.signal))

    def reset(self, rec: int) -> None:
        """Free record ``rec`` for a new producer (its previous one is dead and accounted for)."""
        check(lib.shmfeed_record_reset(self.ring.c_handle(), rec), f"resetting producer record {rec}")

    def stop(self, rec: int) -> None:
        """Ask the producer at ``rec`` to stop once its current task is made (its takes end)."""
        check(lib.shmfeed_record_stop(self.ring.c_handle(), rec), f"stopping producer record {rec}")

    # ---- a producer's side -------------------------------------------------

    def open(self, rec: int, owner: int, pid: int) -> None:
        check(lib.shmfeed_record_open(self.ring.c_handle(), rec, owner, pid), f"opening producer record {rec}")

    def watch_signals(self, rec: int) -> None:
        """In the producer's process: a fatal signal (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT) is noted in
        record ``rec`` before the process dies of it (NOTE [fatal signals] in csrc/work.c)."""
        check(lib.shmfeed_record_watch_signals(self.ring.c_handle(), rec), f"watching signals (record {rec})")

    def take(self, rec: int, *, timeout: float | None = None, stop: Callable[[], bool] | None = None) -> Task:
        """The next task for the producer at record ``rec`` (waits; ``RingClosed`` when the ring closes)."""
        ptr = self.ring.c_handle()
        t = self._task
        self.ring.wait_in_c(lambda ns: lib.shmfeed_take(ptr, rec, ns, t), "waiting for work", timeout, stop)
        return Task(int(t.seq), int(t.k), int(t.epoch), int(t.start), int(t.flags), bool(t.reissued))

    def done(self, rec: int, busy_s: float) -> None:
        check(lib.shmfeed_task_done(self.ring.c_handle(), rec, int(busy_s * 1e9)), f"finishing a task (record {rec})")


# ---- which batch index a task makes -------------------------------------------


def epoch_order(length: int, epoch: int, *, seed: int, shuffle: bool, rank: int = 0,
                world_size: int = 1) -> np.ndarray:
    """The indices a rank delivers in ``epoch``, in order.

    All ranks compute the same global order (a permutation seeded by ``seed``
    and the epoch when ``shuffle``, else ``0..length-1``); rank r takes every
    ``world_size``-th index from position r. Like torch's DistributedSampler,
    the order is padded by wrapping around so every rank gets
    ``ceil(length / world_size)`` batches and none waits for the others at the
    end of an epoch.
    """
    if shuffle:
        order = np.random.default_rng(np.random.SeedSequence([seed & (2**63 - 1), epoch, 0x5F])) \
            .permutation(length)
    else:
        order = np.arange(length)
    if world_size == 1:
        return order
    per_rank = -(-length // world_size)
    padded = np.resize(order, per_rank * world_size)  # np.resize repeats from the start
    return padded[rank::world_size]


def epoch_positions(order: np.ndarray, *, start: int, ordered: bool, skip: frozenset[int] = frozenset()
                    ) -> np.ndarray:
    """Positions in ``order`` an epoch's tasks make, task ``k`` first to last.

    Ordered: from ``start`` on (a resumed ordered epoch delivered a prefix).
    Unordered: every position whose index is not in ``skip`` (a resumed
    unordered epoch delivered an arbitrary set).
    """
    if ordered or not skip:
        return np.arange(start, len(order))
    keep = ~np.isin(order, np.fromiter(skip, dtype=np.int64, count=len(skip)))
    return np.flatnonzero(keep)


class TaskIndex:
    """Maps a task to its batch index, with the epoch's order cached (the producers' side).

    An unshuffled single-rank epoch needs no arrays (task ``k`` makes ``start + k``), and an
    ordered one or one with nothing to skip no positions array: a producer of a 10-million-batch
    feed used to build two 80 MB arrays before its first batch, holding that batch's seq (an
    ordered feed's loop waited seconds for it). ``prepare`` lets a new producer build what the
    current job needs before it takes one of its tasks.
    """

    def __init__(self, length: int, *, seed: int, shuffle: bool, ordered: bool, rank: int, world_size: int,
                 resume_skip: frozenset[int] = frozenset()) -> None:
        self._seed, self._shuffle, self._rank, self._world_size = seed, shuffle, rank, world_size
        self.length = length
        self.ordered = ordered
        self.resume_skip = resume_skip
        self._key: tuple | None = None
        self._order: np.ndarray | None = None      # None: the identity (unshuffled, one rank)
        self._positions: np.ndarray | None = None  # None: task k is position start + k
        self._count = 0                            # the epoch's tasks

    @property
    def prepared(self) -> bool:
        """An epoch's order is built (a new producer's has none yet)."""
        return self._key is not None

    def prepare(self, epoch: int, start: int, flags: int) -> None:
        """Build the order of a job's epoch (done once per epoch; ``__call__`` does it if not yet)."""
        key = (epoch, start, bool(flags & JOB_RESUME))
        if key == self._key:
            return
        identity = not self._shuffle and self._world_size == 1
        self._order = None if identity else epoch_order(self.length, epoch, seed=self._seed, shuffle=self._shuffle,
                                                        rank=self._rank, world_size=self._world_size)
        size = self.length if self._order is None else len(self._order)
        skip = self.resume_skip if key[2] else frozenset()
        if self.ordered or not skip:
            self._positions, self._count = None, max(0, size - start)
        else:
            order = np.arange(size) if self._order is None else self._order
            self._positions = epoch_positions(order, start=start, ordered=self.ordered, skip=skip)
            self._count = len(self._positions)
        self._key = key

    def __call__(self, task: Task) -> int:
        self.prepare(task.epoch, task.start, task.flags)
        if not 0 <= task.k < self._count:
            raise errors.CorruptSegment(f"task {task.k} of epoch {task.epoch} is past the epoch's "
                                        f"{self._count} batches")
        position = task.start + task.k if self._positions is None else int(self._positions[task.k])
        return position if self._order is None else int(self._order[position])
