"""Faults at the ring level, with real processes and real signals: nothing lost, repeated, torn or leaked.

- A producer SIGKILLs itself at every step of claim -> write -> commit (and the
  two instants inside the C calls are reproduced by writing the exact state a
  death there leaves): the consumer reclaims, the batch is re-issued, and every
  batch arrives exactly once, intact, in order.
- The consumer SIGKILLs itself at every step of acquire -> release: producers
  (separate processes, waiting with a ``registry.is_alive`` stop callback) notice
  and exit within a few seconds.
- A producer SIGSTOPped while holding a claim is reclaimed and its batch
  re-issued and delivered; after SIGCONT its late commit gets ``StaleClaim``
  and nothing it wrote is delivered.
- 1,000 create/close cycles through every exit path leave no segment, no file
  descriptor and no memory behind; children killed by signals leave nothing
  that ``pyshmfeed cleanup`` does not remove.
- A hostile writer changing lengths, states and header fields after attach
  gets ``CorruptSegment`` or another clean error, never a crash.
- Too little memory is ``NoSpace`` at creation, with the numbers.
- Another user cannot open a segment; named segments are 0600, unguessable,
  and a planted name is an error, not reused.

Every batch carries its sequence, length and CRC, so a torn, repeated or
misplaced batch cannot pass for a good one.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest

from pyshmfeed import Ring, RingHandle, registry
from pyshmfeed._ffi import ffi, lib
from pyshmfeed.errors import (
    CorruptSegment,
    NoSpace,
    RingClosed,
    SegmentNotFound,
    SegmentPermissionError,
    ShmfeedError,
    SlotStateError,
    StaleClaim,
    Timeout,
)
from pyshmfeed.ring import SEGMENT_FIELDS

_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["numpy", "pyshmfeed"])

HEADER = struct.Struct("<QII")  # seq, body length, crc32 of the body
SLOT_BYTES = 4096
SHM = "/dev/shm"

# Offsets from the C core's layout table (csrc/layout.h): slot descriptors start at DESC, DESC_BYTES each.
DESC, DESC_BYTES = SEGMENT_FIELDS["desc"]
WORD, OWNER, BATCH_SEQ, PAYLOAD_LEN, COMMIT_ORDER, WAITERS = (
    SEGMENT_FIELDS[f"desc.{name}"][0] for name in ("word", "owner", "batch_seq", "payload_len", "commit_order", "waiters"))
CLOSED, CLOSE_CODE, CLOSE_MSG = (SEGMENT_FIELDS[f"header.{name}"][0] for name in ("closed", "close_code", "close_msg"))
CONSUMER_HEAD = SEGMENT_FIELDS["consumer.head"][0]
STATE_FREE, STATE_CLAIMED, STATE_READY, STATE_ACQUIRED = 0, 1, 2, 3


def word(gen: int, seq: int, state: int) -> int:
    return (gen << 48) | (seq << 2) | state


# ---- batches that tell a good one from a bad one ----------------------------------


def body_for(seq: int) -> bytes:
    n = 1 + (seq * 7919) % (SLOT_BYTES - HEADER.size)
    return (np.arange(n, dtype=np.uint32) * 2654435761 + seq).astype(np.uint8).tobytes()


def write_batch(slot, seq: int, die_at: str | None = None) -> None:
    """Write batch ``seq`` in two halves and commit, SIGKILLing this process at ``die_at``."""
    body = body_for(seq)
    mem = slot.memory
    die_here("claimed", die_at)
    HEADER.pack_into(mem, 0, seq, len(body), zlib.crc32(body))
    half = len(body) // 2
    mem[HEADER.size: HEADER.size + half] = body[:half]
    die_here("half_written", die_at)
    mem[HEADER.size + half: HEADER.size + len(body)] = body[half:]
    die_here("written", die_at)
    slot.commit(HEADER.size + len(body))
    die_here("committed", die_at)


def check_batch(got) -> int:
    seq, n, crc = HEADER.unpack_from(got.memory, 0)
    assert seq == got.seq, f"slot says batch {got.seq}, payload says {seq}"
    assert got.nbytes == HEADER.size + n, f"batch {seq}: length {got.nbytes}, header says {HEADER.size + n}"
    body = got.memory[HEADER.size: HEADER.size + n]
    assert zlib.crc32(body) == crc and body == body_for(seq), f"batch {seq}: torn or wrong bytes"
    return seq


def die_here(step: str, die_at: str | None) -> None:
    if step == die_at:
        os.kill(os.getpid(), signal.SIGKILL)


# ---- processes ---------------------------------------------------------------------


def producer_main(handle: RingHandle, owner: int, seqs: list[int], die_at: str | None, die_seq: int) -> None:
    """Produce ``seqs`` in order; at batch ``die_seq`` SIGKILL this process at step ``die_at``."""
    with Ring.attach(handle, owner=owner) as ring:
        for seq in seqs:
            step = die_at if seq == die_seq else None
            die_here("claim", step)
            write_batch(ring.claim(seq, timeout=60), seq, step)


def endless_producer(handle: RingHandle, first: int, stride: int, consumer_pid: int) -> None:
    """Produce batches first, first + stride, ... until the consumer's process is gone."""
    with Ring.attach(handle) as ring:
        seq = first
        try:
            while True:
                slot = ring.claim(seq, stop=lambda: not registry.is_alive(consumer_pid))
                write_batch(slot, seq)
                seq += stride
        except RingClosed:
            os._exit(0)  # stopped by the callback: the consumer is gone
    os._exit(5)


def consumer_main(conn, die_at: str, after: int) -> None:
    """Create a ring, send its handle, consume; SIGKILL this process at ``die_at`` of batch ``after``."""
    with Ring.create(4, SLOT_BYTES) as ring:
        conn.send(ring.handle)
        n = 0
        while True:
            if n == after and die_at == "acquire":
                conn.send("dying")
                os.kill(os.getpid(), signal.SIGKILL)
            got = ring.acquire(timeout=60)
            if n == after and die_at == "acquired":
                conn.send("dying")
                os.kill(os.getpid(), signal.SIGKILL)
            check_batch(got)
            if n == after and die_at == "read":
                conn.send("dying")
                os.kill(os.getpid(), signal.SIGKILL)
            got.release()
            if n == after and die_at == "released":
                conn.send("dying")
                os.kill(os.getpid(), signal.SIGKILL)
            n += 1


# `start` (conftest.py) starts child processes and kills leftovers after each test.


def committed_or_delivered(ring: Ring, delivered: set[int]) -> set[int]:
    """Sequences that must not be produced again: delivered, or ready/acquired in the ring now."""
    held = {ring.slot_info(i)["seq"] for i in range(ring.slots)
            if ring.slot_info(i)["state"] in ("ready", "acquired")}
    return held | delivered


# ---- producer killed at every step ------------------------------------------------------

PRODUCER_STEPS = ["claim", "claimed", "half_written", "written", "committed"]
#                 before claim | claimed, nothing written | torn | whole but not committed | after commit


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
@pytest.mark.parametrize("die_at", PRODUCER_STEPS)
def test_producer_killed_at_each_step_loses_and_repeats_nothing(start, die_at, ordered):
    n, die_seq, victim_owner = 120, 40, 0xDEAD01
    with Ring.create(4, SLOT_BYTES, ordered=ordered) as ring:
        victim_seqs = list(range(0, n, 2))
        victim = start(producer_main, ring.handle, victim_owner, victim_seqs, die_at, die_seq)
        others = [start(producer_main, ring.handle, 0xB0B, list(range(1, n, 2)), None, -1)]
        delivered: list[int] = []
        reissued: list[int] = []
        reclaim_s = None
        while len(delivered) < n:
            try:
                got = ring.acquire(timeout=0.05)
            except Timeout:
                if victim.exitcode is None or reclaim_s is not None:
                    continue
                # The victim is dead (the test's liveness check, as the feed's is Ray's): take back
                # its claims and give its unfinished batches to a replacement.
                t0 = time.monotonic()
                reissued = ring.reclaim(victim_owner)
                done = committed_or_delivered(ring, set(delivered))
                redo = [s for s in victim_seqs if s not in done]
                others.append(start(producer_main, ring.handle, 0xFEED, redo, None, -1))
                reclaim_s = time.monotonic() - t0
                continue
            with got:
                delivered.append(check_batch(got))
        assert victim.exitcode == -signal.SIGKILL
        for p in others:
            p.join(30)
            assert p.exitcode == 0
        assert ring.try_acquire() is None, "a batch was delivered twice"
        counters = ring.counters()
    assert (delivered if ordered else sorted(delivered)) == list(range(n))
    # The slot is reclaimed only when the victim died holding a claim.
    assert reissued == ([die_seq] if die_at in ("claimed", "half_written", "written") else [])
    assert counters["reclaims"] == len(reissued)
    assert counters["stale_commits"] == 0
    assert counters["commits"] == counters["acquires"] == n
    assert reclaim_s is not None and reclaim_s < 1.0
    print(f"\n[producer killed at {die_at}, {'ordered' if ordered else 'unordered'}] {n} batches, "
          f"re-issued {reissued}, reclaim + re-issue took {reclaim_s * 1e3:.1f} ms")


# The two instants inside the C calls that Python cannot stop at, reproduced by writing
# the exact descriptor state a death there leaves behind.


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_death_between_the_owner_lock_and_the_claim_cas_is_reclaimed(ordered):
    # try_claim_slot() takes the owner lock, then CASes the word: died in between.
    with Ring.create(2, SLOT_BYTES, ordered=ordered) as ring:
        shm = np.frombuffer(ffi.buffer(ring._base, ring.segment_bytes), dtype="<u8")
        for slot in range(2):
            shm[desc(slot, OWNER)] = 0xDEAD02  # unordered: any slot would do, so lock them all
        with pytest.raises(Timeout):
            ring.claim(0, timeout=0.2)  # locked by the dead owner: nobody can claim...
        assert ring.reclaim(0xDEAD02) == []  # ...until reclaim; no batch was claimed, none re-issued
        assert [ring.slot_info(i)["owner"] for i in range(2)] == [0, 0]
        assert ring.occupancy()["free"] == 2
        with ring.claim(0, timeout=1) as slot:
            write_batch(slot, slot.seq)
        with ring.acquire(timeout=1) as got:
            assert check_batch(got) == 0


def test_death_inside_commit_before_its_cas_publishes_nothing():
    # commit() stores payload_len and commit_ns, then CASes the word: died in between.
    with Ring.create(2, SLOT_BYTES) as ring, Ring.attach(ring.handle, owner=0xDEAD03) as victim:
        slot = victim.claim(0)
        slot.memory[:4] = b"torn"
        shm = np.frombuffer(ffi.buffer(ring._base, ring.segment_bytes), dtype="<u8")
        shm[(DESC + PAYLOAD_LEN) // 8] = 4
        assert ring.try_acquire() is None  # the length alone publishes nothing
        assert ring.reclaim(0xDEAD03) == [0]
        with ring.claim(0, timeout=1) as redo:
            write_batch(redo, 0)
        with ring.acquire(timeout=1) as got:
            assert check_batch(got) == 0


# ---- consumer killed at every step -------------------------------------------------------

CONSUMER_STEPS = ["acquire", "acquired", "read", "released"]


@pytest.mark.parametrize("die_at", CONSUMER_STEPS)
def test_producers_notice_a_killed_consumer_and_exit_within_seconds(start, die_at):
    parent, child = _CTX.Pipe()
    consumer = start(consumer_main, child, die_at, 25)
    assert parent.poll(60)
    handle = parent.recv()
    producers = [start(endless_producer, handle, w, 2, consumer.pid) for w in range(2)]
    assert parent.poll(60) and parent.recv() == "dying"
    consumer.join(10)
    died = time.monotonic()
    assert consumer.exitcode == -signal.SIGKILL
    for p in producers:
        p.join(10)
    noticed_s = time.monotonic() - died
    assert [p.exitcode for p in producers] == [0, 0], "a producer did not stop cleanly"
    print(f"\n[consumer killed at {die_at}] producers exited {noticed_s:.3f} s after its death")
    assert noticed_s < 3.0, f"producers took {noticed_s:.2f} s to notice the consumer's death"
    # memfd backing: the segment went with the last process that mapped it; nothing to find.
    assert not os.path.exists(handle.path)
    with pytest.raises(SegmentNotFound):
        Ring.attach(handle)


# ---- paused producer ------------------------------------------------------------------------


def paused_producer(handle: RingHandle, owner: int, conn) -> None:
    """Claim batch 0, write it whole, report, wait for "go", then commit late."""
    with Ring.attach(handle, owner=owner) as ring:
        slot = ring.claim(0, timeout=60)
        mem = slot.memory
        mem[:] = b"S" * len(mem)  # stale bytes: must never reach the consumer
        conn.send("written")
        assert conn.recv() == "go"
        try:
            slot.commit(len(mem))
        except StaleClaim:
            conn.send("stale")
            return
        conn.send("committed")


def wait_stopped(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
        time.sleep(0.01)
    pytest.fail(f"process {pid} did not stop")


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_paused_producer_gets_stale_claim_and_nothing_corrupt_is_delivered(start, ordered):
    owner = 0x5709
    with Ring.create(2, SLOT_BYTES, ordered=ordered) as ring:
        parent, child = _CTX.Pipe()
        paused = start(paused_producer, ring.handle, owner, child)
        assert parent.poll(60) and parent.recv() == "written"
        os.kill(paused.pid, signal.SIGSTOP)
        wait_stopped(paused.pid)
        # Past its lease: take its claim back and re-issue the batch elsewhere.
        assert ring.reclaim(owner) == [0]
        rescue = start(producer_main, ring.handle, 0xCAFE, list(range(6)), None, -1)
        delivered = []
        for _ in range(4):
            with ring.acquire(timeout=30) as got:
                delivered.append(check_batch(got))
        # Resume it while later batches reuse its slot: its commit must fail and publish nothing.
        parent.send("go")
        os.kill(paused.pid, signal.SIGCONT)
        assert parent.poll(30) and parent.recv() == "stale"
        paused.join(30)
        for _ in range(2):
            with ring.acquire(timeout=30) as got:
                delivered.append(check_batch(got))
        rescue.join(30)
        assert ring.try_acquire() is None
        counters = ring.counters()
    assert (delivered if ordered else sorted(delivered)) == list(range(6))
    assert counters["stale_commits"] == 1 and counters["reclaims"] == 1
    assert counters["commits"] == counters["acquires"] == 6
    assert paused.exitcode == 0 and rescue.exitcode == 0


# ---- cleanup under every exit path --------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def segments(creators: set[int] | None = None) -> set[str]:
    """Named segments in /dev/shm, only those created by ``creators`` (default: this process).

    Other test runs on the machine may hold named rings of their own: they are not this test's.
    """
    creators = {os.getpid()} if creators is None else creators
    found = set()
    for name in os.listdir(SHM):
        if not name.startswith("pyshmfeed-"):
            continue
        try:
            with open(os.path.join(SHM, name), "rb") as f:
                head = f.read(80)
        except OSError:
            continue
        if len(head) == 80 and struct.unpack_from("<I", head, 72)[0] in creators:
            found.add(name)
    return found


class Boom(Exception):
    pass


def one_cycle(i: int) -> None:
    """One create/close cycle through exit path ``i % 5`` (both backings, with traffic)."""
    backing = "named" if i % 2 else "memfd"
    path = i % 5
    if path == 0:  # normal exit from `with`, with a batch through the ring
        with Ring.create(2, 256, backing=backing) as ring, Ring.attach(ring.handle) as producer:
            with producer.claim(0) as slot:
                slot.memory[:3] = b"abc"
            with ring.acquire(timeout=1) as got:
                assert bytes(got.memory[:3]) == b"abc"
    elif path == 1:  # an exception while a claim is held
        try:
            with Ring.create(2, 256, backing=backing, ordered=False) as ring, ring.claim():
                raise Boom()
        except Boom:
            pass
    elif path == 2:  # an exception while a batch is held by the consumer
        try:
            with Ring.create(2, 256, backing=backing) as ring:
                ring.claim(0).commit(1)
                with ring.acquire(timeout=1):
                    raise Boom()
        except Boom:
            pass
    elif path == 3:  # explicit detach, after closing with a reason
        ring = Ring.create(2, 256, backing=backing)
        ring.close("done")
        ring.detach()
    else:  # dropped without detach: the finalizer frees it
        Ring.create(2, 256, backing=backing).claim(0)


def test_a_thousand_create_close_cycles_leak_no_segment_fd_or_memory():
    def mine():
        return {e["dir"] for e in registry.rings() if e["ring"] and e["ring"]["pid"] == os.getpid()}

    registry_before = mine()
    for i in range(50):  # warm up allocators and caches before measuring
        one_cycle(i)
    fds, rss = open_fds(), rss_bytes()
    for i in range(1000):
        one_cycle(i)
    assert open_fds() == fds, "file descriptors leaked"
    growth = rss_bytes() - rss
    print(f"\n[1,000 cycles] fds {fds} -> {open_fds()}, RSS growth {growth / 2**10:.0f} KiB")
    assert growth < 4 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 1,000 cycles"
    assert segments() == set()
    assert mine() == registry_before, "registry records leaked"


def ring_holder(conn, backing: str, handle_sigterm: bool) -> None:
    """Hold a ring with a claim and an acquired batch, until a signal ends this process."""
    if handle_sigterm:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with Ring.create(4, 256, backing=backing) as ring, Ring.attach(ring.handle) as producer:
        producer.claim(0).commit(1)
        got = ring.acquire(timeout=1)
        producer.claim(1)
        conn.send(ring.handle.path)
        try:
            while True:
                time.sleep(0.01)
        finally:
            got.release()


def cleanup_main(argv: list[str]) -> int:
    from pyshmfeed import cleanup

    return cleanup.main(argv)


@pytest.mark.parametrize("backing", ["memfd", "named"])
def test_processes_ended_by_signals_leave_nothing_that_cleanup_does_not_remove(start, backing, capsys):
    kinds = [(signal.SIGKILL, False), (signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGINT, False)]
    holders, paths = [], []
    for k in range(12):
        sig, handled = kinds[k % len(kinds)]
        parent, child = _CTX.Pipe()
        holders.append((start(ring_holder, child, backing, handled), sig, handled))
        assert parent.poll(60)
        paths.append(parent.recv())
    pids = {p.pid for p, _, _ in holders}
    for p, sig, _ in holders:
        os.kill(p.pid, sig)
    for p, _, _ in holders:
        p.join(10)
    leftovers = segments(pids)
    for (p, sig, handled), path in zip(holders, paths):
        assert p.exitcode is not None
        clean_exit = sig == signal.SIGINT or handled
        if backing == "memfd" or clean_exit:
            assert os.path.basename(path) not in leftovers, f"{signal.Signals(sig).name} left {path}"
    if backing == "memfd":
        assert leftovers == set()
    else:  # exactly the creators that could run no finalizer
        assert len(leftovers) == sum(sig == signal.SIGKILL or (sig == signal.SIGTERM and not handled)
                                     for _, sig, handled in holders)
    # What a SIGKILLed / unhandled-SIGTERM creator of a named ring leaves, cleanup removes; and the
    # registry records of every dead holder go too.
    assert cleanup_main([]) == 0
    assert segments(pids) == set()
    assert not [e for e in registry.rings() if e["ring"] and e["ring"]["pid"] in pids]


# ---- a hostile writer changes shared memory after attach ----------------------------------


@pytest.fixture
def hostile():
    """A ring, a producer attached to it, and a writable uint64 view of the raw segment."""
    with Ring.create(4, SLOT_BYTES) as ring, Ring.attach(ring.handle, owner=0xA11CE) as producer:
        shm = np.frombuffer(ffi.buffer(ring._base, ring.segment_bytes), dtype="<u8")
        yield ring, producer, shm


def desc(slot: int, field: int) -> int:
    return (DESC + slot * DESC_BYTES + field) // 8


@pytest.mark.parametrize("length", [SLOT_BYTES + 1, 2**40, 2**64 - 1])
def test_payload_length_past_the_slot_is_corrupt_segment_not_a_read_past_it(hostile, length):
    ring, producer, shm = hostile
    producer.claim(0).commit(16)
    shm[desc(0, PAYLOAD_LEN)] = length  # after the commit, before the consumer looks
    with pytest.raises(CorruptSegment):
        ring.acquire(timeout=1)


def test_payload_length_changed_after_acquire_does_not_change_the_view(hostile):
    ring, producer, shm = hostile
    with producer.claim(0) as slot:
        write_batch(slot, 0)
    got = ring.acquire(timeout=1)
    shm[desc(0, PAYLOAD_LEN)] = 2**64 - 1
    assert check_batch(got) == 0 and len(got.memory) == got.nbytes <= SLOT_BYTES
    got.release()


def test_forged_ready_state_yields_at_most_a_slot_and_the_real_commit_fails_cleanly(hostile):
    ring, producer, shm = hostile
    slot = producer.claim(0)
    shm[desc(0, WORD)] = word(0, 0, STATE_READY)  # published by nobody
    with ring.acquire(timeout=1) as got:
        assert got.nbytes <= SLOT_BYTES
    with pytest.raises((SlotStateError, StaleClaim)):
        slot.commit(16)


@pytest.mark.parametrize("garbage", [2**64 - 1, word(0xFFFF, 2**46 - 1, STATE_ACQUIRED), word(7, 3, STATE_CLAIMED),
                                     word(0, 2**45, STATE_FREE), 0x0123456789ABCDEF])
def test_garbage_slot_words_give_clean_errors_never_a_crash(hostile, garbage):
    ring, producer, shm = hostile
    for i in range(4):
        shm[desc(i, WORD)] = garbage
    outcomes = []
    for call in (lambda: ring.acquire(timeout=0.1), lambda: producer.claim(0, timeout=0.1),
                 lambda: producer.claim(5, timeout=0.1), lambda: ring.reclaim(0xA11CE),
                 lambda: ring.seq_committed(3), lambda: ring.occupancy()):
        try:
            result = call()
        except ShmfeedError as exc:
            outcomes.append(type(exc).__name__)
            continue
        if hasattr(result, "release"):
            assert result.nbytes <= SLOT_BYTES
            result.release()
        elif hasattr(result, "commit"):
            result.abort()
        outcomes.append("ok")
    assert len(outcomes) == 6


HEADER_VALUES = {"slot_count": 65535, "slot_bytes": 2**40, "slot_stride": 1, "data_offset": 2**63,
                 "segment_bytes": 0, "magic": 0, "flags": 0xFF}
HEADER_FIELDS = {name: (SEGMENT_FIELDS[f"header.{name}"][0], {4: "<I", 8: "<Q"}[SEGMENT_FIELDS[f"header.{name}"][1]],
                        value) for name, value in HEADER_VALUES.items()}


@pytest.mark.parametrize("field", sorted(HEADER_FIELDS))
def test_header_changed_after_attach_is_ignored_by_attached_rings_and_rejected_by_new_ones(hostile, field):
    ring, producer, _ = hostile
    offset, fmt, value = HEADER_FIELDS[field]
    struct.pack_into(fmt, ffi.buffer(ring._base, 4096), offset, value)
    # Both sides keep their own validated geometry: the protocol goes on, in bounds.
    for seq in range(8):
        with producer.claim(seq, timeout=1) as slot:
            write_batch(slot, seq)
        with ring.acquire(timeout=1) as got:
            assert check_batch(got) == seq
    with pytest.raises(CorruptSegment):
        Ring.attach(ring.handle)


def test_unterminated_close_message_is_read_bounded(hostile):
    ring, producer, _ = hostile
    buf = ffi.buffer(ring._base, 4096)
    buf[CLOSE_MSG:4096] = b"A" * (4096 - CLOSE_MSG)  # no NUL anywhere in the header's tail
    struct.pack_into("<i", buf, CLOSE_CODE, -123)
    struct.pack_into("<I", buf, CLOSED, 2)
    code, reason = producer.close_reason()
    assert code == -123 and 0 < len(reason) < 2048 and set(reason) == {"A"}
    with pytest.raises(RingClosed):
        ring.acquire(timeout=1)


def test_close_stuck_half_written_still_ends_every_wait(hostile):
    ring, producer, _ = hostile
    struct.pack_into("<I", ffi.buffer(ring._base, 4096), CLOSED, 1)  # "closing", forever
    t0 = time.monotonic()
    with pytest.raises(RingClosed):
        ring.acquire(timeout=5)
    with pytest.raises(RingClosed):
        producer.claim(0, timeout=5)
    assert time.monotonic() - t0 < 4


def test_garbage_counters_and_unordered_fields_stay_in_bounds():
    with Ring.create(4, SLOT_BYTES, ordered=False) as ring, Ring.attach(ring.handle) as producer:
        shm = np.frombuffer(ffi.buffer(ring._base, ring.segment_bytes), dtype="<u8")
        for seq in range(3):
            with producer.claim(seq) as slot:
                write_batch(slot, seq)
        for i in range(4):
            shm[desc(i, COMMIT_ORDER)] = 2**64 - 1 - i
            shm[desc(i, BATCH_SEQ)] = 2**64 - 1
        shm[SEGMENT_FIELDS["producer.commit_order"][0] // 8] = 2**64 - 1  # the commit ticket counter
        struct.pack_into("<I", ffi.buffer(ring._base, ring.segment_bytes), DESC + WAITERS, 2**32 - 1)
        got_any = 0
        while (got := ring.try_acquire()) is not None:
            with got:
                assert got.nbytes <= SLOT_BYTES and got.slot < 4
                got_any += 1
        assert got_any == 3


def test_garbage_consumer_head_is_corrupt_segment_not_a_crash_or_an_endless_wait(hostile):
    ring, producer, shm = hostile
    producer.claim(0).commit(1)
    shm[CONSUMER_HEAD // 8] = 2**64 - 3  # slot 1 holds batch 1: never what a consumer at 2**64 - 3 sees
    with pytest.raises(CorruptSegment):
        ring.acquire(timeout=5)


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_a_payload_length_past_the_slot_leaves_the_slot_ready_and_the_ring_usable(ordered):
    # The error comes before the slot moves: the consumer holds no token it could not give back.
    with Ring.create(4, SLOT_BYTES, ordered=ordered) as ring, Ring.attach(ring.handle) as producer:
        shm = np.frombuffer(ffi.buffer(ring._base, ring.segment_bytes), dtype="<u8")
        with producer.claim(0) as slot:
            write_batch(slot, 0)
        good = shm[desc(0, PAYLOAD_LEN)]
        shm[desc(0, PAYLOAD_LEN)] = SLOT_BYTES + 1
        for _ in range(3):
            with pytest.raises(CorruptSegment):
                ring.acquire(timeout=1)
        assert ring.slot_info(0)["state"] == "ready"
        assert ring.counters()["consumer_head"] == 0 and ring.counters()["acquires"] == 0
        shm[desc(0, PAYLOAD_LEN)] = good  # whoever wrote it puts it back: the batch is still there
        with ring.acquire(timeout=1) as got:
            assert check_batch(got) == 0


def descriptor_scribbler(path: str, slots: int, seed: int) -> None:
    """A hostile process: random bytes over every slot descriptor of a live ring (not the header)."""
    rng = np.random.default_rng(seed)
    with open(path, "r+b") as f:
        f.seek(DESC)
        f.write(rng.bytes(slots * DESC_BYTES))
    os._exit(0)


def test_random_bytes_over_the_descriptors_of_an_ordered_ring_are_corrupt_segment_at_once(start):
    times = []
    for seed in range(20):
        with Ring.create(4, SLOT_BYTES) as ring, Ring.attach(ring.handle) as producer:
            for seq in range(7):  # a lap and a half through the ring, then two batches ready
                with producer.claim(seq, timeout=5) as slot:
                    write_batch(slot, seq)
                if seq < 5:
                    with ring.acquire(timeout=5) as got:
                        assert check_batch(got) == seq
            hostile = start(descriptor_scribbler, ring.handle.path, ring.slots, seed)
            hostile.join(30)
            assert hostile.exitcode == 0
            t0 = time.monotonic()
            with pytest.raises(CorruptSegment, match="impossible"):
                ring.acquire(timeout=30)  # before: a Timeout every time, whatever the timeout
            times.append(time.monotonic() - t0)
    print(f"\n[random descriptors, ordered] 20 of 20 acquires: CorruptSegment within {max(times) * 1e3:.2f} ms")


def scribbler(path: str, seconds: float, seed: int) -> None:
    """A hostile process: overwrite random metadata words of a ring, as fast as it can."""
    ring = Ring.attach(path)
    shm = np.frombuffer(ffi.buffer(ring._base, ring.segment_bytes), dtype="<u8")
    rng = np.random.default_rng(seed)
    # Counters and slot descriptors (the close flag is left alone: once set, every call is RingClosed).
    meta_words = list(range(4096 // 8, 4096 // 8 + 32)) + list(range(DESC // 8, (DESC + ring.slots * DESC_BYTES) // 8))
    interesting = np.array([0, 1, 2, 3, 2**64 - 1, SLOT_BYTES, SLOT_BYTES + 1, 2**40, 2**63], dtype=np.uint64)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        i = meta_words[rng.integers(len(meta_words))]
        shm[i] = interesting[rng.integers(len(interesting))] if rng.random() < 0.5 else rng.integers(2**63)
    os._exit(0)


def survivor(path: str, seconds: float, conn) -> None:
    """Run producer and consumer calls against a ring being scribbled on; report outcome counts."""
    try:
        conn.send(survive(path, seconds))
    except BaseException as exc:  # noqa: BLE001 - anything but a ShmfeedError fails: report it, do not hang
        conn.send({"unexpected": repr(exc)})
    os._exit(0)


def survive(path: str, seconds: float) -> dict[str, int]:
    ring = Ring.attach(path)
    outcomes: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    seq = 0
    while time.monotonic() < deadline:
        for call in ("claim", "acquire", "info"):
            try:
                if call == "claim":
                    slot = ring.claim(seq % 64, timeout=0.01)
                    slot.memory[:8] = b"survivor"
                    slot.commit(8)
                elif call == "acquire":
                    got = ring.acquire(timeout=0.01)
                    assert got.nbytes <= ring.slot_bytes and len(got.memory) == got.nbytes
                    got.release()
                else:
                    ring.occupancy(), ring.counters(), ring.close_reason()
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except ShmfeedError as exc:
                outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
            seq += 1
    return outcomes


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_random_scribbling_on_the_metadata_never_crashes_a_ring_user(start, ordered):
    seconds = 2.0
    with Ring.create(4, SLOT_BYTES, ordered=ordered) as ring:
        parent, child = _CTX.Pipe()
        user = start(survivor, ring.handle.path, seconds, child)
        writers = [start(scribbler, ring.handle.path, seconds, seed) for seed in range(2)]
        assert parent.poll(seconds + 60), "the ring user hung"
        outcomes = parent.recv()
        user.join(10)
        for w in writers:
            w.join(10)
    assert user.exitcode == 0, f"the ring user died with {user.exitcode}"
    print(f"\n[scribbled {'ordered' if ordered else 'unordered'}] outcomes of ring calls: {outcomes}")
    assert "unexpected" not in outcomes, outcomes
    assert sum(outcomes.values()) > 100, outcomes


# ---- a named segment truncated by another process ----------------------------------------

TRUNCATED_UNDER_A_CONSUMER = """
import json, subprocess, sys
import numpy as np
from pyshmfeed import Ring
from pyshmfeed.errors import CorruptSegment, ShmfeedError

cut = sys.argv[1]
ring = Ring.create(4, 1 << 16, backing="named")
producer = Ring.attach(ring.handle)
for seq in range(3):
    with producer.claim(seq) as slot:
        slot.memory[:] = bytes([seq + 1]) * len(slot.memory)
held = ring.acquire(timeout=5)
view = held.array(np.uint8, 1 << 16)
assert int(view[0]) == 1
size = {"all": 0, "header": 4096, "counters": 8192, "slots": ring._data_offset + (1 << 16) // 2}[cut]
# Another process of this user cuts the file.
subprocess.run([sys.executable, "-c", f"import os; os.truncate({ring.handle.path!r}, {size})"], check=True)
out = {"held view": int(view[-1])}  # a page past the new end, unless only the slots were cut...
out["held view, first page"] = int(view[0])
calls = {"acquire": lambda: ring.acquire(timeout=1), "claim": lambda: producer.claim(3, timeout=1),
         "ready_slots": ring.ready_slots, "occupancy": ring.occupancy, "release": held.release}
for name, call in calls.items():
    try:
        call()
        out[name] = "ok"
    except ShmfeedError as exc:
        out[name] = f"{type(exc).__name__}: {exc}"
producer.detach()
ring.detach()
print(json.dumps(out))
"""


@pytest.mark.parametrize("cut", ["all", "header", "counters", "slots"])
def test_a_named_segment_truncated_by_another_process_is_corrupt_segment_never_sigbus(cut):
    child = subprocess.run([sys.executable, "-c", TRUNCATED_UNDER_A_CONSUMER, cut], capture_output=True,
                           text=True, timeout=120, check=False)
    assert child.returncode == 0, f"the consumer died ({child.returncode}): {child.stderr[-2000:]}"
    out = json.loads(child.stdout)
    print(f"\n[named segment cut to '{cut}'] {out}")
    assert out["held view"] == 0  # the page is gone: it reads zeros, it does not kill the process
    for call in ("acquire", "claim"):  # never hand out a slot of a cut segment
        assert out[call].startswith("CorruptSegment") and "truncated" in out[call], out[call]
    if cut != "slots":  # the descriptors and counters were cut too: nothing read from them passes
        assert all(out[c].startswith("CorruptSegment") for c in ("ready_slots", "occupancy", "release")), out


# ---- the system refuses: memfd seals, futex ------------------------------------------------

FAILING_SEALS = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
static int refuse(int fd, int cmd, void *arg, const char *name)
{
    if (cmd == F_ADD_SEALS) { errno = EPERM; return -1; }
    int (*real)(int, int, ...) = (int (*)(int, int, ...))dlsym(RTLD_NEXT, name);
    return real(fd, cmd, arg);
}
int fcntl(int fd, int cmd, ...) { va_list ap; va_start(ap, cmd); void *a = va_arg(ap, void *); va_end(ap);
                                  return refuse(fd, cmd, a, "fcntl"); }
int fcntl64(int fd, int cmd, ...) { va_list ap; va_start(ap, cmd); void *a = va_arg(ap, void *); va_end(ap);
                                    return refuse(fd, cmd, a, "fcntl64"); }
"""

NO_FUTEX = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <sys/syscall.h>
static long attempts;
long futex_attempts(void) { return attempts; }
long syscall(long n, ...)
{
    va_list ap; va_start(ap, n);
    long a[6]; for (int i = 0; i < 6; i++) a[i] = va_arg(ap, long);
    va_end(ap);
    if (n == SYS_futex) { __atomic_add_fetch(&attempts, 1, __ATOMIC_RELAXED); errno = ENOSYS; return -1; }
    long (*real)(long, ...) = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
    return real(n, a[0], a[1], a[2], a[3], a[4], a[5]);
}
"""


def build_shim(tmp_path, name: str, source: str) -> str:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("needs a C compiler to build the LD_PRELOAD shim")
    (tmp_path / f"{name}.c").write_text(source)
    shim = tmp_path / f"{name}.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(shim), str(tmp_path / f"{name}.c"), "-ldl"], check=True)
    return str(shim)


def test_a_memfd_that_cannot_be_sealed_is_refused_not_run_unprotected(tmp_path):
    shim = build_shim(tmp_path, "refuse_seals", FAILING_SEALS)
    code = ("from pyshmfeed import Ring, SegmentError\n"
            "try:\n    Ring.create(2, 64)\n    print('CREATED')\n"
            "except SegmentError as exc:\n    print('REFUSED', exc)\n"
            "Ring.create(2, 64, backing='named').detach()\nprint('NAMED OK')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, LD_PRELOAD=shim), check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("REFUSED") and "sealing the memfd" in out.stdout, out.stdout
    assert "NAMED OK" in out.stdout


WITHOUT_FUTEX = """
import ctypes, sys, threading, time
from pyshmfeed import Ring, Timeout
shim = ctypes.CDLL(sys.argv[1])
shim.futex_attempts.restype = ctypes.c_long
with Ring.create(2, 64) as ring:
    t0 = time.monotonic()
    try:
        ring.acquire(timeout=0.5)
    except Timeout:
        pass
    waited = time.monotonic() - t0
    attempts = shim.futex_attempts()
    # Wake-ups still happen (by polling): a batch committed by another thread is taken.
    threading.Timer(0.2, lambda: ring.claim(0).commit(1)).start()
    got = ring.acquire(timeout=10)
    print(attempts, round(waited, 3), got.seq, got.nbytes)
"""


def test_without_futex_a_wait_polls_with_short_sleeps_instead_of_spinning(tmp_path):
    shim = build_shim(tmp_path, "no_futex", NO_FUTEX)
    out = subprocess.run([sys.executable, "-c", WITHOUT_FUTEX, shim], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, LD_PRELOAD=shim), check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    attempts, waited, seq, nbytes = out.stdout.split()
    print(f"\n[futex refused] a {waited} s wait made {attempts} futex attempts")
    # Each attempt after the first is followed by a sleep of up to 0.2 ms, so 0.5 s allow some
    # thousands, whatever the machine's load; a spin makes millions.
    assert int(attempts) <= 5, "every wait retried the refused futex"
    assert (int(seq), int(nbytes)) == (0, 1)


# ---- too little memory ---------------------------------------------------------------------


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable")


def test_ring_larger_than_memory_available_is_no_space_with_the_exact_numbers():
    slot_bytes = 2**39  # 512 GiB in each of 2 slots
    needed = ffi.new("uint64_t *")
    assert lib.shmfeed_ring_size_for(2, slot_bytes, needed) == 0
    with pytest.raises(NoSpace) as info:
        Ring.create(2, slot_bytes)
    got_needed, got_available = map(int, re.search(r"needs (\d+) bytes.*only (\d+) bytes are available",
                                                   str(info.value)).groups())
    assert got_needed == needed[0]
    assert abs(got_available - mem_available()) < 0.1 * mem_available()


SMALL_TMPFS = textwrap.dedent("""
    import subprocess, sys, mmap
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", "/dev/shm"], check=True)
    from pyshmfeed import Ring, NoSpace
    first = Ring.create(1, 3 * 2**20, backing="named")        # fits: 3 MiB of 4
    mem = first.slot_buffer(0)
    mem[:] = b"x" * len(mem)                                  # every page is really there: no SIGBUS
    try:
        Ring.create(1, 2 * 2**20, backing="named")            # does not fit beside the first
    except NoSpace as exc:
        print("NOSPACE", exc)
    first.detach()
    second = Ring.create(1, 2 * 2**20, backing="named")       # fits once the first is gone
    second.detach()
    print("OK")
""")


def test_named_ring_in_a_small_tmpfs_is_no_space_at_creation_never_sigbus_later():
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount a private small tmpfs on /dev/shm")
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode().strip()}")
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", SMALL_TMPFS],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    nospace = [line for line in out.stdout.splitlines() if line.startswith("NOSPACE")]
    assert nospace and "OK" in out.stdout.splitlines()
    needed, available = map(int, re.search(r"needs (\d+) bytes.*only (\d+) bytes are available",
                                           nospace[0]).groups())
    assert needed > available and available <= 2**20  # 4 MiB mount - 3 MiB ring - headers


IN_A_SMALL_CGROUP = textwrap.dedent("""
    import os, sys
    with open(sys.argv[1], "w") as f:                        # move this process into the cgroup
        f.write(str(os.getpid()))
    import numpy as np
    from pyshmfeed import Ring, NoSpace
    fits = Ring.create(1, 64 * 2**20)                         # 64 MiB of a 256 MiB limit
    np.frombuffer(fits.slot_buffer(0), dtype=np.uint8)[:] = 1  # every page really there
    try:
        Ring.create(1, 512 * 2**20)                           # past the limit: refused, not OOM-killed
    except NoSpace as exc:
        print("NOSPACE", exc)
    fits.detach()
""")


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def small_memory_cgroup(limit: int):
    """A fresh memory cgroup (v1 or v2) limited to ``limit`` bytes: (its procs file, its dir), or skip."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a memory cgroup")
    name = f"pyshmfeed-test-{os.getpid()}"
    v1, v2 = "/sys/fs/cgroup/memory", "/sys/fs/cgroup"
    try:
        if os.path.isfile(os.path.join(v1, "memory.limit_in_bytes")):
            path = os.path.join(v1, name)
            os.mkdir(path)
            with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
                f.write(str(limit))
        elif "memory" in read_text(os.path.join(v2, "cgroup.subtree_control")).split():
            path = os.path.join(v2, name)
            os.mkdir(path)
            with open(os.path.join(path, "memory.max"), "w") as f:
                f.write(str(limit))
        else:
            pytest.skip("no writable memory cgroup controller (v1 or v2) here")
    except OSError as exc:
        pytest.skip(f"cannot make a memory cgroup here: {exc}")
    return os.path.join(path, "cgroup.procs"), path


def test_ring_past_the_memory_cgroup_limit_is_no_space_not_an_oom_kill():
    procs, path = small_memory_cgroup(256 * 2**20)
    try:
        out = subprocess.run([sys.executable, "-c", IN_A_SMALL_CGROUP, procs], capture_output=True, text=True,
                             timeout=60, check=False)
    finally:
        os.rmdir(path)
    assert out.returncode == 0, f"the creator died ({out.returncode}): {out.stderr[-2000:]}"
    needed, available = map(int, re.search(r"needs (\d+) bytes.*only (\d+) bytes are available",
                                           out.stdout).groups())
    assert needed > 512 * 2**20 and available < 256 * 2**20 - 64 * 2**20


# ---- security -----------------------------------------------------------------------------

OTHER_USER = 65534  # nobody

def attempts_as_other_user(path: str) -> list[str]:
    """Fork, drop to another uid in the child, try to read and to attach ``path``; what happened.

    A fork rather than a new interpreter: the other user may not be able to read this
    interpreter's files, and what is tested is the segment's protection, not theirs.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls and the ring library, then _exit
        outcome = []
        try:
            os.setgroups([])
            os.setgid(OTHER_USER)
            os.setuid(OTHER_USER)
            outcome.append(f"uid={os.getuid()},{os.geteuid()}")
            try:
                os.close(os.open(path, os.O_RDONLY))
                outcome.append("READABLE")
            except PermissionError:
                outcome.append("NOT-READABLE")
            try:
                Ring.attach(path)
                outcome.append("ATTACHED")
            except (SegmentPermissionError, SegmentNotFound) as exc:
                outcome.append(f"REFUSED:{type(exc).__name__}")
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
            outcome.append(f"ERROR:{exc!r}")
        os.write(write_end, " ".join(outcome).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        result = f.read().decode().split()
    os.waitpid(pid, 0)
    return result


@pytest.mark.parametrize("backing", ["memfd", "named"])
def test_another_user_can_neither_read_nor_attach_a_segment(backing, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user in a child")
    monkeypatch.setenv("PYSHMFEED_REGISTRY_DIR", "/nonexistent")  # the child would not record anyway
    with Ring.create(2, 256, backing=backing) as ring:
        outcome = attempts_as_other_user(ring.handle.path)
    assert outcome[0] == f"uid={OTHER_USER},{OTHER_USER}", outcome
    assert "NOT-READABLE" in outcome and any(o.startswith("REFUSED:") for o in outcome), outcome


def test_named_segments_are_private_whatever_the_umask():
    old = os.umask(0)
    try:
        with Ring.create(1, 64, backing="named") as ring:
            st = os.stat(ring.handle.path)
    finally:
        os.umask(old)
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.getuid()


def test_named_segment_names_carry_128_random_bits():
    names = []
    for _ in range(200):
        with Ring.create(1, 64, backing="named") as ring:
            names.append(os.path.basename(ring.handle.path))
    randoms = [re.fullmatch(rf"pyshmfeed-{os.getuid()}-([0-9a-f]{{32}})", n).group(1) for n in names]
    assert len(set(randoms)) == len(randoms)
    # Every hex digit position varies: nothing is a counter, a pid or a time.
    assert all(len({r[k] for r in randoms}) >= 8 for k in range(32))


FIXED_GETRANDOM = r"""
#include <string.h>
#include <sys/types.h>
ssize_t getrandom(void *buf, size_t n, unsigned int flags) { memset(buf, 0x41, n); return (ssize_t)n; }
"""


def test_a_planted_segment_with_the_chosen_name_is_an_error_not_reused(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("needs a C compiler to build the getrandom() shim that makes the name predictable")
    shim = tmp_path / "fixed_getrandom.so"
    (tmp_path / "shim.c").write_text(FIXED_GETRANDOM)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(shim), str(tmp_path / "shim.c")], check=True)
    planted = f"{SHM}/pyshmfeed-{os.getuid()}-{'41' * 16}"
    with open(planted, "wb") as f:
        f.write(b"planted by someone else")
    if os.geteuid() == 0:
        os.chown(planted, OTHER_USER, OTHER_USER)
    try:
        code = ("from pyshmfeed import Ring, SegmentPermissionError\n"
                "try:\n    Ring.create(1, 64, backing='named')\n    print('REUSED')\n"
                "except SegmentPermissionError as exc:\n    print('REFUSED', exc)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, LD_PRELOAD=str(shim)), check=False)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("REFUSED") and planted.split("/")[-1] in out.stdout, out.stdout
        with open(planted, "rb") as f:
            assert f.read() == b"planted by someone else"
    finally:
        os.unlink(planted)
