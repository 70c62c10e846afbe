"""PyTorch front end over any ``Feed``: ``TorchBatches``, batches of tensors on a device.

``TorchBatches(feed, device=...)`` iterates a feed epoch after epoch and
yields ``Batch`` objects of torch tensors, staged by ``pyshmfeed.stage``.
Copies made on the consumer side, per batch:

- ``device="cpu"`` (default): none. ``torch.from_numpy`` views over the
  slot, valid until the loop asks for the next batch (``copy=True``: one
  copy into owned tensors; ``pin=True`` with CUDA: the ring is page-locked so
  ``x.cuda(non_blocking=True)`` is a DMA straight from the slot).
- ``device="cuda"``: no host copy. The ring is page-locked once and each
  array goes slot → GPU by DMA on a side stream; if page-locking fails, one
  host copy into a small pool of pinned buffers (``feed.stats()["staging"]``
  says which). The CUDA tensors belong to the loop.

The drop-in for ``torch.utils.data.DataLoader`` is ``DataLoader`` in
torch_loader.py (also importable from here and as
``pyshmfeed.torch.DataLoader``); importing this module imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..stage import Stage, cuda_target, torch_cpu_target

if TYPE_CHECKING:  # at run time DataLoader comes from __getattr__ below: importing this module imports no torch
    from .torch_loader import DataLoader

# ---- batches of tensors from any feed ----------------------------------------------


class TorchBatches:
    """An iterable over ``feed``: each ``iter()`` is the next epoch, yielding ``Batch`` objects of tensors.

    ``device``: "cpu" (tensors viewing the slot, valid until the next batch;
    ``copy=True`` for owned tensors, ``pin=True`` to page-lock) or a CUDA
    device (tensors copied from the ring by DMA, owned by the loop).
    ``prefetch``: batches staged ahead (default: the feed's).
    ``epoch(e)`` iterates one given epoch.
    """

    def __init__(self, feed: Any, device: Any = "cpu", *, prefetch: int | None = None, copy: bool = False,
                 pin: bool = False, start_epoch: int = 0) -> None:
        self.feed = feed
        self.device = device
        self.prefetch = prefetch
        self.copy = copy
        self.pin = pin
        self.next_epoch = start_epoch
        self._target = _target_for(feed, device, copy=copy, pin=pin)

    def epoch(self, epoch: int) -> Stage:
        """A ``Stage`` (an iterator, also a context manager) over ``epoch``."""
        return Stage(self.feed, epoch, self._target, prefetch=self.prefetch)

    def __iter__(self) -> Stage:
        e = self.next_epoch
        self.next_epoch += 1
        return self.epoch(e)

    def set_epoch(self, epoch: int) -> None:
        self.next_epoch = epoch

    def __len__(self) -> int:
        if self.feed.length is None:
            raise TypeError("a shards feed has no length")
        return self.feed.length

    def stats(self) -> dict[str, Any]:
        return self.feed.stats()


def _target_for(feed: Any, device: Any, *, copy: bool, pin: bool):
    if device is None or str(device) == "cpu":
        return torch_cpu_target(feed, copy=copy, pin=pin)
    return cuda_target(feed, device)


def __getattr__(name: str):
    """``DataLoader`` lives in torch_loader.py, which imports torch: load it on first use only."""
    if name == "DataLoader":
        from .torch_loader import DataLoader

        return DataLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TorchBatches", "DataLoader"]
