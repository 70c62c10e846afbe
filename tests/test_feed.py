"""The Feed end to end, with a real local Ray (the session-wide ``ray_session``).

Every batch a feed delivers is checked against the same source run in this
process (a checksum of each array's dtype, shape and bytes), for the three
kinds of source and both orderings; plus determinism, shuffling, resuming,
abandoned epochs, every shutdown path, errors from sources and bad arguments.

The source functions live at module level so that producer actors can import
them (conftest puts tests/ on the workers' PYTHONPATH); test_feed_faults.py
imports them too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time

import numpy as np
import pytest

import pyshmfeed.feed as feed_module
from pyshmfeed import Batch, BatchSpec, Feed, SourceContext, hosts, registry, release_producers
from pyshmfeed.errors import InvalidArgument, NoSpace, ProducerError, RingClosed
from pyshmfeed.source import copy_batch_into, write_indexed_batch
from pyshmfeed.spec import SlotLayout

pytestmark = pytest.mark.timeout(90)

# ---- sources (run inside producer actors) --------------------------------------------

COLS = 16
ROWS = 4
SPEC = BatchSpec(x=((ROWS, COLS), "float32"), y=((ROWS,), "int64"))
SHARD_SPEC = BatchSpec([((ROWS, COLS), "float32"), ((ROWS,), "int64")])  # tuples, like classic generators
LENGTH = 240
SHARD_ITEMS = 150  # items of a shards epoch, split between workers
FAIL_AT = 37


def rows_of(index: int) -> int:
    """Every fifth batch is partial, so actual shapes smaller than the maximum travel too."""
    return ROWS if index % 5 else 1 + (index // 5) % ROWS


def labels(index: int, epoch: int, n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) + index * 10 + epoch * 1_000_000


def fill_source(index, out, ctx):
    n = rows_of(index)
    ctx.rng(index).random(out=out.resize("x", (n, COLS)), dtype=np.float32)
    out.resize("y", (n,))[...] = labels(index, ctx.epoch, n)


def make_source(index, ctx):
    n = rows_of(index)
    return {"x": ctx.rng(index).random((n, COLS), dtype=np.float32), "y": labels(index, ctx.epoch, n)}


def shards_source(worker, num_workers, ctx):
    """A classic generator pipeline: this worker's share of the items, ``yield x, y``."""
    for item in range(worker, SHARD_ITEMS, num_workers):
        rng = np.random.default_rng([ctx.seed, ctx.epoch, item])
        n = rows_of(item)
        yield rng.random((n, COLS), dtype=np.float32), labels(item, ctx.epoch, n)


def slow_fill_source(index, out, ctx):
    time.sleep(0.004)  # long enough that a test can act while the epoch runs
    fill_source(index, out, ctx)


def slow_make_source(index, ctx):
    time.sleep(0.004)
    return make_source(index, ctx)


def slow_shards_source(worker, num_workers, ctx):
    for batch in shards_source(worker, num_workers, ctx):
        time.sleep(0.004)
        yield batch


def failing_fill_source(index, out, ctx):
    if index == FAIL_AT:
        raise ValueError(f"record {index} is unreadable")
    fill_source(index, out, ctx)


def failing_after_a_slow_batch_source(index, out, ctx):
    """Batch FAIL_AT - 3 is slow: the other producer reaches FAIL_AT while earlier batches are unmade."""
    if index == FAIL_AT - 3:
        time.sleep(0.5)
    failing_fill_source(index, out, ctx)


def failing_shards_source(worker, num_workers, ctx):
    for position, batch in enumerate(shards_source(worker, num_workers, ctx)):
        if worker == 1 and position == 5:
            raise KeyError("shard 1 ran dry")
        yield batch


def make_wrong_dtype(index, ctx):
    b = make_source(index, ctx)
    return {"x": b["x"].astype(np.float64), "y": b["y"]}


def make_wrong_rank(index, ctx):
    b = make_source(index, ctx)
    return {"x": b["x"][:, :, None], "y": b["y"]}


def make_too_large(index, ctx):
    return {"x": np.zeros((ROWS + 1, COLS), np.float32), "y": labels(index, ctx.epoch, ROWS)}


SOURCES = {"fill": fill_source, "make": make_source, "shards": shards_source}
SLOW_SOURCES = {"fill": slow_fill_source, "make": slow_make_source, "shards": slow_shards_source}


# ---- the same sources, run in this process ------------------------------------------


def checksum(batch) -> tuple:
    return tuple((a.dtype.str, a.shape, hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16)
                  .hexdigest()) for a in batch.values())


def reference_indexed(kind: str, fn, spec: BatchSpec, epoch: int, seed: int = 0) -> dict[int, tuple]:
    """index -> checksum of batch ``index`` of ``epoch``, made in this process through the same code path."""
    buf = bytearray(spec.slot_bytes)
    layout = SlotLayout(spec, buf, len(buf))
    out = {}
    for index in range(LENGTH):
        ctx = SourceContext(0, 1, epoch, seed)
        shapes = write_indexed_batch(kind, fn, layout, index, ctx)
        nbytes = layout.write_header(index=index, epoch=epoch, seq=0, worker=0, shapes=shapes)
        _, views, _ = layout.read(nbytes)
        out[index] = checksum(Batch(spec.names, views))
    return out


def reference_shards(fn, spec: BatchSpec, workers: int, epoch: int,
                     seed: int = 0) -> dict[tuple[int, int], tuple]:
    """(worker, position in its shard) -> checksum."""
    buf = bytearray(spec.slot_bytes)
    layout = SlotLayout(spec, buf, len(buf))
    out = {}
    for w in range(workers):
        for position, batch in enumerate(fn(w, workers, SourceContext(w, workers, epoch, seed))):
            shapes = copy_batch_into(layout, batch)
            _, views, _ = layout.read(layout.write_header(index=position, epoch=epoch, seq=0, worker=w,
                                                          shapes=shapes))
            out[(w, position)] = checksum(Batch(spec.names, views))
    return out


def reference(kind: str, workers: int, epoch: int, seed: int = 0) -> dict:
    if kind == "shards":
        return reference_shards(shards_source, SHARD_SPEC, workers, epoch, seed)
    return reference_indexed(kind, SOURCES[kind], SPEC, epoch, seed)


def key_of(kind: str, batch) -> object:
    return (batch.worker, batch.index) if kind == "shards" else batch.index


# ---- feeds and what they leave behind -------------------------------------------------


def new_feed(kind: str, *, slow: bool = False, workers: int = 2, **options) -> Feed:
    fn = (SLOW_SOURCES if slow else SOURCES)[kind]
    if kind == "shards":
        return Feed(SHARD_SPEC, shards=fn, workers=workers, **options)
    return Feed(SPEC, **{kind: fn}, length=LENGTH, workers=workers, **options)


def take(batches, limit: int | None = None, kind: str = "fill") -> list[tuple]:
    """(key, epoch, checksum) of each batch, computed before the next is requested (views expire)."""
    got = []
    for batch in batches:
        got.append((key_of(kind, batch), batch.epoch, checksum(batch)))
        if limit is not None and len(got) >= limit:
            break
    return got


def assert_exactly_once_and_correct(got: list[tuple], expected: dict, epoch: int, *,
                                    in_order: list | None = None) -> None:
    keys = [k for k, _, _ in got]
    twice = sorted(k for k in set(keys) if keys.count(k) > 1)
    assert not twice, f"delivered twice: {twice}"
    assert set(keys) == set(expected), (f"missing {sorted(set(expected) - set(keys))[:20]}, "
                                        f"unexpected {sorted(set(keys) - set(expected))[:20]}")
    if in_order is not None:
        assert keys == in_order
    for key, e, digest in got:
        assert e == epoch
        assert digest == expected[key], f"batch {key} of epoch {epoch} differs from the in-process source"


def producer_pids(feed: Feed) -> list[int]:
    return [pid for p in feed._dispatcher.positions for pid in p.pids]


def producer_actors(feed: Feed) -> list:
    return [p.actor for p in feed._dispatcher.positions if p.actor is not None]


def ring_fds() -> list[str]:
    """This process's open memfd rings."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "pyshmfeed" in target:
            found.append(target)
    return found


def wait_until(check, timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout} s: {what}")
        time.sleep(0.05)


SEGMENT_NAMES = ("memfd:pyshmfeed-", "/dev/shm/pyshmfeed-")  # memfd and named backing (csrc/segment.c)


def maps_a_ring(pid: int) -> bool:
    """Whether process ``pid`` maps a pyshmfeed segment or holds an fd of one."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            if any(name in f.read() for name in SEGMENT_NAMES):
                return True
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if any(name in os.readlink(f"/proc/{pid}/fd/{fd}") for name in SEGMENT_NAMES):
                    return True
    except OSError:
        return False  # gone
    return False


def assert_nothing_left(ray, feed: Feed, pids: list[int], actors: list, fds_before: list[str]) -> None:
    """No producer holds the ring: each one's process is gone or is a warm host back in the pool that
    maps no segment (NOTE [warm producers]); once the pool is released, no producer process, no live
    actor, no ring mapping or fd, and Ray's CPUs all free again."""
    assert pids, "the test should have seen the producers' pids"
    idle = hosts.idle_pids()
    running = [pid for pid in pids if registry.is_alive(pid) and pid not in idle]
    assert not running, f"producer processes still running after close(), not back in the pool: {running}"
    holding = [pid for pid in set(pids) & idle if maps_a_ring(pid)]
    assert not holding, f"warm producer hosts still map a ring: {holding}"
    release_producers()
    dead = [pid for pid in pids if registry.is_alive(pid)]
    assert not dead, f"producer processes still running after release_producers(): {dead}"
    for actor in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.__ray_ready__.remote(), timeout=30)
    assert not feed._ring.attached
    assert sorted(ring_fds()) == sorted(fds_before)
    total = ray.cluster_resources().get("CPU")
    wait_until(lambda: ray.available_resources().get("CPU") == total, 20,
               f"Ray CPUs back to {total}, now {ray.available_resources().get('CPU')}")


# ---- contents, for every source kind and both orderings --------------------------------


@pytest.mark.parametrize("kind, ordered", [("fill", True), ("fill", False), ("make", True), ("make", False),
                                           ("shards", False)])
def test_two_workers_deliver_every_batch_once_with_the_sources_contents(ray_session, kind, ordered):
    with new_feed(kind, ordered=ordered, seed=3) as feed:
        assert feed.ordered is ordered
        for epoch in (0, 1):
            expected = reference(kind, 2, epoch, seed=3)
            got = take(feed.epoch(epoch), kind=kind)
            in_order = list(range(LENGTH)) if ordered else None
            assert_exactly_once_and_correct(got, expected, epoch, in_order=in_order)
            if kind == "shards":  # each shard's batches arrive in the shard's own order
                for w in (0, 1):
                    positions = [k[1] for k, _, _ in got if k[0] == w]
                    assert positions == sorted(positions)
        # Different epochs see different data (the RNG and the labels depend on the epoch).
        assert reference(kind, 2, 0, seed=3) != reference(kind, 2, 1, seed=3)
        stats = feed.stats()
    n = 2 * len(expected)
    assert stats["batches"] == n
    assert stats["source"] == kind and stats["workers"] == 2 and stats["ordered"] is ordered
    spec = SHARD_SPEC if kind == "shards" else SPEC
    assert 0 < stats["bytes"] <= n * spec.batch_bytes  # array bytes (partial batches are smaller)
    assert 0.0 <= stats["stall_fraction"] <= 1.0
    assert 0.0 <= stats["wait_p50_s"] <= stats["wait_p99_s"]
    assert stats["wait_mean_s"] * n == pytest.approx(stats["wait_total_s"])
    assert stats["batches_per_s"] > 0 and stats["gb_per_s"] > 0
    assert 0.0 <= stats["producer_busy_fraction"] <= 1.0
    assert 0.0 <= stats["mean_occupancy"] <= feed.slots
    assert stats["restarts"] == 0 and stats["reissued"] == 0
    assert stats["startup_s"] > 0 and stats["time_to_first_batch_s"] > 0


# ---- determinism --------------------------------------------------------------------------


def run_epochs(workers: int, seed: int, epochs=(0, 1), **options) -> tuple[list[list[tuple]], list]:
    with new_feed("fill", workers=workers, seed=seed, shuffle=True, **options) as feed:
        runs = [take(feed.epoch(e)) for e in epochs]
        orders = [list(map(int, feed.epoch_order(e))) for e in epochs]
    return runs, orders


def test_same_seed_gives_the_same_shuffled_sequence_with_one_and_two_workers(ray_session):
    one, orders = run_epochs(workers=1, seed=5)
    two, orders2 = run_epochs(workers=2, seed=5)
    assert one == two
    assert orders == orders2
    for run, order, epoch in zip(one, orders, (0, 1)):
        assert_exactly_once_and_correct(run, reference("fill", 1, epoch, seed=5), epoch, in_order=order)
        assert sorted(order) == list(range(LENGTH)) and order != list(range(LENGTH))
    assert orders[0] != orders[1], "each epoch gets its own permutation"
    # Another seed: another permutation, and other data for every index.
    six, orders6 = run_epochs(workers=2, seed=6, epochs=(0,))
    assert orders6[0] != orders[0]
    assert_exactly_once_and_correct(six[0], reference("fill", 2, 0, seed=6), 0, in_order=orders6[0])
    digests5 = {k: d for k, _, d in one[0]}
    assert all(digests5[k] != d for k, _, d in six[0])


# ---- resume from state_dict ------------------------------------------------------------


def test_resume_ordered_mid_epoch_equals_the_uninterrupted_run(ray_session):
    options = dict(seed=11, shuffle=True, ordered=True)
    with new_feed("fill", **options) as feed:
        full = take(feed.epoch(0)) + take(feed.epoch(1), limit=40)  # the uninterrupted run
    with new_feed("fill", **options) as feed:
        take(feed.epoch(0), limit=10)
        take(feed.epoch(1), limit=10)  # abandoned epochs before must not confuse the state
        first = take(feed.epoch(0), limit=97)
        state = feed.state_dict()
    assert state["epoch"] == 0 and state["position"] == 97
    with new_feed("fill", state=state, **options) as feed:
        rest = take(iter(feed), limit=LENGTH - 97 + 40)  # iterating the feed goes on into epoch 1
    assert first + rest == full


def test_state_after_a_finished_epoch_resumes_at_the_next_epoch(ray_session):
    with new_feed("make", seed=2) as feed:
        take(feed.epoch(0))
        state = feed.state_dict()
    assert state["epoch"] == 1 and state["position"] == 0
    for bad in ({**state, "seed": 3}, {**state, "kind": "fill"}, {**state, "version": 99}, "not a state"):
        with pytest.raises(InvalidArgument):  # a state from another configuration
            new_feed("make", seed=2, state=bad)
    with new_feed("make", seed=2, state=state) as feed:
        got = take(iter(feed), limit=LENGTH)
    assert_exactly_once_and_correct(got, reference("make", 2, 1, seed=2), 1, in_order=list(range(LENGTH)))


def test_resume_unordered_mid_epoch_delivers_exactly_the_rest(ray_session):
    with new_feed("fill", ordered=False, seed=4, shuffle=True) as feed:
        first = take(feed.epoch(0), limit=90)
        state = feed.state_dict()
    assert state["epoch"] == 0 and len(state["delivered"]) == 90
    with new_feed("fill", ordered=False, seed=4, shuffle=True, state=state) as feed:
        rest = take(feed.epoch(0))
        assert len(rest) == LENGTH - 90
        after = take(feed.epoch(1))
    assert_exactly_once_and_correct(first + rest, reference("fill", 2, 0, seed=4), 0)
    assert_exactly_once_and_correct(after, reference("fill", 2, 1, seed=4), 1)


def test_resume_shards_mid_epoch_delivers_exactly_the_rest(ray_session):
    with new_feed("shards", seed=8) as feed:
        first = take(feed.epoch(0), limit=60, kind="shards")
        state = feed.state_dict()
    assert state["epoch"] == 0 and sum(state["shard_delivered"].values()) == 60
    with new_feed("shards", seed=8, state=state) as feed:
        rest = take(feed.epoch(0), kind="shards")
        after = take(feed.epoch(1), kind="shards")
    assert_exactly_once_and_correct(first + rest, reference("shards", 2, 0, seed=8), 0)
    assert_exactly_once_and_correct(after, reference("shards", 2, 1, seed=8), 1)


# ---- abandoned epochs ------------------------------------------------------------------


@pytest.mark.parametrize("kind, ordered", [("fill", True), ("make", False), ("shards", False)])
def test_break_out_of_an_epoch_then_run_the_next_on_the_same_feed(ray_session, kind, ordered):
    with new_feed(kind, ordered=ordered, seed=1) as feed:
        take(feed.epoch(0), limit=50, kind=kind)
        take(feed.epoch(1), limit=1, kind=kind)
        for epoch in (2, 3):
            got = take(feed.epoch(epoch), kind=kind)
            in_order = list(range(LENGTH)) if ordered else None
            assert_exactly_once_and_correct(got, reference(kind, 2, epoch, seed=1), epoch, in_order=in_order)


def test_a_second_iterator_while_an_epoch_runs_is_refused(ray_session):
    with new_feed("fill", workers=1) as feed:
        it = feed.epoch(0)
        next(it)
        with pytest.raises(InvalidArgument, match="still being iterated"):
            next(feed.epoch(1))
        it.close()
        assert len(take(feed.epoch(1))) == LENGTH


# ---- shutdown: nothing outlives the feed ---------------------------------------------


class Boom(Exception):
    pass


@pytest.mark.parametrize("how", ["normal", "exception", "keyboard_interrupt", "break_and_close",
                                 "close_without_iterating"])
def test_every_shutdown_path_leaves_no_actor_process_or_segment(ray_session, how):
    fds_before = ring_fds()
    backing = "named" if how == "close_without_iterating" else "memfd"  # conftest checks /dev/shm
    seen = {}

    def remember(feed):
        seen["feed"], seen["pids"], seen["actors"] = feed, producer_pids(feed), producer_actors(feed)
        assert all(registry.is_alive(pid) for pid in seen["pids"])
        assert len(ring_fds()) == len(fds_before) + 1  # the ring's fd, memfd or named

    if how == "normal":
        with new_feed("fill") as feed:
            remember(feed)
            assert len(take(feed.epoch(0))) == LENGTH
    elif how == "exception":
        with pytest.raises(Boom):
            with new_feed("make") as feed:
                remember(feed)
                for i, _ in enumerate(feed.epoch(0)):
                    if i == 20:
                        raise Boom()
    elif how == "keyboard_interrupt":
        with pytest.raises(KeyboardInterrupt):
            with new_feed("shards") as feed:
                remember(feed)
                for i, _ in enumerate(feed.epoch(0)):
                    if i == 20:
                        raise KeyboardInterrupt
    elif how == "break_and_close":
        feed = new_feed("fill", ordered=False)
        remember(feed)
        for i, _ in enumerate(feed.epoch(0)):
            if i == 5:
                break  # producers are now blocked on a full ring
        feed.close()
        feed.close()  # idempotent
    elif how == "close_without_iterating":
        feed = new_feed("fill", backing=backing)
        remember(feed)
        time.sleep(0.3)  # let the producers fill the ring and block
        feed.close()
    feed = seen["feed"]
    assert_nothing_left(ray_session, feed, seen["pids"], seen["actors"], fds_before)
    with pytest.raises(RingClosed):
        next(feed.epoch(5))
    assert ray_session.is_initialized(), "a feed that joined a running Ray must leave it running"


# ---- errors from sources -------------------------------------------------------------------


@pytest.mark.parametrize("source", [failing_fill_source, failing_after_a_slow_batch_source])
def test_a_raising_source_gives_producer_error_with_index_worker_and_traceback(ray_session, source):
    fds_before = ring_fds()
    delivered = []
    feed = Feed(SPEC, fill=source, length=LENGTH, workers=2, seed=0)
    pids, actors = producer_pids(feed), producer_actors(feed)
    with pytest.raises(ProducerError) as info:
        with feed:
            for batch in feed.epoch(0):
                delivered.append((batch.index, checksum(batch)))
    err = info.value
    assert err.index == FAIL_AT and err.worker in (0, 1)
    assert f"batch index {FAIL_AT}" in str(err) and f"producer {err.worker}" in str(err)
    assert "ValueError: record 37 is unreadable" in err.traceback_text
    assert "failing_fill_source" in err.traceback_text  # the original frame, from the producer
    assert "record 37 is unreadable" in str(err)
    # Ordered: what came before the failing batch was delivered, in order, intact.
    expected = reference_indexed("fill", fill_source, SPEC, 0)
    assert [i for i, _ in delivered] == list(range(FAIL_AT))
    assert all(d == expected[i] for i, d in delivered)
    assert_nothing_left(ray_session, feed, pids, actors, fds_before)


def test_a_raising_shard_gives_producer_error_naming_its_worker(ray_session):
    with pytest.raises(ProducerError) as info:
        with Feed(SHARD_SPEC, shards=failing_shards_source, workers=2) as feed:
            take(feed.epoch(0), kind="shards")
    assert info.value.worker == 1 and info.value.index == 5
    assert "KeyError" in str(info.value) and "shard 1 ran dry" in info.value.traceback_text


@pytest.mark.parametrize("fn, needles", [
    (make_wrong_dtype, ["'x'", "float64", "float32"]),
    (make_wrong_rank, ["'x'", "rank 3", "rank 2"]),
    (make_too_large, ["'x'", f"({ROWS + 1}, {COLS})", f"({ROWS}, {COLS})"]),
])
def test_a_batch_that_breaks_the_spec_is_a_producer_error_naming_the_array(ray_session, fn, needles):
    with pytest.raises(ProducerError) as info:
        with Feed(SPEC, make=fn, length=LENGTH, workers=1) as feed:
            take(feed.epoch(0))
    err = info.value
    assert err.index == 0 and err.worker == 0
    assert "SpecMismatch" in str(err)
    for needle in needles:
        assert needle in str(err).splitlines()[0], (needle, str(err))


# ---- bad arguments: an error at construction, before anything starts ------------------------


@pytest.fixture
def nothing_may_start(monkeypatch):
    """Fail the test if a feed gets as far as starting Ray or a producer."""
    def refuse(*args, **kwargs):
        raise AssertionError("the feed started Ray or producers despite a bad argument")

    monkeypatch.setattr(feed_module.raylife, "acquire", refuse)


@pytest.mark.parametrize("kwargs, error, needle", [
    (dict(fill=fill_source, length=10, workers=0), InvalidArgument, "workers"),
    (dict(fill=fill_source, length=10, workers=-2), InvalidArgument, "workers"),
    (dict(fill=fill_source, length=10, workers=1.5), InvalidArgument, "workers"),
    (dict(length=10), InvalidArgument, "exactly one source"),
    (dict(fill=fill_source, make=make_source, length=10), InvalidArgument, "['fill', 'make']"),
    (dict(fill=fill_source, shards=shards_source, length=10), InvalidArgument, "exactly one source"),
    (dict(fill="not callable", length=10), InvalidArgument, "callable"),
    (dict(fill=fill_source), InvalidArgument, "length"),
    (dict(make=make_source, length=0), InvalidArgument, "length"),
    (dict(shards=shards_source, shuffle=True), InvalidArgument, "shuffle"),
    (dict(fill=fill_source, length=10, prefetch=4, slots=5), InvalidArgument, "prefetch + 2"),
    (dict(fill=fill_source, length=10, num_cpus=-1), InvalidArgument, "num_cpus"),
    (dict(fill=fill_source, length=10, lease=0), InvalidArgument, "lease"),
    (dict(fill=fill_source, length=10, lease=float("nan")), InvalidArgument, "lease"),  # would never fire
    (dict(fill=fill_source, length=10, lease=float("inf")), InvalidArgument, "lease"),
    (dict(fill=fill_source, length=10, chunk=-1), InvalidArgument, "chunk"),  # nothing would be handed out
    (dict(fill=fill_source, length=10, chunk=0), InvalidArgument, "chunk"),
    (dict(fill=fill_source, length=True), InvalidArgument, "length"),  # a bool is not a count
    (dict(fill=fill_source, length=10, workers=True), InvalidArgument, "workers"),
    (dict(fill=fill_source, length=10, workers=10_000), InvalidArgument, "workers"),
    (dict(fill=fill_source, length=10, device="cuda:4096"), InvalidArgument, "cuda:4096"),  # no such GPU anywhere
    (dict(fill=fill_source, length=10, device="meta"), InvalidArgument, "CUDA device"),
    (dict(fill=fill_source, length=10, state={"version": 0}), InvalidArgument, "state"),
    (dict(fill=fill_source, length=10, backing="tape"), InvalidArgument, "tape"),
    (dict(fill=fill_source, length=10, warm_producers="yes"), InvalidArgument, "warm_producers"),
    (dict(fill=fill_source, length=10, worker=2), TypeError, "worker"),
    (dict(fill=fill_source, length=10, shufle=True), TypeError, "shufle"),
])
def test_bad_arguments_fail_at_construction(nothing_may_start, kwargs, error, needle):
    with pytest.raises(error) as info:
        Feed(SPEC, **kwargs)
    assert needle in str(info.value)


def test_a_spec_that_is_not_a_batch_spec_is_refused(nothing_may_start):
    with pytest.raises(InvalidArgument, match="BatchSpec"):
        Feed({"x": ((4,), "float32")}, fill=fill_source, length=10)


def test_a_spec_too_large_for_memory_is_no_space_before_anything_starts(nothing_may_start):
    fds_before = ring_fds()
    huge = BatchSpec(x=((2**19, 2**19), "uint8"))  # 256 GiB a slot
    with pytest.raises(NoSpace) as info:
        Feed(huge, fill=fill_source, length=10, workers=2, slots=4)
    assert any(ch.isdigit() for ch in str(info.value))  # the message has the numbers
    assert ring_fds() == fds_before
