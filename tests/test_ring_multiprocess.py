"""Real producer processes writing into one ring: every batch exactly once, intact, in order when ordered.

Producers are separate processes (forkserver, so each is a fresh interpreter
that attaches through the pickled handle). Each batch carries its sequence
number, its length and a CRC of a body derived from the sequence, so the
consumer can tell a torn, duplicated, misplaced or stale batch from a good one.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import struct
import time
import zlib

import numpy as np
import pytest

from pyshmfeed import Ring, RingHandle
from pyshmfeed.errors import RingClosed, Timeout

HEADER = struct.Struct("<QII")  # seq, body length, crc32 of the body
SLOT_BYTES = 4096

_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["numpy", "pyshmfeed"])


def body_for(seq: int) -> bytes:
    """A body whose length and bytes both depend on seq."""
    n = 1 + (seq * 7919) % (SLOT_BYTES - HEADER.size)
    return (np.arange(n, dtype=np.uint32) * 2654435761 + seq).astype(np.uint8).tobytes()


def write_batch(slot, seq: int) -> None:
    body = body_for(seq)
    mem = slot.memory
    HEADER.pack_into(mem, 0, seq, len(body), zlib.crc32(body))
    mem[HEADER.size: HEADER.size + len(body)] = body
    slot.commit(HEADER.size + len(body))


def check_batch(got) -> int:
    """Verify one acquired batch in place; return its sequence."""
    seq, n, crc = HEADER.unpack_from(got.memory, 0)
    assert seq == got.seq, f"slot says batch {got.seq}, payload says {seq}"
    assert got.nbytes == HEADER.size + n
    body = got.memory[HEADER.size: HEADER.size + n]
    assert zlib.crc32(body) == crc, f"batch {seq}: torn payload"
    assert body == body_for(seq), f"batch {seq}: wrong bytes"
    return seq


def producer(handle: RingHandle, seqs: list[int]) -> None:
    with Ring.attach(handle) as ring:
        for seq in seqs:
            write_batch(ring.claim(seq, timeout=60), seq)


# `start` (conftest.py) starts child processes and kills leftovers after each test.


def consume_all(ring: Ring, count: int, producers) -> list[int]:
    """Acquire `count` batches, failing fast (not after the suite timeout) if a producer died."""
    seqs: list[int] = []
    all_exited = False
    while len(seqs) < count:
        try:
            got = ring.acquire(timeout=0.5)
        except Timeout:
            # Checked after a timed-out wait that began once every producer had exited:
            # everything they committed was visible during that wait.
            if all_exited:
                pytest.fail(f"every producer has exited but only {len(seqs)} of {count} batches arrived")
            codes = [p.exitcode for p in producers]
            assert all(c in (None, 0) for c in codes), f"producers exited {codes} after {len(seqs)} batches"
            all_exited = None not in codes
            continue
        with got:
            seqs.append(check_batch(got))
    return seqs


def join_all(producers) -> None:
    for p in producers:
        p.join(60)
    assert [p.exitcode for p in producers] == [0] * len(producers)


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
@pytest.mark.parametrize("slots, n_producers, n_batches", [(8, 3, 5000), (1, 2, 1000)])
def test_every_batch_from_many_producers_arrives_once_intact(start, ordered, slots, n_producers, n_batches):
    with Ring.create(slots, SLOT_BYTES, ordered=ordered) as ring:
        # Interleaved shares: in ordered mode each producer waits on the others' slots.
        producers = [start(producer, ring.handle, list(range(w, n_batches, n_producers)))
                     for w in range(n_producers)]
        seqs = consume_all(ring, n_batches, producers)
        join_all(producers)
        assert ring.try_acquire() is None
        counters = ring.counters()
    if ordered:
        assert seqs == list(range(n_batches))
    else:
        assert sorted(seqs) == list(range(n_batches))
    assert counters["commits"] == counters["acquires"] == counters["releases"] == n_batches
    assert counters["claims"] == n_batches
    assert counters["stale_commits"] == counters["aborts"] == 0


def unnumbered_producer(handle: RingHandle, count: int) -> None:
    """Claims without naming a batch: the ring numbers them (unordered rings only)."""
    with Ring.attach(handle) as ring:
        for _ in range(count):
            slot = ring.claim(timeout=60)
            write_batch(slot, slot.seq)


def test_unordered_claims_without_a_seq_get_distinct_seqs_across_processes(start):
    # The sequence comes from a counter in the segment, not from each process: two producers
    # (and the creator, claiming too) never number two batches alike.
    n_each = 300
    with Ring.create(4, SLOT_BYTES, ordered=False) as ring:
        producers = [start(unnumbered_producer, ring.handle, n_each) for _ in range(2)]
        seqs = []
        for _ in range(20):
            slot = ring.claim(timeout=60)
            write_batch(slot, slot.seq)
            with ring.acquire(timeout=60) as got:  # this batch or a producer's
                seqs.append(check_batch(got))
        seqs += consume_all(ring, 2 * n_each, producers)
        join_all(producers)
        assert ring.try_acquire() is None
    assert sorted(seqs) == list(range(2 * n_each + 20))


def test_ordered_delivery_holds_when_producers_own_contiguous_ranges(start):
    # Producer 1 can only run `slots` batches ahead of producer 0's last one: the ring backpressures it.
    n, workers = 1200, 3
    with Ring.create(4, SLOT_BYTES) as ring:
        chunk = n // workers
        producers = [start(producer, ring.handle, list(range(w * chunk, (w + 1) * chunk)))
                     for w in range(workers)]
        seqs = consume_all(ring, n, producers)
        join_all(producers)
    assert seqs == list(range(n))


def blocked_producer(handle: RingHandle, seq: int, expected_reason: str, attached) -> None:
    with Ring.attach(handle) as ring:
        attached.release()
        try:
            ring.claim(seq)  # no timeout: only close ends this wait
        except RingClosed as exc:
            os._exit(0 if exc.reason == expected_reason else 3)
    os._exit(4)


def test_close_wakes_every_producer_process_blocked_in_claim(start):
    with Ring.create(2, SLOT_BYTES) as ring:
        for seq in range(2):
            write_batch(ring.claim(seq), seq)  # full: every further claim waits for the consumer
        attached = _CTX.Semaphore(0)
        producers = [start(blocked_producer, ring.handle, seq, "consumer stopped", attached)
                     for seq in (2, 3, 4)]
        for _ in producers:
            assert attached.acquire(timeout=60)
        time.sleep(0.3)  # let them fall asleep; closing earlier would pass too, just test less
        assert [p.exitcode for p in producers] == [None] * 3
        ring.close("consumer stopped")
        join_all(producers)


def claim_and_hang(handle: RingHandle, seq: int, owner: int, claimed) -> None:
    with Ring.attach(handle, owner=owner) as ring:
        slot = ring.claim(seq, timeout=60)
        slot.memory[:4] = b"torn"  # half a batch, never committed
        claimed.set()
        signal.pause()


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_batches_of_a_killed_producer_are_reclaimed_and_delivered_once(start, ordered):
    n, dead_owner = 200, 0xDEAD
    with Ring.create(4, SLOT_BYTES, ordered=ordered) as ring:
        claimed = _CTX.Event()
        victim = start(claim_and_hang, ring.handle, 0, dead_owner, claimed)
        assert claimed.wait(60)
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(60)
        reissued = ring.reclaim(dead_owner)
        assert reissued == [0]
        survivors = [start(producer, ring.handle, reissued + list(range(1, n, 2))),
                     start(producer, ring.handle, list(range(2, n, 2)))]
        seqs = consume_all(ring, n, survivors)
        join_all(survivors)
        assert ring.counters()["reclaims"] == 1
    assert (seqs if ordered else sorted(seqs)) == list(range(n))
