"""The cffi binding: loads the compiled module and maps status codes to exceptions.

``lib`` is the C core as declared in ``csrc/shmfeed.h``; ``check(rc, what)`` is
the one place a negative status becomes a typed exception. cffi releases the
GIL around every call into ``lib``, so waits in C never block other threads.
"""

from __future__ import annotations

from typing import Any

from . import errors

try:
    from ._shmfeed_cffi import ffi, lib
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "pyshmfeed's compiled core (_shmfeed_cffi) is missing: install the package with "
        "`pip install .` (or `./run test`), which builds it with CMake."
    ) from exc

_EXCEPTIONS: dict[int, type[errors.ShmfeedError]] = {
    lib.SHMFEED_E_INVAL: errors.InvalidArgument,
    lib.SHMFEED_E_NOMEM: errors.NoSpace,
    lib.SHMFEED_E_SYS: errors.SegmentError,
    lib.SHMFEED_E_CORRUPT: errors.CorruptSegment,
    lib.SHMFEED_E_VERSION: errors.LayoutVersionMismatch,
    lib.SHMFEED_E_TIMEOUT: errors.Timeout,
    lib.SHMFEED_E_CLOSED: errors.RingClosed,
    lib.SHMFEED_E_STALE: errors.StaleClaim,
    lib.SHMFEED_E_STATE: errors.SlotStateError,
    lib.SHMFEED_E_TOOBIG: errors.PayloadTooLarge,
    lib.SHMFEED_E_NOENT: errors.SegmentNotFound,
    lib.SHMFEED_E_PERM: errors.SegmentPermissionError,
    lib.SHMFEED_E_AGAIN: errors.WouldBlock,
}

ERR_BYTES = 1024


def error_for(rc: int, what: str, detail: str = "") -> errors.ShmfeedError:
    """The exception for status ``rc`` raised by operation ``what``."""
    cls = _EXCEPTIONS.get(rc, errors.ShmfeedError)
    reason = ffi.string(lib.shmfeed_strerror(rc)).decode()
    message = f"{what}: {detail}" if detail else f"{what}: {reason}"
    return cls(message)


def check(rc: int, what: str, err: Any = None) -> int:
    """Raise the typed exception for a negative status; return ``rc`` otherwise.

    ``err`` is the char buffer a C call wrote its explanation into, if any.
    """
    if rc >= 0:
        return rc
    detail = ffi.string(err).decode(errors="replace") if err is not None else ""
    raise error_for(rc, what, detail)
