"""Torch and CUDA targets for the stage: torch CPU tensors (views or owned, optionally pinned) and CUDA tensors.

What a target is, and when each slot goes back, is NOTE [stage lifecycle] in
core.py. This module adds what frameworks bring to it: page-locking the ring
(``HostRegistration``, once per feed), the CUDA copy stream and its events,
pinned buffers, numpy → torch dtypes. torch is imported inside the functions
that use it (``_torch``): importing this module imports no framework.
"""

from __future__ import annotations

import collections
import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from .. import errors
from ..ring import ConsumerSlot
from ..spec import Batch, BatchSpec
from .core import (
    WAIT_SLICE_S,
    FeedStaging,
    Stage,
    StageCore,
    Staged,
    StagedFeed,
    StageStopped,
    Target,
    feed_staging,
)

CUDA_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context


def _torch():
    import torch  # absolute: the real torch, imported on first use only

    return torch


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


def ring_registration(staging: FeedStaging) -> HostRegistration:
    """The feed's ring, page-locked on first use and shared by all its targets (the stats say how it went)."""
    if staging.registration is None:
        reg = staging.registration = HostRegistration(staging.ring.data_address, staging.ring.data_nbytes)
        staging.stats.register_error = reg.error
        staging.stats.register_s = reg.seconds
    return staging.registration


# ---- targets ----------------------------------------------------------------------


def _writable(a: np.ndarray) -> np.ndarray:
    """The same memory, flagged writable: torch.from_numpy warns on read-only arrays.

    Writing through it would only change the consumer's own batch; nothing here does.
    """
    v = a.view()
    v.flags.writeable = True
    return v


class TorchCPUTarget(Target):
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

    def __init__(self, staging: FeedStaging, *, copy: bool = False, pin: bool = False) -> None:
        torch = _torch()
        self._torch = torch
        self.pin = bool(pin) and torch.cuda.is_available()
        self.copy = bool(copy)
        self.registered = False
        if self.pin and not self.copy:
            reg = ring_registration(staging)
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

    def stage(self, core: "StageCore", slot: ConsumerSlot, batch: Batch) -> Staged:
        torch = self._torch
        if not self.copy:
            return Staged(batch.map(lambda a: torch.from_numpy(_writable(a))), slot, slot.nbytes)
        staged_at = time.perf_counter()

        def owned(a: np.ndarray):
            t = torch.empty(a.shape, dtype=_torch_dtype(a.dtype), pin_memory=self.pin)
            t.copy_(torch.from_numpy(_writable(a)))
            return t

        out = batch.map(owned)
        core.release(slot, staged_at)  # the copy is done: nothing reads the slot any more
        return Staged(out, None, slot.nbytes, staged_at=staged_at)

    def moved_on(self, core: "StageCore", staged: Staged) -> None:
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
                    raise StageStopped()
                self._cond.wait(WAIT_SLICE_S)
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


class CudaTarget(Target):
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

    def __init__(self, staging: FeedStaging, device: Any = "cuda", *, register: bool = True, pool: int = 3,
                 _delay_cycles: int = 0, _release_early: bool = False) -> None:
        torch = _torch()
        self._torch = torch
        self.device = check_cuda_device(device)
        self.spec = staging.spec
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(self.device)
        reg = ring_registration(staging) if register else None
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

    def stage(self, core: "StageCore", slot: ConsumerSlot, batch: Batch) -> Staged:
        torch = self._torch
        staged_at = time.perf_counter()
        arrays = list(batch.values())
        buf = None
        pool = self.pool
        held: ConsumerSlot | None = slot  # None once the batch is copied out of the slot
        put_back: Callable[[], None] | None = None  # gives the pinned buffer back to the pool
        if self.registered:
            sources = [torch.from_numpy(_writable(a)) for a in arrays]
        else:
            assert pool is not None  # made whenever the ring is not registered
            buf = pool.get(core.stop_event)
            sources = pool.views(buf, batch)
            for dst, a in zip(sources, arrays):
                dst.copy_(torch.from_numpy(_writable(a)))  # the one extra copy
            core.release(slot, staged_at)  # the pinned buffer holds the batch now
            held = None
            put_back = functools.partial(pool.put, buf)
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
        if held is not None:
            if self._release_early:
                core.release(held, staged_at)  # WRONG on purpose (test hook): the DMA may not have run yet
            else:
                core.release_after(event, held, staged_at)
        else:
            core.release_after(event, None, staged_at, then=put_back)
        it = iter(outs)
        return Staged(batch.map(lambda _a: next(it)), None, batch_nbytes(batch), event=event,
                       staged_at=staged_at)

    def thread_setup(self) -> None:
        self._torch.cuda.set_device(self.device)  # the runtime's current device is per thread

    def hand_out(self, staged: Staged) -> None:
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


def check_cuda_device(device: Any) -> Any:
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


def torch_cpu_target(feed: StagedFeed, *, copy: bool = False, pin: bool = False) -> Target:
    """torch CPU tensors; see ``TorchCPUTarget``."""
    staging = feed_staging(feed)
    key = ("torch-cpu", bool(copy), bool(pin))
    if key not in staging.targets:
        staging.targets[key] = TorchCPUTarget(staging, copy=copy, pin=pin)
    return staging.targets[key]


def cuda_target(feed: StagedFeed, device: Any = "cuda", *, register: bool = True, **test_hooks: Any) -> Target:
    """CUDA tensors on ``device``; see ``CudaTarget``. Test hooks make an uncached target."""
    staging = feed_staging(feed)
    dev = check_cuda_device(device)
    if test_hooks:
        target = CudaTarget(staging, dev, register=register, **test_hooks)
        staging.targets[("cuda-test", id(target))] = target
        return target
    key = ("cuda", str(dev), bool(register))
    if key not in staging.targets:
        staging.targets[key] = CudaTarget(staging, dev, register=register)
    return staging.targets[key]


class DeviceFeed(StagedFeed, Protocol):
    """A feed built with a CUDA ``device=``."""

    device: Any


def staged_epoch(feed: DeviceFeed, epoch: int) -> Iterator[Batch]:
    """``Feed.epoch`` for a feed built with a CUDA ``device=``: CUDA tensors staged from the ring."""
    with Stage(feed, epoch, cuda_target(feed, feed.device)) as stage:
        yield from stage


__all__ = ["HostRegistration", "TorchCPUTarget", "CudaTarget", "torch_cpu_target", "cuda_target",
           "check_cuda_device", "staged_epoch", "ring_registration", "batch_nbytes"]
