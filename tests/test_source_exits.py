"""A source that ends its producer's process, or raises KeyboardInterrupt/SystemExit (issue 11, item 8).

Each must reach the training loop as ``ProducerError`` naming the batch index, after
the batches before it, without using up the restart budget on a batch that will
kill every producer it is given.
"""

from __future__ import annotations

import os

import pytest

from pyshmfeed import BatchSpec, Feed
from pyshmfeed.errors import ProducerError
from pyshmfeed.supervisor import KILLS_PER_BATCH

pytestmark = pytest.mark.timeout(180)

SPEC = BatchSpec(x=((4,), "int64"))
BAD = 7


def raising_fill(index, out, ctx):
    if index == BAD:
        raise KeyboardInterrupt  # e.g. a library that turns a signal into this
    out["x"][...] = index


def exiting_fill(index, out, ctx):
    if index == BAD:
        raise SystemExit(3)
    out["x"][...] = index


def dying_fill(index, out, ctx):
    if index == BAD:
        os._exit(3)  # no Python left to report anything
    out["x"][...] = index


def take_until_error(feed) -> tuple[list[int], ProducerError]:
    got = []
    with pytest.raises(ProducerError) as info:
        for b in feed.epoch(0):
            got.append(int(b["x"][0]))
    return got, info.value


@pytest.mark.parametrize("fill, name", [(raising_fill, "KeyboardInterrupt"), (exiting_fill, "SystemExit")])
def test_keyboard_interrupt_or_system_exit_in_a_source_is_a_producer_error(ray_session, fill, name):
    with Feed(SPEC, fill=fill, length=20, workers=2) as feed:
        got, err = take_until_error(feed)
        restarts = feed.stats()["restarts"]
    assert got == list(range(BAD))  # every batch before it, in order
    assert err.index == BAD and name in str(err) and name in err.traceback_text
    assert restarts == 0


def test_a_batch_that_kills_every_producer_is_named_not_retried_forever(ray_session):
    with Feed(SPEC, fill=dying_fill, length=20, workers=2, max_restarts=20) as feed:
        got, err = take_until_error(feed)
        restarts = feed.stats()["restarts"]
    assert got == list(range(BAD))
    assert err.index == BAD and f"killed its producer {KILLS_PER_BATCH} times" in str(err)
    assert KILLS_PER_BATCH <= restarts < 20  # the budget was not burnt on it
