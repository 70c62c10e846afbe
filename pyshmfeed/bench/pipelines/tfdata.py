"""tf.data over Python generators: one generator with prefetch, or one per worker interleaved.

``from_generator`` runs the Python generator on a tf.data thread in the
training process (under the GIL) and copies each yielded array into a tensor.
tf.data runs at most as many generator bodies at once as its private thread
pool has threads (default: the core count), so interleaving W sleeping
generators needs ``private_threadpool_size >= W + 2`` (W generators, plus the
interleave and prefetch stages); with the default, two cores run two at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before the import: silences start-up chatter

import tensorflow as tf

from ..workload import Workload, shard_batches
from . import RunContext


def _signature(w: Workload):
    return (tf.TensorSpec(shape=w.shape, dtype=tf.float32), tf.TensorSpec(shape=w.label_shape, dtype=tf.float32))


@contextmanager
def open_prefetch(w: Workload, length: int, run: RunContext) -> Iterator[Iterator[Any]]:
    ds = tf.data.Dataset.from_generator(lambda: shard_batches(0, 1, length, w), output_signature=_signature(w))
    ds = ds.prefetch(tf.data.AUTOTUNE)
    iterator = ds.as_numpy_iterator()
    try:
        yield iterator
    finally:
        del iterator


@contextmanager
def open_interleave(w: Workload, length: int, run: RunContext) -> Iterator[Iterator[Any]]:
    workers = w.workers

    def shard(k):
        return shard_batches(int(k), workers, length, w)

    ds = tf.data.Dataset.range(workers).interleave(
        lambda k: tf.data.Dataset.from_generator(shard, args=(k,), output_signature=_signature(w)),
        cycle_length=workers, block_length=1, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.threading.private_threadpool_size = workers + 2
    ds = ds.with_options(options)
    run.extra["private_threadpool_size"] = workers + 2
    iterator = ds.as_numpy_iterator()
    try:
        yield iterator
    finally:
        del iterator
