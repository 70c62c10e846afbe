"""Warm producer processes, shared by the feeds of this process (NOTE [warm producers]).

NOTE [warm producers]
  why      A Ray actor is a new Python process that imports Ray, numpy and
           pyshmfeed before it makes a batch: 0.2 s on an idle machine,
           seconds on a loaded one. That was most of a feed's start-up, and
           every Feed (every DataLoader iterator) paid it again.
  host     A ``ProducerHost`` is a Ray actor that runs one producer at a
           time: ``start()`` attaches a feed's ring and opens its record,
           ``serve()`` makes batches until the ring closes (or the record's
           stop flag ends it), then detaches the ring, drops the source and
           returns. The host is then free for another feed.
  pool     When a feed stops, the hosts whose ``serve()`` returned go back
           to this process's pool, keyed by their actor options; the next
           feed with the same options takes them instead of starting actors.
           One still finishing the batch it had when the ring closed is
           handed to a returner thread, so ``close()`` does not wait for it:
           it joins the pool when its ``serve()`` returns, or is killed if
           that takes over ``RETURN_S``. A host that died or was killed
           (lease, Ray's death) never goes back.
  cost     Idle hosts hold their Ray CPUs (``num_cpus``). They are killed
           after ``IDLE_S`` idle, when a feed asks for other options (the
           CPUs they hold may be what its producers wait for), by
           ``release_idle()`` (public: ``pyshmfeed.release_producers()``),
           and with Ray (they are owned by this process: they die with it).
  safety   A host in the pool maps no ring: ``serve()`` detaches before it
           returns, so nothing it does later can touch an old segment. A new
           feed gives it a new owner token, so reclaiming by owner never
           mixes two feeds' claims.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from dataclasses import dataclass
from typing import Any

from .procs import wait_dead
from .producer import Producer

IDLE_S = 30.0     # an idle host is killed after this long in the pool
RETURN_S = 5.0    # after its ring closed, a serve() that has not returned by then is killed
START_GRACE_S = 30.0  # ... and a host still starting then, if it has not started by this
_REAP_TICK_S = 1.0


class ProducerHost:
    """A Ray actor that hosts one ``Producer`` at a time (NOTE [warm producers])."""

    def __init__(self) -> None:
        self._producer: Producer | None = None

    def start(self, *producer_args: Any) -> dict[str, Any]:
        """Attach the feed's ring as its producer ``worker``; returns ``Producer.identity()``."""
        if self._producer is not None:
            raise RuntimeError("this producer host already runs a producer")  # the supervisor's bug, not a user's
        self._producer = Producer(*producer_args)
        return self._producer.identity()

    def serve(self) -> dict[str, Any]:
        """``Producer.serve()``, then give the ring and the source up (the host is free again)."""
        producer = self._producer
        assert producer is not None  # start() came first (the supervisor's order)
        try:
            return producer.serve()
        finally:
            self._producer = None
            producer.close()
            del producer
            gc.collect()  # the source's memory goes now, not at some later feed's batch


@dataclass
class Host:
    """A started host actor: its handle and (once it ran a producer) its pid."""

    actor: Any
    pid: int | None = None
    idle_since: float = 0.0


_lock = threading.Lock()
_idle: dict[Any, list[Host]] = {}
_session: Any = None       # the Ray session the idle hosts belong to
_reaper: threading.Thread | None = None
_returning: dict[Any, tuple[Any, Host, float]] = {}  # start() or serve() ref -> (key, host, deadline)
_serving: set[Any] = set()  # the refs of _returning that are serve() calls
_returner: threading.Thread | None = None


def _current_session() -> Any:
    import ray

    if not ray.is_initialized():
        return None
    return id(ray._private.worker.global_worker.core_worker)  # noqa: SLF001 -- changes with every ray.init


def borrow(key: Any) -> Host | None:
    """An idle host started with options ``key``, or None (start one). Idle hosts of other keys are killed."""
    session = _current_session()
    with _lock:
        _forget_other_session(session)
        others = [h for k, hs in _idle.items() if k != key for h in hs]
        for k in [k for k in _idle if k != key]:
            del _idle[k]
        host = _idle[key].pop() if _idle.get(key) else None
        if host is None:
            # One finishing its last batch: Ray runs the new start() after that serve() returns.
            ref = next((r for r in _serving if _returning[r][0] == key), None)
            if ref is not None:
                host = _returning.pop(ref)[1]
                _serving.discard(ref)
    _kill(others)
    return host


def give_back(key: Any, host: Host) -> None:
    """A host whose ``serve()`` returned: keep it warm for the next feed."""
    global _reaper
    session = _current_session()
    if session is None:
        return
    with _lock:
        _forget_other_session(session)
        host.idle_since = time.monotonic()
        _idle.setdefault(key, []).append(host)
        if _reaper is None:
            _reaper = threading.Thread(target=_reap, name="pyshmfeed-host-reaper", daemon=True)
            _reaper.start()


def give_back_when_done(key: Any, host: Host, serve_ref: Any = None, start_ref: Any = None) -> None:
    """A host whose feed closed while it made a batch (``serve_ref``) or was still starting
    (``start_ref``): pool it once its ``serve()`` returns (NOTE [warm producers])."""
    global _returner
    with _lock:
        if start_ref is not None:
            _returning[start_ref] = (key, host, time.monotonic() + START_GRACE_S)
        else:
            _returning[serve_ref] = (key, host, time.monotonic() + RETURN_S)
            _serving.add(serve_ref)
        if _returner is None:
            _returner = threading.Thread(target=_return_hosts, name="pyshmfeed-host-returner", daemon=True)
            _returner.start()


def settle(timeout: float = RETURN_S + 5) -> None:
    """Wait until no host is still returning (tests: every host is then pooled or dead)."""
    deadline = time.monotonic() + timeout
    while _returning and time.monotonic() < deadline:
        time.sleep(0.02)


def release_idle() -> list[int]:
    """Kill the warm producer processes waiting for this process's next feed; returns their pids.

    A closed feed's producers stay warm for ``IDLE_S`` seconds (NOTE [warm producers]), holding
    their Ray CPUs: call this to have those CPUs back at once (``pyshmfeed.release_producers()``).
    """
    with _lock:
        hosts = [h for hs in _idle.values() for h in hs]
        _idle.clear()
    _kill(hosts)
    return [h.pid for h in hosts if h.pid is not None]


def idle_pids() -> set[int]:
    """Pids of the idle hosts (tests, ``doctor``)."""
    with _lock:
        return {h.pid for hs in _idle.values() for h in hs if h.pid is not None}


def _forget_other_session(session: Any) -> None:
    """Hosts of an earlier Ray died with it: drop their handles (under _lock)."""
    global _session
    if session != _session:
        _idle.clear()
        _session = session


def _kill(hosts: list[Host]) -> None:
    if not hosts:
        return
    import ray

    for h in hosts:
        with contextlib.suppress(BaseException):  # a dead actor, or Ray shutting down
            ray.kill(h.actor, no_restart=True)
    for h in hosts:
        if h.pid is not None:
            wait_dead(h.pid, polite_s=2.0)


def _return_hosts() -> None:
    """The returner thread: pool each host whose serve() returned, kill those past their deadline.

    A host that was still starting gets its ``serve()`` called once ``start()`` returns: its
    ring is closed, so that returns at once, with the ring detached.
    """
    global _returner
    import ray

    while True:
        with _lock:
            refs = list(_returning)
            if not refs:
                _returner = None  # under the lock: give_back_when_done() starts a new one from here on
                return
        try:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0.05)
        except BaseException:  # Ray is gone (its shutdown raises SystemExit in waiting threads): so are the hosts
            with _lock:
                _returning.clear()
                _serving.clear()
            return
        now = time.monotonic()
        for ref in refs:
            if ref not in done and now <= _returning.get(ref, (None, None, now))[2]:
                continue
            with _lock:  # from here on this thread owns the host (a borrow() can no longer take it)
                entry = _returning.pop(ref, None)
                _serving.discard(ref)
            if entry is None:
                continue  # borrowed by a new feed meanwhile
            key_, host, _ = entry
            if ref not in done:  # past its deadline
                _kill([host])
                continue
            try:
                result = ray.get(ref, timeout=1)
            except BaseException:
                result = None  # it died, or its start failed (or Ray shut down): not worth keeping
            if isinstance(result, dict) and "pid" in result:  # start() returned: now serve() returns
                host.pid = result["pid"]
                serve_ref = host.actor.serve.remote()
                with _lock:
                    _returning[serve_ref] = (key_, host, now + RETURN_S)
                    _serving.add(serve_ref)
            elif result is not None:
                give_back(key_, host)
            else:
                _kill([host])


def _reap() -> None:
    """Kill hosts idle for over IDLE_S; ends when the pool is empty."""
    global _reaper
    while True:
        time.sleep(_REAP_TICK_S)
        now = time.monotonic()
        with _lock:
            if not any(_idle.values()):
                _reaper = None  # under the lock: give_back() starts a new one from here on
                return
            expired = [h for hs in _idle.values() for h in hs if now - h.idle_since > IDLE_S]
            for k in list(_idle):
                _idle[k] = [h for h in _idle[k] if now - h.idle_since <= IDLE_S]
            same_session = _session == _current_session()
        if expired and same_session:
            _kill(expired)


def key(node_id: str, num_cpus: float, actor_options: dict[str, Any]) -> tuple[str, float, str]:
    """Hosts are interchangeable when they were started with equal options on the same node."""
    return (node_id, float(num_cpus), repr(sorted(actor_options.items())))


__all__ = ["ProducerHost", "Host", "IDLE_S", "RETURN_S", "borrow", "give_back", "give_back_when_done", "settle",
           "release_idle", "idle_pids", "key"]
