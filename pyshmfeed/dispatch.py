"""The feed's control plane: hands out work to producer actors and handles their deaths.

One ``Dispatcher`` thread per ``Feed``, which hands it its parts (the ring,
the source, the options; it knows nothing of the feed). It starts the
producer actors, gives ``(seq, index, epoch)`` tasks in chunks to whichever
producer is free, and on a producer's death (or a lease running out) kills it
for good, reclaims its slots, re-issues its unfinished work in order and
starts a replacement. The whole lifecycle is NOTE [producer lifecycle] in
feed.py; remote producers add NOTE [remote producers] in remote.py.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from typing import Any, Callable

from . import errors
from .autotune import Tuner
from .procs import wait_dead
from .producer import Producer
from .registry import is_alive
from .ring import CLOSE_FAILED, CLOSE_PRODUCER_ERROR, Ring
from .spec import BatchSpec


class ProducerPosition:
    """One producer position (worker number): its current actor incarnation and its calls in flight.

    Not ``ring.ProducerSlot``, which is a claimed slot of the ring."""

    def __init__(self, worker: int) -> None:
        self.worker = worker
        self.actor: Any = None  # a Ray actor handle
        self.identity: dict[str, Any] | None = None
        self.ready_ref: Any = None  # a Ray ObjectRef
        self.inflight: dict[Any, tuple[list, float]] = {}  # ref -> (tasks, start time)
        self.shard_ref: Any = None
        self.shard_epoch: int | None = None
        self.shard_count: int | None = None
        self.pids: list[int] = []
        self.active = True     # under autotune, positions past the running count are idle
        self.retiring = False  # autotune stops it: no more work; stopped once its calls returned


class Dispatcher(threading.Thread):
    """Hands out work to producer actors and handles their deaths (NOTE [producer lifecycle])."""

    def __init__(self, *, ring: Ring, spec: BatchSpec, kind: str, fn: Callable[..., Any], workers: int,
                 seed: int, ordered: bool, chunk: int, placement: str | tuple[str, ...], num_cpus: float,
                 lease: float | None, max_restarts: int, actor_options: dict,
                 delivered: Callable[[], set[int]], active: int | None = None, tuner: Tuner | None = None) -> None:
        """``delivered()``: the sequences of this epoch the loop has had (a copy; any thread).

        ``tuner`` (NOTE [autotune]): ``workers`` positions, the first ``active`` started; the
        controller starts and stops producers at the others.
        """
        super().__init__(name="pyshmfeed-dispatcher", daemon=True)
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._ray = ray
        self.ring = ring
        self.kind = kind
        self.ordered = ordered
        self.chunk = chunk
        self._delivered = delivered
        self._args = (ring.handle, spec, kind, fn)
        self._workers = workers
        self._seed = seed
        self.lease = lease
        self.restarts_left = max_restarts
        self.restarts = 0
        self.reissued = 0
        self._lock = threading.Lock()
        self._pending: collections.deque = collections.deque()
        self._max_dispatched = -1
        self._dispatched: set[int] = set()
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        # Ordered feeds: a source error waits here until the loop has every batch before it.
        self._deferred_error: tuple[errors.ProducerError, int] | None = None
        self._busy_s = 0.0
        self._t0 = time.perf_counter()
        self._shard_epoch: int | None = None
        self._shard_skip: dict[int, int] = {}
        options = {"num_cpus": num_cpus, "max_restarts": 0, "max_task_retries": 0,
                   "scheduling_strategy": NodeAffinitySchedulingStrategy(
                       node_id=ray.get_runtime_context().get_node_id(), soft=False)}
        options.update(actor_options)
        self._actor_cls = ray.remote(Producer).options(**options)
        self._cluster = None  # producers on other nodes: NOTE [remote producers] in remote.py
        if placement != "node":
            from .remote import ClusterPlacement

            self._cluster = ClusterPlacement(ring=ring, spec=spec, kind=kind, fn=fn, workers=workers, seed=seed,
                                             placement=placement, options=options, actor_options=actor_options)
        self._tuner = tuner
        self._busy_seen = 0.0  # _busy_s at the controller's last window
        self.positions = [ProducerPosition(w) for w in range(workers)]
        for p in self.positions:
            p.active = active is None or p.worker < active
            if p.active:
                self._start_actor(p)
        # Wait for the first producer to attach, so start-up errors (a source that does not
        # unpickle, a ring that cannot be attached) surface here, in __init__. The others join
        # as they come up (_on_started): the first batch need not wait for the slowest start.
        starting = {p.ready_ref: p for p in self.positions if p.ready_ref is not None}
        done, _ = ray.wait(list(starting), num_returns=1, timeout=300)
        if not done:
            raise errors.ShmfeedError("no producer started within 300 s; is the Ray cluster out of CPUs? "
                                      f"(each producer asks for num_cpus={num_cpus})")
        p = starting[done[0]]
        try:
            ident = ray.get(done[0])
        except Exception as exc:
            raise errors.ShmfeedError(f"producers failed to start: {exc}") from exc
        p.identity, p.ready_ref = ident, None
        p.pids.append(ident["pid"])

    def _start_actor(self, p: ProducerPosition, elsewhere: bool = False) -> str | None:
        """Start position ``p``'s next incarnation; ``elsewhere``: on another node than this one
        if the placement allows it. Returns the node it was asked onto, if one was chosen."""
        node = None
        if self._cluster is not None:
            p.actor, node = self._cluster.start_actor(p.worker, elsewhere=elsewhere)
        else:
            handle, spec, kind, fn = self._args
            p.actor = self._actor_cls.remote(handle, spec, kind, fn, p.worker, self._workers, self._seed,
                                             os.getpid())
        p.identity = None
        p.ready_ref = p.actor.identity.remote()
        return node

    # ---- called from the training thread -----------------------------------

    def submit(self, tasks: list[tuple[int, int, int]]) -> None:
        with self._lock:
            self._pending.extend(tasks)
            self._dispatched = set()

    def submit_shards(self, epoch: int, skip: dict[int, int]) -> None:
        with self._lock:
            self._shard_epoch = epoch
            self._shard_skip = dict(skip)
            for p in self.positions:
                p.shard_epoch, p.shard_count = epoch, None

    def shard_total(self) -> int | None:
        """Batches in this shard epoch, once every shard has finished; None before."""
        with self._lock:
            counts = [p.shard_count for p in self.positions]
        return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)

    def cancel_pending(self) -> None:
        """Drop work not yet handed out (the loop abandoned the epoch)."""
        with self._lock:
            self._pending = collections.deque(t for t in self._pending if t[0] in self._dispatched)
            for p in self.positions:
                if p.shard_epoch is not None and p.shard_ref is None:
                    p.shard_epoch = None

    def shards_unfinished(self) -> bool:
        """Whether a shard of the current shard epoch is running, or restarting after a death."""
        with self._lock:
            return any(p.shard_epoch is not None and p.shard_count is None for p in self.positions)

    def still_in_flight(self, seqs: set[int]) -> set[int]:
        """Those of ``seqs`` held by a producer call that has not returned (it may still be lost)."""
        with self._lock:
            return seqs & {t[0] for p in self.positions for ts, _ in p.inflight.values() for t in ts}

    def outstanding(self, delivered: set[int]) -> list[int]:
        """Sequences handed out to producers but not delivered (to drain)."""
        while True:
            with self._lock:
                shard_running = any(p.shard_ref is not None for p in self.positions)
                if not shard_running:
                    return sorted(self._dispatched - delivered)
            self.raise_if_failed()
            time.sleep(0.05)

    def raise_if_failed(self) -> None:
        if self._error is None and self._deferred_error is not None:
            exc, seq = self._deferred_error
            if self.ring.counters()["consumer_head"] >= seq:  # every batch before it was delivered
                self._fail(exc)
        if self._error is not None:
            raise self._error

    def producer_counts(self) -> dict[str, int]:
        """Producers running (started, taking work) and starting (Ray is starting them) now."""
        running = sum(p.identity is not None for p in self.positions)
        starting = sum(p.ready_ref is not None for p in self.positions)
        return {"running": running, "starting": starting}

    def summary(self) -> dict[str, Any]:
        s: dict[str, Any] = {"restarts": self.restarts, "reissued": self.reissued, "producer_busy_s": self._busy_s,
             "producer_wall_s": time.perf_counter() - self._t0}
        if self._cluster is not None:
            s.update(self._cluster.summary([p.identity for p in self.positions]))  # remote batches, ingest copies
        if self._tuner is not None:
            s["workers"] = sum(1 for p in self.positions if p.active and not p.retiring)
            s["autotune"] = self._tuner.summary()
        return s

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=10)
        # Producers still starting: learn their pids, so we can make sure they are gone.
        pending = {p.ready_ref: p for p in self.positions if p.ready_ref is not None}
        if pending:
            done, _ = self._ray.wait(list(pending), num_returns=len(pending), timeout=10)
            for ref in done:
                try:
                    pending[ref].pids.append(self._ray.get(ref)["pid"])
                except Exception:
                    pass  # it died starting: nothing to wait for
        pids = [pid for p in self.positions for pid in p.pids if pid is not None]  # None: on another node
        for p in self.positions:
            if p.actor is not None:
                try:
                    self._ray.kill(p.actor, no_restart=True)
                except Exception:
                    pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(is_alive(pid) for pid in pids):
            time.sleep(0.05)
        if self._cluster is not None:
            self._cluster.stop()  # the ingest, once no producer can call it

    # ---- the dispatcher thread ----------------------------------------------

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._dispatch()
                self._collect()
        except BaseException as exc:  # never die silently: the loop raises it
            self._fail(errors.ShmfeedError(f"the feed's dispatcher failed: {exc!r}"), exc)

    def _fail(self, exc: BaseException, cause: BaseException | None = None) -> None:
        if cause is not None:
            exc.__cause__ = cause
        if self._error is None:
            self._error = exc
        code = CLOSE_PRODUCER_ERROR if isinstance(exc, errors.ProducerError) else CLOSE_FAILED
        try:
            self.ring.close(str(exc).splitlines()[0][:1500], code=code)
        except errors.ShmfeedError:
            pass
        self._stopping.set()

    def _dispatch(self) -> None:
        with self._lock:
            # Ordered: batch t needs slot t mod N, free once batch t - N is consumed. Hand t out only
            # when t - N is committed (below the lowest batch in flight or pending), so a producer
            # waits on the consumer alone, never on a batch a dead producer held: re-issued behind
            # that wait, it would stall the loop until a replacement producer has started.
            limit = None
            if self.ordered and self._pending:
                in_flight = [t[0] for q in self.positions for ts, _ in q.inflight.values() for t in ts]
                limit = min(in_flight + [self._pending[0][0]]) + self.ring.slots
            for p in self.positions:
                if p.identity is None or p.retiring:
                    continue
                if p.shard_epoch is not None and p.shard_ref is None and p.shard_count is None:
                    skip = self._shard_skip.get(p.worker, 0)
                    p.shard_ref = p.actor.run_shard.remote(p.shard_epoch, skip, p.worker << 32)
                    p.inflight[p.shard_ref] = ([], time.monotonic())
                    continue
                while len(p.inflight) < 2 and self._pending:
                    # A producer runs its calls one after the other: never queue a (re-issued)
                    # earlier batch behind a later one of its own, which may be waiting for it.
                    held = max((t[0] for ts, _ in p.inflight.values() for t in ts), default=-1)
                    if self._pending[0][0] < held:
                        break
                    n = 0
                    while n < min(self.chunk, len(self._pending)) and (
                            limit is None or self._pending[n][0] < limit):
                        n += 1
                    if n == 0:
                        break
                    tasks = [self._pending.popleft() for _ in range(n)]
                    for t in tasks:
                        self._dispatched.add(t[0])
                    ref = p.actor.run.remote(tasks)
                    p.inflight[ref] = (tasks, time.monotonic())

    def _collect(self) -> None:
        ray = self._ray
        by_ref = {ref: p for p in self.positions for ref in p.inflight}
        starting = {p.ready_ref: p for p in self.positions if p.ready_ref is not None}
        refs = list(by_ref) + list(starting)
        if not refs:
            self._stopping.wait(0.05)
            return
        done, _ = ray.wait(refs, num_returns=1, timeout=0.1)
        for ref in done:
            if ref in starting:
                self._on_started(starting[ref], ref)
            else:
                self._on_result(by_ref[ref], ref)
        self._check_leases()
        self._stop_retired()
        if self._tuner is not None and self._tuner.due():
            self._autotune(self._tuner)

    # ---- autotune (NOTE [autotune]) ----------------------------------------------

    def _autotune(self, tuner: Tuner) -> None:
        busy, self._busy_seen = self._busy_s - self._busy_seen, self._busy_s
        running = sum(1 for p in self.positions if p.active and not p.retiring and p.identity is not None)
        wanted = sum(1 for p in self.positions if p.active and not p.retiring)
        change = tuner.step(busy, running, starting=running < wanted)
        # Where to add: with no idle core here, on another node (placement="cluster").
        elsewhere = tuner.controller.short_of_cpu
        for _ in range(max(0, change)):
            idle = next((p for p in self.positions if not p.active), None)
            if idle is None:
                break
            with self._lock:
                idle.active, idle.retiring = True, False
            node = self._start_actor(idle, elsewhere=elsewhere)
            if node is not None:
                tuner.controller.note(f"; producer {idle.worker} asked onto node {node[:8]} (no idle core here)")
        for _ in range(max(0, -change)):
            busy_one = next((p for p in reversed(self.positions) if p.active and not p.retiring), None)
            if busy_one is not None:
                with self._lock:
                    busy_one.retiring = True  # no more work for it; stopped once its calls returned

    def _stop_retired(self) -> None:
        """A clean stop: a retiring producer whose calls all returned holds nothing; kill it."""
        for p in self.positions:
            if not (p.retiring and not p.inflight and p.ready_ref is None):
                continue
            with contextlib.suppress(Exception):
                self._ray.kill(p.actor, no_restart=True)
            if p.identity is not None and not p.identity.get("remote"):
                wait_dead(p.identity.get("pid"))
            with self._lock:
                p.actor, p.identity = None, None
                p.active = p.retiring = False

    def _on_started(self, p: ProducerPosition, ref) -> None:
        try:
            ident = self._ray.get(ref)
        except Exception:
            self._on_death(p)
            return
        with self._lock:
            p.identity, p.ready_ref = ident, None
            p.pids.append(ident["pid"])

    def _on_result(self, p: ProducerPosition, ref) -> None:
        try:
            result = self._ray.get(ref)
        except Exception as exc:
            if is_actor_death(self._ray, exc):
                self._on_death(p)
                return
            raise
        with self._lock:
            tasks, _ = p.inflight.pop(ref)
            if ref is p.shard_ref:
                p.shard_ref = None
                if "error" not in result and not result.get("closed"):
                    p.shard_count = result["count"]
        self._busy_s += result.get("busy_s", 0.0)
        if "error" in result:
            e = result["error"]
            error = errors.ProducerError.from_record(self.kind, e)
            if self.ordered and "seq" in e:
                # Batches before it may still be in the making: keep the ring open and producing
                # until the loop reaches this batch (raise_if_failed), so they are delivered first.
                with self._lock:
                    if self._deferred_error is None or e["seq"] < self._deferred_error[1]:
                        self._deferred_error = (error, e["seq"])
            else:
                self._fail(error)

    def _check_leases(self) -> None:
        if self.lease is None:
            return
        now = time.monotonic()
        for p in self.positions:
            if p.shard_ref is not None:
                continue  # a shard runs a whole epoch: no per-call lease
            if any(now - started > self.lease for _, started in p.inflight.values()):
                # Stuck (or paused): kill it first so it can never write again, then re-issue.
                self._ray.kill(p.actor, no_restart=True)
                wait_dead(p.pids[-1] if p.pids else None)
                self._on_death(p)

    def _on_death(self, p: ProducerPosition) -> None:
        """Reclaim a dead producer's slots, re-issue its unfinished work, start a replacement."""
        if p.identity is not None:
            # Ray may report an actor dead (ray.kill) before its process is gone: one that still
            # runs could commit after the reclaim below and its work be made twice.
            wait_dead(p.identity.get("pid"))
        with self._lock:
            lost_tasks = [t for tasks, _ in p.inflight.values() for t in tasks]
            had_shard = p.shard_ref is not None
            p.inflight.clear()
            p.shard_ref = None
            if p.identity is not None:
                if self._cluster is not None:
                    self._cluster.reclaim(p.identity)  # a remote producer's writes: fenced at the ingest
                else:
                    self.ring.reclaim(p.identity["owner"])
            committed = self._committed_seqs() if not self.ordered else None
            redo = [t for t in lost_tasks if not self._is_committed(t[0], committed)]
            self._pending = collections.deque(sorted([*redo, *self._pending]))  # several may die at once
            self.reissued += len(redo)
            if had_shard:
                # The replacement re-runs the shard and skips what was committed.
                assert committed is not None  # shards feeds are unordered
                skip = self._shard_committed(p.worker, committed)
                self._shard_skip[p.worker] = skip
                p.shard_count = None
            p.identity = None
            if p.retiring or not p.active:  # autotune was stopping it anyway: its work is re-issued
                p.actor, p.ready_ref, p.active, p.retiring = None, None, False, False
                return
        if self.restarts_left <= 0:
            self._fail(errors.ProducerLost(f"producer {p.worker} died and no restarts are left "
                                           f"({self.restarts} used); see the Ray logs for why it died"))
            return
        self.restarts_left -= 1
        self.restarts += 1
        self._start_actor(p)

    def _committed_seqs(self) -> set[int]:
        """Unordered rings: sequences committed = delivered ∪ ready/acquired in the ring now."""
        in_ring: set[int] = set()
        for i in range(self.ring.slots):
            info = self.ring.slot_info(i)
            if info["state"] in ("ready", "acquired"):
                in_ring.add(info["seq"])
        return in_ring | self._delivered()

    def _is_committed(self, seq: int, committed: set[int] | None) -> bool:
        return self.ring.seq_committed(seq) if committed is None else seq in committed

    def _shard_committed(self, worker: int, committed: set[int]) -> int:
        """How many leading batches of ``worker``'s shard are committed (a shard commits in order)."""
        base = worker << 32
        positions = [s - base for s in committed if base <= s < base + (1 << 32)]
        return max(self._shard_skip.get(worker, 0), max(positions) + 1 if positions else 0)


def is_actor_death(ray: Any, exc: BaseException) -> bool:
    from ray import exceptions as rex

    return isinstance(exc, (rex.RayActorError, rex.WorkerCrashedError, rex.ActorDiedError,
                            rex.ActorUnavailableError))
