"""The consumer thread: stage batches ahead of the training loop, release each slot when nothing can read it.

A ``Stage`` iterates one epoch of a ``Feed`` on a background thread and hands
the loop batches on a *target*: numpy views, torch CPU tensors (views or owned
copies, optionally pinned) or CUDA tensors copied straight from the ring.

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

Frameworks are imported inside the functions that use them: importing this
module imports neither torch nor anything else heavy.
"""

from __future__ import annotations

import collections
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import errors
from .ring import ConsumerSlot
from .spec import Batch, BatchSpec

if TYPE_CHECKING:
    from .feed import Feed

_WAIT_SLICE_S = 0.1        # longest single wait on either thread before the stop Event is checked again
_JOIN_TIMEOUT_S = 60.0     # a thread that has not stopped by then is reported, not waited for forever
CUDA_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context


def _torch():
    import torch  # absolute: the real torch, imported on first use only

    return torch


# ---- what the stage thread hands over ------------------------------------------


@dataclass
class _Staged:
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


# ---- page-locking the ring -------------------------------------------------------


class HostRegistration:
    """Page-locks ``[address, address + nbytes)`` once with ``cudaHostRegister`` so the GPU's DMA reads it.

    ``ok`` says whether it worked; ``error`` says why not (memlock limit, a
    driver that refuses shared mappings, no CUDA...). ``close()`` unregisters;
    it must run before the memory is unmapped (the feed's close does it).
    """

    def __init__(self, address: int, nbytes: int, *, flags: int = CUDA_HOST_REGISTER_PORTABLE) -> None:
        self.address = address
        self.nbytes = nbytes
        self.ok = False
        self.error: str | None = None
        self.seconds = 0.0
        torch = _torch()
        t0 = time.perf_counter()
        try:
            cudart = torch.cuda.cudart()
            rc = int(cudart.cudaHostRegister(address, nbytes, flags))
        except Exception as exc:  # no CUDA runtime bindings, CUDA not initialisable...
            self.error = f"cudaHostRegister is unavailable: {exc}"
            return
        self.seconds = time.perf_counter() - t0
        if rc != 0:
            self.error = f"cudaHostRegister of {nbytes} bytes at {address:#x} failed: {_cuda_error_text(rc)}"
            return
        self.ok = True

    def close(self) -> None:
        if not self.ok:
            return
        self.ok = False
        torch = _torch()
        torch.cuda.synchronize()  # no DMA may still be reading the pages
        rc = int(torch.cuda.cudart().cudaHostUnregister(self.address))
        if rc != 0:
            raise errors.ShmfeedError(f"cudaHostUnregister({self.address:#x}) failed: {_cuda_error_text(rc)}")


def _cuda_error_text(rc: int) -> str:
    try:
        return str(_torch().cuda.CudaError(rc))
    except Exception:
        return f"CUDA error {rc}"


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

    def use(self, target: "_Target") -> None:
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


class _FeedStaging:
    """Staging state that lives as long as its feed: one registration, cached targets, the counters."""

    def __init__(self, feed: "Feed") -> None:
        self.ring = feed.ring
        self.spec = feed.spec
        self.stats = StageStats()
        self.targets: dict[tuple, _Target] = {}
        self._registration: HostRegistration | None = None
        self._closed = False
        feed._staging_stats = self.stats.summary
        feed._add_closer(self.close)

    def registration(self) -> HostRegistration:
        if self._registration is None:
            self._registration = HostRegistration(self.ring.data_address, self.ring.data_nbytes)
            self.stats.register_error = self._registration.error
            self.stats.register_s = self._registration.seconds
        return self._registration

    def close(self) -> None:
        """Run by the feed's close, after every stage closed and before the ring is unmapped."""
        if self._closed:
            return
        self._closed = True
        for target in self.targets.values():
            target.close()
        if self._registration is not None:
            self._registration.close()


_FEEDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FEEDS_LOCK = threading.Lock()


def _staging(feed: "Feed") -> _FeedStaging:
    with _FEEDS_LOCK:
        state = _FEEDS.get(feed)
        if state is None:
            state = _FEEDS[feed] = _FeedStaging(feed)
        return state


# ---- targets: what "staging a batch" means ---------------------------------------


class _Target:
    """How batches are staged: ``stage`` runs on the stage thread, ``hand_out``/``moved_on`` on the loop's."""

    path = "cpu-view"
    description = "cpu-view (zero copy)"
    host_copies = 0          # copies the consumer side makes of each batch on the host
    asynchronous = False     # needs the releaser thread (copies that complete later)

    def stage(self, core: "_StageCore", slot: ConsumerSlot, batch: Batch) -> _Staged:
        raise NotImplementedError

    def hand_out(self, staged: _Staged) -> None:
        """On the loop's thread, just before the loop gets the batch."""

    def moved_on(self, core: "_StageCore", staged: _Staged) -> None:
        """On the loop's thread, when the loop asks for the next batch (or the stage closes)."""
        if staged.slot is not None:
            slot, staged.slot = staged.slot, None
            core.release(slot, staged.staged_at)

    def close(self) -> None:
        """When the feed closes."""

    def thread_setup(self) -> None:
        """At the start of the stage and releaser threads."""


class NumpyTarget(_Target):
    """Read-only numpy views over the slot: zero copy, valid until the loop asks for the next batch."""

    def stage(self, core: "_StageCore", slot: ConsumerSlot, batch: Batch) -> _Staged:
        return _Staged(batch, slot, slot.nbytes)


def _writable(a: np.ndarray) -> np.ndarray:
    """The same memory, flagged writable: torch.from_numpy warns on read-only arrays.

    Writing through it would only change the consumer's own batch; nothing here does.
    """
    v = a.view()
    v.flags.writeable = True
    return v


class TorchCPUTarget(_Target):
    """torch CPU tensors: zero-copy views over the slot, or owned copies (``copy=True``), optionally pinned.

    - views (default): ``torch.from_numpy`` over slot memory; valid until the
      loop asks for the next batch. With ``pin=True`` and CUDA, the ring is
      page-locked, so ``x.cuda(non_blocking=True)`` is a true DMA from the
      slot; the slot is then released only after an event recorded on the
      loop's current stream, when it asks for the next batch, has completed
      (so a copy the loop queued on that stream has finished reading).
    - copies (``copy=True``): one copy into fresh tensors (pinned with
      ``pin=True``: torch's pinned host allocator, which itself tracks
      non-blocking copies), on the stage thread; the slot goes back at once
      and the tensors stay valid for as long as the loop keeps them.
    """

    def __init__(self, staging: _FeedStaging, *, copy: bool = False, pin: bool = False) -> None:
        torch = _torch()
        self._torch = torch
        self.pin = bool(pin) and torch.cuda.is_available()
        self.copy = bool(copy)
        self.registered = False
        if self.pin and not self.copy:
            reg = staging.registration()
            self.registered = reg.ok
            if not reg.ok:
                self.copy = True  # fallback: pinned copies (one copy) instead of registered views
        if self.copy:
            kind = "pinned " if self.pin else ""
            reason = f"; {staging.stats.register_error}" if pin and not copy and self.pin else ""
            self.path = "torch-cpu-pinned-copy" if self.pin else "torch-cpu-copy"
            self.description = f"torch-cpu, one copy into owned {kind}tensors{reason}"
            self.host_copies = 1
        else:
            self.path = "torch-cpu-registered-view" if self.registered else "torch-cpu-view"
            self.description = ("torch-cpu views over the page-locked ring (zero copy)" if self.registered
                                else "torch-cpu views over the ring (zero copy)")
            self.host_copies = 0
        self.asynchronous = self.registered

    def stage(self, core: "_StageCore", slot: ConsumerSlot, batch: Batch) -> _Staged:
        torch = self._torch
        if not self.copy:
            return _Staged(batch.map(lambda a: torch.from_numpy(_writable(a))), slot, slot.nbytes)
        staged_at = time.perf_counter()

        def owned(a: np.ndarray):
            t = torch.empty(a.shape, dtype=_torch_dtype(a.dtype), pin_memory=self.pin)
            t.copy_(torch.from_numpy(_writable(a)))
            return t

        out = batch.map(owned)
        core.release(slot, staged_at)  # the copy is done: nothing reads the slot any more
        return _Staged(out, None, slot.nbytes, staged_at=staged_at)

    def moved_on(self, core: "_StageCore", staged: _Staged) -> None:
        if staged.slot is None:
            return
        slot, staged.slot = staged.slot, None
        if not self.registered:
            core.release(slot, staged.staged_at)
            return
        torch = self._torch
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream())  # after any copy the loop queued from this batch
        core.release_after(event, slot, staged.staged_at)


class _PinnedPool:
    """A few pinned buffers laid out like a slot: the fallback when the ring cannot be page-locked."""

    def __init__(self, torch, spec: BatchSpec, count: int) -> None:
        self.spec = spec
        self.count = count
        self._free: collections.deque = collections.deque(
            torch.empty(spec.slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(count))
        self._cond = threading.Condition()

    def get(self, stop: threading.Event):
        with self._cond:
            while not self._free:
                if stop.is_set():
                    raise _Stopped()
                self._cond.wait(_WAIT_SLICE_S)
            return self._free.popleft()

    def put(self, buf) -> None:
        with self._cond:
            self._free.append(buf)
            self._cond.notify()

    def views(self, buf, batch: Batch) -> list:
        out = []
        for a, off, arr in zip(self.spec.arrays, self.spec.offsets, batch.values()):
            n = arr.size * a.dtype.itemsize
            out.append(buf[off: off + n].view(_torch_dtype(a.dtype)).view(arr.shape))
        return out


class _Stopped(Exception):
    """Raised inside a stage thread's wait when the stop Event is set."""


class CudaTarget(_Target):
    """CUDA tensors, copied from the ring on a dedicated stream (see DESIGN §5).

    Registered path (the normal one): the whole ring was page-locked once; each
    array is copied slot → GPU with ``non_blocking=True`` on the stage's own
    stream (a DMA straight from where the producer wrote it: no host copy), an
    event is recorded, and the slot is released only after ``event.query()``
    says the copy completed. The loop's current stream waits on the event when
    the batch is handed out, and ``record_stream`` tells the caching allocator
    the tensors are used there. The tensors belong to the loop (valid for as
    long as it keeps them).

    Fallback (the ring could not be page-locked): a small pool of pinned
    buffers; each batch is copied slot → pinned buffer on the host (one extra
    copy; the slot is released right after it), then pinned buffer → GPU as
    above; the buffer returns to the pool when the copy's event completed.
    ``feed.stats()["staging"]`` says which path is active, and why.

    ``_delay_cycles`` and ``_release_early`` are test hooks for
    ``bench/gpu_check.py``: a GPU sleep queued before each copy, and a
    deliberately wrong release right after the copy is queued (which the check
    must catch). Never use them otherwise.
    """

    asynchronous = True

    def __init__(self, staging: _FeedStaging, device: Any = "cuda", *, register: bool = True, pool: int = 3,
                 _delay_cycles: int = 0, _release_early: bool = False) -> None:
        torch = _torch()
        self._torch = torch
        self.device = check_cuda_device(device)
        self.spec = staging.spec
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(self.device)
        reg = staging.registration() if register else None
        self.registered = reg is not None and reg.ok
        self._delay_cycles = int(_delay_cycles)
        self._release_early = bool(_release_early)
        self.pool: _PinnedPool | None = None
        if self.registered:
            self.path = "cuda-registered"
            self.description = f"{self.device}: DMA from the page-locked ring (no host copy)"
            self.host_copies = 0
        else:
            why = reg.error if reg is not None else "page-locking turned off (register=False)"
            self.pool = _PinnedPool(torch, self.spec, max(2, int(pool)))
            self.path = "cuda-pinned-pool"
            self.description = (f"{self.device}: via a pool of {self.pool.count} pinned buffers (one extra "
                                f"host copy), because {why}")
            self.host_copies = 1

    def stage(self, core: "_StageCore", slot: ConsumerSlot, batch: Batch) -> _Staged:
        torch = self._torch
        staged_at = time.perf_counter()
        arrays = list(batch.values())
        buf = None
        if self.registered:
            sources = [torch.from_numpy(_writable(a)) for a in arrays]
        else:
            buf = self.pool.get(core.stop_event)
            sources = self.pool.views(buf, batch)
            for dst, a in zip(sources, arrays):
                dst.copy_(torch.from_numpy(_writable(a)))  # the one extra copy
            core.release(slot, staged_at)  # the pinned buffer holds the batch now
            slot = None
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if self._delay_cycles:
                torch.cuda._sleep(self._delay_cycles)
            outs = []
            for src in sources:
                dst = torch.empty(src.shape, dtype=src.dtype, device=self.device)
                dst.copy_(src, non_blocking=True)
                outs.append(dst)
            event = torch.cuda.Event()
            event.record(self.stream)
        if slot is not None:
            if self._release_early:
                core.release(slot, staged_at)  # WRONG on purpose (test hook): the DMA may not have run yet
            else:
                core.release_after(event, slot, staged_at)
        else:
            core.release_after(event, None, staged_at, then=lambda: self.pool.put(buf))
        it = iter(outs)
        return _Staged(batch.map(lambda _a: next(it)), None, batch_nbytes(batch), event=event,
                       staged_at=staged_at)

    def thread_setup(self) -> None:
        self._torch.cuda.set_device(self.device)  # the runtime's current device is per thread

    def hand_out(self, staged: _Staged) -> None:
        torch = self._torch
        current = torch.cuda.current_stream(self.device)
        current.wait_event(staged.event)  # the loop's work on these tensors runs after the copy
        for t in staged.batch.values():
            t.record_stream(current)      # the allocator must not reuse them before that work is done


def batch_nbytes(batch: Batch) -> int:
    return int(sum(getattr(a, "nbytes", 0) for a in batch.values()))


_TORCH_DTYPES: dict[np.dtype, Any] = {}


def _torch_dtype(dtype: np.dtype):
    dtype = np.dtype(dtype)
    t = _TORCH_DTYPES.get(dtype)
    if t is None:
        try:
            t = _torch().from_numpy(np.empty(0, dtype)).dtype
        except TypeError as exc:
            raise errors.InvalidArgument(f"dtype {dtype} has no torch equivalent: {exc}") from exc
        _TORCH_DTYPES[dtype] = t
    return t


def check_cuda_device(device: Any):
    """``device`` as a ``torch.device`` of type cuda with an index, or ``InvalidArgument`` saying why not."""
    torch = _torch()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise errors.InvalidArgument(f"device={device!r} is not a device: {exc}") from exc
    if dev.type != "cuda":
        raise errors.InvalidArgument(f"device={device!r}: staging onto a device needs a CUDA device "
                                     "('cuda' or 'cuda:N'); use device='cpu' for numpy views")
    if not torch.cuda.is_available():
        raise errors.InvalidArgument(f"device={device!r}, but CUDA is not available here "
                                     "(torch.cuda.is_available() is False)")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise errors.InvalidArgument(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA "
                                     "devices")
    return torch.device("cuda", index)


# ---- target factories (cached per feed: page-locking and pinned pools are paid once) ----


def numpy_target(feed: "Feed") -> _Target:
    """Numpy views (zero copy, valid until the next batch)."""
    staging = _staging(feed)
    return staging.targets.setdefault(("numpy",), NumpyTarget())


def torch_cpu_target(feed: "Feed", *, copy: bool = False, pin: bool = False) -> _Target:
    """torch CPU tensors; see ``TorchCPUTarget``."""
    staging = _staging(feed)
    key = ("torch-cpu", bool(copy), bool(pin))
    if key not in staging.targets:
        staging.targets[key] = TorchCPUTarget(staging, copy=copy, pin=pin)
    return staging.targets[key]


def cuda_target(feed: "Feed", device: Any = "cuda", *, register: bool = True, **test_hooks: Any) -> _Target:
    """CUDA tensors on ``device``; see ``CudaTarget``. Test hooks make an uncached target."""
    staging = _staging(feed)
    dev = check_cuda_device(device)
    if test_hooks:
        target = CudaTarget(staging, dev, register=register, **test_hooks)
        staging.targets[("cuda-test", id(target))] = target
        return target
    key = ("cuda", str(dev), bool(register))
    if key not in staging.targets:
        staging.targets[key] = CudaTarget(staging, dev, register=register)
    return staging.targets[key]


# ---- the stage ----------------------------------------------------------------------


class _StageCore:
    """The state both threads share. The public ``Stage`` wraps it, so that dropping the
    iterator (``next(iter(loader))``) lets it be garbage collected and closes the core."""

    def __init__(self, feed: "Feed", epoch: int, target: _Target, prefetch: int,
                 on_release: Callable[[ConsumerSlot], None] | None) -> None:
        self.feed = feed
        self.epoch = epoch
        self.target = target
        self.prefetch = prefetch
        self.stats = _staging(feed).stats
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
        self.current: _Staged | None = None   # the batch the loop has now
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
        feed._add_closer(self._close_from_feed)
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
                    self._release_cond.wait(_WAIT_SLICE_S)
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
                self._cond.wait(_WAIT_SLICE_S)
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
                self.feed._undelivered = self.undelivered  # state_dict() must not count staged batches
                self._push(staged)
                k += 1
        except _Stopped:
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
                self._cond.wait(_WAIT_SLICE_S)
            item = self._ready.popleft() if self._ready else None
        if item is None:
            if self._closed:
                raise errors.RingClosed(self._close_reason or "the stage was closed")
            self._raise_async_failure()
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
                      if isinstance(item, _Staged)]
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
            if isinstance(item, _Staged):
                self._discarded.append((item.batch.index, item.batch.worker))
            if isinstance(item, _Staged) and item.slot is not None:
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
        self.feed._remove_closer(self._close_from_feed)
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

    def __init__(self, feed: "Feed", epoch: int = 0, target: _Target | None = None, *,
                 prefetch: int | None = None,
                 on_release: Callable[[ConsumerSlot], None] | None = None) -> None:
        prefetch = feed.prefetch if prefetch is None else prefetch
        if not isinstance(prefetch, int) or prefetch < 0 or prefetch + 2 > feed.slots:
            raise errors.InvalidArgument(f"prefetch={prefetch!r} must be an int in 0..{feed.slots - 2} "
                                         f"(the feed has {feed.slots} slots; the loop holds one batch and "
                                         "prefetch more while producers fill the rest)")
        self._core = _StageCore(feed, epoch, target or numpy_target(feed), prefetch, on_release)

    def __iter__(self) -> "Stage":
        return self

    def __next__(self) -> Batch:
        return self._core.next()

    def close(self) -> None:
        self._core.close()

    def __enter__(self) -> "Stage":
        return self

    def __exit__(self, *exc) -> None:
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
    def target(self) -> _Target:
        return self._core.target

    def stats(self) -> dict[str, Any]:
        """The feed's stats with this feed's staging figures merged in."""
        return self._core.feed.stats()


def staged_epoch(feed: "Feed", epoch: int) -> Iterator[Batch]:
    """``Feed.epoch`` for a feed built with a CUDA ``device=``: CUDA tensors staged from the ring."""
    with Stage(feed, epoch, cuda_target(feed, feed.device)) as stage:
        yield from stage


__all__ = ["Stage", "StageStats", "HostRegistration", "NumpyTarget", "TorchCPUTarget", "CudaTarget",
           "numpy_target", "torch_cpu_target", "cuda_target", "check_cuda_device", "staged_epoch"]
