"""Producers on other nodes of a Ray cluster: their batches reach the ring through Ray's object store.

NOTE [remote producers]
  where    ``Feed(..., placement=...)``: ``"node"`` (default) pins every
           producer to the consumer's node; ``"cluster"`` lets Ray place
           them anywhere (``SPREAD``); a list of node ids pins producer
           ``w`` to ``nodes[w % len(nodes)]`` while that node is alive (a
           replacement for a producer whose node is gone starts wherever Ray
           can place it). The ring never moves: it is memory on the
           consumer's node.
  local    A ``ClusterProducer`` that lands on the ring's node is a plain
           ``Producer``: it maps the ring and writes into slots (zero copy).
  remote   One on another node cannot map the ring (its handle is a path on
           the consumer's machine). It writes each batch, with the same
           ``SlotLayout`` code and so the same header, into one private
           slot-sized buffer, ``ray.put``s the used bytes (one copy, on its
           node) and calls ``Ingest.write`` with the reference. Ray moves
           the bytes to the consumer's node; the ingest actor, pinned there,
           claims the slot for that batch's seq under its own owner token,
           copies the payload in (one copy, in the ingest process: the
           training loop's GIL is not involved) and commits. A producer keeps
           at most ``REMOTE_WINDOW`` writes in flight, and a ``run`` call
           returns only when every write it made is settled, so the feed's
           bookkeeping (a task is done when its call returned) holds as on
           one node.
  deadlock The ingest serves every write on its own thread (``max_concurrency``
           covers every write producers may have in flight), so a write
           blocked on a slot never holds back the write of an earlier batch:
           the ordered-ring argument of NOTE [producer lifecycle] carries over.
  death    A remote producer that dies (process killed, node removed, lease
           expired) cannot have claimed anything: the ingest claims for it.
           The feed *fences* its token at the ingest before asking which of
           its tasks were committed: the fence aborts that token's writes
           still waiting for a slot, waits for those already copying to
           commit, and drops any that arrive later (Ray may still be carrying
           them). After the fence nothing of the dead producer can commit,
           so the feed's usual reclaim → re-issue → restart is exact.
  ingest   If the ingest actor dies, every remote producer notices on its
           next reply and exits (so none keeps a write aimed at the dead
           ingest); the feed, handling the first such death, kills what is
           left of the ingest, waits for its process to exit, reclaims its
           owner token in the ring, starts a new ingest and then re-issues as
           for any producer death. Replacements get the new ingest's handle.
  stop     ``Feed.close`` closes the ring (the ingest's waits end), kills the
           producers, then the ingest, and waits for the ingest's process.
  autotune With ``workers="auto"`` the dispatcher runs the same controller
           as the supervisor (NOTE [autotune]): it starts producers at idle
           positions and retires one by giving it no more work and killing
           it once its calls returned (nothing of it is in flight). While the
           consumer's node has no idle core, an added producer is asked onto
           another node (``start_actor(elsewhere=True)``: a soft affinity,
           the live nodes with CPUs in turn).
  tuning   A remote batch stays in flight longer (copy out, transfer, copy
           in), and a call settles all its batches before it returns: give
           remote producers more ``slots`` and a ``chunk`` of a few batches
           so that they keep making batches while earlier ones travel.

Copies per remote batch: producer → private buffer (the source writes there
instead of a slot), private buffer → object store (``ray.put``), Ray's
transfer between nodes, object store → slot (the ingest). A local batch is
written once, straight into its slot.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from collections.abc import Iterable
from typing import Any, Callable, cast

import numpy as np
import ray

from . import errors
from .procs import wait_dead
from .producer import Producer, error_record
from .ring import Ring, RingHandle, new_owner_token
from .spec import BatchSpec

PLACEMENTS = ("node", "cluster")
REMOTE_WINDOW = 3  # writes a remote producer may have in flight (its object-store footprint, in batches)
_CONTROL = "control"  # the ingest's concurrency group for calls that must not queue behind blocked writes
_INGEST_START_S = 120.0
_FENCE_S = 60.0


def check_placement(placement: Any) -> str | tuple[str, ...]:
    """``placement`` normalised ("node", "cluster" or a tuple of Ray node ids), or ``InvalidArgument``."""
    if isinstance(placement, str):
        if placement in PLACEMENTS:
            return placement
    elif isinstance(placement, (list, tuple)) and placement and all(
            isinstance(n, str) and n for n in placement):
        return tuple(placement)
    raise errors.InvalidArgument(
        f"placement={placement!r}: use 'node' (producers on this node), 'cluster' (anywhere in the Ray "
        "cluster) or a non-empty list of Ray node ids (ray.nodes()[i]['NodeID'])")


# ---- the producer side ------------------------------------------------------


class _PrivateSlot:
    """A claim on the remote producer's private buffer; ``commit`` ships it to the ingest."""

    __slots__ = ("_ring", "seq", "slot")

    def __init__(self, ring: RemoteRing, seq: int) -> None:
        self._ring = ring
        self.seq = seq
        self.slot = 0

    def commit(self, nbytes: int | None = None) -> None:
        self._ring._send(self.seq, self._ring.slot_bytes if nbytes is None else nbytes)

    def abort(self) -> None:
        pass  # nothing left the process


class RemoteRing:
    """Stands in for ``Ring`` in a producer on another node (the parts ``Producer`` uses).

    One private buffer of ``slot_bytes`` plays the role of the slot: ``ray.put``
    copies it out synchronously, so it is free again as soon as ``commit``
    returns. ``claim`` waits until fewer than ``window`` writes are unsettled.
    """

    slots = 1

    def __init__(self, handle: RingHandle, ingest: Any, window: int = REMOTE_WINDOW) -> None:  # ingest: a Ray actor handle
        self.slot_bytes = handle.slot_bytes
        self.ordered = handle.ordered
        self.owner = new_owner_token()  # names this producer's writes at the ingest (for fencing)
        self._ingest = ingest
        self._window = window
        self._buffer = np.zeros(self.slot_bytes, dtype=np.uint8)
        self._acks: collections.deque = collections.deque()
        self.sent = 0
        self.settled: collections.Counter[str] = collections.Counter()

    def slot_buffer(self, slot: int, nbytes: int | None = None) -> np.ndarray:
        return self._buffer if nbytes is None else self._buffer[:nbytes]

    def claim(self, seq: int, *, timeout: float | None = None,
              stop: Callable[[], bool] | None = None) -> _PrivateSlot:
        self._settle(self._window - 1)
        return _PrivateSlot(self, seq)

    def _send(self, seq: int, nbytes: int) -> None:
        ref = ray.put(self._buffer[:nbytes])  # the copy out of the producer: the buffer is free again
        self._acks.append(self._ingest.write.remote(self.owner, seq, ref))
        self.sent += 1

    def drain(self) -> None:
        """Wait until every write is settled (committed, a duplicate, or the ring closed)."""
        self._settle(0)

    def _settle(self, keep: int) -> None:
        """Wait until at most ``keep`` writes are unsettled. ``RingClosed`` if the ring closed."""
        closed = False
        while len(self._acks) > keep:
            ack = self._acks.popleft()
            try:
                outcome = ray.get(ack)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                # The ingest is gone: writes in flight may or may not have landed, and only the
                # feed can tell which. Exit, so the feed fences, reclaims and re-issues our work
                # (NOTE [remote producers], "ingest").
                os._exit(70)
            self.settled[outcome] += 1
            closed = closed or outcome == "closed"
        if closed:
            raise errors.RingClosed("the ring was closed (reported by the ingest)")

    def detach(self) -> None:
        self._acks.clear()


class ClusterProducer(Producer):
    """A ``Producer`` that may run on any node: on the ring's node it writes slots directly,
    elsewhere it ships batches to the ingest actor (NOTE [remote producers])."""

    def __init__(self, handle: RingHandle, spec: BatchSpec, kind: str, fn: Callable[..., Any], worker: int,
                 num_workers: int, seed: int, consumer_pid: int, ring_node: str, ingest: Any,
                 window: int = REMOTE_WINDOW) -> None:
        self.node = ray.get_runtime_context().get_node_id()
        self.remote = self.node != ring_node
        self._ingest = ingest
        self._window = window
        super().__init__(handle, spec, kind, fn, worker, num_workers, seed, consumer_pid)

    def _attach(self, handle: RingHandle):
        if not self.remote:
            return super()._attach(handle)
        return RemoteRing(handle, self._ingest, self._window)

    def _consumer_gone(self) -> bool:
        # The consumer's pid means nothing on another node; if the consumer dies, Ray takes its
        # actors (this one included) down with it.
        return False if self.remote else super()._consumer_gone()

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        ident.update(node=self.node, remote=self.remote)
        if self.remote:
            ident["pid"] = None  # a pid on another machine: nothing the feed may wait on or signal
        return ident

    def run(self, tasks: list[tuple[int, int, int]]) -> dict[str, Any]:
        return self._settled(super().run(tasks))

    def run_shard(self, epoch: int, skip: int, seq_base: int) -> dict[str, Any]:
        return self._settled(super().run_shard(epoch, skip, seq_base))

    def _settled(self, result: dict[str, Any]) -> dict[str, Any]:
        """Return only when every write of this call is settled (the feed then counts it done)."""
        if self.remote:
            try:
                cast(RemoteRing, self.ring).drain()  # remote: _attach gave the stand-in
            except errors.RingClosed:
                result["closed"] = True
            except Exception as exc:  # the ingest refused a batch: report it like a source error
                result.setdefault("error", error_record(exc, -1, self.worker))
        return result


# ---- the consumer's node ----------------------------------------------------


class Ingest:
    """Copies batches made on other nodes into ring slots. One per feed, on the ring's node.

    Threaded: each ``write`` runs on its own thread and may block waiting for
    its slot (in C, the GIL released); ``fence``, ``identity`` and ``stats``
    run in a separate concurrency group so blocked writes never delay them.
    """

    def __init__(self, handle: RingHandle) -> None:
        self.ring = Ring.attach(handle)  # its own owner token: the feed reclaims by it if we die
        self._cond = threading.Condition()
        self._fenced: set[int] = set()
        self._writing: collections.Counter[int] = collections.Counter()
        self._stats = {"batches": 0, "bytes": 0, "copy_s": 0.0, "stale": 0, "fenced": 0}

    @ray.method(concurrency_group=_CONTROL)
    def identity(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "owner": self.ring.owner,
                "node": ray.get_runtime_context().get_node_id()}

    @ray.method(concurrency_group=_CONTROL)
    def stats(self) -> dict[str, Any]:
        with self._cond:
            return dict(self._stats)

    def write(self, token: int, seq: int, payload: np.ndarray) -> str:
        """Claim the slot for ``seq``, copy ``payload`` in, commit. Returns "ok", "stale"
        (already committed: a re-issued duplicate), "fenced" (its producer was declared dead)
        or "closed"."""
        with self._cond:
            if token in self._fenced:
                self._stats["fenced"] += 1
                return "fenced"
            self._writing[token] += 1
        try:
            return self._write(token, seq, payload)
        finally:
            with self._cond:
                self._writing[token] -= 1
                self._cond.notify_all()

    def _write(self, token: int, seq: int, payload: np.ndarray) -> str:
        # The slot header inside the payload is the consumer's to check (SlotLayout.read, against
        # the spec and the ring's seq), as for a batch written in place; here only the length.
        n = payload.nbytes
        if n > self.ring.slot_bytes:
            raise errors.PayloadTooLarge(f"batch {seq}: a payload of {n} bytes does not fit a slot of "
                                         f"{self.ring.slot_bytes} bytes (producer and ring disagree on the "
                                         "spec)")
        try:
            slot = self.ring.claim(seq, stop=lambda: token in self._fenced)
        except errors.StaleClaim:
            with self._cond:
                self._stats["stale"] += 1
            return "stale"
        except errors.RingClosed:
            return "fenced" if token in self._fenced else "closed"
        t0 = time.perf_counter()
        try:
            np.copyto(np.frombuffer(self.ring.slot_buffer(slot.slot, n), dtype=np.uint8), payload)
        except BaseException:
            slot.abort()
            raise
        try:
            slot.commit(n)
        except errors.RingClosed:
            return "closed"
        copy_s = time.perf_counter() - t0
        with self._cond:
            self._stats["batches"] += 1
            self._stats["bytes"] += n
            self._stats["copy_s"] += copy_s
        return "ok"

    @ray.method(concurrency_group=_CONTROL)
    def fence(self, token: int, timeout: float = _FENCE_S) -> bool:
        """Nothing written for ``token`` commits after this returns True (NOTE [remote producers])."""
        with self._cond:
            self._fenced.add(token)
            return self._cond.wait_for(lambda: self._writing[token] == 0, timeout=timeout)


# ---- the feed's side: placement, ingest lifecycle, fencing, stats -------------


class ClusterPlacement:
    """What the feed's dispatcher does differently when producers may run on other nodes.

    Given the parts a producer is made of (the ring, the source, the feed's
    options), ``options`` (the dispatcher's actor options, ``actor_options``
    merged in) and ``actor_options`` (the caller's, to tell whether it chose
    a scheduling strategy itself).
    """

    def __init__(self, *, ring: Ring, spec: BatchSpec, kind: str, fn: Callable[..., Any], workers: int,
                 seed: int, placement: str | tuple[str, ...], options: dict[str, Any],
                 actor_options: dict[str, Any]) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._affinity = NodeAffinitySchedulingStrategy
        self.ring = ring
        self.placement = placement
        self._args = (spec, kind, fn)
        self._workers = workers
        self._seed = seed
        self.node = ray.get_runtime_context().get_node_id()
        self.window = REMOTE_WINDOW
        self._options = dict(options)
        self._user_strategy = "scheduling_strategy" in actor_options
        self._elsewhere = 0  # producers autotune asked onto other nodes (to take the nodes in turn)
        self._producer_cls = ray.remote(ClusterProducer)
        concurrency = max(4, workers * self.window + 2)
        self._ingest_cls = ray.remote(concurrency_groups={_CONTROL: 2})(Ingest).options(
            num_cpus=0, max_restarts=0, max_task_retries=0, max_concurrency=concurrency,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=self.node, soft=False))
        self.ingest: Any = None  # the Ingest actor's handle
        self.ingest_identity: dict[str, Any] | None = None
        self.ingest_restarts = 0
        self._past: collections.Counter[str] = collections.Counter()  # stats of ingest incarnations that died
        self._final: dict[str, Any] | None = None
        self._start_ingest()

    def _start_ingest(self) -> None:
        self.ingest = self._ingest_cls.remote(self.ring.handle)
        try:
            self.ingest_identity = ray.get(self.ingest.identity.remote(), timeout=_INGEST_START_S)
        except Exception as exc:
            raise errors.ShmfeedError(f"the ingest actor (which copies batches from other nodes into the "
                                      f"ring) failed to start on node {self.node}: {exc}") from exc

    def start_actor(self, worker: int, elsewhere: bool = False) -> tuple[Any, str | None]:
        """Start producer ``worker``'s next incarnation, placed as ``placement`` says.

        ``elsewhere`` (autotune, when this node has no idle core): with ``placement="cluster"``,
        ask for another node (a soft affinity: Ray falls back to any node if that one is full).
        Returns the actor and the node it was asked onto (None: Ray's choice or the pinned one).
        """
        options = dict(self._options)
        node = None
        if not self._user_strategy:
            if self.placement == "cluster" and elsewhere and (node := self._other_node()) is not None:
                options["scheduling_strategy"] = self._affinity(node_id=node, soft=True)
            elif self.placement == "cluster":
                options["scheduling_strategy"] = "SPREAD"
            else:
                nodes = self.placement
                # Pinned while its node is alive; once the node is gone, the replacement starts
                # wherever Ray can place it (a soft affinity to a dead node).
                node = nodes[worker % len(nodes)]
                alive = any(n["NodeID"] == node and n["Alive"] for n in ray.nodes())
                options["scheduling_strategy"] = self._affinity(node_id=node, soft=not alive)
        spec, kind, fn = self._args
        actor = self._producer_cls.options(**options).remote(
            self.ring.handle, spec, kind, fn, worker, self._workers, self._seed, os.getpid(), self.node,
            self.ingest, self.window)
        return actor, node

    def _other_node(self) -> str | None:
        """A live node other than the ring's with CPUs, in turn (None: there is none)."""
        others = sorted(n["NodeID"] for n in ray.nodes()
                        if n["Alive"] and n["NodeID"] != self.node and n.get("Resources", {}).get("CPU", 0) > 0)
        if not others:
            return None
        self._elsewhere += 1
        return others[self._elsewhere % len(others)]

    def reclaim(self, identity: dict[str, Any]) -> None:
        """Make sure a dead producer can commit nothing more (then the feed re-issues its work)."""
        if not identity.get("remote"):
            self.ring.reclaim(identity["owner"])
            return
        try:
            if ray.get(self.ingest.fence.remote(identity["owner"]), timeout=_FENCE_S):
                return
        except Exception:
            pass  # dead, or not answering: either way it is replaced below
        self._replace_ingest()

    def _replace_ingest(self) -> None:
        """Kill the ingest, wait for its process, reclaim its claims in the ring, start another."""
        ident = self.ingest_identity or {}
        # If it died with its counters, the totals miss what it did since the last stats().
        with contextlib.suppress(Exception):
            self._past.update(ray.get(self.ingest.stats.remote(), timeout=1))
        with contextlib.suppress(Exception):
            ray.kill(self.ingest, no_restart=True)
        wait_dead(ident.get("pid"))
        if "owner" in ident:
            self.ring.reclaim(ident["owner"])
        self.ingest_restarts += 1
        self._start_ingest()

    def summary(self, identities: Iterable[dict[str, Any] | None]) -> dict[str, Any]:
        """Stats: batches and bytes that came from other nodes, and what copying them in cost.

        ``identities``: each producer's ``identity()`` (None while it starts), to count the remote ones."""
        if self._final is not None:
            s = self._final
        else:
            s = collections.Counter(self._past)
            with contextlib.suppress(Exception):
                s.update(ray.get(self.ingest.stats.remote(), timeout=10))
        n = s.get("batches", 0)
        remote_workers = sum(1 for ident in identities if (ident or {}).get("remote"))
        return {"placement": self.placement if isinstance(self.placement, str) else list(self.placement),
                "remote_batches": n, "remote_bytes": s.get("bytes", 0),
                "ingest_copy_s": s.get("copy_s", 0.0),
                "ingest_copy_mean_s": s.get("copy_s", 0.0) / n if n else 0.0,
                "ingest_duplicates": s.get("stale", 0), "ingest_fenced": s.get("fenced", 0),
                "ingest_restarts": self.ingest_restarts, "remote_producers": remote_workers}

    def stop(self) -> None:
        """After the producers are gone: keep the final stats, kill the ingest, wait for its process."""
        if self.ingest is None:
            return
        s = collections.Counter(self._past)
        with contextlib.suppress(Exception):
            s.update(ray.get(self.ingest.stats.remote(), timeout=5))
        self._final = dict(s)
        with contextlib.suppress(Exception):
            ray.kill(self.ingest, no_restart=True)
        self.ingest = None
        wait_dead((self.ingest_identity or {}).get("pid"))
