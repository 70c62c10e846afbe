"""JAX front end: batches of ``jax.Array`` put on a device with ``jax.device_put``, a few batches ahead.

Copies per array per batch:

- accelerator (GPU/TPU): **one transfer, straight from the slot**: the slot
  is held until ``block_until_ready`` says the transfer finished reading it,
  then released. (The ring is not page-locked for JAX, so the runtime may
  stage the transfer through its own pinned buffer: that one is JAX's.)
- CPU: **one copy** (slot → a new numpy array, then the slot is released):
  on the CPU backend ``device_put`` may adopt a numpy buffer without copying,
  and a slot must not outlive its batch's turn.

The arrays handed out belong to the loop. JAX is imported on first use.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from .. import errors
from ..spec import Batch


def batches(feed: Any, epoch: int = 0, *, device: Any = None, prefetch: int = 2) -> Iterator[Batch]:
    """Iterate ``epoch`` of ``feed`` as ``Batch`` objects of ``jax.Array`` on ``device``.

    ``device``: a ``jax.Device`` or a platform name ("gpu", "cpu"); default
    ``jax.devices()[0]``. ``prefetch`` transfers are kept in flight ahead of
    the loop (at most ``feed.slots - 2``).
    """
    import jax

    if device is None:
        dev = jax.devices()[0]
    elif isinstance(device, str):
        dev = jax.devices(device)[0]
    else:
        dev = device
    if not isinstance(prefetch, int) or prefetch < 0 or prefetch + 2 > feed.slots:
        raise errors.InvalidArgument(f"prefetch={prefetch!r} must be an int in 0..{feed.slots - 2} (the feed "
                                     f"has {feed.slots} slots)")
    on_cpu = dev.platform == "cpu"
    pending: collections.deque = collections.deque()  # (slot or None, batch, device arrays)

    def hand_out(item) -> Batch:
        slot, batch, arrays = item
        jax.block_until_ready(arrays)  # the transfer has read the slot: it may go back
        if slot is not None:
            slot.release()
        it = iter(arrays)
        return batch.map(lambda _a: next(it))

    with contextlib.closing(feed.slots_of(epoch)) as slots:
        try:
            for slot, batch in slots:
                if on_cpu:
                    host = [np.array(a, copy=True) for a in batch.values()]  # the one copy
                    slot.release()
                    slot = None
                    arrays = jax.device_put(host, dev)
                else:
                    arrays = jax.device_put(list(batch.values()), dev)  # reads the slot, asynchronously
                pending.append((slot, batch, arrays))
                if len(pending) > prefetch:
                    yield hand_out(pending.popleft())
            while pending:
                yield hand_out(pending.popleft())
        finally:
            while pending:  # abandoned early: wait for each transfer, then give its slot back
                slot, _batch, arrays = pending.popleft()
                try:
                    jax.block_until_ready(arrays)
                finally:
                    if slot is not None:
                        slot.release()


__all__ = ["batches"]
