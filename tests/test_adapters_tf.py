"""The tf.data front end: a Keras model trains through model.fit; a custom loop sees what producers wrote.

One module (TensorFlow takes seconds to import); one feed for all of it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")

from pyshmfeed import BatchSpec, Feed  # noqa: E402
from pyshmfeed.adapters.tfdata import dataset  # noqa: E402

pytestmark = pytest.mark.timeout(120)

ROWS, COLS = 16, 4
LENGTH = 10
SPEC = BatchSpec(x=((ROWS, COLS), "float32"), y=((ROWS, 1), "float32"))
W = np.array([[0.5], [-1.0], [2.0], [0.25]], dtype=np.float32)


def rows_of(index: int) -> int:
    return ROWS if index < LENGTH - 1 else 5  # the last batch is partial


def contents(index: int, epoch: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng([index, epoch]).standard_normal((n, COLS), dtype=np.float32)
    return x, x @ W


def fill(index, out, ctx):
    n = rows_of(index)
    x, y = contents(index, ctx.epoch, n)
    out.resize("x", (n, COLS))[...] = x
    out.resize("y", (n, 1))[...] = y


@pytest.fixture(scope="module")
def feed(ray_session):
    with Feed(SPEC, fill=fill, length=LENGTH, workers=2, slots=6) as f:
        yield f


def test_a_custom_loop_sees_what_the_producers_wrote(feed):
    ds = dataset(feed, start_epoch=100)
    for epoch in (100, 101):  # each iteration of the dataset is the feed's next epoch
        got = list(ds)
        assert len(got) == LENGTH
        for index, element in enumerate(got):
            x, y = contents(index, epoch, rows_of(index))
            assert set(element) == {"x", "y"}
            np.testing.assert_array_equal(element["x"].numpy(), x)
            np.testing.assert_array_equal(element["y"].numpy(), y)
    # The tensors were copied out of their slots: every slot has been rewritten since, and they are intact.
    x0, _ = contents(0, 101, ROWS)
    np.testing.assert_array_equal(got[0]["x"].numpy(), x0)


def test_the_signature_comes_from_the_spec(feed):
    ds = dataset(feed, keys=("x", "y"))
    x_spec, y_spec = ds.element_spec
    assert x_spec.shape.as_list() == [None, COLS] and x_spec.dtype == tf.float32
    assert y_spec.shape.as_list() == [None, 1]
    fixed = dataset(feed, fixed_batch=True).element_spec
    assert fixed["x"].shape.as_list() == [ROWS, COLS]


def test_a_keras_model_trains_through_model_fit(feed):
    keras = tf.keras
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((COLS,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    history = model.fit(dataset(feed, keys=("x", "y"), start_epoch=200, prefetch=2), epochs=4, shuffle=False,
                        verbose=0)
    losses = history.history["loss"]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0]
    assert feed.stats()["batches"] >= 4 * LENGTH
