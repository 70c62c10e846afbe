"""The work hand-out through the segment (csrc/work.c, pyshmfeed/work.py, supervisor.py).

Ring level: jobs, takes, re-issue and records from Python, with real producer
processes racing for tasks. Feed level: ``assignment="round_robin"`` gives task
k to producer k % workers only (torch's DataLoader assignment) — so a source
with per-producer random state makes the same batches run after run — and
survives an abandoned epoch and a producer killed mid-epoch.
"""

from __future__ import annotations

import os
import pickle
import signal

import numpy as np
import pytest

from pyshmfeed import BatchSpec, Feed
from pyshmfeed.errors import CorruptSegment, InvalidArgument, WouldBlock
from pyshmfeed.producer import KILL_HOOK_ENV
from pyshmfeed.ring import Ring
from pyshmfeed.work import JOB_RESUME, MAX_PRODUCERS, Task, TaskIndex, WorkArea, epoch_order, epoch_positions
from test_feed import wait_until

pytestmark = pytest.mark.timeout(120)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# ---- the work area from Python ---------------------------------------------------------


def test_take_reissue_and_records_from_python():
    with Ring.create(4, 64, ordered=False) as ring:
        work = WorkArea(ring)
        work.open(0, ring.owner, os.getpid())
        with pytest.raises(WouldBlock):
            work.take(0, timeout=0)
        job = work.post(epoch=3, base_seq=100, count=2)
        assert (job.epoch, job.base_seq, job.count) == (3, 100, 2)
        first = work.take(0, timeout=1)
        assert (first.seq, first.k, first.epoch, first.reissued) == (100, 0, 3, False)
        rec = work.record(0)
        assert rec.task == 100 and not rec.intent and rec.pid == os.getpid()
        work.reissue(100)  # as the supervisor does for a dead producer's task
        assert work.queued() == [100]
        work.done(0, 0.001)
        again = work.take(0, timeout=1)
        assert (again.seq, again.reissued) == (100, True)
        work.done(0, 0.001)
        assert work.take(0, timeout=1).seq == 101
        work.done(0, 0.0)
        assert work.record(0).batches == 3
        assert work.freeze().taken == 2


def _dies_of(handle, rec: int, signum: int) -> None:
    ring = Ring.attach(handle)
    work = WorkArea(ring)
    work.open(rec, ring.owner, os.getpid())
    work.watch_signals(rec)
    os.kill(os.getpid(), signum)


def test_a_producer_that_dies_of_a_signal_leaves_it_in_its_record():
    import multiprocessing

    from pyshmfeed import errors

    with Ring.create(4, 64, ordered=False) as ring:
        work = WorkArea(ring)
        child = multiprocessing.get_context("spawn").Process(target=_dies_of, args=(ring.handle, 1, signal.SIGABRT))
        child.start()
        child.join(60)
        assert child.exitcode == -signal.SIGABRT  # it still dies of it
        rec = work.record(1)
        assert (rec.signal, rec.pid) == (signal.SIGABRT, child.pid)
        work.reset(1)
        assert work.record(1).signal == 0
    lost = errors.ProducerLost("producer 1 died", pid=child.pid, signal=signal.SIGABRT)
    again = pickle.loads(pickle.dumps(lost))
    assert (str(again), again.pid, again.signal) == ("producer 1 died", child.pid, signal.SIGABRT)


def _taker(handle, rec: int, out) -> None:
    ring = Ring.attach(handle)
    work = WorkArea(ring)
    work.open(rec, ring.owner, os.getpid())
    seqs = []
    while True:
        try:
            task = work.take(rec, timeout=0)
        except WouldBlock:
            break
        seqs.append(task.seq)
        work.done(rec, 0.0)
    out.put(seqs)
    ring.detach()


def test_producer_processes_take_every_task_once(start):
    import multiprocessing

    out = multiprocessing.get_context("forkserver").SimpleQueue()
    with Ring.create(4, 64, ordered=False) as ring:
        WorkArea(ring).post(epoch=0, base_seq=0, count=20_000)
        procs = [start(_taker, ring.handle, rec, out) for rec in range(3)]
        got = [out.get() for _ in procs]
        for p in procs:
            p.join(30)
    everything = sorted(s for seqs in got for s in seqs)
    assert everything == list(range(20_000))


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 1), (3, 2)])
@pytest.mark.parametrize("ordered,start,resume", [(True, 0, False), (True, 4, True), (False, 0, False),
                                                  (False, 0, True)])
def test_task_index_matches_the_feeds_order(shuffle, world_size, rank, ordered, start, resume):
    # The producers' TaskIndex (which skips building arrays where it can) against the feed's
    # own order and positions, for every kind of epoch: the batch each task makes must agree.
    skip = frozenset({3, 7})
    index = TaskIndex(11, seed=4, shuffle=shuffle, ordered=ordered, rank=rank, world_size=world_size,
                      resume_skip=skip)
    order = epoch_order(11, 2, seed=4, shuffle=shuffle, rank=rank, world_size=world_size)
    positions = epoch_positions(order, start=start, ordered=ordered, skip=skip if resume else frozenset())
    flags = JOB_RESUME if resume else 0
    made = [index(Task(seq=k, k=k, epoch=2, start=start, flags=flags, reissued=False))
            for k in range(len(positions))]
    assert made == [int(order[p]) for p in positions]
    with pytest.raises(CorruptSegment, match="past the epoch"):
        index(Task(seq=0, k=len(positions), epoch=2, start=start, flags=flags, reissued=False))


def test_workers_beyond_the_records_are_refused():
    spec = BatchSpec(x=((4,), "float32"))
    with pytest.raises(InvalidArgument, match="workers"):
        Feed(spec, fill=worker_fill, length=4, workers=MAX_PRODUCERS + 1)
    with pytest.raises(InvalidArgument, match="assignment"):
        Feed(spec, fill=worker_fill, length=4, assignment="fastest")
    with pytest.raises(InvalidArgument, match="round_robin"):
        Feed(spec, shards=lambda w, n, ctx: iter(()), assignment="round_robin")


# ---- round robin through a Feed ---------------------------------------------------------

SPEC = BatchSpec(worker=((1,), "int64"), draw=((8,), "float64"))
_STREAMS: dict[int, np.random.Generator] = {}


def worker_fill(index, out, ctx):
    """Records who made the batch and a draw from that producer's own random stream (as augmentation does)."""
    rng = _STREAMS.setdefault(ctx.worker, np.random.default_rng(1000 + ctx.worker))
    out["worker"][0] = ctx.worker
    out["draw"][...] = rng.random(8)


def run_round_robin(ordered: bool, epochs: int = 2, **options) -> list[list[tuple[int, int, bytes]]]:
    runs = []
    with Feed(SPEC, fill=worker_fill, length=30, workers=3, ordered=ordered, assignment="round_robin",
              **options) as feed:
        for epoch in range(epochs):
            runs.append([(b.index, int(b["worker"][0]), b["draw"].tobytes()) for b in feed.epoch(epoch)])
    return runs


@pytest.mark.parametrize("ordered", [True, False])
def test_round_robin_gives_batch_k_to_producer_k_mod_workers(ray_session, ordered):
    for epoch in run_round_robin(ordered):
        assert sorted(i for i, _, _ in epoch) == list(range(30))
        assert all(worker == index % 3 for index, worker, _ in epoch)


def test_round_robin_with_per_producer_random_state_is_reproducible(ray_session):
    first, second = run_round_robin(True), run_round_robin(True)
    assert first == second  # the same producer made each batch, with its stream at the same point


def test_round_robin_after_an_abandoned_epoch(ray_session):
    with Feed(SPEC, fill=worker_fill, length=30, workers=3, assignment="round_robin") as feed:
        for n, _ in enumerate(feed.epoch(0)):
            if n == 7:
                break
        again = [(b.index, int(b["worker"][0])) for b in feed.epoch(1)]
    assert [i for i, _ in again] == list(range(30))
    assert all(w == i % 3 for i, w in again)


def test_round_robin_survives_a_producer_killed_mid_epoch(ray_session, tmp_path):
    marker = tmp_path / "killed"
    pythonpath = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH", "")) if p)
    opts = {"runtime_env": {"env_vars": {"PYTHONPATH": pythonpath, KILL_HOOK_ENV: f"write:3:{marker}"}}}
    with Feed(SPEC, fill=worker_fill, length=60, workers=3, assignment="round_robin",
              _actor_options=opts) as feed:
        got = [b.index for b in feed.epoch(0)]
        assert marker.exists(), "the kill hook never fired"
        assert got == list(range(60))  # exactly once, in order, despite the death
        wait_until(lambda: feed.stats()["restarts"] == 1, 30, "the death handled")
        assert [b.index for b in feed.epoch(1)] == list(range(60))


def test_sigkill_of_every_producer_between_epochs(ray_session):
    with Feed(SPEC, fill=worker_fill, length=20, workers=2) as feed:
        assert [b.index for b in feed.epoch(0)] == list(range(20))
        wait_until(lambda: all(p.pids for p in feed._dispatcher.positions), 60, "every producer started")
        for p in feed._dispatcher.positions:
            os.kill(p.pids[-1], signal.SIGKILL)
        assert [b.index for b in feed.epoch(1)] == list(range(20))
