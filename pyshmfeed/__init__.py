"""pyshmfeed: keep GPUs fed from a shared-memory ring written by Ray producers.

This module only re-exports the public API; see README.md for the tour.
Frameworks (torch, tensorflow, jax) are never imported here: their front
ends live in ``pyshmfeed.adapters`` and import them on first use.
"""

from .errors import (
    ConsumerGone,
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
from .ring import ConsumerSlot, ProducerSlot, Ring, RingHandle
from .source import SlotArrays, SourceContext
from .spec import ArraySpec, Batch, BatchSpec

__version__ = "0.1.0"

__all__ = [
    "Feed", "BatchSpec", "ArraySpec", "Batch", "SourceContext", "SlotArrays",
    "Ring", "RingHandle", "ProducerSlot", "ConsumerSlot",
    "ShmfeedError", "InvalidArgument", "NoSpace", "SegmentError", "SegmentNotFound",
    "SegmentPermissionError", "CorruptSegment", "LayoutVersionMismatch", "Timeout", "WouldBlock",
    "RingClosed", "StaleClaim", "StaleView", "SlotStateError", "PayloadTooLarge", "SpecMismatch", "ProducerError",
    "ProducerLost", "ConsumerGone",
]
