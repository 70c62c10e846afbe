"""The JAX front end: values arrive intact on the device, every slot goes back. Skipped without jax."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from pyshmfeed import BatchSpec, Feed  # noqa: E402
from pyshmfeed.adapters.jax import batches  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SPEC = BatchSpec(x=((8, 5), "float32"), y=((8,), "int32"))
LENGTH = 12


def fill(index, out, ctx):
    out["x"][...] = np.arange(40, dtype=np.float32).reshape(8, 5) + index * 1000 + ctx.epoch
    out["y"][...] = index


def test_values_arrive_intact_and_outlive_their_slots(ray_session):
    with Feed(SPEC, fill=fill, length=LENGTH, workers=2, slots=6, prefetch=2) as feed:
        kept = list(batches(feed, 3, prefetch=2))  # every slot has been rewritten since the first batches
        assert len(kept) == LENGTH
        for index, batch in enumerate(kept):
            assert isinstance(batch["x"], jax.Array)
            expected = np.arange(40, dtype=np.float32).reshape(8, 5) + index * 1000 + 3
            np.testing.assert_array_equal(np.asarray(batch["x"]), expected)
            np.testing.assert_array_equal(np.asarray(batch["y"]), np.full(8, index, np.int32))
        assert feed.ring.occupancy()["acquired"] == 0


def test_breaking_out_gives_every_slot_back(ray_session):
    with Feed(SPEC, fill=fill, length=LENGTH, workers=2, slots=6, prefetch=2) as feed:
        for n, _batch in enumerate(batches(feed, 0, prefetch=3)):
            if n == 2:
                break
        assert feed.ring.occupancy()["acquired"] == 0
        assert len(list(batches(feed, 1))) == LENGTH
