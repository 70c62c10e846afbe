"""Generated inputs: attach must survive any header, and the slot protocol must match a reference model.

1. Header validation: random files, and valid segments with flipped bytes,
   fields set to random values or cut short, are attached. Each attach either
   raises ``CorruptSegment`` (or its subclass) or yields a ring whose geometry
   fits inside the file; it never crashes the process.
2. The slot state machine: claim/commit/abort/acquire/release in random order
   (one process, zero timeouts) against a plain-Python model of which batches
   are free, claimed, ready, acquired or done, checking every return value,
   every exception and the delivery order.
"""

from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pyshmfeed import Ring
from pyshmfeed._ffi import ffi
from pyshmfeed.errors import (
    CorruptSegment,
    PayloadTooLarge,
    RingClosed,
    SlotStateError,
    StaleClaim,
    WouldBlock,
)
from pyshmfeed.ring import SEGMENT_FIELDS

PAGE = 4096
MAX_SLOTS = 65536
MAX_SLOT_BYTES = 1 << 40

# ---- 1. header validation ------------------------------------------------------------

# (offset, size) of every header field before the close flag, from the C core's layout table (csrc/layout.h).
CLOSE_FLAG_OFFSET = SEGMENT_FIELDS["header.closed"][0]
HEADER_FIELDS = sorted(field for name, field in SEGMENT_FIELDS.items()
                       if name.startswith("header.") and field[0] < CLOSE_FLAG_OFFSET)
DESC_OFFSET, DESC_BYTES = SEGMENT_FIELDS["desc"]


def _valid_segment(slots: int, slot_bytes: int, ordered: bool) -> bytes:
    with Ring.create(slots, slot_bytes, ordered=ordered) as ring:
        return bytes(ffi.buffer(ring._base, ring.segment_bytes))


VALID_SEGMENTS = [_valid_segment(1, 1, True), _valid_segment(3, 5000, False)]
_TMP = tempfile.TemporaryDirectory(prefix="pyshmfeed-header-fuzz-")


def attach_must_not_crash(data: bytes) -> None:
    """Attach `data` as a segment file: it is either refused as corrupt or usable within its bounds."""
    path = os.path.join(_TMP.name, "segment")
    with open(path, "wb") as f:
        f.write(data)
    try:
        ring = Ring.attach(path)
    except CorruptSegment as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("accepted")
    with ring:
        # Whatever it accepted must describe memory that exists.
        assert 1 <= ring.slots <= MAX_SLOTS and 1 <= ring.slot_bytes <= MAX_SLOT_BYTES
        assert ring.slot_bytes <= ring.slot_stride and ring.slot_stride % PAGE == 0
        assert ring.data_address - int(ffi.cast("uintptr_t", ring._base)) + ring.data_nbytes <= len(data)
        assert ring.segment_bytes == len(data)
        # And reading its state through the API stays inside the mapping.
        ring.counters()
        ring.occupancy()
        for slot in range(ring.slots):
            ring.slot_info(slot)
        bytes(ring.slot_buffer(ring.slots - 1))


def _set_field(data: bytearray, field: tuple[int, int], value: int) -> None:
    offset, size = field
    data[offset: offset + size] = (value % (1 << (8 * size))).to_bytes(size, "little")


fuzz_settings = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz_settings
@given(data=st.binary(min_size=0, max_size=3 * PAGE))
def test_attach_survives_random_files(data):
    attach_must_not_crash(data)


@fuzz_settings
@given(base=st.sampled_from(VALID_SEGMENTS), rest=st.binary(min_size=0, max_size=3 * PAGE),
       keep=st.integers(8, 96))
def test_attach_survives_a_valid_header_prefix_followed_by_garbage(base, rest, keep):
    # Keeping the magic (and maybe more fields) gets the garbage past the first check.
    attach_must_not_crash(base[:keep] + rest)


@fuzz_settings
@given(base=st.sampled_from(VALID_SEGMENTS),
       flips=st.lists(st.tuples(st.one_of(st.integers(0, 95), st.integers(0, 2 * PAGE - 1)), st.integers(0, 255)),
                     min_size=1, max_size=8))
def test_attach_survives_flipped_bytes_in_a_valid_segment(base, flips):
    data = bytearray(base)
    for offset, value in flips:
        # Close flag 1 means "a closer is writing": readers spin on it; leave that state out.
        assume(not (CLOSE_FLAG_OFFSET <= offset < CLOSE_FLAG_OFFSET + 4))
        data[offset] = value
    attach_must_not_crash(bytes(data))


interesting_values = st.one_of(
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, 1, PAGE - 1, PAGE, PAGE + 1, 8192, 2**31, 2**32 - 1, 2**32, 2**40, 2**40 + 1,
                     2**46, 2**63, 2**64 - 1, 2**64 - PAGE, MAX_SLOTS, MAX_SLOTS + 1]),
)


@fuzz_settings
@given(base=st.sampled_from(VALID_SEGMENTS),
       changes=st.lists(st.tuples(st.sampled_from(HEADER_FIELDS), interesting_values), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 6 * PAGE)))
def test_attach_survives_header_fields_set_to_arbitrary_values(base, changes, cut):
    data = bytearray(base)
    for field, value in changes:
        _set_field(data, field, value)
    if cut is not None:
        del data[cut:]
    attach_must_not_crash(bytes(data))


@fuzz_settings
@given(base=st.sampled_from(VALID_SEGMENTS), slots=st.integers(1, 2 * MAX_SLOTS),
       slot_bytes=st.integers(1, 2 * MAX_SLOT_BYTES), extra=st.integers(-PAGE, PAGE))
def test_attach_survives_a_self_consistent_header_of_any_size(base, slots, slot_bytes, extra):
    # Every geometry field agrees with the others, so only the bounds checks stand in the way.
    stride = -(-slot_bytes // PAGE) * PAGE
    data_offset = -(-(DESC_OFFSET + slots * DESC_BYTES) // PAGE) * PAGE
    data = bytearray(base)
    for name, value in [("slot_count", slots), ("slot_bytes", slot_bytes), ("slot_stride", stride),
                        ("data_offset", data_offset), ("segment_bytes", data_offset + slots * stride + extra)]:
        _set_field(data, SEGMENT_FIELDS[f"header.{name}"], value)
    attach_must_not_crash(bytes(data))


# ---- 2. the slot state machine against a reference model ---------------------------------

SLOTS = 3
SLOT_BYTES = 64


def payload(seq: int, n: int) -> bytes:
    return bytes((seq * 37 + i * 11) & 0xFF for i in range(n))


class SlotProtocol(RuleBasedStateMachine):
    """One ring, one process, every call with a zero timeout, checked against a model.

    Model: `state[seq]` is "claimed", "ready", "acquired" or "done" (absent: never
    claimed, or aborted). Ordered: batch s lives in slot s % SLOTS, is claimable
    once every earlier batch of that slot is done, and is delivered in sequence
    order. Unordered: any free slot, delivered in commit order.
    """

    ORDERED = True

    def __init__(self) -> None:
        super().__init__()
        self.ring = Ring.create(SLOTS, SLOT_BYTES, ordered=self.ORDERED)
        self.state: dict[int, str] = {}
        self.claims: dict[int, object] = {}     # seq -> ProducerSlot
        self.held: dict[int, object] = {}       # seq -> ConsumerSlot
        self.lengths: dict[int, int] = {}
        self.slot_of: dict[int, int] = {}       # seq -> slot, while claimed/ready/acquired
        self.finished: list[object] = []        # committed or aborted ProducerSlots
        self.released: list[object] = []        # released ConsumerSlots
        self.commit_order: list[int] = []       # unordered: ready batches, oldest commit first
        self.head = 0                           # ordered: next batch to deliver
        self.next_seq = 0                       # unordered: next batch number to hand out
        self.closed = False
        self.counts = dict.fromkeys(["claims", "commits", "aborts", "acquires", "releases"], 0)

    def teardown(self) -> None:
        self.ring.detach()

    # -- model helpers --

    def in_use(self) -> int:
        return sum(1 for s in self.state.values() if s != "done")

    def next_deliverable(self) -> int | None:
        if self.ORDERED:
            return self.head if self.state.get(self.head) == "ready" else None
        return self.commit_order[0] if self.commit_order else None

    def expected_claim(self, seq: int) -> str:
        if self.closed:
            return "closed"
        if self.ORDERED:
            current = self.state.get(seq)
            if current in ("ready", "acquired", "done"):
                return "stale"
            if current == "claimed":
                return "block"
            lap_head = seq % SLOTS
            while self.state.get(lap_head) == "done":
                lap_head += SLOTS
            return "ok" if lap_head == seq else "block"
        return "ok" if self.in_use() < SLOTS else "block"

    # -- producer rules --

    @rule(offset=st.integers(0, 3 * SLOTS))
    def claim(self, offset):
        # Ordered: any batch near the consumer's position, behind it (stale), at it or laps ahead.
        seq = max(self.head - SLOTS, 0) + offset if self.ORDERED else self.next_seq
        self._claim(seq)

    @precondition(lambda self: self.ORDERED)
    @rule()
    def claim_the_lowest_unclaimed_batch(self):
        seq = 0
        while seq in self.state:
            seq += 1
        self._claim(seq)

    def _claim(self, seq):
        expected = self.expected_claim(seq)
        event(f"claim: {expected}")
        if expected == "stale":
            with pytest.raises(StaleClaim):
                self.ring.claim(seq, timeout=0)
        elif expected == "block":
            with pytest.raises(WouldBlock):
                self.ring.claim(seq, timeout=0)
        elif expected == "closed":
            with pytest.raises(RingClosed):
                self.ring.claim(seq, timeout=0)
        else:
            slot = self.ring.claim(seq, timeout=0)
            assert slot.seq == seq
            if self.ORDERED:
                assert slot.slot == seq % SLOTS
            assert slot.slot not in self.slot_of.values(), "claimed a slot that is still in use"
            self.state[seq] = "claimed"
            self.claims[seq] = slot
            self.slot_of[seq] = slot.slot
            self.counts["claims"] += 1
            self.next_seq += 1

    @precondition(lambda self: self.claims)
    @rule(data=st.data(), n=st.integers(0, SLOT_BYTES + 3))
    def commit(self, data, n):
        seq = data.draw(st.sampled_from(sorted(self.claims)), label="seq")
        slot = self.claims[seq]
        body = payload(seq, min(n, SLOT_BYTES))
        slot.memory[: len(body)] = body
        if n > SLOT_BYTES:
            with pytest.raises(PayloadTooLarge):
                slot.commit(n)
            assert self.ring.slot_info(slot.slot)["state"] == "claimed"  # still ours
            return
        slot.commit(n)
        del self.claims[seq]
        self.finished.append(slot)
        self.state[seq] = "ready"
        self.lengths[seq] = n
        self.commit_order.append(seq)
        self.counts["commits"] += 1

    @precondition(lambda self: self.claims)
    @rule(data=st.data())
    def abort(self, data):
        seq = data.draw(st.sampled_from(sorted(self.claims)), label="seq")
        slot = self.claims.pop(seq)
        slot.abort()
        self.finished.append(slot)
        del self.state[seq]
        del self.slot_of[seq]
        self.counts["aborts"] += 1

    @precondition(lambda self: self.finished)
    @rule(data=st.data(), action=st.sampled_from(["commit", "abort", "memory"]))
    def reuse_a_finished_claim(self, data, action):
        slot = data.draw(st.sampled_from(self.finished), label="claim")
        with pytest.raises(SlotStateError):
            if action == "commit":
                slot.commit(0)
            elif action == "abort":
                slot.abort()
            else:
                _ = slot.memory

    # -- consumer rules --

    @rule()
    def acquire(self):
        expected = self.next_deliverable()
        event("acquire: " + ("nothing" if expected is None else "delivers"))
        if expected is None:
            with pytest.raises(RingClosed if self.closed else WouldBlock):
                self.ring.acquire(timeout=0)
            return
        got = self.ring.acquire(timeout=0)
        assert got.seq == expected, f"delivered batch {got.seq}, the model expects {expected}"
        assert got.slot == self.slot_of[expected]
        assert got.nbytes == self.lengths[expected]
        assert bytes(got.memory) == payload(expected, self.lengths[expected])
        self.state[expected] = "acquired"
        self.held[expected] = got
        self.commit_order.remove(expected)
        if self.ORDERED:
            self.head += 1
        self.counts["acquires"] += 1

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data):
        seq = data.draw(st.sampled_from(sorted(self.held)), label="seq")
        got = self.held.pop(seq)
        got.release()
        self.released.append(got)
        self.state[seq] = "done"
        del self.slot_of[seq]
        self.counts["releases"] += 1

    @precondition(lambda self: self.released)
    @rule(data=st.data(), action=st.sampled_from(["release", "memory", "array"]))
    def reuse_a_released_batch(self, data, action):
        got = data.draw(st.sampled_from(self.released), label="batch")
        with pytest.raises(SlotStateError):
            if action == "release":
                got.release()
            elif action == "memory":
                _ = got.memory
            else:
                got.array("uint8", 0)

    @precondition(lambda self: not self.closed and self.counts["releases"] >= 3)  # after some traffic
    @rule(reason=st.text(max_size=20).filter(lambda s: "\x00" not in s))
    def close(self, reason):
        self.ring.close(reason)
        self.closed = True
        assert self.ring.close_reason()[1] == reason

    # -- invariants --

    @invariant()
    def occupancy_matches_the_model(self):
        want = {"free": SLOTS, "claimed": 0, "ready": 0, "acquired": 0}
        for s in self.state.values():
            if s != "done":
                want[s] += 1
                want["free"] -= 1
        assert self.ring.occupancy() == want

    @invariant()
    def counters_match_the_model(self):
        counters = self.ring.counters()
        assert {k: counters[k] for k in self.counts} == self.counts
        assert counters["stale_commits"] == counters["reclaims"] == 0
        if self.ORDERED:
            assert counters["consumer_head"] == self.head


class UnorderedSlotProtocol(SlotProtocol):
    ORDERED = False


machine_settings = settings(max_examples=150, stateful_step_count=50, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])
TestOrderedSlotProtocol = SlotProtocol.TestCase
TestOrderedSlotProtocol.settings = machine_settings
TestUnorderedSlotProtocol = UnorderedSlotProtocol.TestCase
TestUnorderedSlotProtocol.settings = machine_settings


def test_slot_protocol_model_notices_a_transition_it_did_not_make():
    # The model is an oracle only if it can disagree with the ring: change the ring behind its back.
    machine = SlotProtocol()
    try:
        machine.occupancy_matches_the_model()
        machine.ring.claim(0).commit(1)  # behind the model's back
        with pytest.raises(AssertionError):
            machine.occupancy_matches_the_model()
        with pytest.raises(AssertionError):
            machine.counters_match_the_model()
    finally:
        machine.teardown()
