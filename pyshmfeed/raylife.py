"""The one Ray of this process: joined or started on first need, shared, shut down after the last user.

Every ``Feed`` (and so every ``DataLoader``) holds a lease from ``acquire()``
while it is open and gives it back with ``release()``. Ray is shut down when
the last lease goes *and* pyshmfeed started it; a Ray the user started (or a
cluster joined with ``address=``... by the user's own ``ray.init``) is never
touched. Feeds created and freed in a loop, or two at once, share one Ray, so
one's close never takes the cluster from under another.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading

_lock = threading.RLock()
_leases = 0
_started = False  # pyshmfeed called ray.init (and so owns the shutdown)

# Ray's environment for an instance pyshmfeed starts itself (never for one the user runs):
# token auth off (the instance is local and private to this process's user) and no usage report.
_OWN_RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


class Lease:
    """Proof that a feed uses Ray; ``release()`` once (idempotent)."""

    def __init__(self) -> None:
        self._held = True

    def release(self) -> None:
        global _leases, _started
        with _lock:
            if not self._held:
                return
            self._held = False
            _leases -= 1
            if _leases == 0 and _started:
                import ray

                _started = False
                with contextlib.suppress(Exception):
                    ray.shutdown()


def acquire(address: str | None, workers: int, num_cpus: float) -> Lease:
    """Use the running Ray, or join ``address``, or start a small local one; counted until released."""
    global _leases, _started
    import ray

    with _lock:
        if not ray.is_initialized():
            if address is not None:
                ray.init(address=address, include_dashboard=False, log_to_driver=True)
            else:
                cpus = max(os.cpu_count() or 1, math.ceil(workers * num_cpus))
                # address="local": a new instance, even if a `ray start` cluster runs here (ray.init()
                # would join it, and refuse num_cpus); joining a cluster is what address= is for.
                with _environment(_OWN_RAY_ENV):
                    ray.init(address="local", num_cpus=cpus, include_dashboard=False, configure_logging=True,
                             logging_level="warning")
            _started = True
        _leases += 1
        return Lease()


def leases() -> int:
    """Feeds holding Ray now (for tests and ``doctor``)."""
    return _leases


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """Set environment variables for the duration (ray.init reads them; its processes inherit them)."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
