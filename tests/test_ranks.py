"""Data-parallel ranks: ``Feed(rank=r, world_size=w)`` gives each rank a disjoint, equal, deterministic share.

Like torch's DistributedSampler, an epoch whose length does not divide by the
world size is padded by wrapping around to its start, so every rank gets
``ceil(length / world_size)`` batches; the padding is the only overlap
between ranks. The split itself (``Feed.epoch_order``) is checked over many
shapes without starting anything; real feeds then check that what each rank
*delivers* is that split, with the right contents, and that each rank
resumes from its own ``state_dict()``.
"""

from __future__ import annotations

import collections
import math
from types import SimpleNamespace

import numpy as np
import pytest

import pyshmfeed as sf

SPEC = sf.BatchSpec(x=((4, 3), "int64"))


def fill(index, out, ctx):
    out["x"][:] = index * 1000 + ctx.epoch  # the contents name the batch


def split(length: int, world_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0):
    """Every rank's ``epoch_order`` (the method only reads these attributes)."""
    return [sf.Feed.epoch_order(SimpleNamespace(length=length, world_size=world_size, rank=r, shuffle=shuffle,
                                                seed=seed), epoch)
            for r in range(world_size)]


def delivered(feed: sf.Feed, epoch: int, stop_after: int | None = None) -> list[int]:
    """Indices in delivery order; checks every batch's contents on the way."""
    out = []
    for batch in feed.epoch(epoch):
        assert np.all(batch["x"] == batch.index * 1000 + epoch), f"batch {batch.index} has wrong contents"
        out.append(batch.index)
        if stop_after is not None and len(out) == stop_after:
            break
    return out


# ---- the split, without starting anything -------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("length", [1, 7, 10, 11, 64])
def test_ranks_get_equal_shares_that_cover_the_epoch_and_overlap_only_in_padding(length, world_size, shuffle):
    shares = split(length, world_size, shuffle=shuffle, seed=11)
    per_rank = math.ceil(length / world_size)
    assert [len(s) for s in shares] == [per_rank] * world_size
    counts = collections.Counter(int(i) for s in shares for i in s)
    assert set(counts) == set(range(length))  # together complete
    padding = per_rank * world_size - length
    assert sum(counts.values()) - length == padding
    # The padding wraps around: it repeats the first indices of the epoch's global order.
    global_order = split(length, 1, shuffle=shuffle, seed=11)[0]
    repeated = sorted(i for i, c in counts.items() for _ in range(c - 1))
    assert repeated == sorted(int(i) for i in np.resize(global_order, padding))


def test_the_split_is_deterministic_and_shuffles_per_epoch():
    assert all(np.array_equal(a, b) for a, b in zip(split(50, 4, shuffle=True, seed=3),
                                                    split(50, 4, shuffle=True, seed=3)))
    assert not np.array_equal(split(50, 4, shuffle=True, seed=3, epoch=0)[1],
                              split(50, 4, shuffle=True, seed=3, epoch=1)[1])
    assert not np.array_equal(split(50, 4, shuffle=True, seed=3)[1], split(50, 4, shuffle=True, seed=4)[1])
    assert [list(s) for s in split(5, 2)] == [[0, 2, 4], [1, 3, 0]]  # unshuffled: round robin, wrapped


def test_a_rank_outside_the_world_is_refused():
    for rank, world_size in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(sf.InvalidArgument, match="rank"):
            sf.Feed(SPEC, fill=fill, length=4, rank=rank, world_size=world_size)


def test_a_shards_source_cannot_be_split_by_the_feed():
    with pytest.raises(sf.InvalidArgument, match="shard by rank"):
        sf.Feed(SPEC, shards=lambda w, n, ctx: iter(()), rank=0, world_size=2)


# ---- real feeds ------------------------------------------------------------------


def test_two_ranks_deliver_disjoint_equal_shares_that_together_complete_each_epoch(ray_session):
    length, world_size = 11, 2
    got = {}
    for rank in range(world_size):
        with sf.Feed(SPEC, fill=fill, length=length, workers=2, shuffle=True, seed=5, rank=rank,
                     world_size=world_size) as feed:
            for epoch in range(2):
                got[rank, epoch] = delivered(feed, epoch)
                assert got[rank, epoch] == [int(i) for i in feed.epoch_order(epoch)]
    for epoch in range(2):
        a, b = got[0, epoch], got[1, epoch]
        assert len(a) == len(b) == 6
        assert set(a) | set(b) == set(range(length))
        assert len(set(a) & set(b)) == 1  # the one padding batch
    assert got[0, 0] != got[0, 1]  # shuffled per epoch

    # Deterministic: the same rank, started again, delivers the same batches in the same order.
    with sf.Feed(SPEC, fill=fill, length=length, workers=1, shuffle=True, seed=5, rank=1,
                 world_size=world_size) as feed:
        assert delivered(feed, 1) == got[1, 1]


@pytest.mark.parametrize("ordered", [True, False])
def test_each_rank_resumes_from_its_own_state(ray_session, ordered):
    length, world_size, rank = 10, 3, 1
    options = {"fill": fill, "length": length, "workers": 2, "shuffle": True, "seed": 9, "rank": rank,
               "world_size": world_size, "ordered": ordered}
    with sf.Feed(SPEC, **options) as feed:
        expected = [int(i) for i in feed.epoch_order(0)]
        first = delivered(feed, 0, stop_after=2)
        state = feed.state_dict()
    assert state["rank"] == rank and state["world_size"] == world_size
    with pytest.raises(sf.InvalidArgument, match="rank"):
        sf.Feed(SPEC, **{**options, "rank": 0}, state=state)
    with sf.Feed(SPEC, **options, state=state) as feed:
        rest = delivered(feed, 0)
        after = delivered(feed, 1)
        expected_after = [int(i) for i in feed.epoch_order(1)]
    if ordered:
        assert first + rest == expected
        assert after == expected_after
    else:
        assert sorted(first + rest) == sorted(expected)
        assert sorted(after) == sorted(expected_after)
