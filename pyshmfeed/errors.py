"""The exception hierarchy: one exception per C status code, plus the feed's own.

Every status the C core can return maps to exactly one class here (see
``_ffi.check``), so callers can catch what they can handle and let the rest
travel. Messages say what happened, the value that was wrong and what to do.
"""

from __future__ import annotations


class ShmfeedError(Exception):
    """Base class of every error raised by pyshmfeed."""


class InvalidArgument(ShmfeedError, ValueError):
    """An argument is out of range (slot count, slot size, flags, owner token...)."""


class NoSpace(ShmfeedError, MemoryError):
    """The machine cannot back a ring of the requested size, or a slot at its first claim (the message says)."""

    def __init__(self, message: str, *, claim: bool = False) -> None:
        super().__init__(message)
        self.claim = claim  # raised by Ring.claim: a producer's error record says so (ProducerError.from_record)


class SegmentError(ShmfeedError, OSError):
    """A system call on the segment failed."""


class SegmentNotFound(SegmentError, FileNotFoundError):
    """The segment does not exist (its creator exited or closed it)."""


class SegmentPermissionError(SegmentError, PermissionError):
    """This process may not open the segment (another user's ring, or a name that exists)."""


class CorruptSegment(ShmfeedError):
    """The segment fails validation: wrong magic, impossible geometry, truncated, bad lengths."""


class LayoutVersionMismatch(CorruptSegment):
    """The segment was written by a pyshmfeed with another layout version."""


class Timeout(ShmfeedError, TimeoutError):
    """A wait on the ring ran out of time."""


class WouldBlock(ShmfeedError):
    """A zero-timeout (try_) call found nothing to do now."""


class RingClosed(ShmfeedError):
    """The ring was closed by either side; ``code`` and ``reason`` say why."""

    def __init__(self, message: str, code: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class StaleClaim(ShmfeedError):
    """This producer's claim was taken back (it was presumed dead); its batch was re-issued."""


class SlotStateError(ShmfeedError):
    """The slot is not in the state the call needs: committed twice, released twice, used after release."""


class StaleView(ShmfeedError):
    """Debug mode (``PYSHMFEED_DEBUG_VIEWS=1``): a view of slot memory was read after its slot was released.

    Without debug mode such a read silently returns whatever the slot holds next.
    """


class PayloadTooLarge(ShmfeedError, ValueError):
    """A payload is longer than the slot."""


class SpecMismatch(ShmfeedError, ValueError):
    """A batch does not match the BatchSpec: wrong array name, dtype, rank or a shape over the maximum."""


class ProducerError(ShmfeedError):
    """A user source function raised inside a producer.

    ``index`` is the batch index it was making, ``worker`` the producer's
    number and ``traceback_text`` the original traceback, formatted in the
    producer process.
    """

    def __init__(self, message: str, *, index: int | None = None, worker: int | None = None,
                 traceback_text: str = "") -> None:
        super().__init__(message)
        self.index = index
        self.worker = worker
        self.traceback_text = traceback_text

    @classmethod
    def from_record(cls, kind: str, record: dict) -> "ProducerError":
        """The error for a producer's error record (``producer.error_record``): what failed, where."""
        what = (f"claiming a slot for it failed with {record['type']}" if record.get("origin") == "claim"
                else f"the {kind} source raised {record['type']}")
        return cls(f"{what}: {record['message']} (batch index {record['index']}, producer {record['worker']})",
                   index=record["index"], worker=record["worker"], traceback_text=record["traceback"])

    def __str__(self) -> str:
        base = super().__str__()
        if self.traceback_text:
            return f"{base}\n\nOriginal traceback (in the producer):\n{self.traceback_text}"
        return base


class ProducerLost(ShmfeedError):
    """Producers kept dying and the feed ran out of restarts.

    ``pid``: the process of the producer that died last (None if it never
    started); ``signal``: the signal it died of when it noted one
    (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT), else None.
    """

    def __init__(self, message: str, *, pid: int | None = None, signal: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.signal = signal

    def __reduce__(self):
        return type(self), self.args, {"pid": self.pid, "signal": self.signal}

