"""pyshmfeed: keep GPUs fed from a shared-memory ring written by Ray producers.

This module only re-exports the public API; see README.md for the tour.
Frameworks (torch, tensorflow, jax) are never imported here: their front
ends live in ``pyshmfeed.adapters`` and import them on first use.
"""

from .errors import (
    CorruptSegment,
    InvalidArgument,
    LayoutVersionMismatch,
    NoSpace,
    PayloadTooLarge,
    ProducerError,
    ProducerLost,
    RingClosed,
    SegmentError,
    SegmentNotFound,
    SegmentPermissionError,
    ShmfeedError,
    SlotStateError,
    SpecMismatch,
    StaleClaim,
    StaleView,
    Timeout,
    WouldBlock,
)
from .feed import Feed
from .hosts import release_idle as release_producers
from .ring import ConsumerSlot, ProducerSlot, Ring, RingHandle
from .source import SlotArrays, SourceContext
from .spec import ArraySpec, Batch, BatchSpec

try:  # one place for the version: the package metadata (pyproject.toml)
    from importlib.metadata import PackageNotFoundError, version as _version

    __version__ = _version("pyshmfeed")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Feed", "release_producers", "BatchSpec", "ArraySpec", "Batch", "SourceContext", "SlotArrays",
    "Ring", "RingHandle", "ProducerSlot", "ConsumerSlot",
    "ShmfeedError", "InvalidArgument", "NoSpace", "SegmentError", "SegmentNotFound",
    "SegmentPermissionError", "CorruptSegment", "LayoutVersionMismatch", "Timeout", "WouldBlock",
    "RingClosed", "StaleClaim", "StaleView", "SlotStateError", "PayloadTooLarge", "SpecMismatch",
    "ProducerError", "ProducerLost",
]
