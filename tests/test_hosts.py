"""Warm producer hosts (NOTE [warm producers] in pyshmfeed/hosts.py).

A closed ``warm_producers=True`` feed's producer processes go back to this process's pool and
the next such feed with the same options runs in them: its batches are its own, exactly once,
and no host in the pool maps a ring. Hosts that died never go back; hosts of
other options, idle ones past ``IDLE_S`` and ``release_producers()`` are
killed.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from pyshmfeed import BatchSpec, Feed, hosts, release_producers
from pyshmfeed.registry import is_alive as process_alive
from test_feed import maps_a_ring, producer_pids, wait_until

SPEC = BatchSpec(x=((8,), "int64"))
LENGTH = 24


def fill(index, out, ctx):
    out["x"][...] = index


def slow_fill(index, out, ctx):
    time.sleep(0.2)
    out["x"][...] = index


def epoch_indices(feed: Feed, epoch: int = 0) -> list[int]:
    return [int(b["x"][0]) for b in feed.epoch(epoch)]


def running_pids(feed: Feed) -> set[int]:
    return {p.pid for p in feed._dispatcher.positions if p.pid is not None}


def all_started(feed: Feed) -> bool:
    return all(p.pid is not None for p in feed._dispatcher.positions)


def test_a_second_feed_runs_in_the_first_one_s_processes_and_makes_its_own_batches(ray_session):
    with Feed(SPEC, fill=fill, length=LENGTH, workers=2, warm_producers=True) as first:
        wait_until(lambda: all_started(first), 120, "both producers started")
        assert epoch_indices(first) == list(range(LENGTH))
        first_pids = running_pids(first)
    idle = hosts.idle_pids()
    assert first_pids <= idle, "a cleanly closed feed's producers go back to the pool"
    assert not [pid for pid in idle if maps_a_ring(pid)], "a host in the pool maps no ring"

    with Feed(SPEC, fill=lambda i, out, ctx: out["x"].fill(1000 + i), length=LENGTH, workers=2,
              warm_producers=True) as second:
        wait_until(lambda: all_started(second), 120, "both producers started")
        got = [int(b["x"][0]) for b in second.epoch(0)]
        second_pids = running_pids(second)
    assert got == [1000 + i for i in range(LENGTH)], "the new feed's source, exactly once, in order"
    assert second_pids == first_pids, "the second feed borrowed the warm hosts instead of starting actors"


def test_a_feed_closed_mid_batch_pools_its_hosts_once_their_batch_ends(ray_session):
    feed = Feed(SPEC, fill=slow_fill, length=200, workers=2, slots=4, prefetch=1, warm_producers=True)
    wait_until(lambda: all_started(feed), 120, "both producers started")
    batches = feed.epoch(0)
    next(batches)
    pids = running_pids(feed)
    batches.close()
    feed.close()  # the producers are inside slow_fill: close gives them 1.5 batch times to finish it
    assert pids <= hosts.idle_pids()
    # The next feed works in them, and sees none of the old feed's batches.
    with Feed(SPEC, fill=fill, length=LENGTH, workers=2, warm_producers=True) as again:
        assert epoch_indices(again) == list(range(LENGTH))


def test_a_host_whose_producer_was_killed_never_goes_back(ray_session):
    with Feed(SPEC, fill=slow_fill, length=30, workers=2, slots=4, warm_producers=True) as feed:
        wait_until(lambda: all_started(feed), 120, "both producers started")
        victim = feed._dispatcher.positions[0].pid
        os.kill(victim, signal.SIGKILL)
        assert sorted(epoch_indices(feed)) == list(range(30))  # the replacement carries on
        pids = set(producer_pids(feed))
    assert victim in pids and not process_alive(victim)
    assert victim not in hosts.idle_pids()


def test_other_options_release_idle_hosts_and_release_producers_kills_them(ray_session):
    with Feed(SPEC, fill=fill, length=LENGTH, workers=2, num_cpus=0.25, warm_producers=True) as feed:
        wait_until(lambda: all_started(feed), 120, "both producers started")
        epoch_indices(feed)
        quarter = running_pids(feed)
    assert quarter <= hosts.idle_pids()
    with Feed(SPEC, fill=fill, length=LENGTH, workers=1, num_cpus=0.5, warm_producers=True) as other:
        assert epoch_indices(other) == list(range(LENGTH))
        assert not quarter & running_pids(other)
        assert not [pid for pid in quarter if process_alive(pid)], "idle hosts of other options are killed"
    idle = hosts.idle_pids()
    assert idle and sorted(release_producers()) == sorted(idle)
    assert not [pid for pid in idle if process_alive(pid)]
    assert hosts.idle_pids() == set()


def test_idle_hosts_are_killed_after_idle_s(ray_session, monkeypatch):
    monkeypatch.setattr(hosts, "IDLE_S", 0.5)
    with Feed(SPEC, fill=fill, length=LENGTH, workers=2, warm_producers=True) as feed:
        wait_until(lambda: all_started(feed), 120, "both producers started")
        epoch_indices(feed)
        pids = running_pids(feed)
    wait_until(lambda: not any(process_alive(pid) for pid in pids), 30, "idle hosts killed after IDLE_S")
    assert hosts.idle_pids() == set()


def test_feeds_in_a_loop_reuse_hosts_and_every_epoch_is_exact(ray_session):
    seen: set[int] = set()
    for round_ in range(4):
        with Feed(SPEC, fill=lambda i, out, ctx, r=round_: out["x"].fill(100 * r + i), length=LENGTH,
                  workers=2, warm_producers=True) as feed:
            got = np.array([int(b["x"][0]) for b in feed.epoch(0)])
            assert (got == 100 * round_ + np.arange(LENGTH)).all()
            seen |= set(producer_pids(feed))
    assert len(seen) < 8, f"four feeds of two producers started {len(seen)} processes: the pool was not used"


def test_by_default_every_feed_starts_fresh_processes_and_leaves_none(ray_session):
    with Feed(SPEC, fill=fill, length=LENGTH, workers=2) as first:
        wait_until(lambda: all_started(first), 120, "both producers started")
        epoch_indices(first)
        first_pids = running_pids(first)
    assert hosts.idle_pids() == set() and not [pid for pid in first_pids if process_alive(pid)]
    with Feed(SPEC, fill=fill, length=LENGTH, workers=2, warm_producers=True) as second:
        wait_until(lambda: all_started(second), 120, "both producers started")
        assert not running_pids(second) & first_pids


@pytest.fixture(autouse=True)
def _no_idle_hosts_before(ray_session):
    release_producers()
    yield
