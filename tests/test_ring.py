"""The ring's semantics, one process (and a few children): what each call promises.

Misuse and bad input live in test_ring_errors.py, many producer processes in
test_ring_multiprocess.py, generated inputs in test_ring_hypothesis.py.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import pickle
import stat
import threading
import time

import numpy as np
import pytest

from pyshmfeed import ConsumerSlot, ProducerSlot, Ring, RingHandle
from pyshmfeed.errors import InvalidArgument, RingClosed, SegmentNotFound, StaleClaim, Timeout, WouldBlock
from pyshmfeed.ring import CLOSE_NORMAL, CLOSE_PRODUCER_ERROR

SLOT_BYTES = 1000  # not a page multiple, on purpose: the stride rounds up, the slot does not


_THREADS: list[threading.Thread] = []


def stop_waiters(ring: Ring) -> None:
    """Wake and join threads a failed test left waiting in the ring: unmapping under them would segfault."""
    if _THREADS:
        ring.close("test teardown")
        for t in _THREADS:
            t.join(5)
        _THREADS.clear()


@pytest.fixture
def ring():
    with Ring.create(4, SLOT_BYTES) as r:
        yield r
        stop_waiters(r)


@pytest.fixture
def unordered_ring():
    with Ring.create(4, SLOT_BYTES, ordered=False) as r:
        yield r
        stop_waiters(r)


def produce(ring: Ring, seq: int | None, payload: bytes) -> ProducerSlot:
    slot = ring.claim(seq, timeout=5)
    slot.memory[: len(payload)] = payload
    slot.commit(len(payload))
    return slot


def consume(ring: Ring) -> tuple[int, bytes]:
    with ring.acquire(timeout=5) as slot:
        return slot.seq, bytes(slot.memory)


def in_thread(fn):
    """Run fn in a thread; returns (thread, box) where box gets 'result' or 'error'."""
    box: dict[str, object] = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    _THREADS.append(t)
    return t, box


# ---- create / attach ----------------------------------------------------------


def test_create_reports_the_requested_geometry(ring):
    assert (ring.slots, ring.slot_bytes, ring.ordered) == (4, SLOT_BYTES, True)
    assert ring.slot_stride % 4096 == 0 and ring.slot_stride >= SLOT_BYTES
    assert ring.segment_bytes >= ring.data_nbytes == 4 * ring.slot_stride
    assert ring.creator_pid == os.getpid()
    assert ring.attached


def test_unordered_ring_reports_unordered(unordered_ring):
    assert unordered_ring.ordered is False
    assert unordered_ring.handle.ordered is False


def test_default_backing_is_memfd_reached_through_proc(ring):
    assert ring.handle.path.startswith(f"/proc/{os.getpid()}/fd/")


def test_slots_are_page_aligned_and_a_stride_apart(ring):
    addresses = [ring.slot_address(i) for i in range(ring.slots)]
    assert all(a % 4096 == 0 for a in addresses)
    assert [b - a for a, b in itertools.pairwise(addresses)] == [ring.slot_stride] * 3
    assert addresses[0] == ring.data_address


def test_attach_sees_the_same_geometry(ring):
    with Ring.attach(ring.handle) as other:
        assert (other.slots, other.slot_bytes, other.slot_stride, other.ordered, other.segment_bytes) == (
            ring.slots, ring.slot_bytes, ring.slot_stride, ring.ordered, ring.segment_bytes)
        assert other.creator_pid == os.getpid()


def test_attach_accepts_a_plain_path(ring):
    with Ring.attach(ring.handle.path) as other:
        produce(other, 0, b"by path")
        assert consume(ring) == (0, b"by path")


def test_attached_rings_share_memory_but_not_owner_tokens(ring):
    with Ring.attach(ring.handle) as other:
        assert other.owner != ring.owner and other.owner != 0
        assert other.slot_address(0) != ring.slot_address(0)  # two mappings of the same pages
        produce(other, 0, b"written through the second mapping")
        assert consume(ring) == (0, b"written through the second mapping")


def test_attach_with_an_explicit_owner_token_uses_it(ring):
    with Ring.attach(ring.handle, owner=0x1234) as other:
        slot = other.claim(0)
        assert ring.slot_info(0)["owner"] == 0x1234
        slot.abort()


def test_handle_survives_pickling(ring):
    handle = pickle.loads(pickle.dumps(ring.handle))
    assert isinstance(handle, RingHandle)
    assert handle == ring.handle
    with Ring.attach(handle) as other:
        assert other.slots == ring.slots


def test_detach_twice_is_harmless(ring):
    ring.detach()
    ring.detach()
    assert not ring.attached


def test_memfd_ring_has_no_name_in_any_file_system(ring):
    # An anonymous memfd: the kernel shows it as "/memfd:<label> (deleted)", never a path in /dev/shm.
    target = os.readlink(ring.handle.path)
    assert target.startswith("/memfd:pyshmfeed") and target.endswith("(deleted)")


def test_memfd_segment_stays_usable_by_an_attached_ring_after_the_creator_detaches():
    creator = Ring.create(2, 64)
    path = creator.handle.path
    attached = Ring.attach(creator.handle)
    creator.detach()
    try:
        with pytest.raises(SegmentNotFound):  # the creator's fd is gone: nobody new can attach
            Ring.attach(path).detach()
        produce(attached, 0, b"still mapped")
        assert consume(attached) == (0, b"still mapped")
    finally:
        attached.detach()


def _child_writes(handle: RingHandle, seq: int, payload: bytes) -> None:
    with Ring.attach(handle) as ring, ring.claim(seq, timeout=30) as slot:
        data = payload + str(os.getpid()).encode()
        slot.memory[: len(data)] = data
        slot.set_commit_bytes(len(data))


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_child_process_attaches_through_the_pickled_handle_and_writes(ring, method):
    child = multiprocessing.get_context(method).Process(target=_child_writes, args=(ring.handle, 0, b"pid="))
    child.start()
    try:
        seq, data = consume_with_timeout(ring, 60)
    finally:
        child.join(60)
    assert child.exitcode == 0
    assert (seq, data) == (0, f"pid={child.pid}".encode())


def consume_with_timeout(ring: Ring, timeout: float) -> tuple[int, bytes]:
    with ring.acquire(timeout=timeout) as slot:
        return slot.seq, bytes(slot.memory)


def _child_closes(handle: RingHandle, reason: str) -> None:
    with Ring.attach(handle) as ring:
        ring.close(reason, code=CLOSE_PRODUCER_ERROR)


def test_close_from_another_process_wakes_the_consumer(ring):
    waiter, box = in_thread(lambda: ring.acquire())
    child = multiprocessing.get_context("spawn").Process(target=_child_closes, args=(ring.handle, "boom in child"))
    child.start()
    child.join(60)
    waiter.join(10)
    assert child.exitcode == 0
    assert not waiter.is_alive()
    assert isinstance(box.get("error"), RingClosed)
    assert (box["error"].code, box["error"].reason) == (CLOSE_PRODUCER_ERROR, "boom in child")


# ---- ordered delivery ------------------------------------------------------


def test_ordered_batch_s_lives_in_slot_s_mod_n(ring):
    for seq in range(10):
        slot = ring.claim(seq, timeout=0)
        assert (slot.seq, slot.slot) == (seq, seq % 4)
        slot.commit(1)
        with ring.acquire(timeout=0) as got:
            assert (got.seq, got.slot) == (seq, seq % 4)


def test_ordered_ring_delivers_in_sequence_order_whatever_the_commit_order(ring):
    claims = {seq: ring.claim(seq, timeout=0) for seq in (3, 1, 0, 2)}
    for seq in (3, 1, 2):
        claims[seq].memory[:1] = bytes([seq])
        claims[seq].commit(1)
    assert ring.try_acquire() is None  # batch 0 is not committed yet, later ones wait behind it
    claims[0].memory[:1] = b"\x00"
    claims[0].commit(1)
    assert [consume(ring) for _ in range(4)] == [(s, bytes([s])) for s in range(4)]


def test_ordered_claim_waits_until_batch_s_minus_n_is_released(ring):
    for seq in range(4):
        produce(ring, seq, b"x")
    with pytest.raises(WouldBlock):
        ring.claim(4, timeout=0)
    got = ring.acquire(timeout=0)
    assert got.seq == 0
    with pytest.raises(WouldBlock):  # acquired is not released: the slot still holds batch 0
        ring.claim(4, timeout=0)
    got.release()
    assert ring.claim(4, timeout=0).slot == 0


def test_ordered_claim_of_a_later_lap_blocks_rather_than_stealing_the_slot(ring):
    with pytest.raises(WouldBlock):
        ring.claim(8, timeout=0)  # slot 0 is free for batch 0, not for batch 8
    assert ring.claim(0, timeout=0).slot == 0


def test_ordered_ring_needs_a_sequence_to_claim(ring):
    with pytest.raises(InvalidArgument):
        ring.claim()


def test_claiming_a_batch_already_committed_is_stale(ring):
    produce(ring, 0, b"first")
    with pytest.raises(StaleClaim):
        ring.claim(0, timeout=0)
    consume(ring)
    with pytest.raises(StaleClaim):  # consumed already: still a duplicate
        ring.claim(0, timeout=0)


def test_seq_committed_follows_the_batch(ring):
    assert not ring.seq_committed(0)
    slot = ring.claim(0)
    assert not ring.seq_committed(0)
    slot.commit(1)
    assert ring.seq_committed(0)
    consume(ring)
    assert ring.seq_committed(0)
    assert not ring.seq_committed(1)


def test_consumer_may_hold_several_batches_and_release_them_out_of_order(ring):
    for seq in range(3):
        produce(ring, seq, bytes([seq]))
    held = [ring.acquire(timeout=0) for _ in range(3)]
    assert [h.seq for h in held] == [0, 1, 2]
    for h in reversed(held):
        assert bytes(h.memory) == bytes([h.seq])
        h.release()
    assert ring.occupancy()["free"] == 4


# ---- unordered delivery ----------------------------------------------------


def test_unordered_ring_delivers_in_commit_order(unordered_ring):
    ring = unordered_ring
    claims = [ring.claim(seq, timeout=0) for seq in (10, 11, 12)]
    for c in (claims[2], claims[0], claims[1]):
        c.memory[:1] = bytes([c.seq])
        c.commit(1)
    assert [consume(ring) for _ in range(3)] == [(12, b"\x0c"), (10, b"\x0a"), (11, b"\x0b")]


def test_unordered_claim_takes_any_free_slot_until_none_is_left(unordered_ring):
    ring = unordered_ring
    claims = [ring.claim(seq, timeout=0) for seq in range(4)]
    assert sorted(c.slot for c in claims) == [0, 1, 2, 3]
    with pytest.raises(WouldBlock):
        ring.claim(4, timeout=0)
    claims[2].abort()
    assert ring.claim(4, timeout=0).slot == claims[2].slot


def test_unordered_slow_producer_blocks_nobody(unordered_ring):
    ring = unordered_ring
    slow = ring.claim(0, timeout=0)
    for seq in range(1, 20):
        produce(ring, seq, bytes([seq]))
        assert consume(ring) == (seq, bytes([seq]))
    slow.commit(0)
    assert consume(ring) == (0, b"")


def test_unordered_claim_without_a_sequence_numbers_batches_consecutively(unordered_ring):
    seqs = []
    for _ in range(6):
        with unordered_ring.claim(timeout=0) as slot:
            seqs.append(slot.seq)
        consume(unordered_ring)
    assert seqs == list(range(6))


# ---- zero copy -------------------------------------------------------------


def test_consumer_view_is_the_memory_the_producer_wrote(ring):
    slot = ring.claim(0)
    written = slot.array(np.float32, (5, 10))
    written[:] = np.arange(50, dtype=np.float32).reshape(5, 10)
    slot.commit(written.nbytes)
    got = ring.acquire(timeout=0)
    read = got.array(np.float32, (5, 10))
    assert read.ctypes.data == written.ctypes.data == ring.slot_address(got.slot)
    assert np.shares_memory(read, written)
    np.testing.assert_array_equal(read, np.arange(50, dtype=np.float32).reshape(5, 10))
    written[0, 0] = 42.0  # a later store through the producer view shows through: nothing was copied
    assert read[0, 0] == 42.0
    got.release()


def test_consumer_memoryview_points_into_the_slot(ring):
    produce(ring, 0, b"abcdef")
    with ring.acquire(timeout=0) as got:
        view = np.frombuffer(got.memory, dtype=np.uint8)
        assert view.ctypes.data == ring.slot_address(got.slot)


def test_write_through_one_mapping_is_read_in_place_through_another(ring):
    with Ring.attach(ring.handle) as producer:
        slot = producer.claim(0)
        slot.array(np.int64, 8)[:] = np.arange(8) * 7
        slot.commit(64)
        with ring.acquire(timeout=0) as got:
            arr = got.array(np.int64, 8)
            assert arr.ctypes.data == ring.slot_address(0)
            np.testing.assert_array_equal(arr, np.arange(8) * 7)


def test_array_views_honour_the_offset(ring):
    slot = ring.claim(0)
    slot.array(np.uint8, 16)[:] = np.arange(16, dtype=np.uint8)
    tail = slot.array(np.uint8, 4, offset=12)
    assert tail.ctypes.data == ring.slot_address(0) + 12
    np.testing.assert_array_equal(tail, [12, 13, 14, 15])
    slot.abort()


def test_producer_memory_is_the_whole_slot_and_writable(ring):
    slot = ring.claim(0)
    assert len(slot.memory) == SLOT_BYTES
    assert not slot.memory.readonly
    assert slot.array(np.uint8, SLOT_BYTES).flags.writeable
    slot.abort()


def test_consumer_memory_is_exactly_the_payload(ring):
    produce(ring, 0, b"12345")
    with ring.acquire(timeout=0) as got:
        assert got.nbytes == 5
        assert len(got.memory) == 5


# ---- read-only consumer views ----------------------------------------------


def test_consumer_memory_is_read_only(ring):
    produce(ring, 0, b"abc")
    with ring.acquire(timeout=0) as got:
        assert got.memory.readonly
        with pytest.raises(TypeError):
            got.memory[0] = 0
        assert bytes(got.memory) == b"abc"


def test_consumer_array_is_read_only(ring):
    produce(ring, 0, bytes(8))
    with ring.acquire(timeout=0) as got:
        arr = got.array(np.uint8, 8)
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[0] = 1


def test_consumer_array_is_writable_only_when_asked(ring):
    produce(ring, 0, bytes(8))
    with ring.acquire(timeout=0) as got:
        arr = got.array(np.uint8, 8, writable=True)
        arr[0] = 9
        assert got.memory[0] == 9


# ---- context managers -------------------------------------------------------


def test_clean_exit_from_claim_context_commits_the_whole_slot(ring):
    with ring.claim(0) as slot:
        slot.memory[:3] = b"abc"
    with ring.acquire(timeout=0) as got:
        assert got.nbytes == SLOT_BYTES
        assert bytes(got.memory[:3]) == b"abc"


def test_set_commit_bytes_sets_what_the_context_commits(ring):
    with ring.claim(0) as slot:
        slot.memory[:3] = b"abc"
        slot.set_commit_bytes(3)
    assert consume(ring) == (0, b"abc")


def test_explicit_commit_inside_the_context_is_not_repeated(ring):
    with ring.claim(0) as slot:
        slot.memory[:2] = b"hi"
        slot.commit(2)
    assert ring.counters()["commits"] == 1
    assert consume(ring) == (0, b"hi")


@pytest.mark.parametrize("ordered", [True, False])
def test_exception_inside_claim_context_aborts_and_leaves_the_slot_free(ordered):
    with Ring.create(2, 64, ordered=ordered) as ring:
        with pytest.raises(RuntimeError, match="source failed"), ring.claim(0) as slot:
            slot.memory[:4] = b"half"
            raise RuntimeError("source failed")
        info = ring.slot_info(slot.slot)
        assert (info["state"], info["owner"]) == ("free", 0)
        assert ring.occupancy()["free"] == 2
        assert ring.counters()["aborts"] == 1
        assert ring.try_acquire() is None  # nothing half-written is delivered
        again = ring.claim(0, timeout=0)  # the same batch can be claimed again
        assert again.seq == 0
        again.commit(0)
        assert consume(ring) == (0, b"")


def test_consumer_context_releases_on_exit_even_after_an_exception(ring):
    produce(ring, 0, b"a")
    with pytest.raises(KeyError), ring.acquire(timeout=0) as got:
        raise KeyError("training step failed")
    assert got.released
    assert ring.slot_info(0)["state"] == "free"
    assert ring.counters()["releases"] == 1


def test_releasing_inside_the_consumer_context_is_not_repeated(ring):
    produce(ring, 0, b"a")
    with ring.acquire(timeout=0) as got:
        got.release()
    assert ring.counters()["releases"] == 1


# ---- counters, slot info, occupancy -----------------------------------------


def test_counters_count_each_protocol_step(ring):
    assert set(ring.counters().values()) == {0}
    produce(ring, 0, b"a")
    ring.claim(1).abort()
    consume(ring)
    c = ring.counters()
    assert {k: c[k] for k in ("claims", "commits", "aborts", "acquires", "releases", "consumer_head")} == {
        "claims": 2, "commits": 1, "aborts": 1, "acquires": 1, "releases": 1, "consumer_head": 1}
    assert c["stale_commits"] == c["reclaims"] == 0


def test_counters_live_in_the_segment_and_are_seen_by_every_mapping(ring):
    with Ring.attach(ring.handle) as other:
        produce(other, 0, b"a")
        assert ring.counters()["commits"] == 1
        consume(ring)
        assert other.counters() == ring.counters()


def test_timed_out_waits_are_counted_with_their_duration(ring):
    with pytest.raises(Timeout):
        ring.acquire(timeout=0.05)
    c = ring.counters()
    assert c["consumer_waits"] >= 1
    assert c["consumer_wait_ns"] >= 40_000_000
    assert c["acquires"] == 0


def test_a_wait_that_did_not_sleep_is_not_counted(ring):
    produce(ring, 0, b"a")
    consume(ring)
    c = ring.counters()
    assert c["consumer_waits"] == c["producer_waits"] == 0


def test_occupancy_counts_slots_in_each_state(ring):
    assert ring.occupancy() == {"free": 4, "claimed": 0, "ready": 0, "acquired": 0}
    produce(ring, 0, b"a")
    held = ring.acquire(timeout=0)
    produce(ring, 1, b"b")
    claimed = ring.claim(2)
    assert ring.occupancy() == {"free": 1, "claimed": 1, "ready": 1, "acquired": 1}
    held.release()
    claimed.abort()
    assert ring.occupancy() == {"free": 3, "claimed": 0, "ready": 1, "acquired": 0}


def test_slot_info_follows_a_batch_through_its_states(ring):
    slot = ring.claim(1)
    info = ring.slot_info(1)
    assert (info["state"], info["seq"], info["owner"]) == ("claimed", 1, ring.owner)
    assert info["claim_ns"] > 0
    slot.commit(7)
    info = ring.slot_info(1)
    assert (info["state"], info["owner"], info["payload_len"]) == ("ready", 0, 7)
    assert info["commit_ns"] >= info["claim_ns"]
    produce(ring, 0, b"z")
    consume(ring)
    got = ring.acquire(timeout=0)
    assert ring.slot_info(1)["state"] == "acquired"
    assert got.commit_ns == info["commit_ns"]
    got.release()
    info = ring.slot_info(1)
    assert (info["state"], info["seq"]) == ("free", 5)  # free for the next lap: 1 + 4


# ---- close -------------------------------------------------------------------


def test_close_reason_is_empty_while_the_ring_is_open(ring):
    assert ring.close_reason() == (0, "")
    assert not ring.closed


def test_close_records_code_and_reason(ring):
    ring.close("epoch finished")
    assert ring.closed
    assert ring.close_reason() == (CLOSE_NORMAL, "epoch finished")


def test_first_close_wins(ring):
    ring.close("producer 3 failed", code=CLOSE_PRODUCER_ERROR)
    ring.close("later", code=CLOSE_NORMAL)
    assert ring.close_reason() == (CLOSE_PRODUCER_ERROR, "producer 3 failed")


def test_close_is_seen_through_every_mapping(ring):
    with Ring.attach(ring.handle) as other:
        other.close("from the other side")
        assert ring.close_reason() == (CLOSE_NORMAL, "from the other side")


def test_close_with_reason_wakes_a_thread_blocked_in_acquire(ring):
    waiter, box = in_thread(lambda: ring.acquire())  # no timeout: only close can end it
    time.sleep(0.2)
    assert waiter.is_alive()
    ring.close("trainer stopped", code=CLOSE_PRODUCER_ERROR)
    waiter.join(5)
    assert not waiter.is_alive()
    err = box.get("error")
    assert isinstance(err, RingClosed)
    assert (err.code, err.reason) == (CLOSE_PRODUCER_ERROR, "trainer stopped")
    assert "trainer stopped" in str(err)


def test_close_wakes_a_producer_blocked_in_claim(ring):
    for seq in range(4):
        produce(ring, seq, b"x")
    waiter, box = in_thread(lambda: ring.claim(4))
    time.sleep(0.2)
    assert waiter.is_alive()
    ring.close("consumer gone")
    waiter.join(5)
    assert not waiter.is_alive()
    assert isinstance(box.get("error"), RingClosed)
    assert box["error"].reason == "consumer gone"


def test_close_wakes_an_unordered_consumer_and_producer(unordered_ring):
    ring = unordered_ring
    consumer, consumer_box = in_thread(lambda: ring.acquire())
    for seq in range(4):
        ring.claim(seq, timeout=0)
    producer, producer_box = in_thread(lambda: ring.claim(4))
    time.sleep(0.2)
    ring.close("stop")
    consumer.join(5)
    producer.join(5)
    assert isinstance(consumer_box.get("error"), RingClosed)
    assert isinstance(producer_box.get("error"), RingClosed)


def test_batches_ready_before_close_are_still_delivered(ring):
    produce(ring, 0, b"last")
    ring.close("done")
    assert consume(ring) == (0, b"last")
    with pytest.raises(RingClosed):
        ring.acquire(timeout=1)


def test_claims_fail_once_the_ring_is_closed(ring):
    ring.close("done")
    with pytest.raises(RingClosed):
        ring.claim(0, timeout=1)


def test_stop_callback_ends_an_unbounded_wait(ring):
    start = time.monotonic()
    with pytest.raises(RingClosed, match="stopped by request"):
        ring.acquire(stop=lambda: True)
    assert time.monotonic() - start < 5


def test_closing_a_detached_ring_does_nothing():
    ring = Ring.create(1, 64)
    ring.detach()
    ring.close("late")  # must not touch unmapped memory


# ---- timeouts ----------------------------------------------------------------


def test_acquire_times_out_on_an_empty_ring(ring):
    start = time.monotonic()
    with pytest.raises(Timeout):
        ring.acquire(timeout=0.3)
    elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 5


def test_timeout_is_also_a_builtin_timeout_error(ring):
    with pytest.raises(TimeoutError):
        ring.acquire(timeout=0.01)


def test_claim_times_out_while_the_slot_holds_an_unconsumed_batch(ring):
    for seq in range(4):
        produce(ring, seq, b"x")
    start = time.monotonic()
    with pytest.raises(Timeout):
        ring.claim(4, timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 5
    assert ring.counters()["producer_waits"] >= 1


def test_acquire_returns_a_batch_committed_during_the_wait(ring):
    def late_producer():
        time.sleep(0.2)
        produce(ring, 0, b"late")

    t, box = in_thread(late_producer)
    assert consume_with_timeout(ring, 10) == (0, b"late")
    t.join(5)
    assert "error" not in box


def test_claim_returns_once_the_consumer_releases_during_the_wait(ring):
    for seq in range(4):
        produce(ring, seq, b"x")
    t, box = in_thread(lambda: ring.claim(4, timeout=10))
    time.sleep(0.1)
    consume(ring)
    t.join(10)
    assert isinstance(box.get("result"), ProducerSlot)
    assert box["result"].slot == 0
    box["result"].abort()


def test_zero_timeout_acquire_would_block_on_an_empty_ring(ring):
    with pytest.raises(WouldBlock):
        ring.acquire(timeout=0)


def test_zero_timeout_claim_would_block_on_a_full_ring(unordered_ring):
    for seq in range(4):
        unordered_ring.claim(seq)
    with pytest.raises(WouldBlock):
        unordered_ring.claim(4, timeout=0)


def test_try_acquire_returns_none_when_nothing_is_ready(ring):
    assert ring.try_acquire() is None
    ring.claim(0)  # claimed is not ready
    assert ring.try_acquire() is None


def test_try_acquire_returns_the_ready_batch(ring):
    produce(ring, 0, b"now")
    got = ring.try_acquire()
    assert isinstance(got, ConsumerSlot)
    assert (got.seq, bytes(got.memory)) == (0, b"now")
    got.release()


# ---- named backing --------------------------------------------------------------


def test_named_ring_lives_in_dev_shm_private_to_its_user_until_the_creator_detaches():
    with Ring.create(2, 64, backing="named") as ring:
        path = ring.handle.path
        assert path.startswith("/dev/shm/pyshmfeed-")
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.getuid()
        assert st.st_size == ring.segment_bytes
    assert not os.path.exists(path)


def test_named_ring_carries_batches_between_mappings():
    with Ring.create(2, 64, backing="named", ordered=False) as ring, Ring.attach(ring.handle) as producer:
        assert not producer.ordered
        produce(producer, 7, b"named")
        assert consume(ring) == (7, b"named")


def test_named_rings_get_distinct_names():
    with Ring.create(1, 64, backing="named") as a, Ring.create(1, 64, backing="named") as b:
        assert a.handle.path != b.handle.path


def test_attaching_does_not_unlink_a_named_ring():
    with Ring.create(1, 64, backing="named") as ring:
        Ring.attach(ring.handle).detach()
        assert os.path.exists(ring.handle.path)
