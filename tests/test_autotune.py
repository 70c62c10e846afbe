"""Autotune (NOTE [autotune] in pyshmfeed/autotune.py): the controller's decisions, the budget, and a
feed that scales its producers up and down while every batch is still delivered exactly once."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from pyshmfeed import BatchSpec, Feed
from pyshmfeed.autotune import Controller, Window, parse_bytes
from pyshmfeed.errors import InvalidArgument
from test_feed import wait_until

pytestmark = pytest.mark.timeout(180)

# ---- sizes and bounds ------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [(4096, 4096), ("256MiB", 256 * 2**20), ("2GiB", 2 * 2**30),
                                            ("1.5 GB", 1_500_000_000), ("64k", 64_000), ("100", 100)])
def test_memory_budget_sizes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", [0, -1, True, "lots", "2 GiBs", "", 1.5])
def test_bad_memory_budgets_are_refused(bad):
    with pytest.raises(InvalidArgument, match="memory_budget"):
        parse_bytes(bad)


SPEC = BatchSpec(x=((256, 1024), "float32"))  # 1 MiB a batch


def io_fill(index, out, ctx):
    time.sleep(0.02)  # waiting on storage: more producers than cores pay off
    out["x"][0, 0] = index


@pytest.mark.parametrize("kwargs, needle", [
    (dict(workers="auto", min_workers=3, max_workers=2), "min_workers"),
    (dict(workers=4, max_workers=8), "min_workers/max_workers"),
    (dict(workers=(2, 4), max_workers=8), "one or the other"),
    (dict(workers="auto", max_workers=0), "max_workers"),
    (dict(workers="many"), "workers"),
    (dict(workers="auto", memory_budget="1MiB"), "memory_budget"),  # not even prefetch + 2 slots of 1 MiB
    (dict(workers=2, slots=8, memory_budget="4MiB"), "memory_budget"),
    (dict(workers="auto", assignment="round_robin"), "round_robin"),
])
def test_bad_autotune_arguments(kwargs, needle):
    with pytest.raises(InvalidArgument, match=needle):
        Feed(SPEC, fill=io_fill, length=10, **kwargs)


# ---- the controller, on made-up windows --------------------------------------------------


def window(rate: float, wait_fraction: float, busy: float, workers: int, idle: float = 1.0) -> Window:
    return Window(seconds=1.0, batches=int(rate), loop_wait_s=wait_fraction, busy_s=busy * workers,
                  workers=workers, idle_cores=idle)


def test_adds_producers_while_the_loop_waits_and_they_are_busy():
    c = Controller(1, 8)
    change = c.decide(window(20, 0.6, 0.95, 2), 2)
    assert change >= 1
    assert "+" in c.decisions[-1].reason and "idle cores" in c.decisions[-1].reason
    assert c.decide(window(40, 0.2, 0.95, 2 + change), 2 + change) >= 0  # it paid: no revert


def test_an_add_that_does_not_pay_is_taken_back_and_not_retried_at_once():
    c = Controller(1, 8, hold=3)
    add = c.decide(window(50, 0.5, 1.0, 1, idle=1.0), 1)
    assert add >= 1
    assert c.decide(window(49, 0.5, 1.0, 1 + add, idle=0.0), 1 + add) == -add  # CPU-bound: reverted
    assert "did not pay" in c.decisions[-1].reason
    def windows_until_next_try() -> tuple[int, int]:
        for n in range(100):
            add = c.decide(window(50, 0.5, 1.0, 1, idle=1.0), 1)
            if add:
                return n, add
        raise AssertionError("never tried again")

    first_wait, add = windows_until_next_try()
    assert first_wait >= 2  # held back for a while, then tried again (the workload may have changed)
    assert c.decide(window(50, 0.5, 1.0, 1 + add, idle=0.0), 1 + add) == -add
    second_wait, _ = windows_until_next_try()
    assert second_wait > first_wait  # a second failure in a row: longer before the next try


def test_after_a_cpu_bound_take_back_one_fewer_is_tried_and_judged():
    # 3 producers on a machine with no idle core: +1 does not pay, so it goes back and then one
    # fewer is tried. Throughput holds with 2: kept. (Had it dropped, the third would come back.)
    c = Controller(1, 16)
    assert c.decide(window(150, 0.9, 1.0, 3, idle=0.0), 3) == 1
    assert c.decide(window(150, 0.9, 1.0, 4, idle=0.0), 4) == -1  # taken back
    assert c.decide(window(150, 0.9, 1.0, 3, idle=0.0), 3) == -1  # one fewer, on trial
    assert "one fewer" in c.decisions[-1].reason
    assert c.decide(window(149, 0.9, 1.0, 2, idle=0.0), 2) == 0
    assert "kept" in c.decisions[-1].reason

    c = Controller(1, 16)
    c.decide(window(150, 0.9, 1.0, 3, idle=0.0), 3)
    c.decide(window(150, 0.9, 1.0, 4, idle=0.0), 4)
    assert c.decide(window(150, 0.9, 1.0, 3, idle=0.0), 3) == -1
    assert c.decide(window(100, 0.9, 1.0, 2, idle=0.0), 2) == 1  # it cost throughput: put back
    assert "cost throughput" in c.decisions[-1].reason


def test_without_an_idle_core_an_add_is_a_single_probe():
    c = Controller(1, 16)
    assert c.decide(window(20, 0.9, 1.0, 2, idle=0.0), 2) == 1
    assert "+1 producers" in c.decisions[-1].reason and "0.0 idle cores" in c.decisions[-1].reason


def test_an_add_judged_on_a_slower_phase_is_kept_while_cores_are_idle():
    # The trial began in a fast phase and was judged in a slow one: the rate fell, the loop still
    # waits, but a core is idle, so producers did not compete for CPU. Keep them and add more.
    c = Controller(1, 16)
    add = c.decide(window(160, 0.3, 0.9, 2, idle=1.5), 2)
    assert add >= 1
    more = c.decide(window(60, 0.8, 1.0, 2 + add, idle=1.5), 2 + add)
    assert more >= 1, "a slower phase is no reason to take producers back: it is a reason to add"
    kept = [d for d in c.decisions if d.change == 0]
    assert kept and "kept" in kept[-1].reason and "idle cores" in kept[-1].reason


def test_removes_idle_producers_down_to_the_minimum():
    c = Controller(2, 8)
    assert c.decide(window(100, 0.0, 0.1, 4), 4) == -1
    assert c.decide(window(100, 0.0, 0.1, 2), 2) == 0  # the minimum holds


def test_never_past_the_maximum():
    c = Controller(1, 3)
    total = 1
    for _ in range(10):
        total += c.decide(window(10 * total, 0.8, 1.0, total), total)
        assert 1 <= total <= 3


# ---- a feed that scales ----------------------------------------------------------------------


def test_auto_grows_for_io_bound_producers_within_the_budget(ray_session):
    with Feed(SPEC, fill=io_fill, length=400, workers="auto", min_workers=1, max_workers=6,
              memory_budget="16MiB") as feed:
        got = [b.index for b in feed.epoch(0)]
        stats = feed.stats()
    assert got == list(range(400))
    assert stats["ring_bytes"] <= 16 * 2**20 and stats["memory_budget"] == 16 * 2**20
    decisions = stats["autotune"]["decisions"]
    assert any(d["change"] > 0 for d in decisions), decisions  # the loop waited: producers were added
    assert all(1 <= d["workers"] <= 6 for d in decisions)


_SCALE_SPEC = BatchSpec(x=((8,), "int64"))


def jittery_fill(index, out, ctx):
    time.sleep(random.Random(index).choice([0.0, 0.01, 0.03]))
    out["x"][...] = index


@pytest.mark.parametrize("ordered", [True, False])
def test_exactly_once_while_scaling_and_a_producer_is_killed(ray_session, ordered):
    with Feed(_SCALE_SPEC, fill=jittery_fill, length=600, workers=(1, 5), ordered=ordered) as feed:
        sup = feed._dispatcher
        killed = threading.Event()

        def kill_one():
            wait_until(lambda: sup.workers_running() >= 2 and any(p.pid for p in sup.positions), 60,
                       "a second producer")
            victim = next(p.pid for p in sup.positions if p.pid)
            os.kill(victim, signal.SIGKILL)
            killed.set()

        threading.Thread(target=kill_one, daemon=True).start()
        got = []
        for epoch in range(3):
            got.append(sorted(int(b["x"][0]) for b in feed.epoch(epoch)))
            if epoch == 0:
                time.sleep(1.5)  # the loop is away: producers go idle and some are stopped
        assert killed.wait(60)
        decisions = feed.stats()["autotune"]["decisions"]
    assert all(g == list(range(600)) for g in got)
    assert any(d["change"] > 0 for d in decisions)


def fast_fill(index, out, ctx):
    out["x"][...] = index


def test_auto_stops_idle_producers_cleanly(ray_session):
    # The loop is the slow side (10 ms a batch) and producers are nearly free: extra ones only idle.
    with Feed(_SCALE_SPEC, fill=fast_fill, length=300, workers=(1, 4), ordered=False) as feed:
        assert feed._dispatcher.workers_running() == min(4, max(1, os.cpu_count() or 1))
        got = []
        for b in feed.epoch(0):
            got.append(int(b["x"][0]))
            time.sleep(0.01)
        stats = feed.stats()
        again = sorted(int(b["x"][0]) for b in feed.epoch(1))  # the stopped positions stay quiet
    assert sorted(got) == list(range(300)) and again == list(range(300))
    decisions = stats["autotune"]["decisions"]
    if (os.cpu_count() or 1) > 1:
        assert any(d["change"] < 0 for d in decisions), decisions
        assert stats["workers"] < min(4, os.cpu_count() or 1)
    assert stats["restarts"] == 0  # a clean stop is not a death


@pytest.mark.parametrize("ordered", [True, False])
def test_cluster_placement_scales_up_and_down_exactly_once_through_a_kill(ray_session, ordered):
    # placement="cluster" runs producers through the dispatcher (Ray calls per chunk), not the
    # segment: autotune adds positions there too, and retires them cleanly after their calls.
    with Feed(_SCALE_SPEC, fill=jittery_fill, length=400, workers=(1, 4), ordered=ordered,
              placement="cluster") as feed:
        d = feed._dispatcher
        killed = threading.Event()

        def kill_one():
            wait_until(lambda: sum(p.identity is not None for p in d.positions) >= 2, 60, "a second producer")
            victim = next(p.identity["pid"] for p in d.positions if p.identity is not None)
            os.kill(victim, signal.SIGKILL)
            killed.set()

        threading.Thread(target=kill_one, daemon=True).start()
        got = [sorted(int(b["x"][0]) for b in feed.epoch(0))]
        slow = []
        for b in feed.epoch(1):  # the loop is now the slow side: producers idle, and are stopped
            slow.append(int(b["x"][0]))
            time.sleep(0.03)
        got.append(sorted(slow))
        assert killed.wait(60)
        stats = feed.stats()
    assert all(g == list(range(400)) for g in got)
    decisions = stats["autotune"]["decisions"]
    assert any(d["change"] > 0 for d in decisions), decisions
    assert any(d["change"] < 0 for d in decisions), decisions
    assert all(1 <= d["workers"] <= 4 for d in decisions)
    assert stats["restarts"] == 1  # the kill; a retired producer is not a death
