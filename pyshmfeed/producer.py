"""The producer loop, run inside a Ray actor: attach, then take → claim → write → commit.

One ``Producer`` per process. Indexed sources (fill/make) on the ring's node
run ``serve(...)`` once: it takes tasks from the segment's work area until the
ring closes (NOTE [work hand-out] in csrc/work.c), so no batch costs a Ray
call. Generator sources get ``run_shard(...)`` once per epoch, and producers on
other nodes ``run(tasks)`` per chunk (NOTE [remote producers] in remote.py).
Each batch is written straight into its ring slot.

Failure handling (see NOTE [producer lifecycle] in feed.py):
  - a user function that raises: the slot is aborted and ``run`` *returns* an
    error record (index, worker, traceback text); the feed closes the ring
    with it so the training loop raises ``ProducerError``;
  - ``StaleClaim`` on claim or commit: the batch was already committed or
    re-issued elsewhere; this producer skips it;
  - the ring closed, or the consumer process gone: ``run`` returns at once.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
import traceback
from typing import Any, Callable

from . import errors, registry
from .ring import Ring, RingHandle
from .source import SourceContext, copy_batch_into, write_indexed_batch
from .spec import BatchSpec, SlotLayout
from .work import TaskIndex, WorkArea

# Test hook (fault injection): "STEP:N:MARKER" makes a producer SIGKILL itself at
# STEP (claim, write, commit, after_commit) of its N-th batch, once: the first
# producer to get there creates the file MARKER and dies; others carry on.
KILL_HOOK_ENV = "PYSHMFEED_TEST_KILL_AT"


class Producer:
    """Writes batches into ring slots. Construct inside the producer process."""

    def __init__(self, handle: RingHandle, spec: BatchSpec, kind: str, fn: Callable[..., Any], worker: int,
                 num_workers: int, seed: int, consumer_pid: int, task_index: TaskIndex | None = None) -> None:
        self.ring = self._attach(handle)
        self.spec = spec
        self.kind = kind
        self.fn = fn
        self.worker = worker
        self.num_workers = num_workers
        self.seed = seed
        self.consumer_pid = consumer_pid
        self.layouts = [SlotLayout(spec, self.ring.slot_buffer(i), self.ring.slot_bytes)
                        for i in range(self.ring.slots)]
        self._batches = 0
        self._kill_at = _parse_kill_hook(os.environ.get(KILL_HOOK_ENV, ""))
        self.task_index = task_index
        if task_index is not None:  # takes its work from the segment, at record `worker`
            self.work = WorkArea(self.ring)
            self.work.open(worker, self.ring.owner, os.getpid())
            with contextlib.suppress(errors.ShmfeedError):  # only the death message is poorer without it
                self.work.watch_signals(worker)

    def _attach(self, handle: RingHandle) -> Ring:
        """Map the ring. Same node only (the handle is a path on this machine): a producer on
        another node gets a stand-in that ships batches to the ring's node (pyshmfeed/remote.py)."""
        return Ring.attach(handle)

    def close(self) -> None:
        """Give the ring up: this process then holds no mapping of it (NOTE [warm producers] in hosts.py)."""
        self.layouts = []
        del self.fn  # the source's memory goes with it
        self.ring.detach()

    def identity(self) -> dict[str, Any]:
        """Who this producer is: the feed reclaims by ``owner`` if it dies."""
        return {"pid": os.getpid(), "owner": self.ring.owner, "worker": self.worker}

    def _leave_if_orphaned(self) -> None:
        """The training process died (SIGKILL, OOM): nobody will kill this actor in time (Ray notices
        its driver's death only seconds later), and nothing is left to report to. Leave now."""
        if self._consumer_gone():
            os._exit(0)

    def _consumer_gone(self) -> bool:
        # A zombie counts as gone: a SIGKILLed training process stays one until its parent reaps it.
        return not registry.is_alive(self.consumer_pid)

    def _maybe_die(self, step: str) -> None:
        if self._kill_at is None or self._kill_at[:2] != (step, self._batches):
            return
        try:
            os.close(os.open(self._kill_at[2], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)

    def _produce(self, seq: int, index: int, ctx: SourceContext, write: Callable[[SlotLayout], list]) -> float:
        """Claim slot for ``seq``, write via ``write``, commit. Returns busy seconds (0 if skipped)."""
        self._maybe_die("claim")
        try:
            slot = self.ring.claim(seq, stop=self._consumer_gone)
        except errors.StaleClaim:
            return 0.0  # already committed by someone else: a re-issue raced us
        t0 = time.perf_counter()
        layout = self.layouts[slot.slot]
        try:
            self._maybe_die("write")
            shapes = write(layout)
            nbytes = layout.write_header(index=index, epoch=ctx.epoch, seq=seq, worker=self.worker,
                                         shapes=shapes)
        except BaseException:
            slot.abort()
            raise
        busy = time.perf_counter() - t0
        self._maybe_die("commit")
        try:
            slot.commit(nbytes)
        except errors.StaleClaim:
            return 0.0
        self._maybe_die("after_commit")
        self._batches += 1
        return busy

    def serve(self) -> dict[str, Any]:
        """Make tasks taken from the work area until the ring closes. Never raises for user errors.

        Returns ``{"closed": True}`` when the ring closed (or the consumer is
        gone), or an error record for the batch whose source raised; the task
        stays in this producer's record, so the feed knows it was not made.
        """
        work, rec, task_index = self.work, self.worker, self.task_index
        assert task_index is not None  # serve() is for producers made with a task index
        while True:
            # A new producer (started mid-epoch, a replacement, an added one) builds the epoch's
            # order before taking a task, not while holding one: an ordered feed's loop waits for
            # the task it holds (work.TaskIndex). After that nothing is read here per batch.
            if not task_index.prepared:
                job = work.current()
                if job.count:
                    task_index.prepare(job.epoch, job.start, job.flags)
            try:
                task = work.take(rec, stop=self._consumer_gone)
            except errors.RingClosed:
                self._leave_if_orphaned()
                return {"closed": True}
            index = task_index(task)
            ctx = SourceContext(self.worker, self.num_workers, task.epoch, self.seed)
            try:
                busy = self._make(task.seq, index, ctx)
            except errors.RingClosed:
                return {"closed": True}
            except (Exception, KeyboardInterrupt, SystemExit) as exc:  # the source failed (even by exiting)
                return {"error": {**error_record(exc, index, self.worker), "seq": task.seq}}
            work.done(rec, busy)

    def _make(self, seq: int, index: int, ctx: SourceContext) -> float:
        """Make batch ``index`` as ``seq`` with an indexed source; returns busy seconds."""
        if self.kind == "make":
            # Make the batch before claiming its slot: the source's I/O and compute then
            # overlap with the consumer still reading the slot, which is held only for the copy.
            t0 = time.perf_counter()
            batch = self.fn(index, ctx)
            busy = time.perf_counter() - t0
            return busy + self._produce(seq, index, ctx, lambda layout: copy_batch_into(layout, batch))
        return self._produce(seq, index, ctx, lambda layout: write_indexed_batch(self.kind, self.fn, layout,
                                                                                 index, ctx))

    def run(self, tasks: list[tuple[int, int, int]]) -> dict[str, Any]:
        """Make each ``(seq, index, epoch)`` task, in order. Never raises for user errors."""
        busy = 0.0
        done = 0
        for seq, index, epoch in tasks:
            ctx = SourceContext(self.worker, self.num_workers, epoch, self.seed)
            try:
                busy += self._make(seq, index, ctx)
            except errors.RingClosed:
                self._leave_if_orphaned()
                return {"done": done, "busy_s": busy, "closed": True}
            except Exception as exc:  # a user function (or its batch) failed
                error = {**error_record(exc, index, self.worker), "seq": seq}  # seq: feed.py orders errors
                return {"done": done, "busy_s": busy, "error": error}
            done += 1
        return {"done": done, "busy_s": busy}

    def run_shard(self, epoch: int, skip: int, seq_base: int) -> dict[str, Any]:
        """Run ``shards(worker, num_workers, ctx)`` for one epoch, skipping the first ``skip`` batches
        (already delivered before a restart). Returns how many batches the shard has in total."""
        ctx = SourceContext(self.worker, self.num_workers, epoch, self.seed)
        busy = 0.0
        position = 0  # the batch being made (or fetched from the generator): an error names it
        try:
            for batch in self.fn(self.worker, self.num_workers, ctx):
                if position >= skip:
                    busy += self._produce(seq_base + position, position, ctx,
                                          functools.partial(copy_batch_into, batch=batch))
                position += 1
        except errors.RingClosed:
            self._leave_if_orphaned()
            return {"count": position, "busy_s": busy, "closed": True}
        except Exception as exc:
            return {"count": position, "busy_s": busy, "error": error_record(exc, position, self.worker)}
        return {"count": position, "busy_s": busy}


def error_record(exc: BaseException, index: int, worker: int) -> dict[str, Any]:
    """What the feed raises as ``ProducerError.from_record``: the source's exception, or the claim's."""
    return {"index": index, "worker": worker, "type": type(exc).__name__, "message": str(exc),
            "traceback": traceback.format_exc(),
            "origin": "claim" if isinstance(exc, errors.NoSpace) and exc.claim else "source"}


def _parse_kill_hook(value: str) -> tuple[str, int, str] | None:
    if not value:
        return None
    step, n, marker = value.split(":", 2)
    return (step, int(n), marker)
