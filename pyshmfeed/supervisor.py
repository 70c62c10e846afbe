"""Producers on the ring's node that take their work from the segment: start, watch, replace.

NOTE [supervision]
  start    One producer per position ``w`` (0 .. workers-1), pinned to this
           node, each in a new host actor or, with ``warm=True``, a warm one
           from this process's pool (NOTE [warm producers] in hosts.py).
           Warm ones start all at once. New ones start in two waves: first
           one (``FIRST_WAVE``), the rest once it is up. A new Ray worker
           process spends ~0.4 s of CPU importing Ray; six at once on two
           cores all came up after 1.1 s, where the first alone came up in
           0.25 s (on a worker Ray had prestarted) to 0.5 s, so the first
           batch came 0.3-0.5 s sooner. (Holding the rest back until the
           first batch is in the ring gave it 0.2 s sooner again but the
           12th batch 0.5 s later: rejected.) Each opens
           record ``w`` of the work area and then runs ``serve()``: one Ray
           call for its whole life. ``Supervisor.__init__`` returns once the
           first one is up, so start-up errors surface in ``Feed()``; the
           others join as they come.
  work     The feed posts a job per epoch in the segment (``WorkArea.post``);
           producers take tasks themselves. Nothing here runs per batch.
  watch    One thread wakes every ``_TICK_S``: process liveness of every
           producer pid (the pid is in its record), Ray's answer for each
           ``serve()`` call (a return is an error record or a death), and the
           lease of the task each record holds.
  death    Kill it for good and wait for its process (a paused one could
           still write), ``reclaim`` its claims in the ring, then work out
           what it held: the task in its record, or, if it died inside a take
           (``intent`` set), any task handed out that is neither committed,
           queued nor held by a live producer (NOTE [work hand-out] gives the
           order in which those are read). Re-issue what was lost, reset the
           record, start a replacement at the same position.
  errors   A source that raises ends its ``serve()`` with an error record:
           ordered feeds hold it until the loop has every batch before it.
  scale    With ``workers="auto"`` (NOTE [autotune] in autotune.py) there
           are ``max_workers`` positions, some idle; the watch thread runs
           the controller every ``autotune.AUTOTUNE_S`` and starts producers at idle
           positions or stops one cleanly: its record's stop flag ends its
           takes, it finishes the batch it holds, its ``serve()`` returns and
           its host is killed (or, warm, goes back to the pool). No task is
           lost or repeated by either.
  ray      If Ray itself dies, the producers die with it and no replacement
           starts: ``raise_if_failed`` says so within ``RAY_LOST_S``.
  stop     The feed closes the ring (every ``serve()`` returns once its batch
           in hand is done), then ``stop()`` kills the hosts and waits,
           boundedly, for their pids; a warm feed first gives those whose
           ``serve()`` returned within 1.5 batch times (``hosts.return_grace``)
           back to the pool.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Callable

from . import errors, hosts, raylife, registry
from ._ffi import lib
from .procs import wait_dead
from .autotune import Tuner
from .ring import CLOSE_FAILED, CLOSE_PRODUCER_ERROR, Ring
from .spec import BatchSpec
from .work import JOB_RESUME, Job, TaskIndex, WorkArea

_TICK_S = 0.05          # how often the watch thread looks (nothing per batch)
_SETTLE_S = 2.0         # a live producer's take in progress ends in nanoseconds; a paused one is leased out
START_S = 300.0         # the first producer must be up by then
FIRST_WAVE = 1           # new producer processes started before the first one is up
RAY_LOST_S = 30.0       # no producer alive and none starting for this long: Ray is gone
KILLS_PER_BATCH = 3     # a batch whose producer died this often is the culprit: it fails the feed


class Position:
    """Producer position ``worker``: its current actor incarnation."""

    def __init__(self, worker: int) -> None:
        self.worker = worker
        self.actor: Any = None       # its host's Ray actor handle
        self.host: hosts.Host | None = None
        self.ready_ref: Any = None   # start() while it starts
        self.serve_ref: Any = None   # serve() once it runs
        self.pid: int | None = None
        self.owner: int | None = None
        self.pids: list[int] = []    # every incarnation's pid, oldest first (tests, stop())
        self.started_at = time.monotonic()
        self.finished = False        # serve() returned: the ring closed, or its source raised
        self.active = True           # autotune: a position may be idle (no producer there)
        self.stopping = False        # autotune: asked to stop after its current batch
        self.busy_seen = (0, 0)      # (owner, busy_ns) at the controller's last look

    @property
    def identity(self) -> dict[str, Any] | None:
        """The running incarnation's pid and owner token; None while it starts (or after its death)."""
        return None if self.pid is None else {"pid": self.pid, "owner": self.owner, "worker": self.worker}


class Supervisor(threading.Thread):
    """Starts the producers of one feed and keeps them going (NOTE [supervision])."""

    def __init__(self, *, ring: Ring, spec: BatchSpec, kind: str, fn: Callable[..., Any], workers: int,
                 seed: int, task_index: TaskIndex, ordered: bool, num_cpus: float, lease: float | None,
                 max_restarts: int, actor_options: dict, delivered: Callable[[], set[int]],
                 active: int | None = None, tuner: Tuner | None = None, warm: bool = False) -> None:
        """``warm``: borrow producer hosts from this process's pool and give them back at the end
        (NOTE [warm producers]); otherwise every host is started here and killed at the end."""
        super().__init__(name="pyshmfeed-supervisor", daemon=True)
        import ray

        self._ray = ray
        self.ring = ring
        self.work = WorkArea(ring)
        self.ordered = ordered
        self.lease = lease
        self.restarts_left = max_restarts
        self.restarts = 0
        self.reissued = 0
        self._delivered = delivered
        self._args = (ring.handle, spec, kind, fn)
        self._workers = workers
        self._seed = seed
        self._task_index = task_index
        self._kind = kind
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._deferred_error: tuple[errors.ProducerError, int] | None = None
        self._job: Job | None = None  # the job posted last
        self._frozen: set[int] | None = None  # once the loop abandoned it: every seq it handed out
        self._gens: set[int] = set()  # round robin: the generations the current job was posted as
        self._t0 = time.perf_counter()
        self.beat = time.monotonic()  # the watch thread's last round (a stuck Ray call stops it)
        self._no_producer_since: float | None = None
        self._ray_checked = 0.0
        self._host_options = (num_cpus, actor_options)
        self._warm = warm
        self._pool_key = hosts.key(ray.get_runtime_context().get_node_id(), num_cpus, actor_options)
        self.positions = [Position(w) for w in range(workers)]
        self._tuner = tuner  # None: a fixed number of producers (NOTE [autotune])
        self._deaths_holding: dict[int, int] = {}  # seq -> producers that died holding it
        for p in self.positions:
            self.work.reset(p.worker)
            p.active = active is None or p.worker < active
        starting = [p for p in self.positions if p.active]
        pooled = {p.worker: h for p in starting if warm and (h := hosts.borrow(self._pool_key)) is not None}
        # New producer processes start in two waves: one, then the rest once it is up, so that the
        # first batch does not wait for every process's imports (NOTE [supervision]: start).
        first = [p for p in starting if p.worker in pooled] or starting[:FIRST_WAVE]
        for p in first:
            self._start(p, pooled.get(p.worker))
        self._await_first(num_cpus)
        for p in starting:
            if p not in first:
                self._start(p, pooled.get(p.worker))

    def _start(self, p: Position, host: hosts.Host | None = None) -> None:
        """Start producer ``p`` in ``host``, in a warm one from the pool (``warm``), or in a new one."""
        handle, spec, kind, fn = self._args
        if host is None and self._warm:
            host = hosts.borrow(self._pool_key)
        p.host = host or hosts.start(*self._host_options)
        p.actor = p.host.actor
        p.ready_ref = p.actor.start.remote(handle, spec, kind, fn, p.worker, self._workers, self._seed,
                                           os.getpid(), self._task_index)
        p.serve_ref = None
        p.pid = p.owner = None
        p.started_at = time.monotonic()

    def _await_first(self, num_cpus: float) -> None:
        ray = self._ray
        starting = {p.ready_ref: p for p in self.positions if p.ready_ref is not None}
        done, _ = ray.wait(list(starting), num_returns=1, timeout=START_S)
        if not done:
            raise errors.ShmfeedError(f"no producer started within {START_S:g} s; is the Ray cluster out of "
                                      f"CPUs? (each producer asks for num_cpus={num_cpus})")
        try:
            self._on_started(starting[done[0]], ray.get(done[0]))
        except errors.ShmfeedError:
            raise
        except Exception as exc:
            raise errors.ShmfeedError(f"producers failed to start: {exc}") from exc

    def _on_started(self, p: Position, ident: dict[str, int]) -> None:
        p.pid, p.owner, p.ready_ref = ident["pid"], ident["owner"], None
        assert p.host is not None  # set with the actor
        p.host.pid = p.pid
        p.pids.append(p.pid)
        p.serve_ref = p.actor.serve.remote()

    # ---- called by the feed (training thread) -------------------------------

    def post(self, epoch: int, base_seq: int, count: int, *, start: int, resume: bool,
             round_robin: bool = False) -> None:
        """Start an epoch: producers take its tasks from the segment at once.

        ``round_robin``: task k is made by producer ``k % workers`` only (torch's DataLoader assignment).
        """
        with self._lock:
            self._frozen = None
            self.work.post(epoch, base_seq, count, start=start, resume=resume,
                           round_robin=len(self.positions) if round_robin else 0)
            self._job = job = self.work.current()
            self._gens = {job.gen}

    def abandon(self) -> None:
        """The loop left the epoch early: hand out nothing more of it (re-issued work still goes)."""
        with self._lock:
            if self._job is None or self._frozen is not None:
                return
            frozen = self.work.freeze()
            job = self._job
            if job.round_robin:
                self._settle_takes()  # a take that saw the old job either ends holding its task or gives it back
                handed = self._handed_out()
                last = max(handed, default=job.base_seq - 1) - job.base_seq + 1
                if self.ordered and len(handed) < last:
                    # Producers took tasks up to `last` with gaps between (each its own numbers): an ordered
                    # ring delivers in sequence, so the gaps are made too, each by its own producer, by
                    # re-posting the job up to `last` with every record going on where it was.
                    carried = self.work.post(job.epoch, job.base_seq, last, start=job.start, resume=bool(
                        job.flags & JOB_RESUME), round_robin=job.stride, carry_gen=job.gen)
                    self._gens.add(carried.gen)
                    handed = set(range(job.base_seq, job.base_seq + last))
                self._frozen = handed
            else:
                self._frozen = set(range(job.base_seq, job.base_seq + frozen.taken))

    def outstanding(self, delivered: set[int]) -> list[int]:
        """Batches of an abandoned epoch handed out but not delivered: the feed drains them."""
        with self._lock:
            return sorted((self._frozen or set()) - delivered)

    def _handed_out(self) -> set[int]:
        """Every seq of the current job a producer took (made, making, lost or re-issued since)."""
        if self._frozen is not None:
            return self._frozen
        job = self._job
        assert job is not None  # called once a job was posted
        base = job.base_seq
        if not job.round_robin:
            return set(range(base, base + self.work.current().taken))
        seqs: set[int] = set()
        for p in self.positions:
            seqs |= self._handed_out_by(p.worker)
        return seqs

    def _handed_out_by(self, worker: int) -> set[int]:
        """Round robin: the seqs the producer at record ``worker`` took of the current job."""
        job = self._job
        assert job is not None
        base = job.base_seq
        rec = self.work.record(worker)
        seqs: set[int] = set()
        if rec.next_gen in self._gens:
            seqs.update(range(base + worker, base + min(rec.next_k, job.count), job.stride))
        if rec.task is not None and rec.task >= base:
            seqs.add(rec.task)
        return seqs

    def _settle_takes(self) -> None:
        """Wait (briefly) until no live producer is inside a take (NOTE [work hand-out])."""
        deadline = time.monotonic() + _SETTLE_S
        for p in self.positions:
            if p.pid is None or not registry.is_alive(p.pid):
                continue
            while self.work.record(p.worker).intent and time.monotonic() < deadline:
                time.sleep(0.0005)

    def raise_if_failed(self) -> None:
        if self._error is None and self._deferred_error is not None:
            exc, seq = self._deferred_error
            if self.ring.counters()["consumer_head"] >= seq:  # every batch before it was delivered
                self._fail(exc)
        if self._error is None and time.monotonic() - self.beat > RAY_LOST_S and self.is_alive():
            self._fail(errors.ShmfeedError(
                f"the feed's supervisor has been stuck in a Ray call for over {RAY_LOST_S:g} s: Ray (its raylet "
                "or GCS) is probably gone. Close the feed; check `ray status` and the Ray logs"))
        if self._error is not None:
            raise self._error

    def summary(self) -> dict[str, Any]:
        busy_ns = 0
        for p in self.positions:
            with contextlib.suppress(errors.ShmfeedError):
                busy_ns += self.work.record(p.worker).busy_ns
        s = {"restarts": self.restarts, "reissued": self.reissued, "producer_busy_s": busy_ns / 1e9,
             "producer_wall_s": time.perf_counter() - self._t0, "handout": "segment",
             "workers": self.workers_running()}
        if self._tuner is not None:
            s["autotune"] = self._tuner.summary()
        return s

    def producer_counts(self) -> dict[str, int]:
        """Producers running (started, taking work) and starting (Ray is starting them) now."""
        live = [p for p in self.positions if p.active and not p.stopping]
        return {"running": sum(p.pid is not None for p in live), "starting": sum(p.pid is None for p in live)}

    def workers_running(self) -> int:
        """Producer positions with a producer (running or starting), not counting ones being stopped."""
        return sum(1 for p in self.positions if p.active and not p.stopping)

    def stop(self) -> None:
        """After the ring was closed: stop watching, pool the hosts whose serve() returned, kill the rest
        and wait (boundedly) for their pids."""
        self._stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)
        if raylife.dead_processes():
            # Ray is gone: its calls would only time out. Its workers are our producers: kill them.
            for pid in {pid for p in self.positions for pid in p.pids}:
                wait_dead(pid, polite_s=0.0)
            return
        if self._warm:
            self._collect_returns()
        killed: set[int] = set()
        for p in self.positions:
            host, p.host = p.host, None
            if p.actor is None:
                continue
            if self._warm and host is not None and p.finished and p.ready_ref is None:
                hosts.give_back(self._pool_key, host)  # it detached the ring before its serve() returned
            else:  # still starting, or not back from its last batch in time: not worth waiting for
                if p.pid is not None:
                    killed.add(p.pid)
                with contextlib.suppress(Exception):
                    self._ray.kill(p.actor, no_restart=True)
            p.actor = None
        for pid in killed:
            wait_dead(pid, polite_s=2.0)

    def _collect_returns(self) -> None:
        """The ring is closed: each serve() returns once its batch in hand is done. Give them together
        one and a half batch times (``hosts.return_grace``); those that returned go back to the pool."""
        serving = {p.serve_ref: p for p in self.positions if p.serve_ref is not None and p.ready_ref is None}
        if not serving:
            return
        per_batch = 0.0
        for p in serving.values():
            with contextlib.suppress(errors.ShmfeedError):
                rec = self.work.record(p.worker)
                if rec.batches:
                    per_batch = max(per_batch, rec.busy_ns / rec.batches / 1e9)
        with contextlib.suppress(Exception):
            done, _ = self._ray.wait(list(serving), num_returns=len(serving), timeout=hosts.return_grace(per_batch))
            for ref in done:
                p = serving[ref]
                with contextlib.suppress(Exception):
                    self._ray.get(ref, timeout=1)
                    p.serve_ref, p.finished = None, True  # it returned (a death raised above)

    # ---- the watch thread -----------------------------------------------------

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._watch_round()
                self.beat = time.monotonic()
        except BaseException as exc:  # never die silently: the loop raises it
            if not self._stopping.is_set():
                self._fail(errors.ShmfeedError(f"the feed's supervisor failed: {exc!r}"), exc)

    def _watch_round(self) -> None:
        ray = self._ray
        by_ref = {}
        for p in self.positions:
            if p.ready_ref is not None:
                by_ref[p.ready_ref] = p
            elif p.serve_ref is not None:
                by_ref[p.serve_ref] = p
        if by_ref:
            done, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=_TICK_S)
        else:
            done = []
            self._stopping.wait(_TICK_S)
        if self._stopping.is_set():
            return
        for ref in done:
            p = by_ref[ref]
            try:
                result = ray.get(ref)
            except Exception:
                self._on_death(p)
                continue
            if ref is p.ready_ref:
                self._on_started(p, result)
            else:
                self._on_returned(p, result)
        now_ns = lib.shmfeed_now_ns()
        for p in self.positions:
            if not p.active:
                continue
            if p.pid is not None and not p.finished and not registry.is_alive(p.pid):
                self._on_death(p)
            elif p.pid is not None and self.lease is not None and not p.finished:
                rec = self.work.record(p.worker)
                if rec.task is not None and (now_ns - rec.since_ns) / 1e9 > self.lease:
                    # Stuck (or paused) on one batch: kill it first so it can never write again.
                    with contextlib.suppress(Exception):
                        ray.kill(p.actor, no_restart=True)
                    self._on_death(p)
        self._check_ray_alive()
        if self._tuner is not None and self._tuner.due():
            self._autotune(self._tuner)

    # ---- autotune (NOTE [autotune]) ----------------------------------------------

    def _autotune(self, tuner: Tuner) -> None:
        busy_ns = 0
        for p in self.positions:
            if p.active and p.owner is not None:
                rec = self.work.record(p.worker)
                owner, seen = p.busy_seen
                busy_ns += rec.busy_ns - (seen if owner == rec.owner else 0)
                p.busy_seen = (rec.owner, rec.busy_ns)
        running = sum(1 for p in self.positions if p.active and p.pid is not None and not p.stopping)
        change = tuner.step(busy_ns / 1e9, running, starting=running < self.workers_running())
        for _ in range(max(0, change)):
            self._add_producer()
        for _ in range(max(0, -change)):
            self._stop_producer()

    def _add_producer(self) -> None:
        for p in self.positions:
            if not p.active:
                self.work.reset(p.worker)
                p.active, p.stopping, p.finished = True, False, False
                self._start(p)
                return

    def _stop_producer(self) -> None:
        """A clean stop of the newest producer: it finishes its batch, then its serve() returns."""
        for p in reversed(self.positions):
            if p.active and not p.stopping:
                p.stopping = True
                self.work.stop(p.worker)
                return

    def _retire(self, p: Position) -> None:
        """A stopped producer's serve() returned: its host goes back to the pool, its position is idle."""
        assert p.host is not None  # it ran
        if self._warm:
            hosts.give_back(self._pool_key, p.host)
        else:
            with contextlib.suppress(Exception):
                self._ray.kill(p.actor, no_restart=True)
            wait_dead(p.pid)
        self.work.reset(p.worker)
        p.actor = p.host = p.ready_ref = p.serve_ref = None
        p.pid = p.owner = None
        p.active = p.stopping = False

    def _check_ray_alive(self) -> None:
        """Ray's processes gone, or no producer alive and none coming for RAY_LOST_S: fail the feed."""
        now = time.monotonic()
        if now - self._ray_checked > 0.5:
            self._ray_checked = now
            dead = raylife.dead_processes()
            if dead:
                self._fail(errors.ShmfeedError(
                    f"Ray died under the feed ({', '.join(dead)} exited): its producers cannot run or be "
                    "replaced. Close the feed (and Ray); check the Ray logs for why"))
                return
        if any(p.pid is not None and not p.finished for p in self.positions):
            self._no_producer_since = None
            return
        if self._no_producer_since is None:
            self._no_producer_since = now
        elif now - self._no_producer_since > RAY_LOST_S and not all(p.finished for p in self.positions):
            self._fail(errors.ShmfeedError(
                f"no producer has been running for {RAY_LOST_S:g} s and Ray started none: Ray (raylet or GCS) "
                "is probably gone or out of resources. Close the feed; check `ray status` and the Ray logs"))

    def _on_returned(self, p: Position, result: dict[str, Any]) -> None:
        p.serve_ref = None
        if p.stopping and result.get("closed"):
            self._retire(p)
            return
        if result.get("closed"):
            p.finished = True
            return
        e = result["error"]
        p.finished = True
        self._source_failed(errors.ProducerError.from_record(self._kind, e), e["seq"])

    def _source_failed(self, exc: errors.ProducerError, seq: int) -> None:
        """Batch ``seq`` cannot be made: the loop raises ``exc`` (ordered: once it has every batch before)."""
        if self.ordered:
            # Batches before it may still be in the making: keep the ring open and producing
            # until the loop reaches this batch (raise_if_failed), so they are delivered first.
            with self._lock:
                if self._deferred_error is None or seq < self._deferred_error[1]:
                    self._deferred_error = (exc, seq)
        else:
            self._fail(exc)

    def _fail(self, exc: BaseException, cause: BaseException | None = None) -> None:
        if cause is not None:
            exc.__cause__ = cause
        if self._error is None:
            self._error = exc
        code = CLOSE_PRODUCER_ERROR if isinstance(exc, errors.ProducerError) else CLOSE_FAILED
        with contextlib.suppress(errors.ShmfeedError):
            self.ring.close(str(exc).splitlines()[0][:1500], code=code)
        self._stopping.set()

    # ---- a death ---------------------------------------------------------------

    def _on_death(self, p: Position) -> None:
        """Account for a dead producer's task, re-issue it if it was lost, start a replacement."""
        wait_dead(p.pid)  # Ray may call it dead before its process is gone
        died = self.work.record(p.worker)  # before the reset below: the pid and the fatal signal it noted
        pid, signum = p.pid or died.pid or None, died.signal or None
        if p.owner is not None:
            self.ring.reclaim(p.owner)
        if p.pid is not None:
            registry.forget_process(p.pid, self.ring)  # inspect/cleanup stop listing the dead producer
        culprit = None
        with self._lock:
            lost = self._lost_by(p.worker)
            for seq in lost:
                self._deaths_holding[seq] = self._deaths_holding.get(seq, 0) + 1
                if self._deaths_holding[seq] >= KILLS_PER_BATCH:
                    culprit = seq  # its source kills the process (os._exit, a crash): re-issuing cannot help
                    continue
                self.work.reissue(seq)
                self.reissued += 1
            self.work.reset(p.worker)
        if culprit is not None:
            index = self._index_of(culprit)
            self._source_failed(errors.ProducerError(
                f"batch index {index} killed its producer {KILLS_PER_BATCH} times (the {self._kind} source "
                "ended the process: os._exit, a crash in native code, or the OOM killer; no Python traceback "
                "exists): fix the source for this index", index=index, worker=p.worker, traceback_text=""),
                culprit)
        p.pid = p.owner = None
        p.serve_ref = p.ready_ref = None
        p.host = None  # dead: never pooled
        if p.stopping:  # it was being stopped anyway: its position goes idle, no replacement
            p.active = p.stopping = False
            p.actor = None
            return
        if self.restarts_left <= 0:
            held = f" while making batch index {self._index_of(lost[0])}" if lost else ""
            how = f" (pid {pid}, killed by {_signal_name(signum)})" if signum else ""
            self._fail(errors.ProducerLost(f"producer {p.worker} died{held}{how} and no restarts are left "
                                           f"({self.restarts} used); see the Ray logs for why it died",
                                           pid=pid, signal=signum))
            return
        self.restarts_left -= 1
        self.restarts += 1
        self._start(p)

    def _index_of(self, seq: int) -> int | None:
        """The batch index task ``seq`` of the current job makes (for messages)."""
        from .work import Task

        job = self._job
        if job is None:
            return None
        try:
            return self._task_index(Task(seq, seq - job.base_seq, job.epoch, job.start, job.flags, True))
        except Exception:
            return None

    def _lost_by(self, dead: int) -> list[int]:
        """Tasks the producer at record ``dead`` took that nobody will make now (NOTE [work hand-out])."""
        if self._job is None:
            return []
        base = self._job.base_seq
        rec = self.work.record(dead)
        candidates = set() if rec.task is None else {rec.task}
        if rec.intent:  # it died inside a take: any task handed out may be the one
            if self._job.round_robin:  # ... of its own: the others' records are theirs
                candidates.update(self._handed_out_by(dead))
            else:
                candidates.update(self._handed_out())  # 1. what was handed out
        candidates = {s for s in candidates if s >= base}  # earlier jobs were drained before this one
        if not candidates:
            return []
        queued = set(self.work.queued())  # 2. the queue, before the records a pop moves a task into
        held = self._held_by_live(dead)   # 3. live records, once every take in progress ended
        if self.ordered:                  # 4. the ring, then 5. what the loop has
            lost = [s for s in sorted(candidates - queued - held) if not self.ring.seq_committed(s)]
        else:
            in_ring = set()
            for i in range(self.ring.slots):
                info = self.ring.slot_info(i)
                if info["state"] in ("ready", "acquired"):
                    in_ring.add(info["seq"])
            delivered = self._delivered()
            lost = sorted(candidates - queued - held - in_ring - delivered)
        return lost

    def _held_by_live(self, dead: int) -> set[int]:
        """The tasks the other producers hold, once their takes in progress have ended."""
        self._settle_takes()
        held: set[int] = set()
        for p in self.positions:
            if p.worker != dead and (task := self.work.record(p.worker).task) is not None:
                held.add(task)
        return held


def _signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
