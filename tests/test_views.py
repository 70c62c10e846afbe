"""Debug views (``PYSHMFEED_DEBUG_VIEWS=1``, ``debug_views=True``): a batch read after its slot was
released raises ``StaleView`` instead of silently returning another batch's bytes; off, nothing changes."""

from __future__ import annotations

import numpy as np
import pytest

from pyshmfeed import BatchSpec, Ring
from pyshmfeed.errors import StaleView
from pyshmfeed.spec import SlotLayout
from pyshmfeed.views import DEBUG_ENV, POISON, GuardedArray

SPEC = BatchSpec(x=((4, 8), "float32"), y=((4,), "int64"))


def produce(ring: Ring, layout_of, seq: int) -> None:
    with ring.claim(seq, timeout=5) as slot:
        layout = layout_of(slot.slot)
        x, y = layout.writer_arrays()
        x[:] = seq
        y[:] = seq
        slot.set_commit_bytes(layout.write_header(index=seq, epoch=0, seq=seq, worker=0, shapes=[(4, 8), (4,)]))


def consume(ring: Ring, layout_of):
    got = ring.acquire(timeout=5)
    _, views, _ = layout_of(got.slot).read(got.nbytes)
    return got, views


def layouts(ring: Ring, debug_views: bool | None = None):
    cache = {}

    def layout_of(slot: int) -> SlotLayout:
        if slot not in cache:
            cache[slot] = SlotLayout(SPEC, ring.slot_buffer(slot), ring.slot_bytes, debug_views=debug_views)
        return cache[slot]
    return layout_of


@pytest.mark.parametrize("slots", [1, 2], ids=["slot-reused", "slot-poisoned"])
def test_a_batch_kept_past_its_release_raises_stale_view_in_debug_mode(slots):
    with Ring.create(slots, SPEC.slot_bytes, debug_views=True) as ring:
        layout_of = layouts(ring, debug_views=True)
        produce(ring, layout_of, 0)
        got, (x, y) = consume(ring, layout_of)
        row = x[1]  # a view of a view: guarded too
        assert isinstance(x, GuardedArray) and float(x.sum()) == 0.0 and int(y[3]) == 0
        kept = x.copy()  # a copy owns its bytes: never stale
        got.release()
        produce(ring, layout_of, 1)  # with one slot, batch 1 now lives where batch 0 did
        reads = {"index": lambda: x[0, 0], "sum": lambda: x.sum(), "ufunc": lambda: np.add(y, 1),
                 "function": lambda: np.mean(x), "view of a view": lambda: row[0], "repr": lambda: repr(y),
                 "tolist": lambda: y.tolist(), "copy": lambda: x.copy(), "float": lambda: float(y[0]),
                 "compare": lambda: x == 1, "iterate": lambda: list(y)}
        for what, read in reads.items():
            with pytest.raises(StaleView, match="batch index 0"):
                read()
                pytest.fail(f"{what}: a stale view was read")
        assert float(kept.sum()) == 0.0
        got1, (x1, _) = consume(ring, layout_of)
        assert float(x1.sum()) == 32.0  # the current batch reads normally
        got1.release()


def test_without_debug_mode_a_kept_batch_silently_shows_the_next_one():
    # What debug mode exists for: the same mistake, undetected.
    with Ring.create(1, SPEC.slot_bytes, debug_views=False) as ring:
        layout_of = layouts(ring, debug_views=False)
        produce(ring, layout_of, 0)
        got, (x, _) = consume(ring, layout_of)
        assert type(x) is np.ndarray
        got.release()
        produce(ring, layout_of, 1)
        assert float(x.sum()) == 32.0  # batch 1's bytes, read through batch 0's view


def test_debug_mode_poisons_a_released_slot_and_guards_consumer_slot_arrays():
    with Ring.create(2, 4096, debug_views=True) as ring:
        with ring.claim(0) as slot:
            slot.memory[:] = b"\x01" * 4096
        got = ring.acquire(timeout=5)
        array, raw = got.array(np.uint8, 16), got.memory  # a memoryview cannot be guarded...
        assert int(array.sum()) == 16
        got.release()
        with pytest.raises(StaleView, match="batch 0"):
            array.sum()
        assert set(bytes(raw)) == {POISON}  # ...but reads the poison, not a plausible batch


def test_the_environment_variable_turns_debug_mode_on(monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    with Ring.create(1, SPEC.slot_bytes) as ring:
        assert ring.debug_views
        layout_of = layouts(ring)  # debug_views=None: the environment decides
        produce(ring, layout_of, 0)
        got, (x, _) = consume(ring, layout_of)
        got.release()
        with pytest.raises(StaleView):
            x.sum()
    monkeypatch.setenv(DEBUG_ENV, "0")
    with Ring.create(1, 64) as ring:
        assert not ring.debug_views
