"""Producers die mid-epoch; the feed still delivers every batch exactly once, intact.

Three ways to die: the producer's own fault hook (``PYSHMFEED_TEST_KILL_AT``: it
SIGKILLs itself at a chosen step of the protocol — before the claim, between
claim and write, between write and commit, after the commit), ``ray.kill`` of
its actor, and ``SIGKILL`` of its process from this test while the epoch runs.
The ring's back-pressure keeps producers at most ``slots`` batches ahead of the
loop, so a kill after a few dozen batches always lands mid-epoch.
"""

from __future__ import annotations

import os
import signal

import pytest

from pyshmfeed.producer import KILL_HOOK_ENV
from pyshmfeed.ring import process_alive
from test_feed import (
    LENGTH,
    assert_exactly_once_and_correct,
    assert_nothing_left,
    checksum,
    key_of,
    new_feed,
    producer_actors,
    producer_pids,
    reference,
    ring_fds,
    take,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
KILL_AT_BATCH = 12  # the producer's own count of batches it committed


def kill_hook(step: str, marker: str) -> dict:
    """Actor options that arm the fault hook; PYTHONPATH again, as the session's runtime_env sets it."""
    pythonpath = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": pythonpath, KILL_HOOK_ENV: f"{step}:{KILL_AT_BATCH}:{marker}"}
    return {"runtime_env": {"env_vars": env}}


def wait_started(feed) -> None:
    """Replacements start in the background (the others carry the work meanwhile): wait for their pids."""
    wait_until(lambda: all(p.identity is not None for p in feed._dispatcher.slots), 60,
               "every replacement producer started")


def expected_order(kind: str, ordered: bool) -> list | None:
    return list(range(LENGTH)) if ordered and kind != "shards" else None


def check_epoch(feed, kind: str, ordered: bool, epoch: int, got: list) -> None:
    assert_exactly_once_and_correct(got, reference(kind, feed.workers, epoch), epoch,
                                    in_order=expected_order(kind, ordered))
    if kind == "shards":  # a restarted shard resumes after what was committed: still in shard order
        for w in range(feed.workers):
            positions = [k[1] for k, _, _ in got if k[0] == w]
            assert positions == sorted(positions)


@pytest.mark.parametrize("kind, ordered, step", [
    ("fill", True, "claim"),         # dies holding nothing
    ("fill", True, "write"),         # dies holding a claimed, half-written slot
    ("make", True, "commit"),        # dies with the batch written but unpublished
    ("fill", True, "after_commit"),  # dies right after publishing
    ("make", False, "write"),
    ("fill", False, "after_commit"),
    ("shards", False, "write"),
    ("shards", False, "after_commit"),
])
def test_a_producer_that_dies_at_any_step_loses_and_duplicates_nothing(ray_session, tmp_path, kind, ordered,
                                                                       step):
    marker = str(tmp_path / "killed")
    fds_before = ring_fds()
    with new_feed(kind, ordered=ordered, _actor_options=kill_hook(step, marker)) as feed:
        got = take(feed.epoch(0), kind=kind)
        assert os.path.exists(marker), "the fault hook never fired: this test tested nothing"
        check_epoch(feed, kind, ordered, 0, got)
        stats = feed.stats()
        assert stats["restarts"] == 1
        if kind != "shards":
            # The dead producer's unfinished work went to the others or its replacement.
            assert stats["reissued"] >= (0 if step == "after_commit" else 1)
        # The replacement keeps working: a whole second epoch, with the hook spent.
        check_epoch(feed, kind, ordered, 1, take(feed.epoch(1), kind=kind))
        wait_started(feed)
        pids, actors = producer_pids(feed), producer_actors(feed)
        assert len(pids) == feed.workers + 1
    assert_nothing_left(ray_session, feed, pids, actors, fds_before)


@pytest.mark.parametrize("kind, ordered", [("fill", True), ("make", False), ("shards", False)])
def test_ray_kill_and_sigkill_from_outside_while_the_epoch_runs(ray_session, kind, ordered):
    fds_before = ring_fds()
    with new_feed(kind, slow=True, ordered=ordered) as feed:
        d = feed._dispatcher
        wait_started(feed)  # producers start concurrently: know both pids before killing them
        killed = []
        got = []
        for batch in feed.epoch(0):
            got.append((key_of(kind, batch), batch.epoch, checksum(batch)))
            if len(got) == 40:
                killed.append(d.slots[0].pids[-1])
                ray_session.kill(d.slots[0].actor, no_restart=True)
            elif len(got) == 80:
                killed.append(d.slots[1].pids[-1])
                os.kill(d.slots[1].pids[-1], signal.SIGKILL)
        check_epoch(feed, kind, ordered, 0, got)
        assert not any(process_alive(pid) for pid in killed)
        check_epoch(feed, kind, ordered, 1, take(feed.epoch(1), kind=kind))
        # The supervisor notices a death on its own (not at the dead producer's next task): by now, or soon.
        wait_until(lambda: feed.stats()["restarts"] == 2, 30, "both deaths handled")
        wait_started(feed)
        pids, actors = producer_pids(feed), producer_actors(feed)
        assert len(pids) == 4 and not set(killed) & {p.pids[-1] for p in d.slots}
    assert_nothing_left(ray_session, feed, pids, actors, fds_before)


def test_a_producer_killed_while_the_loop_is_between_epochs(ray_session):
    # Nobody is waiting on the dead producer: the supervisor notices the death and replaces it anyway.
    with new_feed("fill", ordered=True) as feed:
        check_epoch(feed, "fill", True, 0, take(feed.epoch(0)))
        wait_started(feed)  # producers start concurrently: the first may have made the whole epoch
        os.kill(feed._dispatcher.slots[0].pids[-1], signal.SIGKILL)
        check_epoch(feed, "fill", True, 1, take(feed.epoch(1)))
        wait_until(lambda: feed.stats()["restarts"] == 1, 30, "the death handled")
