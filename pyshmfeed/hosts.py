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
  opt-in   Only feeds made with ``Feed(warm_producers=True)`` borrow hosts
           and give theirs back: a reused process keeps the module-level
           state of the source's modules (a global random stream, a cache),
           so by default every feed starts fresh processes, as torch's
           DataLoader starts fresh workers per iterator, and its batches do
           not depend on which feed ran before.
  pool     When such a feed stops, the hosts whose ``serve()`` returned go back
           to this process's pool, keyed by their actor options; the next
           feed with the same options takes them instead of starting actors.
           ``stop()`` gives a host still finishing the batch it had when the
           ring closed 1.5 of its batch times to return (``return_grace``,
           0.25–2 s: ``close()`` waits that long at most); one that does not, one still
           starting, one that died or was killed (lease, Ray's death) is
           killed, never pooled. (No thread waits for late ones: a Ray call
           from a background thread into a Ray that was just shut down ends
           the whole process.)
  cost     Idle hosts hold their Ray CPUs (``num_cpus``). They are killed
           after ``IDLE_S`` idle (by a reaper thread that calls Ray only
           under ``_ray_calls`` and only while that Ray is up; ``forget()``
           takes the same lock before pyshmfeed shuts Ray down), when a feed
           asks for other options (the CPUs they hold may be what its
           producers wait for), by ``release_idle()`` (public:
           ``pyshmfeed.release_producers()``), and with Ray (they are owned
           by this process: they die with it).
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
RETURN_S = (0.25, 2.0)  # after its ring closed, a serve() has 1.5 batch times within these bounds to return
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
_ray_calls = threading.Lock()  # held by the reaper around its Ray calls, and by forget()
_idle: dict[Any, list[Host]] = {}
_session: Any = None       # the Ray session the idle hosts belong to
_reaper: threading.Thread | None = None
_classes: dict[Any, Any] = {}  # (Ray session, key) -> the host actor class with those options


def return_grace(seconds_per_batch: float) -> float:
    """How long a closed feed waits for its producers' serve() to return: 1.5 batch times, bounded."""
    low, high = RETURN_S
    return min(high, max(low, 1.5 * seconds_per_batch))


def _current_session() -> Any:
    import ray

    if not ray.is_initialized():
        return None
    return id(ray._private.worker.global_worker.core_worker)  # noqa: SLF001 -- changes with every ray.init


def forget() -> None:
    """Ray is about to shut down (and take the hosts with it): drop them all; the reaper calls it no more."""
    global _session
    with _ray_calls, _lock:
        _idle.clear()
        _classes.clear()
        _session = None


def borrow(key: Any) -> Host | None:
    """An idle host started with options ``key``, or None (start one). Idle hosts of other keys are killed."""
    session = _current_session()
    with _lock:
        _forget_other_session(session)
        others = [h for k, hs in _idle.items() if k != key for h in hs]
        for k in [k for k in _idle if k != key]:
            del _idle[k]
        host = _idle[key].pop() if _idle.get(key) else None
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
    import ray

    if not hosts or not ray.is_initialized():
        return  # no Ray: its workers, the hosts among them, are gone with it
    for h in hosts:
        with contextlib.suppress(BaseException):  # a dead actor, or Ray shutting down
            ray.kill(h.actor, no_restart=True)
    for h in hosts:
        if h.pid is not None:
            wait_dead(h.pid, polite_s=2.0)


def _reap() -> None:
    """Kill hosts idle for over IDLE_S; ends when the pool is empty."""
    global _reaper
    while True:
        time.sleep(_REAP_TICK_S)
        now = time.monotonic()
        with _ray_calls:
            with _lock:
                if not any(_idle.values()) or _session is None:
                    _reaper = None  # under the lock: give_back() starts a new one from here on
                    return
                expired = [h for hs in _idle.values() for h in hs if now - h.idle_since > IDLE_S]
                for k in list(_idle):
                    _idle[k] = [h for h in _idle[k] if now - h.idle_since <= IDLE_S]
                usable = _current_session() == _session
            if expired and usable:
                _kill(expired)


def start(num_cpus: float, actor_options: dict[str, Any]) -> Host:
    """A new host on this node (Ray starts its process; nothing waits for it here)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    k = (_current_session(), key(node, num_cpus, actor_options))
    with _lock:
        cls = _classes.get(k)
    if cls is None:
        # Made once per options: wrapping the class again costs Ray ~11 ms per actor, 0.7 ms reused.
        options = {"num_cpus": num_cpus, "max_restarts": 0, "max_task_retries": 0,
                   "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False)}
        options.update(actor_options)
        cls = ray.remote(ProducerHost).options(**options)
        with _lock:
            _classes[k] = cls
    return Host(cls.remote())


def key(node_id: str, num_cpus: float, actor_options: dict[str, Any]) -> tuple[str, float, str]:
    """Hosts are interchangeable when they were started with equal options on the same node."""
    return (node_id, float(num_cpus), repr(sorted(actor_options.items())))


__all__ = ["IDLE_S", "RETURN_S", "Host", "ProducerHost", "borrow", "forget", "give_back", "idle_pids", "key",
           "release_idle", "return_grace", "start"]
