"""The consumer thread (pyshmfeed.stage) over a real feed: depth, releases, lifetimes, shutdown, errors.

Outcomes are asserted, never timings: how many batches were ever staged
ahead, how many ring slots were ever acquired at once (read from the ring
itself), which slots were released and when relative to the loop, and that
the next epoch of the same feed runs cleanly after every way of stopping.
Asynchronous copies (CUDA) are stood in for by an event the test completes
by hand, so the release-after-event logic is exercised without a GPU.
"""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest

from pyshmfeed import BatchSpec, Feed
from pyshmfeed.errors import ProducerError, RingClosed, SlotStateError
from pyshmfeed.stage import NumpyTarget, Stage, _Staged, numpy_target, torch_cpu_target

pytestmark = pytest.mark.timeout(90)

SPEC = BatchSpec(x=((8, 16), "float32"), i=((1,), "int64"))
LENGTH = 40
POISON = -1.0


def fill_poisoned(index, out, ctx):
    """Poison the slot the moment it is claimed (just after the consumer released it), then write."""
    out["x"][...] = POISON
    time.sleep(0.001)
    out["x"][...] = index + ctx.epoch * 1000
    out["i"][0] = index


def fill_slow_after_two(index, out, ctx):
    if index >= 2:
        time.sleep(0.5)
    fill_poisoned(index, out, ctx)


def fill_raising_at_five(index, out, ctx):
    if index == 5:
        raise ValueError("batch five is broken")
    fill_poisoned(index, out, ctx)


def expected(batch) -> float:
    return float(batch.index + batch.epoch * 1000)


def acquired_now(feed) -> int:
    return feed.ring.occupancy()["acquired"]


def wait_until(check, what: str, timeout: float = 60.0) -> None:
    """Wait for a condition another thread brings about; the deadline only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"still not true after {timeout} s: {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def feed(ray_session):
    with Feed(SPEC, fill=fill_poisoned, length=LENGTH, workers=2, slots=8, prefetch=3) as f:
        yield f


@pytest.fixture
def epochs(feed):
    """A fresh epoch number per use, so tests sharing the module's feed never collide."""
    counter = iter(range(getattr(feed, "_test_next_epoch", 0), 10**6))

    def next_epoch():
        e = next(counter)
        feed._test_next_epoch = e + 1
        return e
    return next_epoch


def assert_feed_is_clean(feed, epochs) -> None:
    """Nothing held, and the next epoch runs start to end with the right contents."""
    assert acquired_now(feed) == 0
    e = epochs()
    seen = [int(b["i"][0]) for b in feed.epoch(e)]
    assert seen == list(range(LENGTH))


# ---- depth --------------------------------------------------------------------------------


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_prefetch_depth_is_reached_and_never_exceeded(feed, epochs, prefetch):
    most_acquired = 0
    with Stage(feed, epochs(), numpy_target(feed), prefetch=prefetch) as stage:
        for n, batch in enumerate(stage):
            if n == 2:  # let the thread fill up to its limit once
                wait_until(lambda: stage.max_ahead == prefetch, f"{prefetch} batches staged ahead")
            most_acquired = max(most_acquired, acquired_now(feed))
            assert stage.held <= prefetch + 1
    assert stage.max_ahead == prefetch   # reached...
    assert stage.max_held <= prefetch + 1  # ...and the ring agrees: never more slots than that
    assert most_acquired <= prefetch + 1


def test_prefetch_must_leave_producers_a_slot(feed, epochs):
    with pytest.raises(ValueError, match="prefetch"):
        Stage(feed, epochs(), prefetch=feed.slots - 1)


# ---- releases --------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["numpy-view", "torch-view", "torch-copy"])
def test_every_slot_is_released_exactly_once(feed, epochs, which):
    pytest.importorskip("torch")
    target = {"numpy-view": lambda: numpy_target(feed), "torch-view": lambda: torch_cpu_target(feed),
              "torch-copy": lambda: torch_cpu_target(feed, copy=True)}[which]()
    released: list[int] = []
    before = feed.ring.counters()
    delivered = []
    with Stage(feed, epochs(), target, on_release=lambda s: released.append(s.seq)) as stage:
        for batch in stage:
            delivered.append(batch.seq)
    after = feed.ring.counters()
    assert sorted(released) == sorted(delivered) and len(set(released)) == LENGTH
    assert after["acquires"] - before["acquires"] == after["releases"] - before["releases"] == LENGTH


def test_a_slot_is_not_released_while_the_loop_holds_its_view(feed, epochs):
    released: set[int] = set()
    lock = threading.Lock()

    def note(slot):
        with lock:
            released.add(slot.seq)

    with Stage(feed, epochs(), numpy_target(feed), on_release=note) as stage:
        for batch in stage:
            with lock:
                assert batch.seq not in released
            time.sleep(0.005)  # producers are waiting for slots; any released one gets poisoned at once
            assert (batch["x"] == expected(batch)).all(), "a held view was overwritten"
            with lock:
                assert batch.seq not in released
    assert acquired_now(feed) == 0


def test_owned_copies_outlive_their_slots(feed, epochs):
    pytest.importorskip("torch")
    with Stage(feed, epochs(), torch_cpu_target(feed, copy=True)) as stage:
        kept = list(stage)  # every slot has been reused by later batches by now
    assert [float(b["x"][0, 0]) for b in kept] == [expected(b) for b in kept]
    assert all(bool((b["x"] == expected(b)).all()) for b in kept)


class _HandEvent:
    """Stands in for a CUDA event: ``query()`` is True once the test says the copy completed."""

    def __init__(self) -> None:
        self.done = threading.Event()

    def query(self) -> bool:
        return self.done.is_set()


class _AsyncCopyTarget(NumpyTarget):
    """Like the CUDA target: the batch is "copied" asynchronously; the slot goes back after the event."""

    asynchronous = True
    path = "test-async"

    def __init__(self) -> None:
        self.events: dict[int, _HandEvent] = {}

    def stage(self, core, slot, batch):
        event = self.events[batch.seq] = _HandEvent()
        core.release_after(event, slot, time.perf_counter())
        return _Staged(batch.copy(), None, 0)  # the loop gets its own data; the slot waits for the event


def test_an_asynchronously_copied_slot_is_released_only_after_its_event(feed, epochs):
    target = _AsyncCopyTarget()
    released: list[int] = []
    with Stage(feed, epochs(), target, prefetch=2, on_release=lambda s: released.append(s.seq)) as stage:
        first = next(stage)
        wait_until(lambda: stage.held == 3, "three batches staged")
        assert released == []  # none of their copies done
        target.events[first.seq].done.set()
        wait_until(lambda: released, "the first batch released once its event is done")
        assert released == [first.seq]
        for event in target.events.values():
            event.done.set()
        rest = []
        for batch in stage:
            target.events[batch.seq].done.set()
            rest.append(batch)
            for event in list(target.events.values()):
                event.done.set()
    assert len(rest) == LENGTH - 1
    assert sorted(released) == sorted([first.seq] + [b.seq for b in rest])
    assert acquired_now(feed) == 0


# ---- shutdown from every state -------------------------------------------------------------


def _dropped_after_one(feed, e):
    assert next(iter(Stage(feed, e, numpy_target(feed)))) is not None  # the iterator is dropped here
    gc.collect()


def _closed_full(feed, e):
    stage = Stage(feed, e, numpy_target(feed), prefetch=3)
    next(stage)
    wait_until(lambda: stage.held == 4, "queue full (3), the loop holding one batch")
    stage.close()
    assert stage.held == 0


def _closed_before_first(feed, e):
    Stage(feed, e, numpy_target(feed)).close()


def _closed_after_end(feed, e):
    stage = Stage(feed, e, numpy_target(feed))
    assert len(list(stage)) == LENGTH
    stage.close()
    stage.close()
    with pytest.raises(StopIteration):
        next(stage)


def _closed_twice_mid_epoch(feed, e):
    stage = Stage(feed, e, torch_cpu_target(feed))
    next(stage)
    stage.close()
    stage.close()
    with pytest.raises(StopIteration):
        next(stage)


def _closed_from_another_thread(feed, e):
    stage = Stage(feed, e, numpy_target(feed))
    next(stage)
    t = threading.Thread(target=stage.close)
    t.start()
    t.join(30)
    assert not t.is_alive()


@pytest.mark.parametrize("stop", [_closed_before_first, _dropped_after_one, _closed_full, _closed_after_end,
                                  _closed_twice_mid_epoch, _closed_from_another_thread])
def test_every_way_of_stopping_leaves_the_feed_ready_for_the_next_epoch(feed, epochs, stop):
    pytest.importorskip("torch")
    stop(feed, epochs())
    assert_feed_is_clean(feed, epochs)


def test_stopping_while_waiting_for_a_slow_producer(ray_session):
    with Feed(SPEC, fill=fill_slow_after_two, length=12, workers=1, slots=4, prefetch=1) as feed:
        stage = Stage(feed, 0, numpy_target(feed))
        next(stage)
        next(stage)
        stage.close()  # the thread is waiting for batch 2 or 3, half a second away
        assert stage.held == 0 and acquired_now(feed) == 0
        with Stage(feed, 1, numpy_target(feed)) as again:
            assert [int(next(again)["i"][0]) for _ in range(3)] == [0, 1, 2]


def test_closing_the_feed_under_a_stage_ends_it_with_ring_closed(ray_session):
    feed = Feed(SPEC, fill=fill_poisoned, length=LENGTH, workers=1, slots=4, prefetch=1)
    stage = Stage(feed, 0, torch_cpu_target(feed) if _has_torch() else numpy_target(feed))
    next(stage)
    feed.close()
    with pytest.raises(RingClosed, match="feed was closed"):
        next(stage)
    stage.close()


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# ---- errors ----------------------------------------------------------------------------------


def test_a_producer_error_reaches_the_loop_after_the_batches_before_it_and_says_where(ray_session):
    # One producer: batches 0..4 are committed before 5 fails, so the loop must get all of them.
    with Feed(SPEC, fill=fill_raising_at_five, length=LENGTH, workers=1, slots=6, prefetch=2) as feed:
        got = []
        with pytest.raises(ProducerError) as info:
            for batch in Stage(feed, 0, numpy_target(feed)):
                got.append(int(batch["i"][0]))
        assert got == [0, 1, 2, 3, 4]
        assert info.value.index == 5 and "batch five is broken" in str(info.value)
        assert any("stage thread" in note for note in info.value.__notes__)


class _FailingTarget(NumpyTarget):
    def stage(self, core, slot, batch):
        if batch.index == 3:
            raise ZeroDivisionError("the target could not stage this batch")
        return super().stage(core, slot, batch)


def test_an_error_while_staging_names_the_batch_and_releases_its_slot(feed, epochs):
    released: list[int] = []
    got = []
    with pytest.raises(ZeroDivisionError) as info:
        with Stage(feed, epochs(), _FailingTarget(), on_release=lambda s: released.append(s.seq)) as stage:
            for batch in stage:
                got.append(batch.index)
    assert got == [0, 1, 2]
    note = " ".join(info.value.__notes__)
    assert "staging batch index 3" in note and "stage thread" in note
    assert len(released) == len(set(released)) == 4  # the three delivered, and the one that failed
    assert_feed_is_clean(feed, epochs)


def test_releasing_a_slot_twice_is_refused(feed, epochs):
    with Stage(feed, epochs(), numpy_target(feed)) as stage:
        next(stage)
        core = stage._core
        slot = core.current.slot
        core.release(slot, time.perf_counter())
        core.current.slot = None
        with pytest.raises(SlotStateError):
            core.release(slot, time.perf_counter())


def test_staging_figures_are_merged_into_feed_stats(feed, epochs):
    with Stage(feed, epochs(), numpy_target(feed)) as stage:
        for _ in stage:
            pass
    s = feed.stats()
    assert s["staging_path"] == "cpu-view" and s["staging_host_copies"] == 0
    assert s["staged_batches"] >= LENGTH and s["stage_max_ahead"] <= feed.prefetch
    assert np.isfinite(s["stage_wait_mean_s"])


# ---- the CUDA target's bookkeeping, with a stand-in for torch.cuda ----------------------------------
# The real thing runs in bench/gpu_check.py and tests/test_gpu.py on a GPU; this pins down, on any
# machine, what the target does around the CUDA calls: which path it picks, that every slot and every
# pinned buffer comes back exactly once and only after its event, and that the loop's stream waits.


class _FakeCuda:
    """Just enough of torch.cuda: events complete after a few polls; copies are CPU copies."""

    def __init__(self, register_rc: int) -> None:
        import contextlib
        import types

        self.register_rc = register_rc
        self.waited: list = []
        self.recorded_streams: list = []
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.polls = 0

            def record(self, stream=None):
                pass

            def query(self):
                self.polls += 1
                return self.polls > 2

        class Stream:
            def __init__(self, device=None, priority=0):
                pass

            def wait_event(self, event):
                fake.waited.append(event)

        self.cuda = types.SimpleNamespace(
            is_available=lambda: True, current_device=lambda: 0, device_count=lambda: 1, Stream=Stream,
            Event=Event, stream=lambda s: contextlib.nullcontext(), device=lambda d: contextlib.nullcontext(),
            current_stream=lambda device=None: Stream(), set_device=lambda d: None,
            synchronize=lambda *a: None,
            _sleep=lambda cycles: None, CudaError=lambda rc: RuntimeError(f"error {rc}"),
            cudart=lambda: types.SimpleNamespace(cudaHostRegister=lambda ptr, n, flags: fake.register_rc,
                                                 cudaHostUnregister=lambda ptr: 0))

    def torch(self):
        import torch

        fake = self

        class Proxy:
            cuda = fake.cuda

            def __getattr__(self, name):
                return getattr(torch, name)

            @staticmethod
            def empty(*shape, dtype=None, device=None, pin_memory=False):
                return torch.empty(*shape, dtype=dtype)

        return Proxy()


@pytest.mark.parametrize("register_rc, path", [(0, "cuda-registered"), (2, "cuda-pinned-pool")])
def test_cuda_target_bookkeeping_with_a_stand_in_for_torch_cuda(feed, epochs, monkeypatch, register_rc, path):
    torch = pytest.importorskip("torch")
    import pyshmfeed.stage.torch_targets as torch_targets
    from pyshmfeed.stage import FeedStaging

    fake = _FakeCuda(register_rc)
    monkeypatch.setattr(torch_targets, "_torch", fake.torch)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: fake.recorded_streams.append(s),
                        raising=False)
    staging = FeedStaging(feed.ring, feed.spec)  # a private one, not the feed's: no cached state
    target = torch_targets.CudaTarget(staging, "cuda:0")
    assert target.path == path and target.host_copies == (0 if register_rc == 0 else 1)
    released: list[int] = []
    got = []
    with Stage(feed, epochs(), target, on_release=lambda s: released.append(s.seq)) as stage:
        for batch in stage:
            got.append((float(batch["x"][0, 0]), int(batch["i"][0]), batch.index))
    assert [index for _, _, index in got] == list(range(LENGTH))
    assert all(i == index and (x - index) % 1000 == 0 for x, i, index in got)  # each batch's own contents
    assert len(released) == len(set(released)) == LENGTH
    assert len(fake.waited) == LENGTH and len(fake.recorded_streams) == 2 * LENGTH
    if target.pool is not None:
        assert len(target.pool._free) == target.pool.count  # every pinned buffer came back
    assert acquired_now(feed) == 0



def test_state_dict_counts_only_batches_the_loop_has_had(feed, epochs):
    e = epochs()
    acquires_before = feed.ring.counters()["acquires"]
    with Stage(feed, e, numpy_target(feed), prefetch=3) as stage:
        for _ in range(5):
            next(stage)
        wait_until(lambda: stage.max_ahead == 3, "the thread has taken three more from the ring")
        assert (feed.state_dict()["epoch"], feed.state_dict()["position"]) == (e, 5)
        for _ in range(LENGTH - 7):
            next(stage)
        wait_until(lambda: feed.ring.counters()["acquires"] - acquires_before == LENGTH,
                   "the ring side of the epoch is over")  # the loop has not had the last two
        assert (feed.state_dict()["epoch"], feed.state_dict()["position"]) == (e, LENGTH - 2)
    # Closed early: the two staged batches were given back undelivered, so resuming starts with them.
    assert (feed.state_dict()["epoch"], feed.state_dict()["position"]) == (e, LENGTH - 2)
    with Stage(feed, epochs(), numpy_target(feed)) as stage:
        assert len(list(stage)) == LENGTH
    assert feed.state_dict()["position"] == 0  # a finished epoch: the next one starts at 0
