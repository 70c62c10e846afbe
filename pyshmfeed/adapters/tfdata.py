"""tf.data front end: a ``tf.data.Dataset`` over a ``Feed``, for ``model.fit`` and custom loops.

Copies: **one per array per batch**, on tf.data's generator thread: slot →
a fresh 64-byte-aligned numpy array, which TensorFlow adopts as the tensor's
buffer without copying again (it copies only arrays that are not aligned,
which is why the copy is aligned). The copy cannot be skipped: TensorFlow may
keep reading an array it adopted after the generator has moved on (tf.data
prefetches), so a slot lent to it would be overwritten under it. The slot
goes back to the producers as soon as its batch is copied.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import errors

_ALIGN = 64  # TensorFlow adopts numpy buffers aligned to this (EIGEN_MAX_ALIGN_BYTES) instead of copying them


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    """``a`` copied into a new array whose data starts on a 64-byte boundary."""
    raw = np.empty(a.nbytes + _ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    out = raw[start: start + a.nbytes].view(a.dtype).reshape(a.shape)
    np.copyto(out, a, casting="no")
    return out


def dataset(feed: Any, *, keys: Sequence[str] | None = None, start_epoch: int = 0,
            prefetch: int | None = None, fixed_batch: bool = False) -> Any:
    """A ``tf.data.Dataset`` of the feed's batches; each iteration of it is the feed's next epoch.

    Elements are dicts of tensors (named spec), tuples (positional spec), or
    tuples in the order of ``keys`` (e.g. ``keys=("x", "y")`` for
    ``model.fit``). The ``output_signature`` comes from the spec; the leading
    (batch) dimension is ``None`` so a last partial batch fits, unless
    ``fixed_batch=True``. ``prefetch`` adds ``.prefetch(prefetch)``. One copy
    per array per batch (see the module docstring). Iterate one iterator of it
    at a time: an epoch of a feed is read by one consumer.
    """
    import tensorflow as tf

    spec = feed.spec
    if keys is not None:
        keys = tuple(keys)
        for k in keys:
            spec.index_of(k)  # SpecMismatch naming the spec's arrays if k is not one
        order = [spec.index_of(k) for k in keys]
    else:
        order = list(range(len(spec.arrays)))

    def signature(i: int):
        a = spec.arrays[i]
        shape = a.shape if fixed_batch or not a.shape else (None, *a.shape[1:])
        return tf.TensorSpec(shape, tf.as_dtype(a.dtype), name=a.name)

    if keys is not None or spec.positional:
        output_signature: Any = tuple(signature(i) for i in order)
    else:
        output_signature = {a.name: signature(i) for i, a in enumerate(spec.arrays)}
    epochs = itertools.count(start_epoch)

    def generate():
        epoch = next(epochs)
        for batch in feed.epoch(epoch):
            arrays = batch.values()
            copies = [_aligned_copy(arrays[i]) for i in order]  # the one copy; the slot is free after this
            if isinstance(output_signature, dict):
                yield dict(zip(spec.names, copies))
            else:
                yield tuple(copies)

    ds = tf.data.Dataset.from_generator(generate, output_signature=output_signature)
    if getattr(feed, "kind", None) in ("fill", "make"):
        # Batches per epoch are known for indexed sources: Keras then knows an epoch's end in advance.
        ds = ds.apply(tf.data.experimental.assert_cardinality(len(feed.epoch_order(start_epoch))))
    if prefetch:
        if prefetch < 0:
            raise errors.InvalidArgument(f"prefetch={prefetch} must be >= 0")
        ds = ds.prefetch(prefetch)
    return ds


__all__ = ["dataset"]
