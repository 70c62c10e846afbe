"""The low-level ring: create/attach a segment, claim/commit/abort, acquire/release.

This is the Python face of ``csrc/``: one ``Ring`` per process and segment,
``ProducerSlot`` between claim and commit, ``ConsumerSlot`` between acquire
and release. Slot memory is exposed as writable (producer) or read-only
(consumer) ``memoryview``/numpy views over the shared pages: nothing is
copied. Who frees what: the creating process owns the segment; it disappears
when the creator and every attached process have detached (memfd backing),
or when the creator detaches (named backing, unlinked then).

NOTE [mapping lifetime]: every view of slot memory keeps the address range
alive, so reading a view after ``detach()`` can never crash the interpreter.
The mapping's base pointer owns the C handle (``ffi.gc``); each view is a
slice of one memoryview over a cffi buffer of that pointer, so a numpy
array's base chain ends at the owner. ``detach()`` gives the segment up at
once (``shmfeed_ring_retire``: descriptor closed, name unlinked, the range
turned into private zero pages, so the shared memory is freed now) and the
range itself is unmapped when the last view of it is gone. A view kept past
``detach()`` therefore reads zeros, never another batch and never a fault;
in debug mode (``views.py``) a consumer view says so with ``StaleView``.

NOTE [fork]: a ``fork()``ed child holds copies of its parent's ``Ring``
objects. They are not its rings: in the child they are detached (every call
raises ``RingClosed``; attach ``ring.handle`` to use the ring there), and
their ``detach()``, finalizer or ``close()`` release only the child's own copy
of the mapping and descriptor: they never close the ring, never unlink a
named segment and never remove the parent's registry record. The C core
checks the pid too before it unlinks.

Waits run in C with the GIL released, in slices of at most ``WAIT_SLICE`` so
that Python signal handlers (Ctrl-C) and ``stop`` callbacks run between them.
"""

from __future__ import annotations

import os
import secrets
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from numpy.typing import DTypeLike

from . import errors, registry, views
from ._ffi import ERR_BYTES, check, ffi, lib

# Why a ring was closed (the code stored in the segment beside the message).
CLOSE_NORMAL = 1
CLOSE_PRODUCER_ERROR = 2
CLOSE_CONSUMER_GONE = 3
CLOSE_FAILED = 4

WAIT_SLICE = 0.1  # seconds a single C wait may last before Python regains control

# Looked up once: attribute reads on the cffi lib cost as much as the hot path's C calls.
_OK = lib.SHMFEED_OK
_E_AGAIN = lib.SHMFEED_E_AGAIN

# The C core's limits (shmfeed_ring_create refuses anything past them): one source of truth.
MAX_SLOTS: int = lib.shmfeed_max_slots()
MAX_SLOT_BYTES: int = lib.shmfeed_max_slot_bytes()
MAX_SEQ: int = 2**46 - 1  # the slot word's sequence field (csrc/layout.h): claim() refuses more


def _layout_fields() -> dict[str, tuple[int, int]]:
    fields = ffi.new("const shmfeed_field **")
    n = ffi.new("uint32_t *")
    check(lib.shmfeed_layout_fields(fields, n), "reading the segment layout")
    return {ffi.string(f.name).decode(): (int(f.offset), int(f.size)) for f in (fields[0][i] for i in range(n[0]))}


# The segment's layout as the C core defines it (csrc/layout.h, through shmfeed_layout_fields): name ->
# (offset, size). "header.*" and "consumer.*" offsets are from the segment's start, "desc" is slot 0's
# descriptor (offset, stride) and "desc.*" offsets are within a descriptor. For code that reads a segment
# without attaching it (cleanup) and tests that write into one; the ring itself never needs it.
SEGMENT_FIELDS: dict[str, tuple[int, int]] = _layout_fields()
SEGMENT_MAGIC: int = lib.shmfeed_layout_magic()  # the first 8 bytes of every segment (little-endian)

_SLOT_STATES = {
    lib.SHMFEED_SLOT_FREE: "free",
    lib.SHMFEED_SLOT_CLAIMED: "claimed",
    lib.SHMFEED_SLOT_READY: "ready",
    lib.SHMFEED_SLOT_ACQUIRED: "acquired",
}


@dataclass(frozen=True)
class RingHandle:
    """What another process on this machine needs to attach: picklable, a few bytes.

    ``path`` is ``/proc/<creator pid>/fd/<fd>`` for the default memfd backing
    (openable only by processes of the same user) or ``/dev/shm/<name>``.
    """

    path: str
    slots: int
    slot_bytes: int
    ordered: bool
    creator_pid: int
    # When the creator made the ring (0: unknown). A memfd path names an fd number, which the
    # creator reuses for its next ring once this one is closed: attach() checks it is this ring.
    created_ns: int = 0


def new_owner_token() -> int:
    """A random non-zero 63-bit token identifying one producer's claims."""
    return secrets.randbits(62) | 1


def _mapping_owner(handle, base):
    """``base`` as a pointer that keeps ring ``handle`` alive: the handle is freed (range unmapped) with it.

    NOTE [mapping lifetime]. No Python code runs on the way, so a Ctrl-C cannot land half-way and leak
    the mapping: the handle's destructor is the C function itself (its only failure is a NULL handle,
    which this never is), and the base pointer's is a builtin that only holds the handle's owner and
    returns None when called.
    """
    owned = ffi.gc(handle, lib.shmfeed_ring_detach)
    return ffi.gc(base, {"handle": owned}.get)


# Every Ring of this process, so that a fork()ed child can mark its copies (NOTE [fork]).
_LIVE_RINGS: "weakref.WeakSet[Ring]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for ring in list(_LIVE_RINGS):
        ring._inherited_by_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Ring:
    """A shared-memory ring of ``slots`` slots of ``slot_bytes`` bytes each.

    Create one in the consumer (``Ring.create``), hand ``ring.handle`` to
    producers, which ``Ring.attach`` it. Use as a context manager, or call
    ``detach()``; detaching twice is harmless.
    """

    def __init__(self, _ptr: Any, *, owner: int | None = None, debug_views: bool | None = None) -> None:
        base = ffi.new("uint8_t **")
        check(lib.shmfeed_ring_base(_ptr, base), "reading ring base")
        # NOTE [mapping lifetime]: from here on the handle is freed by _base's finalizer, when
        # neither this object nor any view of slot memory refers to the mapping any more.
        self._base = _mapping_owner(_ptr, base[0])
        self._handle = _ptr  # valid while _base lives; calls go through _ptr (None once detached)
        self._ptr = _ptr
        # Threads inside a C wait right now: detach() waits for them (at most one
        # slice) before giving the segment up, so a wait never reads memory that is gone.
        self._in_wait: deque[None] = deque()  # one entry per thread inside a C wait
        self._counters_out = ffi.new("shmfeed_counters *")  # reused by ready_slots()
        geometry = ffi.new("shmfeed_geometry *")
        check(lib.shmfeed_ring_geometry(_ptr, geometry), "reading ring geometry")
        path = ffi.new("char[]", 256)
        check(lib.shmfeed_ring_path(_ptr, path, 256), "reading ring path")
        self.slots: int = geometry.slot_count
        self.slot_bytes: int = geometry.slot_bytes
        self.slot_stride: int = geometry.slot_stride
        self.segment_bytes: int = geometry.segment_bytes  # the whole mapping: header, descriptors, slots
        self.ordered: bool = bool(geometry.flags & lib.SHMFEED_ORDERED)
        self.creator_pid: int = geometry.creator_pid
        self.created_ns: int = geometry.created_ns
        # Every view of slot memory is a slice of this: it holds the owner (_base) through its buffer.
        self._memory: memoryview | None = memoryview(ffi.buffer(self._base, geometry.segment_bytes))
        self._data_offset: int = geometry.data_offset
        self._data = base[0] + geometry.data_offset  # addresses only (page-locking, DMA), never a view
        self._path = ffi.string(path).decode()
        self.owner: int = owner if owner is not None else new_owner_token()
        self._record: str | None = None  # registry record (for inspect/cleanup)
        self._record_pid = os.getpid()
        self.debug_views: bool = views.debug_views_enabled(debug_views)
        self._consumer_slot = _PoisoningConsumerSlot if self.debug_views else ConsumerSlot
        _LIVE_RINGS.add(self)

    # ---- lifetime ---------------------------------------------------------

    @classmethod
    def create(cls, slots: int, slot_bytes: int, *, ordered: bool = True, backing: str = "memfd",
               debug_views: bool | None = None) -> "Ring":
        """Create a ring (``NoSpace`` if the machine is short of memory for all of it).

        Each slot's pages are reserved by its first claim (NOTE [slot memory] in
        csrc/segment.c): that claim raises ``NoSpace`` if the memory went since.

        ``backing`` is ``"memfd"`` (default: anonymous, nothing left behind by a
        crash, not limited by the /dev/shm mount, sealed against resizing) or
        ``"named"`` (a 0600 POSIX segment with a random name, for systems without
        memfd; another process that truncates it makes the ring's calls raise
        ``CorruptSegment``, and a read of a view past the new end reads zeros).
        ``debug_views`` (default: the ``PYSHMFEED_DEBUG_VIEWS`` environment
        variable) poisons each slot on release and makes ``ConsumerSlot.array``
        views raise ``StaleView`` when read after their release (``views.py``).
        """
        if not isinstance(slots, int) or not isinstance(slot_bytes, int):
            raise errors.InvalidArgument(f"slots and slot_bytes must be ints, got {slots!r}, {slot_bytes!r}")
        if slots <= 0 or slots > MAX_SLOTS:
            raise errors.InvalidArgument(f"slots={slots} is out of range: use 1..{MAX_SLOTS}")
        if slot_bytes <= 0 or slot_bytes > MAX_SLOT_BYTES:
            raise errors.InvalidArgument(f"slot_bytes={slot_bytes} is out of range: use 1..{MAX_SLOT_BYTES}")
        if backing not in ("memfd", "named"):
            raise errors.InvalidArgument(f"backing={backing!r}: use 'memfd' or 'named'")
        flags = (lib.SHMFEED_ORDERED if ordered else 0) | (lib.SHMFEED_NAMED if backing == "named" else 0)
        out = ffi.new("shmfeed_ring **")
        err = ffi.new("char[]", ERR_BYTES)
        check(lib.shmfeed_ring_create(slots, slot_bytes, flags, out, err, ERR_BYTES), "creating ring", err)
        ring = cls(out[0], debug_views=debug_views)
        ring._record = registry.record(ring, "creator", backing)
        return ring

    @classmethod
    def attach(cls, handle: "RingHandle | str", *, owner: int | None = None,
               debug_views: bool | None = None, register: bool = True) -> "Ring":
        """Attach to a ring created by another process; validates the whole header first.

        ``register=False`` leaves no registry record: for observers (``pyshmfeed inspect``,
        ``cleanup``) that read the ring and never claim in it.
        """
        path = handle.path if isinstance(handle, RingHandle) else str(handle)
        out = ffi.new("shmfeed_ring **")
        err = ffi.new("char[]", ERR_BYTES)
        check(lib.shmfeed_ring_attach(path.encode(), out, err, ERR_BYTES), f"attaching ring {path}", err)
        ring = cls(out[0], owner=owner, debug_views=debug_views)
        if isinstance(handle, RingHandle) and handle.created_ns and handle.created_ns != ring.created_ns:
            ring.detach()  # another ring now at the path: the handle's was closed and its fd reused
            raise errors.SegmentNotFound(f"attaching ring {path}: the ring this handle names is gone (its "
                                         "creator closed it; the path now holds a newer ring)")
        if register:
            ring._record = registry.record(ring, "attached")
        return ring

    @property
    def handle(self) -> RingHandle:
        return RingHandle(self._path, self.slots, self.slot_bytes, self.ordered, self.creator_pid, self.created_ns)

    @property
    def attached(self) -> bool:
        return self._ptr is not None

    def detach(self) -> None:
        """Give the segment up; every later call raises ``RingClosed``. Idempotent.

        Views handed out before stop showing the ring: they read zeros from now
        on, and the address range is unmapped with the last of them (NOTE
        [mapping lifetime]). Copy what you keep. Interrupted (Ctrl-C), it leaves
        the ring either attached as before or detached with the rest of the work
        left for the next ``detach()`` or the finalizer: never half given up.
        """
        ptr = self._ptr
        if ptr is not None:
            try:
                self._ptr = None  # no wait starts from here on (_call_waiting)
                deadline = time.monotonic() + 10 * WAIT_SLICE
                while self._in_wait and time.monotonic() < deadline:
                    time.sleep(WAIT_SLICE / 20)
            except BaseException:
                self._ptr = ptr  # interrupted before anything was given up: still attached, usable
                raise
        self._give_up()

    def _give_up(self) -> None:
        """The work of detach() after the waits ended; each step may run again (an interrupted detach)."""
        if self._base is not None:
            # Idempotent in C, and the handle stays valid until _base goes: safe to repeat.
            check(lib.shmfeed_ring_retire(self._handle), "detaching ring")
            self._memory = None
            self._base = None  # the range is unmapped with the last view of it: now, if there is none
        if self._record is not None and self._record_pid == os.getpid():  # not a forked copy's
            registry.forget(self._record)
        self._record = None

    def _inherited_by_fork(self) -> None:
        """In a fork()ed child: this is the parent's ring, not ours (NOTE [fork])."""
        self._in_wait = deque()  # the parent's waiting threads do not exist here
        self._ptr = None  # no call from here; detach() frees this process's copy only
        self._record = None  # the record is the parent's

    def __enter__(self) -> "Ring":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __del__(self) -> None:  # last resort; detach() is the documented way
        try:
            self.detach()
        except Exception:
            pass

    def _live(self):
        ptr = self._ptr
        if ptr is None:
            raise errors.RingClosed("the ring is detached in this process (or was inherited through fork(): "
                                    "attach ring.handle there)", code=CLOSE_NORMAL)
        return ptr

    def c_handle(self) -> Any:
        """The C ring handle, for modules of this package that call more of the C core on it (work.py).

        Raises ``RingClosed`` once detached. Waits on it go through ``wait_in_c``.
        """
        return self._live()

    def wait_in_c(self, call: Callable[[int], int], what: str, timeout: float | None = None,
                  stop: Callable[[], bool] | None = None) -> None:
        """Run ``call(timeout_ns)`` (a C wait on this ring) in slices, as ``claim``/``acquire`` wait:
        Ctrl-C and ``stop()`` are seen between slices, detach waits for it, closing raises ``RingClosed``."""
        self._wait(call, what, timeout, stop)

    # ---- slot memory --------------------------------------------------------

    def slot_buffer(self, slot: int, nbytes: int | None = None) -> memoryview:
        """A writable memoryview of slot ``slot`` (zero copy); it keeps the mapping alive. For tests and adapters."""
        self._live()
        if not 0 <= slot < self.slots:
            raise errors.InvalidArgument(f"slot {slot} is out of range 0..{self.slots - 1}")
        n = self.slot_bytes if nbytes is None else nbytes
        if not 0 <= n <= self.slot_bytes:  # past the slot may be past the mapping: a segfault
            raise errors.InvalidArgument(f"nbytes={n} is out of range 0..{self.slot_bytes} (the slot size)")
        start = self._data_offset + slot * self.slot_stride
        memory = self._memory
        assert memory is not None  # dropped with the mapping, after _live() stops answering
        return memory[start: start + n]

    def slot_address(self, slot: int) -> int:
        """The virtual address of slot ``slot`` in this process (for page-locking, DMA)."""
        return int(ffi.cast("uintptr_t", self._data + slot * self.slot_stride))

    @property
    def data_address(self) -> int:
        """Address of slot 0; slots follow every ``slot_stride`` bytes."""
        return int(ffi.cast("uintptr_t", self._data))

    @property
    def data_nbytes(self) -> int:
        return self.slots * self.slot_stride

    # ---- waits --------------------------------------------------------------

    def _wait(self, call: Callable[[int], int], what: str, timeout: float | None,
              stop: Callable[[], bool] | None) -> None:
        """Run a C wait in slices until it returns something other than TIMEOUT."""
        if timeout is not None and timeout <= 0:
            rc = self._call_waiting(call, 0, what)
            if rc == lib.SHMFEED_E_AGAIN:
                raise errors.WouldBlock(f"{what}: nothing available now")
            self._check_wait(rc, what)
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            slice_s = WAIT_SLICE if deadline is None else min(WAIT_SLICE, max(deadline - time.monotonic(), 0))
            rc = self._call_waiting(call, max(int(slice_s * 1e9), 1), what)
            if rc == _OK:  # after a wake every line here is cold: return at once
                return
            if rc not in (lib.SHMFEED_E_TIMEOUT, lib.SHMFEED_E_AGAIN):
                self._check_wait(rc, what)
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise errors.Timeout(f"{what}: nothing happened within {timeout:g} s")
            if stop is not None and stop():
                raise errors.RingClosed(f"{what}: stopped by request", code=CLOSE_NORMAL)

    def _call_waiting(self, call: Callable[[int], int], timeout_ns: int, what: str) -> int:
        # Announce, then look: detach() clears _ptr, then looks at _in_wait. Each step is one
        # atomic operation under the GIL, so either detach() sees this entry and waits for it,
        # or this sees _ptr gone and never enters C. No lock: a KeyboardInterrupt can land
        # between any two bytecodes, and one landing inside `with lock:` can leave it held.
        self._in_wait.append(None)
        try:
            if self._ptr is None:
                raise errors.RingClosed(f"{what}: the ring was detached by this process", code=CLOSE_NORMAL)
            return call(timeout_ns)
        finally:
            self._in_wait.pop()

    def _check_wait(self, rc: int, what: str) -> None:
        if rc == lib.SHMFEED_E_CLOSED:
            code, reason = self.close_reason()
            raise errors.RingClosed(f"{what}: the ring is closed" + (f": {reason}" if reason else ""),
                                    code=code, reason=reason)
        if rc == lib.SHMFEED_E_CORRUPT and self._ptr is not None:
            err = ffi.new("char[]", ERR_BYTES)  # a truncated named segment says so, with the sizes
            if lib.shmfeed_ring_check_backing(self._ptr, err, ERR_BYTES) != _OK:
                check(rc, what, err)
            raise errors.CorruptSegment(
                f"{what}: the ring's shared state is impossible: a slot descriptor, a payload length or the "
                "consumer's position holds a value no pyshmfeed call writes (something else wrote into the "
                "segment); the ring cannot be trusted any more")
        if rc == lib.SHMFEED_E_NOMEM:  # only a claim, reserving its slot (NOTE [slot memory] in segment.c)
            raise errors.NoSpace(
                f"{what}: the machine has no memory left for the slot's {self.slot_bytes} bytes. The ring "
                "fitted when it was made; its slots get their pages when first claimed, and something took "
                "the memory since. Free memory, or use fewer or smaller slots (the claim was taken back: "
                "nothing was written or lost)", claim=True)
        check(rc, what)

    # ---- producer side ------------------------------------------------------

    def claim(self, seq: int | None = None, *, timeout: float | None = None,
              stop: Callable[[], bool] | None = None) -> "ProducerSlot":
        """Claim the slot for batch ``seq`` (ordered rings: required) and return it for writing.

        Blocks until the slot is free (the consumer released batch ``seq - slots``).
        On an unordered ring without ``seq``, the batch gets the next sequence of a
        counter kept in the segment: distinct across every process attached.
        Raises ``StaleClaim`` if batch ``seq`` was already committed, ``RingClosed``
        if either side closed the ring, ``Timeout`` after ``timeout`` seconds,
        ``NoSpace`` if this slot's first claim finds no memory for its pages (the
        claim is taken back).
        Use as ``with ring.claim(s) as slot: ...``: a clean exit commits the whole
        slot (or what ``slot.commit(n)`` said), an exception aborts it.
        """
        ptr = self._live()
        out = ffi.new("shmfeed_claimed *")
        owner = self.owner
        if seq is None:
            if self.ordered:
                raise errors.InvalidArgument("an ordered ring needs the batch sequence: claim(seq)")
            self._wait(lambda ns: lib.shmfeed_claim_next(ptr, owner, ns, out), "claiming a slot for the next batch",
                       timeout, stop)
            return ProducerSlot(self, out)
        if seq < 0 or seq > MAX_SEQ:
            raise errors.InvalidArgument(f"seq={seq} is out of range 0..2**46-1")
        self._wait(lambda ns: lib.shmfeed_claim(ptr, seq, owner, ns, out), f"claiming slot for batch {seq}",
                   timeout, stop)
        return ProducerSlot(self, out)

    def reclaim(self, owner: int) -> list[int]:
        """Take back every claim of a dead producer; returns the batch sequences to re-issue."""
        ptr = self._live()
        seqs = ffi.new("uint64_t[]", self.slots)
        n = ffi.new("uint32_t *")
        check(lib.shmfeed_reclaim(ptr, owner, seqs, self.slots, n), f"reclaiming owner {owner:#x}")
        return [int(seqs[i]) for i in range(n[0])]

    def seq_committed(self, seq: int) -> bool:
        """Ordered rings: has batch ``seq`` been committed (and maybe consumed already)?"""
        out = ffi.new("int32_t *")
        check(lib.shmfeed_seq_committed(self._live(), seq, out), f"checking batch {seq}")
        return bool(out[0])

    # ---- consumer side ------------------------------------------------------

    def acquire(self, timeout: float | None = None, *, stop: Callable[[], bool] | None = None) -> "ConsumerSlot":
        """Take the next ready batch (ordered: the next sequence; unordered: oldest commit).

        The returned slot's memory is valid until ``release()``. Raises
        ``RingClosed`` once the ring is closed and nothing ready remains.
        """
        ptr = self._live()
        out = ffi.new("shmfeed_acquired *")
        # Fast path: a ready batch is taken by one non-blocking call, without the
        # wait loop. Only "nothing ready" goes on to _wait (which tries again), so
        # errors, counters and timeouts are exactly those of the loop alone.
        rc = lib.shmfeed_acquire(ptr, 0, out)
        if rc == _OK:
            return self._consumer_slot(self, out)
        if rc != _E_AGAIN:
            self._check_wait(rc, "acquiring the next batch")
        self._wait(lambda ns: lib.shmfeed_acquire(ptr, ns, out), "acquiring the next batch", timeout, stop)
        return self._consumer_slot(self, out)

    def try_acquire(self) -> "ConsumerSlot | None":
        """``acquire`` without waiting: ``None`` when nothing is ready."""
        try:
            return self.acquire(timeout=0)
        except errors.WouldBlock:
            return None

    # ---- control ------------------------------------------------------------

    def close(self, reason: str = "", code: int = CLOSE_NORMAL) -> None:
        """Close the ring for everyone: every waiter wakes and raises ``RingClosed``.

        The first close wins; later ones keep its code and reason.
        """
        if self._ptr is None:
            return
        check(lib.shmfeed_close(self._ptr, code, reason.encode(errors="replace")[:2000]), "closing ring")

    def close_reason(self) -> tuple[int, str]:
        """``(0, "")`` while open; ``(code, reason)`` once closed."""
        code = ffi.new("int32_t *")
        buf = ffi.new("char[]", 2048)
        check(lib.shmfeed_close_reason(self._live(), code, buf, 2048), "reading close reason")
        return int(code[0]), ffi.string(buf).decode(errors="replace")

    @property
    def closed(self) -> bool:
        return self.close_reason()[0] != 0

    def counters(self) -> dict[str, int]:
        """Monotonic counters kept in the segment (commits, acquires, waits, wait time...)."""
        c = ffi.new("shmfeed_counters *")
        rc = lib.shmfeed_counters_read(self._live(), c)
        if rc != _OK:
            self._check_wait(rc, "reading counters")
        return {name: int(getattr(c, name)) for name, _ in ffi.typeof("shmfeed_counters").fields}

    def ready_slots(self) -> int:
        """Batches committed and not yet acquired: the ring's occupancy, cheap enough per batch."""
        c = self._counters_out
        rc = lib.shmfeed_counters_read(self._live(), c)
        if rc != _OK:  # the message is only formatted when it is needed
            self._check_wait(rc, "reading counters")
        return int(c.commits - c.acquires)

    def slot_info(self, slot: int) -> dict[str, Any]:
        """State, sequence, owner, payload length and timestamps of one slot (for inspect)."""
        info = ffi.new("shmfeed_slot_info *")
        rc = lib.shmfeed_slot_info_read(self._live(), slot, info)
        if rc != _OK:
            self._check_wait(rc, f"reading slot {slot}")
        fields = ffi.typeof("shmfeed_slot_info").fields
        out: dict[str, Any] = {name: int(getattr(info, name)) for name, _ in fields}
        out["state"] = _SLOT_STATES[info.state]
        return out

    def occupancy(self) -> dict[str, int]:
        """How many slots are in each state right now."""
        counts = dict.fromkeys(_SLOT_STATES.values(), 0)
        info = ffi.new("shmfeed_slot_info *")
        for i in range(self.slots):
            rc = lib.shmfeed_slot_info_read(self._live(), i, info)
            if rc != _OK:
                self._check_wait(rc, f"reading slot {i}")
            counts[_SLOT_STATES[info.state]] += 1
        return counts

    def __repr__(self) -> str:
        mode = "ordered" if self.ordered else "unordered"
        return f"<Ring {self.slots}x{self.slot_bytes}B {mode} {self._path}>"


_Shape = int | tuple[int, ...] | list[int]  # what the slots' array() takes as a shape


class ProducerSlot:
    """A claimed slot: write into ``memory`` (or ``array(...)`` views), then commit or abort."""

    __slots__ = ("_ring", "_claim", "seq", "slot", "_done", "_commit_bytes")

    def __init__(self, ring: Ring, claim: Any) -> None:  # claim: the C shmfeed_claimed
        self._ring = ring
        self._claim = claim
        self.seq: int = claim.seq
        self.slot: int = claim.slot
        self._done = False
        self._commit_bytes: int | None = None

    @property
    def memory(self) -> memoryview:
        """The whole slot, writable, zero copy."""
        self._check_open()
        return memoryview(self._ring.slot_buffer(self.slot))

    def array(self, dtype: DTypeLike, shape: _Shape, offset: int = 0) -> np.ndarray:
        """A writable numpy view of part of the slot (bounds checked)."""
        self._check_open()
        return _view(self._ring, self.slot, dtype, shape, offset, self._ring.slot_bytes, writable=True)

    def commit(self, nbytes: int | None = None) -> None:
        """Publish the batch; ``nbytes`` (default: the whole slot) is the payload length."""
        self._check_open()
        n = self._ring.slot_bytes if nbytes is None else nbytes
        if n < 0:
            raise errors.InvalidArgument(f"nbytes={n} is negative")
        if n > self._ring.slot_bytes:  # checked before cffi, which raises OverflowError past 2**64
            rc = lib.SHMFEED_E_TOOBIG
        else:
            rc = lib.shmfeed_commit(self._ring._live(), self._claim, n)
        if rc == lib.SHMFEED_E_TOOBIG:
            raise errors.PayloadTooLarge(
                f"payload of {n} bytes does not fit a slot of {self._ring.slot_bytes} bytes; "
                "the claim is still held: commit less or abort")
        if rc == lib.SHMFEED_E_STALE:
            self._done = True
            raise errors.StaleClaim(
                f"batch {self.seq}: this claim on slot {self.slot} was reclaimed (the producer was presumed "
                "dead) and the batch re-issued; nothing was published")
        if rc == lib.SHMFEED_E_STATE:
            self._done = True
        if rc < 0:
            self._ring._check_wait(rc, f"committing batch {self.seq}")
        self._done = True

    def abort(self) -> None:
        """Give the slot back unpublished; the same batch may be claimed again."""
        self._check_open()
        self._done = True
        rc = lib.shmfeed_abort(self._ring._live(), self._claim)
        if rc == lib.SHMFEED_E_STALE:
            return  # already taken back: aborting is then a no-op
        check(rc, f"aborting batch {self.seq}")

    def set_commit_bytes(self, nbytes: int) -> None:
        """Length the context manager will commit on a clean exit."""
        self._commit_bytes = nbytes

    def _check_open(self) -> None:
        if self._done:
            raise errors.SlotStateError(f"batch {self.seq}: the claim on slot {self.slot} is already "
                                        "committed or aborted")

    def __enter__(self) -> "ProducerSlot":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._done:
            return
        if exc_type is not None:
            try:
                self.abort()
            except errors.ShmfeedError:
                pass  # the original exception matters more
        else:
            self.commit(self._commit_bytes)


class ConsumerSlot:
    """An acquired batch: read ``memory`` (read-only, zero copy) until ``release()``."""

    __slots__ = ("_ring", "_acq", "seq", "slot", "nbytes", "commit_ns", "_released")

    def __init__(self, ring: Ring, acquired: Any) -> None:  # acquired: the C shmfeed_acquired
        self._ring = ring
        self._acq = acquired
        self.seq: int = acquired.seq
        self.slot: int = acquired.slot
        self.nbytes: int = acquired.payload_len
        self.commit_ns: int = acquired.commit_ns
        self._released = False

    @property
    def memory(self) -> memoryview:
        """The payload (``nbytes`` long), read-only, zero copy; invalid after release."""
        self._check_open()
        return memoryview(self._ring.slot_buffer(self.slot, self.nbytes)).toreadonly()

    def array(self, dtype: DTypeLike, shape: _Shape, offset: int = 0, *,
              writable: bool = False) -> np.ndarray:
        """A numpy view over the payload (bounds checked against ``nbytes``)."""
        self._check_open()
        return _view(self._ring, self.slot, dtype, shape, offset, self.nbytes, writable=writable)

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Give the slot back to the producers. Views taken before must not be read after."""
        if self._released:
            raise errors.SlotStateError(f"batch {self.seq}: slot {self.slot} was already released")
        self._released = True
        rc = lib.shmfeed_release(self._ring._live(), self._acq)
        if rc < 0:  # the message is only formatted when it is needed
            self._ring._check_wait(rc, f"releasing batch {self.seq}")

    def _check_open(self) -> None:
        if self._released:
            raise errors.SlotStateError(f"batch {self.seq}: slot {self.slot} was released; its memory "
                                        "now belongs to a producer (copy what you keep before releasing)")

    def __enter__(self) -> "ConsumerSlot":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._released:
            self.release()


class _PoisoningConsumerSlot(ConsumerSlot):
    """Debug mode (``views.py``): guarded array views, and the slot poisoned when it is released."""

    __slots__ = ()

    def array(self, dtype: DTypeLike, shape: _Shape, offset: int = 0, *,
              writable: bool = False) -> np.ndarray:
        return views.guarded(super().array(dtype, shape, offset, writable=writable), self._check_fresh)

    def _check_fresh(self) -> None:
        if self._released:
            raise errors.StaleView(f"batch {self.seq}: a view of slot {self.slot} was read after the slot was "
                                   "released; the slot now holds another batch (copy what you keep before "
                                   "releasing: array.copy(), batch.copy())")

    def release(self) -> None:
        if not self._released:  # still ours: no producer writes it until the release below
            np.frombuffer(self._ring.slot_buffer(self.slot), dtype=np.uint8).fill(views.POISON)
        super().release()


def _view(ring: Ring, slot: int, dtype: DTypeLike, shape: _Shape, offset: int, limit: int, *,
          writable: bool) -> np.ndarray:
    dtype = np.dtype(dtype)
    shape = tuple(map(int, shape)) if isinstance(shape, (tuple, list)) else (int(shape),)
    count = 1
    for s in shape:
        if s < 0:
            raise errors.InvalidArgument(f"negative dimension in shape {shape}")
        count *= s
    end = offset + count * dtype.itemsize
    if offset < 0 or end > limit:
        raise errors.PayloadTooLarge(f"a {dtype} array of shape {shape} at offset {offset} ends at byte {end}, "
                                     f"past the {limit} bytes available")
    buf = ring.slot_buffer(slot, limit)
    # One constructor call (frombuffer + reshape made two arrays); same view, same checks.
    arr = np.ndarray(shape, dtype, buffer=buf, offset=offset)
    if not writable:
        arr.setflags(write=False)
    return arr


__all__ = [
    "Ring", "RingHandle", "ProducerSlot", "ConsumerSlot", "new_owner_token", "SEGMENT_FIELDS", "SEGMENT_MAGIC",
    "CLOSE_NORMAL", "CLOSE_PRODUCER_ERROR", "CLOSE_CONSUMER_GONE", "CLOSE_FAILED",
]
