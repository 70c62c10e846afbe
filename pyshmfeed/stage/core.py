"""The consumer thread: stage batches ahead of the training loop, release each slot when nothing can read it.

A ``Stage`` iterates one epoch of a feed on a background thread and hands
the loop batches on a *target*. This module is the framework-free part: the
threads, the target interface (``Target``, ``Staged``), numpy views, the
per-feed staging state and its counters. Torch and CUDA targets are in
``torch_targets.py``.

NOTE [stage lifecycle]
  start    ``Stage(feed, epoch, target)`` starts the stage thread, which
           iterates ``feed.slots_of(epoch)``, and, for targets whose copies
           are asynchronous (CUDA, pinned CPU tensors), a releaser thread.
  ahead    The stage thread stages batch k only when k < requested + prefetch
           (``requested``: how many batches the loop has asked for) and at
           most ``prefetch`` slots are held, so at most ``prefetch + 1`` slots
           are ever held: a feed's ``slots >= prefetch + 2`` leaves producers
           a free slot, which rules out a deadlock with ordered producers.
  release  Each acquired slot goes back to the producers exactly once, when
           nothing can read it any more:
             views (numpy, torch CPU)     when the loop asks for the next batch
                                          (or the stage closes);
             copies into owned memory     right after the copy, on the stage thread;
             asynchronous copies          when the copy's CUDA event has completed
             (CUDA, pinned views)         (``event.query()``), on the releaser thread.
  errors   Anything raised on either thread reaches the loop as a value
           (``_Failure``) saying what the thread was doing; the loop re-raises
           the original exception (its type unchanged) with that as a note.
  stop     ``close()`` (end of the epoch, ``break`` then garbage collection,
           an error, or the feed closing): set the stop Event; every wait on
           both threads is a bounded slice that checks it; the stage thread
           closes its ``slots_of`` generator (so the feed drains the epoch)
           and is joined; whatever is still held is released (after its event
           for asynchronous copies); the releaser finishes and is joined.
           Idempotent, and safe from any state.
"""

from __future__ import annotations

import collections
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import errors
from ..ring import ConsumerSlot, Ring
from ..spec import Batch, BatchSpec

WAIT_SLICE_S = 0.1         # longest single wait on either thread before the stop Event is checked again
_JOIN_TIMEOUT_S = 60.0     # a thread that has not stopped by then is reported, not waited for forever


class StagedFeed(Protocol):
    """What a stage asks of a feed (``pyshmfeed.Feed`` is one). The feed sits above the stage and
    imports it; the stage knows it only by this shape."""

    spec: BatchSpec
    slots: int
    prefetch: int

    @property
    def ring(self) -> Ring: ...

    def slots_of(self, epoch: int, *, stop: Callable[[], bool] | None = None
                 ) -> Generator[tuple[ConsumerSlot, Batch], None, None]: ...

    def stats(self) -> dict[str, Any]: ...

    def on_close(self, fn: Callable[[], None]) -> None: ...

    def remove_on_close(self, fn: Callable[[], None]) -> None: ...

    def report_staging(self, *, stats: Callable[[], dict[str, Any]] | None = None,
                       undelivered: Callable[[], list[tuple[int, int]]] | None = None) -> None: ...


# ---- what the stage thread hands over ------------------------------------------


@dataclass
class Staged:
    """One staged batch on its way to the loop."""

    batch: Batch                     # what the loop receives
    slot: ConsumerSlot | None        # still held by this batch (None: already released or pending an event)
    nbytes: int
    event: Any = None                # CUDA event the copies completed at (CUDA target)
    staged_at: float = field(default_factory=time.perf_counter)


@dataclass
class _Failure:
    """An exception that happened on a stage thread, and what that thread was doing."""

    exc: BaseException
    where: str


_END = object()


# ---- per-feed staging state: registration, cached targets, counters -------------


class StageStats:
    """What staging did for one feed, over all its stages (merged into ``feed.stats()``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.path = "cpu-view"
        self.description = "cpu-view (zero copy)"
        self.host_copies = 0
        self.register_error: str | None = None
        self.register_s = 0.0
        self.batches = 0
        self.bytes = 0
        self.released = 0
        self.release_lag_s = 0.0
        self.loop_wait_s = 0.0
        self.loop_batches = 0
        self.max_ahead = 0
        self.max_held = 0

    def use(self, target: "Target") -> None:
        with self._lock:
            self.path, self.description = target.path, target.description
            self.host_copies = target.host_copies

    def staged(self, nbytes: int, ahead: int, held: int) -> None:
        with self._lock:
            self.batches += 1
            self.bytes += nbytes
            self.max_ahead = max(self.max_ahead, ahead)
            self.max_held = max(self.max_held, held)

    def release(self, lag_s: float) -> None:
        with self._lock:
            self.released += 1
            self.release_lag_s += lag_s

    def loop_wait(self, seconds: float) -> None:
        with self._lock:
            self.loop_batches += 1
            self.loop_wait_s += seconds

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {
                "staging": self.description,
                "staging_path": self.path,
                "staging_host_copies": self.host_copies,
                "staging_register_error": self.register_error,
                "staging_register_s": self.register_s,
                "staged_batches": self.batches,
                "staged_bytes": self.bytes,
                "stage_released": self.released,
                "stage_release_lag_mean_s": self.release_lag_s / self.released if self.released else 0.0,
                "stage_wait_mean_s": self.loop_wait_s / self.loop_batches if self.loop_batches else 0.0,
                "stage_max_ahead": self.max_ahead,
                "stage_max_held": self.max_held,
            }


class FeedStaging:
    """Staging state that lives as long as its feed: cached targets, the ring's page-locking, the counters."""

    def __init__(self, ring: Ring, spec: BatchSpec) -> None:
        self.ring = ring
        self.spec = spec
        self.stats = StageStats()
        self.targets: dict[tuple, Target] = {}
        # The ring page-locked once for every target of the feed (made by torch_targets on first use).
        self.registration: Any = None
        self._closed = False

    def close(self) -> None:
        """Run by the feed's close, after every stage closed and before the ring is unmapped."""
        if self._closed:
            return
        self._closed = True
        for target in self.targets.values():
            target.close()
        if self.registration is not None:
            self.registration.close()  # after the targets: their copies may read the pages until then


_FEEDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FEEDS_LOCK = threading.Lock()


def feed_staging(feed: StagedFeed) -> FeedStaging:
    """``feed``'s staging state, made by its first stage or target and closed by the feed's close."""
    with _FEEDS_LOCK:
        state = _FEEDS.get(feed)
        if state is None:
            state = _FEEDS[feed] = FeedStaging(feed.ring, feed.spec)
            feed.report_staging(stats=state.stats.summary)
            feed.on_close(state.close)  # added before any stage's: runs after every stage closed
        return state


# ---- targets: what "staging a batch" means ---------------------------------------


class Target:
    """How batches are staged: ``stage`` runs on the stage thread, ``hand_out``/``moved_on`` on the loop's."""

    path = "cpu-view"
    description = "cpu-view (zero copy)"
    host_copies = 0          # copies the consumer side makes of each batch on the host
    asynchronous = False     # needs the releaser thread (copies that complete later)

    def stage(self, core: "StageCore", slot: ConsumerSlot, batch: Batch) -> Staged:
        raise NotImplementedError

    def hand_out(self, staged: Staged) -> None:
        """On the loop's thread, just before the loop gets the batch."""

    def moved_on(self, core: "StageCore", staged: Staged) -> None:
        """On the loop's thread, when the loop asks for the next batch (or the stage closes)."""
        if staged.slot is not None:
            slot, staged.slot = staged.slot, None
            core.release(slot, staged.staged_at)

    def close(self) -> None:
        """When the feed closes."""

    def thread_setup(self) -> None:
        """At the start of the stage and releaser threads."""


class NumpyTarget(Target):
    """Read-only numpy views over the slot: zero copy, valid until the loop asks for the next batch."""

    def stage(self, core: "StageCore", slot: ConsumerSlot, batch: Batch) -> Staged:
        return Staged(batch, slot, slot.nbytes)


class StageStopped(Exception):
    """Raised inside a stage thread's wait when the stop Event is set (ends the thread quietly)."""


# ---- target factories (cached per feed: torch_targets.py has the others) ----


def numpy_target(feed: StagedFeed) -> Target:
    """Numpy views (zero copy, valid until the next batch)."""
    staging = feed_staging(feed)
    return staging.targets.setdefault(("numpy",), NumpyTarget())


# ---- the stage ----------------------------------------------------------------------


class StageCore:
    """The state both threads share. The public ``Stage`` wraps it, so that dropping the
    iterator (``next(iter(loader))``) lets it be garbage collected and closes the core.

    A target's ``stage``/``moved_on`` get it to give slots back: ``release`` now,
    ``release_after`` an event; waits inside ``stage`` check ``stop_event``."""

    def __init__(self, feed: StagedFeed, epoch: int, target: Target, prefetch: int,
                 on_release: Callable[[ConsumerSlot], None] | None) -> None:
        self.feed = feed
        self.epoch = epoch
        self.target = target
        self.prefetch = prefetch
        self.stats = feed_staging(feed).stats
        self.stats.use(target)
        self._on_release = on_release
        self.stop_event = threading.Event()
        self._cond = threading.Condition()
        self._ready: collections.deque = collections.deque()  # staged batches, _END or _Failure
        self._requested = 0
        self._pushed = 0
        self.held = 0                 # slots acquired and not yet released
        self.max_held = 0
        self.max_ahead = 0
        self.released = 0
        self.current: Staged | None = None   # the batch the loop has now
        self._closed = False
        self._close_reason: str | None = None
        self._discarded: list[tuple[int, int]] = []  # staged, never handed out: (index, worker)
        self._async_failure: _Failure | None = None
        self._release_q: collections.deque = collections.deque()
        self._release_cond = threading.Condition()
        self._releaser_done = False
        self.thread = threading.Thread(target=self._run, name=f"pyshmfeed-stage-epoch{epoch}", daemon=True)
        self.releaser = (threading.Thread(target=self._run_releaser, name=f"pyshmfeed-release-epoch{epoch}",
                                          daemon=True) if target.asynchronous else None)
        feed.on_close(self._close_from_feed)
        if self.releaser is not None:
            self.releaser.start()
        self.thread.start()

    # ---- releases (exactly once per slot) ---------------------------------------

    def release(self, slot: ConsumerSlot, staged_at: float) -> None:
        """Give ``slot`` back to the producers now. Any thread; each slot exactly once."""
        with self._cond:
            if slot.released:
                raise errors.SlotStateError(f"batch seq {slot.seq}: slot {slot.slot} released twice by the "
                                            "stage")
            slot.release()
            self.held -= 1
            self.released += 1
            self._cond.notify_all()
        self.stats.release(time.perf_counter() - staged_at)
        if self._on_release is not None:
            self._on_release(slot)

    def release_after(self, event: Any, slot: ConsumerSlot | None, staged_at: float,
                      then: Callable[[], None] | None = None) -> None:
        """Release ``slot`` (and run ``then``) on the releaser thread once ``event`` has completed."""
        with self._release_cond:
            self._release_q.append((event, slot, staged_at, then))
            self._release_cond.notify()

    def _run_releaser(self) -> None:
        try:
            self.target.thread_setup()
        except BaseException as exc:
            self._async_failure = _Failure(exc, f"on the pyshmfeed releaser thread (epoch {self.epoch}), "
                                                "while starting")
        while True:
            with self._release_cond:
                while not self._release_q:
                    if self._releaser_done:
                        return
                    self._release_cond.wait(WAIT_SLICE_S)
                event, slot, staged_at, then = self._release_q[0]
            where = f"waiting for the copy of batch seq {slot.seq if slot is not None else '?'} to complete"
            try:
                delay = 20e-6
                while not event.query():   # never release before the GPU finished reading
                    time.sleep(delay)
                    delay = min(delay * 2, 1e-3)
                where = "releasing a slot after its copy completed"
                if slot is not None:
                    self.release(slot, staged_at)
                if then is not None:
                    then()
            except BaseException as exc:
                if self._async_failure is None:
                    self._async_failure = _Failure(
                        exc, f"on the pyshmfeed releaser thread (epoch {self.epoch}), while {where}")
                with self._cond:
                    self._cond.notify_all()
            with self._release_cond:
                self._release_q.popleft()
                self._release_cond.notify_all()

    # ---- the stage thread -------------------------------------------------------------

    def _wait_for_room(self, k: int) -> bool:
        """Block until batch ``k`` may be staged (NOTE [stage lifecycle], ahead); False once stopped."""
        with self._cond:
            while not (k < self._requested + self.prefetch and self.held <= self.prefetch):
                if self.stop_event.is_set():
                    return False
                self._cond.wait(WAIT_SLICE_S)
            return not self.stop_event.is_set()

    def _push(self, item: Any) -> None:
        with self._cond:
            self._ready.append(item)
            self._cond.notify_all()

    def _run(self) -> None:
        where = "starting the epoch"
        gen = None
        try:
            self.target.thread_setup()
            gen = self.feed.slots_of(self.epoch, stop=self.stop_event.is_set)
            k = 0
            while True:
                where = f"waiting until the loop wants batch {k} (prefetch {self.prefetch})"
                if not self._wait_for_room(k):
                    return
                where = "waiting for the producers' next batch"
                try:
                    slot, batch = next(gen)
                except StopIteration:
                    self._push(_END)
                    return
                with self._cond:
                    self.held += 1
                    self.max_held = max(self.max_held, self.held)
                where = (f"staging batch index {batch.index} (epoch {batch.epoch}, seq {batch.seq}) "
                         f"as {self.target.path}")
                try:
                    staged = self.target.stage(self, slot, batch)
                except BaseException:
                    if not slot.released:
                        self.release(slot, time.perf_counter())
                    raise
                with self._cond:
                    self._pushed += 1
                    ahead = self._pushed - self._requested
                    self.max_ahead = max(self.max_ahead, ahead)
                    held = self.held
                self.stats.staged(staged.nbytes, ahead, held)
                # state_dict() must not count staged batches. Again each batch: the feed forgets it
                # when the epoch starts, which is inside slots_of, on this thread, after the stage began.
                self.feed.report_staging(undelivered=self.undelivered)
                self._push(staged)
                k += 1
        except StageStopped:
            return
        except BaseException as exc:
            if self.stop_event.is_set() and isinstance(exc, errors.RingClosed):
                return  # stopped by request while waiting for the producers
            self._push(_Failure(exc, f"on the pyshmfeed stage thread (epoch {self.epoch}), while {where}"))
        finally:
            if gen is not None:
                try:
                    gen.close()  # an unfinished epoch: the feed cancels and drains what is left
                except BaseException as exc:
                    self._push(_Failure(exc, f"on the pyshmfeed stage thread (epoch {self.epoch}), while "
                                             "closing the epoch"))

    # ---- the loop's side --------------------------------------------------------------

    def next(self) -> Batch:
        if self._closed:
            if self._close_reason:
                raise errors.RingClosed(self._close_reason)
            raise StopIteration
        self._raise_async_failure()
        if self.current is not None:
            staged, self.current = self.current, None
            self.target.moved_on(self, staged)
        t0 = time.perf_counter()
        with self._cond:
            self._requested += 1
            self._cond.notify_all()
            while not self._ready:
                if self._async_failure is not None:
                    break
                if self._closed:
                    break
                if not self.thread.is_alive() and not self._ready:
                    lost = errors.ShmfeedError("the stage thread stopped without a batch, an end or an error")
                    self._ready.append(_Failure(lost, "in pyshmfeed.stage"))
                    break
                self._cond.wait(WAIT_SLICE_S)
            item = self._ready.popleft() if self._ready else None
        if item is None:
            if self._closed:
                raise errors.RingClosed(self._close_reason or "the stage was closed")
            self._raise_async_failure()
            assert item is not None  # the wait ends with a batch, the stage closed or a failure raised
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            _reraise(item)
        self.target.hand_out(item)
        self.current = item
        self.stats.loop_wait(time.perf_counter() - t0)
        return item.batch

    def undelivered(self) -> list[tuple[int, int]]:
        """(index, worker) of each batch taken from the ring that the loop has not had (for state_dict)."""
        with self._cond:
            staged = [(item.batch.index, item.batch.worker) for item in self._ready
                      if isinstance(item, Staged)]
        return staged + self._discarded

    def _raise_async_failure(self) -> None:
        failure = self._async_failure
        if failure is not None:
            self.close()
            _reraise(failure)

    # ---- stop -----------------------------------------------------------------------------

    def _close_from_feed(self) -> None:
        self._close_reason = self._close_reason or "the feed was closed"
        self.close()

    def close(self) -> None:
        """NOTE [stage lifecycle], stop. Idempotent; any state; any thread but the stage's own."""
        if self._closed:
            return
        self._closed = True
        self.stop_event.set()
        with self._cond:
            self._cond.notify_all()
        problems = []
        if self.thread is not threading.current_thread():
            self.thread.join(_JOIN_TIMEOUT_S)
            if self.thread.is_alive():
                problems.append(f"the stage thread of epoch {self.epoch} did not stop within "
                                f"{_JOIN_TIMEOUT_S:g} s")
        # Whatever is still held: the loop's current batch, then batches staged but never handed out.
        if self.current is not None:
            staged, self.current = self.current, None
            try:
                self.target.moved_on(self, staged)
            except BaseException as exc:
                problems.append(f"releasing the current batch: {exc!r}")
        with self._cond:
            leftovers, self._ready = list(self._ready), collections.deque()
        for item in leftovers:
            if isinstance(item, Staged):
                self._discarded.append((item.batch.index, item.batch.worker))
            if isinstance(item, Staged) and item.slot is not None:
                slot, item.slot = item.slot, None
                try:
                    self.release(slot, item.staged_at)
                except BaseException as exc:
                    problems.append(f"releasing batch seq {slot.seq}: {exc!r}")
        if self.releaser is not None:
            with self._release_cond:
                self._releaser_done = True
                self._release_cond.notify_all()
            self.releaser.join(_JOIN_TIMEOUT_S)
            if self.releaser.is_alive():
                problems.append(f"the releaser thread of epoch {self.epoch} did not stop within "
                                f"{_JOIN_TIMEOUT_S:g} s")
        self.feed.remove_on_close(self._close_from_feed)
        if problems:
            raise errors.ShmfeedError("closing the stage: " + "; ".join(problems))


def _reraise(failure: _Failure):
    exc = failure.exc
    note = f"(raised {failure.where})"
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)
    raise exc


class Stage(Iterator[Batch]):
    """Iterate one epoch of ``feed`` with a background thread staging batches on ``target``.

    ``target``: a target from ``numpy_target``, ``torch_cpu_target`` or
    ``cuda_target`` (default: numpy views). ``prefetch`` (default: the feed's)
    is how many batches may be staged before the loop asks for them; at most
    ``prefetch + 1`` ring slots are held at once. Who frees what: the stage
    releases every slot it acquired, exactly once (NOTE [stage lifecycle]);
    batches on view targets are valid until the loop asks for the next one,
    copies (CUDA tensors, ``copy=True``) for as long as the loop keeps them.

    Use as a context manager or call ``close()``; dropping the iterator also
    closes it. ``on_release`` (tests, instrumentation) is called with each
    slot right after it went back to the producers, on whichever thread did it.
    """

    def __init__(self, feed: StagedFeed, epoch: int = 0, target: Target | None = None, *,
                 prefetch: int | None = None,
                 on_release: Callable[[ConsumerSlot], None] | None = None) -> None:
        prefetch = feed.prefetch if prefetch is None else prefetch
        if not isinstance(prefetch, int) or prefetch < 0 or prefetch + 2 > feed.slots:
            raise errors.InvalidArgument(f"prefetch={prefetch!r} must be an int in 0..{feed.slots - 2} "
                                         f"(the feed has {feed.slots} slots; the loop holds one batch and "
                                         "prefetch more while producers fill the rest)")
        self._core = StageCore(feed, epoch, target or numpy_target(feed), prefetch, on_release)

    def __iter__(self) -> "Stage":
        return self

    def __next__(self) -> Batch:
        return self._core.next()

    def close(self) -> None:
        self._core.close()

    def __enter__(self) -> "Stage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        core = getattr(self, "_core", None)
        if core is not None:
            try:
                core.close()
            except Exception:
                pass

    @property
    def prefetch(self) -> int:
        return self._core.prefetch

    @property
    def held(self) -> int:
        """Slots this stage holds now (acquired, not yet released)."""
        return self._core.held

    @property
    def max_ahead(self) -> int:
        """Most batches ever staged before the loop asked for them (never above ``prefetch``)."""
        return self._core.max_ahead

    @property
    def max_held(self) -> int:
        """Most slots ever held at once (never above ``prefetch + 1``)."""
        return self._core.max_held

    @property
    def released(self) -> int:
        return self._core.released

    @property
    def target(self) -> Target:
        return self._core.target

    def stats(self) -> dict[str, Any]:
        """The feed's stats with this feed's staging figures merged in."""
        return self._core.feed.stats()


__all__ = ["Stage", "StagedFeed", "StageCore", "StageStats", "FeedStaging", "Target", "Staged", "StageStopped",
           "NumpyTarget", "feed_staging", "numpy_target", "WAIT_SLICE_S"]
