"""The one Ray of this process: joined or started on first need, shared, shut down after the last user.

Every ``Feed`` (and so every ``DataLoader``) holds a lease from ``acquire()``
while it is open and gives it back with ``release()``. Ray is shut down when
the last lease goes *and* pyshmfeed started it; a Ray the user started (or a
cluster joined with ``address=``... by the user's own ``ray.init``) is never
touched. Feeds created and freed in a loop, or two at once, share one Ray, so
one's close never takes the cluster from under another.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import threading
import weakref
from typing import Any, Callable

_lock = threading.RLock()
_leases = 0
_started = False  # pyshmfeed called ray.init (and so owns the shutdown)

# Ray's environment for an instance pyshmfeed starts itself (never for one the user runs):
# token auth off (the instance is local and private to this process's user) and no usage report.
_OWN_RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


_open: "weakref.WeakSet[Lease]" = weakref.WeakSet()
_exit_hook_for: int | None = None  # id of the Ray session whose shutdown our exit hook precedes


class Lease:
    """Proof that a feed uses Ray; ``release()`` once (idempotent).

    ``closer`` (held weakly) runs at interpreter exit if the lease is still
    held then, *before* Ray's own exit handler shuts Ray down: a feed still
    open at exit stops its producers while Ray can still be asked to.
    """

    def __init__(self, closer: Callable[[], Any] | None = None) -> None:
        self._held = True
        self._closer = weakref.WeakMethod(closer) if closer is not None else None
        _open.add(self)

    def close_owner(self) -> None:
        owner = self._closer() if self._closer is not None else None
        if owner is not None:
            with contextlib.suppress(Exception):
                owner()
        self.release()

    def release(self) -> None:
        global _leases, _started
        with _lock:
            if not self._held:
                return
            self._held = False
            _leases -= 1
            if _leases == 0 and _started:
                import ray

                from . import hosts

                hosts.forget()  # its threads make no Ray call from here on: the hosts go with Ray
                _started = False
                with contextlib.suppress(Exception):
                    ray.shutdown()


def acquire(address: str | None, workers: int, num_cpus: float, closer: Callable[[], Any] | None = None) -> Lease:
    """Use the running Ray, or join ``address``, or start a small local one; counted until released."""
    global _leases, _started, _exit_hook_for
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
        if _exit_hook_for != id(ray._private.worker.global_worker.core_worker):  # noqa: SLF001
            # atexit runs last-registered first: registered after ray.init, ours runs before Ray's.
            atexit.register(_close_open_feeds)
            _exit_hook_for = id(ray._private.worker.global_worker.core_worker)  # noqa: SLF001
        _leases += 1
        return Lease(closer)


def _close_open_feeds() -> None:
    for lease in list(_open):
        lease.close_owner()


def dead_processes() -> list[str]:
    """Ray's own processes (raylet, GCS) that this process started and that have died since.

    Only a Ray started from this process (by pyshmfeed or by the user's ``ray.init()``) has
    them as children; for a joined cluster this is always empty (the feed then notices
    that no producer runs any more).
    """
    try:
        import ray

        node = ray._private.worker._global_node  # noqa: SLF001 -- the only handle on Ray's processes
        processes = node.all_processes if node is not None else {}
    except Exception:
        return []
    dead = []
    for name in ("raylet", "gcs_server"):
        for info in processes.get(name, []):
            proc = getattr(info, "process", None)
            if proc is not None and proc.poll() is not None:
                dead.append(f"{name} (pid {proc.pid})")
    return dead


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
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old
