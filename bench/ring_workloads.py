"""The workloads of the ring microbenchmarks: producer processes and the consumer side of each.

Each workload is a context manager that starts its producer in another process
(``spawn``: a fresh interpreter, as a Ray worker would be) and waits until it is
ready. Consumer-cost and throughput workloads then expose

- ``prepare()``: untimed; makes sure what the next ``step()`` consumes is ready,
- ``step()``: timed; the consumer's work for one batch (or one stream of batches),
- ``check()``: after the measurement; proves it measured what it claims to
  (e.g. that no ring acquire ever waited) and returns figures for the report,

so that ``bench/test_ring_bench.py`` can hand ``step``/``prepare`` to
pytest-benchmark and ``tests/test_bench_ring_smoke.py`` can run them a few times
without it. ``RingWakeLatency.run()`` measures a whole latency distribution.

Every consumer does the same work per batch, whatever the transport: obtain the
batch, build a float32 numpy view of the whole payload, read its last element,
give the batch back. The payload fills the slot (``slot_bytes``).

Who frees what: each workload owns its ring / queues / shared-memory blocks and
its producer process; ``__exit__`` stops the producer (bounded waits, then
SIGKILL), joins it and frees everything, so nothing outlives the ``with`` block.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from multiprocessing import shared_memory

import numpy as np

from pyshmfeed import Ring, RingClosed
from pyshmfeed._ffi import lib

SLOT_SIZES = {"4KiB": 4 << 10, "1MiB": 1 << 20, "64MiB": 64 << 20}
SLOTS = 8  # slots per ring, queue capacity and shared-memory pool size alike
WAIT_LIMIT_S = 60.0  # the longest any untimed wait on the producer may take

_CTX = mp.get_context("spawn")


def payload(slot_bytes: int) -> np.ndarray:
    """The source batch a producer copies from: float32, fills the slot, every page touched."""
    return np.arange(slot_bytes // 4, dtype=np.float32)


# ---- producer processes (module-level functions: spawn imports them by name) ----


def _producer_main(body, control, *args) -> None:
    """Run ``body`` and report its failure to the consumer over ``control``, with the traceback."""
    try:
        body(control, *args)
    except BaseException:
        try:
            control.send(("error", traceback.format_exc()))
        except (OSError, ValueError):
            pass
        raise


def _ring_producer(control, handle, fill: bool) -> None:
    """Produce into the ring on request; commits batches 0, 1, 2... in order.

    Requests: ("fill", n): produce n batches, then answer ("done", n).
    ("full",): produce until the ring closes or a message arrives: the producer
    then sleeps in ``claim`` whenever the ring is full (each consumer release wakes it).
    ("paced", n, gap_s): for each batch claim, sleep ``gap_s``, commit: the
    consumer is asleep in ``acquire`` when the commit lands.  None: exit.
    """
    with Ring.attach(handle) as ring:
        src = payload(ring.slot_bytes)
        count = src.size
        seq = 0
        control.send(("ready", os.getpid()))
        while (request := control.recv()) is not None:
            kind = request[0]
            if kind == "fill":
                for _ in range(request[1]):
                    with ring.claim(seq) as slot:
                        if fill:
                            np.copyto(slot.array(np.float32, count), src)
                    seq += 1
                control.send(("done", request[1]))
            elif kind == "full":
                try:
                    while True:
                        with ring.claim(seq, stop=control.poll) as slot:
                            if fill:
                                np.copyto(slot.array(np.float32, count), src)
                        seq += 1
                except RingClosed:
                    return  # the consumer closed the ring, or sent a message: done either way
            elif kind == "paced":
                _, n, gap_s = request
                for _ in range(n):
                    slot = ring.claim(seq)
                    time.sleep(gap_s)
                    slot.commit()  # stamps commit_ns, then wakes the sleeping consumer
                    seq += 1
                control.send(("done", n))


def _pipe_producer(control, writer) -> None:
    """The latency reference: on ("paced", n, gap_s), n times sleep ``gap_s``, then write a
    CLOCK_MONOTONIC stamp (8 bytes) to the pipe the consumer sleeps on."""
    control.send(("ready", os.getpid()))
    now_ns = lib.shmfeed_now_ns
    while (request := control.recv()) is not None:
        _, n, gap_s = request
        for _ in range(n):
            time.sleep(gap_s)
            os.write(writer.fileno(), now_ns().to_bytes(8, "little"))  # raw bytes, no framing
        control.send(("done", n))


def _queue_producer(control, batches: mp.Queue, slot_bytes: int, fill: bool) -> None:
    """Put numpy batches on a bounded ``multiprocessing.Queue`` (pickled by its feeder thread).

    Requests as for ``_ring_producer``: ("fill", n) answers ("done", n); ("full",)
    keeps the queue full until a message arrives; None: exit. Buffers rotate over
    SLOTS arrays and the queue holds at most SLOTS - 1, so a buffer is only
    rewritten after the consumer has received it.
    """
    src = payload(slot_bytes)
    bufs = [src.copy() for _ in range(SLOTS)]
    i = 0
    control.send(("ready", os.getpid()))

    def put_one(stop) -> bool:
        nonlocal i
        if stop():
            return False
        buf = bufs[i % SLOTS]
        if fill:
            np.copyto(buf, src)
        while True:
            try:
                batches.put(buf, timeout=0.05)
                i += 1
                return True
            except queue.Full:
                if stop():
                    return False

    while (request := control.recv()) is not None:
        if request[0] == "fill":
            for _ in range(request[1]):
                put_one(lambda: False)
            control.send(("done", request[1]))
        elif request[0] == "full":
            while put_one(control.poll):
                pass
    batches.close()
    batches.join_thread()  # every batch put has been handed to the pipe


def _shm_producer(control, names: mp.Queue, free: mp.Queue, slot_bytes: int, fill: bool) -> None:
    """Hand out batches in a pool of SLOTS ``SharedMemory`` blocks by name.

    The consumer attaches by name, reads, closes and puts the name back on
    ``free``. This producer creates, owns and unlinks the blocks.
    """
    src = payload(slot_bytes)
    blocks = {}
    try:
        for _ in range(SLOTS):
            shm = shared_memory.SharedMemory(create=True, size=slot_bytes)
            np.copyto(np.ndarray(src.shape, np.float32, buffer=shm.buf), src)  # touch every page
            blocks[shm.name] = shm
            free.put(shm.name)
        control.send(("ready", os.getpid()))

        def put_one(stop) -> bool:
            if stop():
                return False
            while True:
                try:
                    name = free.get(timeout=0.05)
                    break
                except queue.Empty:
                    if stop():
                        return False
            if fill:  # a view per batch: shm.close() refuses while one is alive
                np.copyto(np.ndarray(src.shape, np.float32, buffer=blocks[name].buf), src)
            names.put(name)
            return True

        while (request := control.recv()) is not None:
            if request[0] == "fill":
                for _ in range(request[1]):
                    put_one(lambda: False)
                control.send(("done", request[1]))
            elif request[0] == "full":
                while put_one(control.poll):
                    pass
        names.close()
        names.join_thread()
    finally:
        for shm in blocks.values():
            shm.close()
            shm.unlink()


# ---- the consumer side -----------------------------------------------------------


class _ProducerProcess:
    """A producer process and its control pipe; bounded waits everywhere."""

    def __init__(self, body, *args) -> None:
        self.control, child_end = _CTX.Pipe()
        self.process = _CTX.Process(target=_producer_main, args=(body, child_end, *args), daemon=True)
        self.process.start()
        child_end.close()
        self.expect("ready")

    def send(self, *request) -> None:
        self.control.send(request)

    def expect(self, kind: str):
        """Wait for the producer's next message, which must be ``kind``; returns its value."""
        if not self.control.poll(WAIT_LIMIT_S):
            self.alive_or_raise()
            raise TimeoutError(f"the producer sent nothing within {WAIT_LIMIT_S:g} s (expected {kind!r})")
        try:
            got, value = self.control.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"the producer process exited (code {self.process.exitcode}) "
                               f"while {kind!r} was expected") from None
        if got == "error":
            raise RuntimeError(f"the producer process failed:\n{value}")
        if got != kind:
            raise RuntimeError(f"the producer answered {got!r}, expected {kind!r}")
        return value

    def alive_or_raise(self) -> None:
        if not self.process.is_alive():
            detail = self.control.recv()[1] if self.control.poll() else ""
            raise RuntimeError(f"the producer process exited (code {self.process.exitcode}) {detail}")

    def state(self) -> str:
        """The producer's scheduler state from /proc: 'S' while it sleeps (in a futex, here)."""
        with open(f"/proc/{self.process.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    def request_exit(self) -> None:
        """Ask the producer to exit (this also ends a ("full",) loop: it polls the pipe)."""
        try:
            self.control.send(None)
        except (OSError, ValueError):
            pass  # it has gone already

    def stop(self) -> None:
        """Ask the producer to exit; it must within a few seconds, or it is killed."""
        self.request_exit()
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.control.close()


def wait_until(condition, what: str, producer: _ProducerProcess) -> None:
    """Spin (yielding) until ``condition()``; bounded, and fails fast if the producer died."""
    deadline = time.monotonic() + WAIT_LIMIT_S
    spins = 0
    while not condition():
        spins += 1
        if spins % 64 == 0:
            producer.alive_or_raise()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {WAIT_LIMIT_S:g} s")
            os.sched_yield()


def _drain_until_exit(q: mp.Queue, producer: _ProducerProcess) -> None:
    """Empty ``q`` until the producer (told to stop) has exited: its feeder must flush first."""
    deadline = time.monotonic() + WAIT_LIMIT_S
    while producer.process.is_alive() and time.monotonic() < deadline:
        try:
            q.get(timeout=0.05)
        except queue.Empty:
            pass


class _RingWorkload:
    """A ring of SLOTS slots created here, and a producer process attached to it."""

    def __init__(self, slot_bytes: int, *, fill: bool = False, slots: int = SLOTS) -> None:
        self.slot_bytes = slot_bytes
        self.count = slot_bytes // 4
        self.slots = slots
        self.fill = fill
        self.head = 0  # the next batch sequence this consumer acquires

    def __enter__(self):
        self.ring = Ring.create(self.slots, self.slot_bytes)
        try:
            self.producer = _ProducerProcess(_ring_producer, self.ring.handle, self.fill)
        except BaseException:
            self.ring.detach()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.ring.close("benchmark done")  # ends a producer sleeping in claim(), if any
        self.producer.stop()
        self.ring.detach()

    def consume_one(self) -> None:
        """The consumer's work for one batch (the same for every transport)."""
        slot = self.ring.acquire()
        view = slot.array(np.float32, self.count)
        view[-1]
        slot.release()
        self.head += 1


class RingConsumerCost(_RingWorkload):
    """Consumer cost of one ready ring slot: acquire + numpy view + release.

    ``producer="asleep"``: the producer keeps the ring full, so it sleeps in
    ``claim`` and every release pays the futex wake that lets it refill the slot
    (the steady state of a feed whose producers are ahead). ``"prefilled"``: the
    producer fills the ring and then waits on a pipe, not on the ring, so releases
    wake nobody; it refills when the consumer has drained the ring (untimed).
    """

    def __init__(self, slot_bytes: int, producer: str = "asleep") -> None:
        if producer not in ("asleep", "prefilled"):
            raise ValueError(f"producer={producer!r}: use 'asleep' or 'prefilled'")
        super().__init__(slot_bytes)
        self.mode = producer

    def __enter__(self):
        super().__enter__()
        if self.mode == "asleep":
            self.producer.send("full")
        self.waits_before = self.ring.counters()["consumer_waits"]
        self.steps = 0
        return self

    def prepare(self) -> None:
        if self.mode == "asleep":
            # Ring full (the newest batch is committed), and the producer asleep in claim().
            last = self.head + self.slots - 1
            wait_until(lambda: self.ring.seq_committed(last), f"batch {last} committed", self.producer)
            wait_until(lambda: self.producer.state() == "S", "the producer asleep", self.producer)
        elif not self.ring.seq_committed(self.head):
            self.producer.send("fill", self.slots)
            self.producer.expect("done")

    def step(self) -> None:
        self.consume_one()
        self.steps += 1

    def check(self) -> dict:
        """Every measured acquire found its slot ready: the consumer never waited."""
        waits = self.ring.counters()["consumer_waits"] - self.waits_before
        if waits:
            raise AssertionError(f"{waits} of {self.steps} acquires waited: not a ready-slot hand-off")
        return {"acquires": self.steps, "acquires_that_waited": waits}


class _StreamOf:
    """A throughput step (ring or reference workload): the producer fills ``batches`` batches
    (np.copyto of a full payload each) and the consumer takes them all."""

    def __init__(self, slot_bytes: int, batches: int) -> None:
        super().__init__(slot_bytes, fill=True)
        self.batches = batches

    def prepare(self) -> None:
        pass

    def step(self) -> None:
        self.producer.send("fill", self.batches)
        for _ in range(self.batches):
            self.consume_one()
        self.producer.expect("done")

    def check(self) -> dict:
        return {"batches_per_step": self.batches}


class RingStream(_StreamOf, _RingWorkload):
    """Throughput: the producer np.copyto's a full slot per batch; ``step`` moves ``batches`` of them."""


class RingWakeLatency(_RingWorkload):
    """Commit-to-wake latency: the consumer sleeps in acquire; the producer commits.

    Latency = CLOCK_MONOTONIC just after ``acquire()`` returns minus the slot's
    ``commit_ns`` (stamped by the producer's commit just before its CAS and wake).
    A hand-off where the consumer arrived after the commit (it did not sleep) is
    not a wake and is left out, and counted.
    """

    def __init__(self, slot_bytes: int, handoffs: int, gap_s: float = 0.0005) -> None:
        super().__init__(slot_bytes)
        self.handoffs = handoffs
        self.gap_s = gap_s

    def run(self) -> dict:
        ring, now_ns = self.ring, lib.shmfeed_now_ns
        latencies = []
        not_slept = 0
        waits = ring.counters()["consumer_waits"]
        self.producer.send("paced", self.handoffs, self.gap_s)
        for _ in range(self.handoffs):
            slot = ring.acquire()
            woke_ns = now_ns()
            latency_ns = woke_ns - slot.commit_ns
            slot.release()
            self.head += 1
            now_waits = ring.counters()["consumer_waits"]
            if now_waits > waits:
                latencies.append(latency_ns)
            else:
                not_slept += 1
            waits = now_waits
        self.producer.expect("done")
        return _percentiles(latencies, self.handoffs, not_slept)


def _percentiles(latencies_ns: list[int], handoffs: int, not_asleep: int) -> dict:
    if not latencies_ns:
        raise AssertionError("the consumer was never asleep when the producer handed over: no wake measured")
    lat = np.array(latencies_ns, dtype=np.float64) / 1000.0
    return {
        "handoffs": handoffs,
        "woken_handoffs": len(latencies_ns),
        "handoffs_not_asleep": not_asleep,
        "p50_us": float(np.percentile(lat, 50)),
        "p90_us": float(np.percentile(lat, 90)),
        "p99_us": float(np.percentile(lat, 99)),
        "max_us": float(lat.max()),
        "mean_us": float(lat.mean()),
    }


class PipeWakeLatency:
    """Reference for RingWakeLatency: the same paced hand-off through a plain ``os.pipe``.

    The consumer sleeps in ``os.read``; the producer writes its CLOCK_MONOTONIC
    stamp. What waking a sleeping Python process costs on this machine by the
    simplest kernel path, measured the same way (a read that found the stamp
    already there is left out and counted).
    """

    def __init__(self, slot_bytes: int, handoffs: int, gap_s: float = 0.0005) -> None:
        self.handoffs = handoffs
        self.gap_s = gap_s

    def __enter__(self):
        self.reader, writer = _CTX.Pipe(duplex=False)  # used as a bare pipe: os.read/os.write
        try:
            self.producer = _ProducerProcess(_pipe_producer, writer)
        finally:
            writer.close()
        return self

    def __exit__(self, *exc) -> None:
        self.producer.stop()
        self.reader.close()

    def run(self) -> dict:
        now_ns, fd = lib.shmfeed_now_ns, self.reader.fileno()
        latencies, not_asleep = [], 0
        self.producer.send("paced", self.handoffs, self.gap_s)
        for _ in range(self.handoffs):
            before_ns = now_ns()
            stamp = os.read(fd, 8)
            woke_ns = now_ns()
            stamp_ns = int.from_bytes(stamp, "little")
            if stamp_ns >= before_ns:
                latencies.append(woke_ns - stamp_ns)
            else:
                not_asleep += 1
        self.producer.expect("done")
        return _percentiles(latencies, self.handoffs, not_asleep)


class _QueueWorkload:
    """A bounded multiprocessing.Queue of pickled numpy batches, and its producer process."""

    def __init__(self, slot_bytes: int, *, fill: bool = False) -> None:
        self.slot_bytes = slot_bytes
        self.fill = fill

    def __enter__(self):
        self.queue = _CTX.Queue(maxsize=SLOTS - 1)
        self.producer = _ProducerProcess(_queue_producer, self.queue, self.slot_bytes, self.fill)
        return self

    def __exit__(self, *exc) -> None:
        # The producer's feeder thread must flush what it holds before the
        # producer can exit: drain the queue until it has.
        self.producer.request_exit()
        _drain_until_exit(self.queue, self.producer)
        self.producer.stop()
        self.queue.close()
        self.queue.join_thread()

    def consume_one(self) -> None:
        view = self.queue.get()  # unpickling builds the array: the view is a fresh copy
        view[-1]


class QueueConsumerCost(_QueueWorkload):
    """Reference for RingConsumerCost: ``get()`` one batch already put on a full queue."""

    def __enter__(self):
        super().__enter__()
        self.producer.send("full")
        return self

    def prepare(self) -> None:
        q = self.queue
        wait_until(lambda: q.qsize() >= SLOTS - 1 and not q.empty(), "the queue full", self.producer)

    def step(self) -> None:
        self.consume_one()

    def check(self) -> dict:
        return {}


class QueueStream(_StreamOf, _QueueWorkload):
    """Reference for RingStream: the producer np.copyto's each batch, then puts it."""


class _ShmWorkload:
    """A pool of SLOTS SharedMemory blocks handed over by name on queues."""

    def __init__(self, slot_bytes: int, *, fill: bool = False) -> None:
        self.slot_bytes = slot_bytes
        self.count = slot_bytes // 4
        self.fill = fill

    def __enter__(self):
        self.names = _CTX.Queue()
        self.free = _CTX.Queue()
        self.producer = _ProducerProcess(_shm_producer, self.names, self.free, self.slot_bytes, self.fill)
        return self

    def __exit__(self, *exc) -> None:
        self.producer.request_exit()
        _drain_until_exit(self.names, self.producer)
        self.producer.stop()
        for q in (self.names, self.free):
            q.close()
            q.join_thread()

    def consume_one(self) -> None:
        name = self.names.get()
        shm = shared_memory.SharedMemory(name=name)
        view = np.ndarray((self.count,), np.float32, buffer=shm.buf)
        view[-1]
        del view  # close() refuses while a view exports the buffer
        shm.close()
        self.free.put(name)


class ShmConsumerCost(_ShmWorkload):
    """Reference for RingConsumerCost: one name already queued; attach, view, read, close, give back."""

    def __enter__(self):
        super().__enter__()
        self.producer.send("full")
        return self

    def prepare(self) -> None:
        q = self.names
        wait_until(lambda: q.qsize() >= SLOTS and not q.empty(), "every block queued", self.producer)

    def step(self) -> None:
        self.consume_one()

    def check(self) -> dict:
        return {}


class ShmStream(_StreamOf, _ShmWorkload):
    """Reference for RingStream: the producer np.copyto's into a free block, then queues its name."""


class CopyBaseline:
    """The floor for throughput: np.copyto of the same bytes in one process.

    Same source size, same ``batches`` per step, destinations rotating over SLOTS
    buffers as the ring's slots do. No process, nothing shared.
    """

    def __init__(self, slot_bytes: int, batches: int) -> None:
        self.slot_bytes = slot_bytes
        self.batches = batches

    def __enter__(self):
        self.src = payload(self.slot_bytes)
        self.dsts = [np.zeros_like(self.src) for _ in range(SLOTS)]
        for dst in self.dsts:
            np.copyto(dst, self.src)  # fault every page in before timing
        return self

    def __exit__(self, *exc) -> None:
        del self.src, self.dsts

    def prepare(self) -> None:
        pass

    def step(self) -> None:
        src, dsts = self.src, self.dsts
        for i in range(self.batches):
            np.copyto(dsts[i % SLOTS], src)

    def check(self) -> dict:
        return {"batches_per_step": self.batches}
