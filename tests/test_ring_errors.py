"""Every bad input and misuse of the ring raises its own exception, with the exact type.

Corrupt segments are made by copying a valid ring's bytes to a file,
changing header fields (offsets from csrc/layout.h) and attaching the file.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

from pyshmfeed import ConsumerSlot, ProducerSlot, Ring
from pyshmfeed._ffi import ERR_BYTES, ffi, lib
from pyshmfeed.errors import (
    CorruptSegment,
    InvalidArgument,
    LayoutVersionMismatch,
    NoSpace,
    PayloadTooLarge,
    RingClosed,
    SegmentNotFound,
    SlotStateError,
    StaleClaim,
)
from pyshmfeed.ring import CLOSE_CONSUMER_GONE, SEGMENT_FIELDS

PAGE = 4096

# (offset, struct format) of the header's integer fields, from the C core's layout table (csrc/layout.h).
FIELDS = {name.removeprefix("header."): (offset, {4: "<I", 8: "<Q"}[size])
          for name, (offset, size) in SEGMENT_FIELDS.items() if name.startswith("header.") and size in (4, 8)}
DESC_OFFSET, DESC_BYTES = SEGMENT_FIELDS["desc"]


def raises_exactly(exc_type, fn, *args, **kwargs):
    """Call fn and return the exception it raised, which must be exactly exc_type (not a subclass)."""
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    assert info.type is exc_type, f"expected exactly {exc_type.__name__}, got {info.type.__name__}: {info.value}"
    return info.value


@pytest.fixture
def ring():
    with Ring.create(4, 1000) as r:
        yield r


@pytest.fixture
def valid_segment() -> bytearray:
    """The bytes of a valid 2-slot ring: header, counters, descriptors and data."""
    with Ring.create(2, 100) as r:
        return bytearray(ffi.buffer(r._base, r.segment_bytes))


def get_field(segment: bytes, name: str) -> int:
    offset, fmt = FIELDS[name]
    return struct.unpack_from(fmt, segment, offset)[0]


def set_field(segment: bytearray, name: str, value: int) -> bytearray:
    offset, fmt = FIELDS[name]
    struct.pack_into(fmt, segment, offset, value)
    return segment


def attach_bytes(tmp_path, data: bytes) -> None:
    path = tmp_path / "segment"
    path.write_bytes(bytes(data))
    Ring.attach(str(path)).detach()


# ---- create: sizes ---------------------------------------------------------------


@pytest.mark.parametrize("slots", [0, -1, 65537, 2**32 + 4])
def test_create_rejects_a_slot_count_out_of_range(slots):
    err = raises_exactly(InvalidArgument, Ring.create, slots, 64)
    assert str(slots) in str(err)


@pytest.mark.parametrize("slot_bytes", [0, -4096, 2**40 + 1, 2**64, 2**64 + 1])
def test_create_rejects_a_slot_size_out_of_range(slot_bytes):
    err = raises_exactly(InvalidArgument, Ring.create, 4, slot_bytes)
    assert str(slot_bytes) in str(err)


def test_python_takes_the_size_limits_from_the_c_core():
    # The largest sizes C accepts pass Python's checks and reach C, which refuses them for want of
    # memory (NoSpace), not as out of range; one past them is InvalidArgument in both.
    max_slots, max_bytes = lib.shmfeed_max_slots(), lib.shmfeed_max_slot_bytes()
    assert (max_slots, max_bytes) == (65536, 2**40)
    raises_exactly(NoSpace, Ring.create, 4, max_bytes)
    raises_exactly(NoSpace, Ring.create, max_slots, 2**30)
    raises_exactly(InvalidArgument, Ring.create, 4, max_bytes + 1)
    raises_exactly(InvalidArgument, Ring.create, max_slots + 1, 64)


@pytest.mark.parametrize("slots, slot_bytes", [(4.0, 64), ("4", 64), (4, 64.5), (None, 64)])
def test_create_rejects_sizes_that_are_not_integers(slots, slot_bytes):
    raises_exactly(InvalidArgument, Ring.create, slots, slot_bytes)


def test_create_rejects_an_unknown_backing():
    err = raises_exactly(InvalidArgument, Ring.create, 4, 64, backing="tmpfs")
    assert "tmpfs" in str(err)


def test_c_core_refuses_sizes_whose_segment_would_overflow_64_bits():
    out = ffi.new("uint64_t *")
    assert lib.shmfeed_ring_size_for(65536, 2**64 - 1, out) == lib.SHMFEED_E_INVAL
    ring = ffi.new("shmfeed_ring **")
    err = ffi.new("char[]", ERR_BYTES)
    assert lib.shmfeed_ring_create(65536, 2**64 - 1, 0, ring, err, ERR_BYTES) == lib.SHMFEED_E_INVAL
    assert ring[0] == ffi.NULL
    assert b"out of range" in ffi.string(err)


def test_c_core_sizes_the_largest_ring_without_overflow():
    out = ffi.new("uint64_t *")
    assert lib.shmfeed_ring_size_for(65536, 2**40, out) == lib.SHMFEED_OK
    descriptors_end = -(-(DESC_OFFSET + 65536 * DESC_BYTES) // PAGE) * PAGE
    assert out[0] == descriptors_end + 65536 * 2**40


def _available_bytes() -> int:
    out = ffi.new("uint64_t *")
    assert lib.shmfeed_memory_available(0, out) == lib.SHMFEED_OK
    return int(out[0])


def _size_for(slots: int, slot_bytes: int) -> int:
    out = ffi.new("uint64_t *")
    assert lib.shmfeed_ring_size_for(slots, slot_bytes, out) == lib.SHMFEED_OK
    return int(out[0])


def test_ring_larger_than_the_machine_raises_no_space_with_the_byte_counts():
    slot_bytes = 1 << 30
    slots = min(65536, 2 * _available_bytes() // slot_bytes + 2)  # about twice what is available
    err = raises_exactly(NoSpace, Ring.create, slots, slot_bytes)
    assert isinstance(err, MemoryError)
    message = str(err)
    assert str(_size_for(slots, slot_bytes)) in message and "bytes" in message
    assert "available" in message


def test_absurd_but_representable_ring_raises_no_space_not_overflow():
    slots, slot_bytes = 65536, 2**40 - 1
    err = raises_exactly(NoSpace, Ring.create, slots, slot_bytes)
    assert str(_size_for(slots, slot_bytes)) in str(err)


# ---- attach: missing and foreign segments -----------------------------------------


def test_attach_to_a_missing_named_segment_raises_segment_not_found():
    err = raises_exactly(SegmentNotFound, Ring.attach, "/dev/shm/pyshmfeed-0-does-not-exist")
    assert isinstance(err, FileNotFoundError)
    assert "pyshmfeed-0-does-not-exist" in str(err)


def test_attach_to_a_memfd_whose_fd_is_gone_raises_segment_not_found():
    raises_exactly(SegmentNotFound, Ring.attach, f"/proc/{os.getpid()}/fd/999999")


def test_attach_to_a_file_of_random_bytes_raises_corrupt_segment(tmp_path):
    err = raises_exactly(CorruptSegment, attach_bytes, tmp_path, os.urandom(64 * 1024))
    assert "magic" in str(err)


def test_attach_to_an_empty_file_raises_corrupt_segment(tmp_path):
    raises_exactly(CorruptSegment, attach_bytes, tmp_path, b"")


def test_attach_to_a_device_raises_corrupt_segment():
    err = raises_exactly(CorruptSegment, Ring.attach, "/dev/null")
    assert "not a shared-memory segment" in str(err)


def test_attach_to_a_segment_shorter_than_its_header_raises_corrupt_segment(tmp_path, valid_segment):
    err = raises_exactly(CorruptSegment, attach_bytes, tmp_path, valid_segment[:PAGE])
    assert "truncated" in str(err)


def test_attach_to_a_segment_missing_its_last_slot_raises_corrupt_segment(tmp_path, valid_segment):
    err = raises_exactly(CorruptSegment, attach_bytes, tmp_path, valid_segment[:-PAGE])
    assert "truncated" in str(err)


def test_attach_to_a_copy_of_a_valid_segment_works(tmp_path, valid_segment):
    attach_bytes(tmp_path, valid_segment)  # the control for every corruption below


# ---- attach: corrupt header fields -------------------------------------------------


def test_attach_rejects_a_bad_magic(tmp_path, valid_segment):
    err = raises_exactly(CorruptSegment, attach_bytes, tmp_path, set_field(valid_segment, "magic", 0x1234))
    assert "magic" in str(err)


LAYOUT_VERSION = int(lib.shmfeed_layout_version())


@pytest.mark.parametrize("version", [0, LAYOUT_VERSION - 1, LAYOUT_VERSION + 1, 0xFFFFFFFF])
def test_attach_rejects_another_layout_version(tmp_path, valid_segment, version):
    err = raises_exactly(LayoutVersionMismatch, attach_bytes, tmp_path,
                         set_field(valid_segment, "version", version))
    assert str(version) in str(err)


CORRUPT_FIELDS = {
    "header_bytes_doubled": ("header_bytes", lambda v: 2 * v),
    "slot_count_zero": ("slot_count", lambda v: 0),
    "slot_count_over_max": ("slot_count", lambda v: 65537),
    "slot_count_plus_one": ("slot_count", lambda v: v + 1),
    "unknown_flag": ("flags", lambda v: v | 0x80),
    "slot_bytes_zero": ("slot_bytes", lambda v: 0),
    "slot_bytes_over_max": ("slot_bytes", lambda v: 2**40 + 1),
    "slot_bytes_past_stride": ("slot_bytes", lambda v: 2 * PAGE),
    "slot_stride_off_by_a_page": ("slot_stride", lambda v: v + PAGE),
    "slot_stride_zero": ("slot_stride", lambda v: 0),
    "desc_offset_moved": ("desc_offset", lambda v: PAGE),
    "desc_stride_changed": ("desc_stride", lambda v: 128),
    "data_offset_moved": ("data_offset", lambda v: v + PAGE),
    "data_offset_past_the_end": ("data_offset", lambda v: 2**64 - PAGE),
    "segment_bytes_grown": ("segment_bytes", lambda v: v + PAGE),
    "segment_bytes_shrunk": ("segment_bytes", lambda v: v - PAGE),
    "segment_bytes_huge": ("segment_bytes", lambda v: 2**64 - 1),
}


@pytest.mark.parametrize("field, change", CORRUPT_FIELDS.values(), ids=CORRUPT_FIELDS.keys())
def test_attach_rejects_an_inconsistent_header_field(tmp_path, valid_segment, field, change):
    set_field(valid_segment, field, change(get_field(valid_segment, field)))
    raises_exactly(CorruptSegment, attach_bytes, tmp_path, valid_segment)


def test_attach_rejects_a_self_consistent_header_larger_than_the_file(tmp_path, valid_segment):
    # Every field agrees with every other, but they describe 64 slots and the file holds 2.
    slots, stride = 64, get_field(valid_segment, "slot_stride")
    data_offset = -(-(DESC_OFFSET + slots * DESC_BYTES) // PAGE) * PAGE
    set_field(valid_segment, "slot_count", slots)
    set_field(valid_segment, "data_offset", data_offset)
    set_field(valid_segment, "segment_bytes", data_offset + slots * stride)
    err = raises_exactly(CorruptSegment, attach_bytes, tmp_path, valid_segment)
    assert "truncated" in str(err)


# ---- producer misuse -------------------------------------------------------------


def test_committing_twice_raises_slot_state_error(ring):
    slot = ring.claim(0)
    slot.commit(1)
    raises_exactly(SlotStateError, slot.commit, 1)
    assert ring.counters()["commits"] == 1


def test_committing_the_same_claim_twice_in_the_c_core_raises_slot_state_error(ring):
    slot = ring.claim(0)
    twin = ProducerSlot(ring, slot._claim)  # a second handle on the same claim: bypasses the Python flag
    slot.commit(1)
    raises_exactly(SlotStateError, twin.commit, 1)
    assert ring.counters()["commits"] == 1
    assert ring.counters()["stale_commits"] == 0


def test_aborting_after_commit_raises_slot_state_error(ring):
    slot = ring.claim(0)
    slot.commit(1)
    raises_exactly(SlotStateError, slot.abort)
    assert ring.slot_info(0)["state"] == "ready"


def test_aborting_a_committed_claim_in_the_c_core_raises_slot_state_error(ring):
    slot = ring.claim(0)
    twin = ProducerSlot(ring, slot._claim)
    slot.commit(1)
    raises_exactly(SlotStateError, twin.abort)
    assert ring.slot_info(0)["state"] == "ready"


def test_committing_after_abort_raises_slot_state_error(ring):
    slot = ring.claim(0)
    slot.abort()
    raises_exactly(SlotStateError, slot.commit, 1)


def test_producer_memory_after_commit_raises_slot_state_error(ring):
    slot = ring.claim(0)
    slot.commit(1)
    raises_exactly(SlotStateError, lambda: slot.memory)
    raises_exactly(SlotStateError, slot.array, "uint8", 4)


def test_payload_longer_than_the_slot_raises_and_keeps_the_claim(ring):
    slot = ring.claim(0)
    err = raises_exactly(PayloadTooLarge, slot.commit, ring.slot_bytes + 1)
    assert str(ring.slot_bytes + 1) in str(err) and str(ring.slot_bytes) in str(err)
    assert ring.slot_info(0)["state"] == "claimed"
    slot.memory[-1:] = b"!"  # the claim is still usable
    slot.commit(ring.slot_bytes)
    with ring.acquire(timeout=0) as got:
        assert got.nbytes == ring.slot_bytes
        assert bytes(got.memory[-1:]) == b"!"


def test_payload_longer_than_the_slot_in_the_c_core_raises_and_keeps_the_claim(ring):
    slot = ring.claim(0)
    assert lib.shmfeed_commit(ring._ptr, slot._claim, 2**64 - 1) == lib.SHMFEED_E_TOOBIG
    assert ring.slot_info(0)["state"] == "claimed"
    slot.abort()


def test_payload_length_past_64_bits_raises_payload_too_large_not_overflow(ring):
    slot = ring.claim(0)
    raises_exactly(PayloadTooLarge, slot.commit, 2**64)
    slot.commit(1)  # still held


def test_negative_payload_length_is_invalid(ring):
    slot = ring.claim(0)
    raises_exactly(InvalidArgument, slot.commit, -1)
    slot.commit(0)  # still held


def test_array_past_the_end_of_the_slot_raises_payload_too_large(ring):
    slot = ring.claim(0)
    raises_exactly(PayloadTooLarge, slot.array, "float64", 126)  # 1008 bytes > 1000
    raises_exactly(PayloadTooLarge, slot.array, "uint8", 10, offset=995)
    raises_exactly(PayloadTooLarge, slot.array, "uint8", 1, offset=-1)
    slot.abort()


def test_array_with_a_negative_dimension_is_invalid(ring):
    slot = ring.claim(0)
    raises_exactly(InvalidArgument, slot.array, "uint8", (4, -1))
    slot.abort()


@pytest.mark.parametrize("seq", [-1, 2**46])
def test_claiming_a_sequence_out_of_range_is_invalid(ring, seq):
    raises_exactly(InvalidArgument, ring.claim, seq, timeout=0)


def test_reclaiming_owner_zero_is_invalid(ring):
    raises_exactly(InvalidArgument, ring.reclaim, 0)


# ---- consumer misuse --------------------------------------------------------------


def _ready_batch(ring: Ring, seq: int = 0) -> None:
    slot = ring.claim(seq)
    slot.memory[:1] = b"x"
    slot.commit(1)


def test_releasing_twice_raises_slot_state_error(ring):
    _ready_batch(ring)
    got = ring.acquire(timeout=0)
    got.release()
    raises_exactly(SlotStateError, got.release)
    assert ring.counters()["releases"] == 1


def test_releasing_twice_in_the_c_core_raises_slot_state_error(ring):
    _ready_batch(ring)
    got = ring.acquire(timeout=0)
    twin = ConsumerSlot(ring, got._acq)  # a second handle on the same acquisition
    got.release()
    raises_exactly(SlotStateError, twin.release)
    assert ring.counters()["releases"] == 1


def _forged_acquisition(slot: int, seq: int):
    acq = ffi.new("shmfeed_acquired *")
    acq.slot, acq.seq, acq.payload_len = slot, seq, 1
    acq.token = (seq << 2) | lib.SHMFEED_SLOT_ACQUIRED  # generation 0
    return acq


def test_releasing_a_ready_slot_that_was_never_acquired_raises_slot_state_error(ring):
    _ready_batch(ring)
    raises_exactly(SlotStateError, ConsumerSlot(ring, _forged_acquisition(0, 0)).release)
    assert ring.slot_info(0)["state"] == "ready"  # untouched: still delivered
    with ring.acquire(timeout=0) as got:
        assert bytes(got.memory) == b"x"


def test_releasing_a_free_slot_raises_slot_state_error(ring):
    raises_exactly(SlotStateError, ConsumerSlot(ring, _forged_acquisition(1, 1)).release)
    assert ring.occupancy()["free"] == 4


def test_consumer_memory_after_release_raises_slot_state_error(ring):
    _ready_batch(ring)
    got = ring.acquire(timeout=0)
    got.release()
    err = raises_exactly(SlotStateError, lambda: got.memory)
    assert "released" in str(err)


def test_consumer_array_after_release_raises_slot_state_error(ring):
    _ready_batch(ring)
    got = ring.acquire(timeout=0)
    got.release()
    raises_exactly(SlotStateError, got.array, "uint8", 1)


def test_array_past_the_payload_raises_payload_too_large(ring):
    _ready_batch(ring)  # 1 byte of payload in a 1000-byte slot
    with ring.acquire(timeout=0) as got:
        raises_exactly(PayloadTooLarge, got.array, "uint8", 2)


def test_using_a_detached_ring_raises_ring_closed():
    ring = Ring.create(1, 64)
    ring.detach()
    raises_exactly(RingClosed, ring.acquire, timeout=0)
    raises_exactly(RingClosed, ring.claim, 0)
    raises_exactly(RingClosed, ring.counters)
    raises_exactly(RingClosed, ring.ready_slots)
    raises_exactly(RingClosed, ring.slot_buffer, 0)


def test_slot_out_of_range_is_invalid(ring):
    raises_exactly(InvalidArgument, ring.slot_info, 4)
    raises_exactly(InvalidArgument, ring.slot_buffer, 4)
    raises_exactly(InvalidArgument, ring.slot_buffer, -1)


@pytest.mark.parametrize("nbytes", [-1, 1001, 10**8])
def test_slot_buffer_longer_than_the_slot_is_invalid(ring, nbytes):
    # The last slot's buffer would reach past the end of the mapping.
    raises_exactly(InvalidArgument, ring.slot_buffer, ring.slots - 1, nbytes)


DETACH_UNDER_A_WAITER = """
import threading, time
from pyshmfeed import Ring
from pyshmfeed.errors import ShmfeedError
ring = Ring.create(2, 64)
def wait():
    try:
        ring.acquire()
    except ShmfeedError:
        pass
t = threading.Thread(target=wait)
t.start()
time.sleep(0.3)
ring.detach()
t.join(5)
"""


def test_detaching_while_another_thread_waits_does_not_crash_the_process():
    child = subprocess.run([sys.executable, "-c", DETACH_UNDER_A_WAITER], capture_output=True, timeout=60,
                           check=False)
    assert child.returncode == 0, f"exit status {child.returncode}: {child.stderr.decode()[-500:]}"


# ---- closed ring ---------------------------------------------------------------------


def test_acquiring_from_a_closed_ring_raises_ring_closed_with_the_reason(ring):
    ring.close("dataset exhausted", code=CLOSE_CONSUMER_GONE)
    err = raises_exactly(RingClosed, ring.acquire, timeout=1)
    assert (err.code, err.reason) == (CLOSE_CONSUMER_GONE, "dataset exhausted")
    assert "dataset exhausted" in str(err)


def test_try_acquire_on_a_closed_ring_raises_ring_closed(ring):
    ring.close("bye")
    raises_exactly(RingClosed, ring.try_acquire)


def test_claiming_on_a_closed_ring_raises_ring_closed_with_the_reason(ring):
    ring.close("trainer crashed")
    err = raises_exactly(RingClosed, ring.claim, 0)
    assert err.reason == "trainer crashed"


def test_waiting_forever_on_a_closed_ring_returns_at_once(ring):
    ring.close("closed before the wait")
    raises_exactly(RingClosed, ring.acquire)  # no timeout: must not hang


def test_close_with_code_zero_is_invalid(ring):
    raises_exactly(InvalidArgument, ring.close, "no code", code=0)
    assert not ring.closed


def test_overlong_close_reason_is_truncated_not_overflowed(ring):
    ring.close("x" * 10_000)
    code, reason = ring.close_reason()
    assert code != 0 and reason == "x" * len(reason) and 0 < len(reason) < 2048


# ---- stale claims ---------------------------------------------------------------------


@pytest.mark.parametrize("ordered", [True, False])
def test_commit_after_reclaim_raises_stale_claim_and_publishes_nothing(ordered):
    with Ring.create(2, 64, ordered=ordered) as consumer, \
            Ring.attach(consumer.handle, owner=0xA) as paused, \
            Ring.attach(consumer.handle, owner=0xB) as rescuer:
        slot = paused.claim(0 if ordered else 5)
        slot.memory[:6] = b"paused"
        assert consumer.reclaim(0xA) == [slot.seq]
        err = raises_exactly(StaleClaim, slot.commit, 6)
        assert str(slot.seq) in str(err)
        assert consumer.try_acquire() is None  # nothing half-written was published
        c = consumer.counters()
        assert (c["reclaims"], c["stale_commits"], c["commits"]) == (1, 1, 0)
        # The re-issued batch goes through once, with the rescuer's bytes.
        redo = rescuer.claim(slot.seq, timeout=0)
        redo.memory[:6] = b"rescue"
        redo.commit(6)
        with consumer.acquire(timeout=0) as got:
            assert (got.seq, bytes(got.memory)) == (slot.seq, b"rescue")


def test_stale_claim_cannot_commit_over_the_batch_that_replaced_it(ring):
    with Ring.attach(ring.handle, owner=0xA) as paused:
        slot = paused.claim(0)
        ring.reclaim(0xA)
        redo = ring.claim(0, timeout=0)  # same slot, same sequence, new generation
        raises_exactly(StaleClaim, slot.commit, 1)
        assert ring.slot_info(0)["state"] == "claimed"
        assert ring.slot_info(0)["owner"] == ring.owner
        redo.commit(0)


def test_aborting_a_reclaimed_claim_is_a_no_op(ring):
    with Ring.attach(ring.handle, owner=0xA) as paused:
        slot = paused.claim(0)
        ring.reclaim(0xA)
        slot.abort()
        assert ring.counters()["aborts"] == 0
        assert ring.slot_info(0)["state"] == "free"


def test_reclaim_leaves_committed_batches_alone(ring):
    with Ring.attach(ring.handle, owner=0xA) as producer:
        producer.claim(0).commit(1)
        held = producer.claim(1)
        assert ring.reclaim(0xA) == [1]
        assert ring.slot_info(0)["state"] == "ready"
        raises_exactly(StaleClaim, held.commit, 1)
