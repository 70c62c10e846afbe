"""A ring's lifetime against its users' mistakes and accidents: views kept past detach(),
fork()ed children holding the parent's rings, and Ctrl-C in the middle of detach().

- Views (numpy arrays, memoryviews, a batch's arrays) read and written after
  ``detach()`` never crash the interpreter: they keep the address range mapped
  (reading zeros), and it is unmapped when the last of them is gone. Run in a
  child interpreter, so that a segfault fails the test instead of killing pytest.
- A child made by a real ``os.fork()`` that detaches, drops, closes, uses or simply
  exits with its copy of the parent's ring never closes it, never unlinks it and
  never takes its registry record; the parent goes on using the ring.
- A ``KeyboardInterrupt`` raised at every line of ``detach()`` (a real exception
  raised by a tracer, as a signal handler's would be) leaves the ring either
  attached and usable, or detached with the rest of the work done by the next
  ``detach()``: no mapping, descriptor, name or record is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from pyshmfeed import Ring, SegmentNotFound, registry
from pyshmfeed._ffi import ffi
from pyshmfeed.errors import RingClosed


def run_child(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=120, check=False)


def maps_lines(address: int) -> list[str]:
    """Lines of /proc/self/maps for the mapping that starts at ``address``."""
    with open("/proc/self/maps") as f:
        return [line for line in f if line.startswith(f"{address:x}-")]


# ---- views after detach ------------------------------------------------------------------

VIEWS_AFTER_DETACH = """
    import gc, json, sys
    import numpy as np
    from pyshmfeed import BatchSpec, Ring
    from pyshmfeed._ffi import ffi
    from pyshmfeed.errors import RingClosed
    from pyshmfeed.spec import SlotLayout

    ring = Ring.create(2, 1 << 20, backing=sys.argv[1])
    base = int(ffi.cast("uintptr_t", ring._base))
    spec = BatchSpec(x=((1000,), "float32"))
    with ring.claim(0) as slot:
        written = slot.array(np.uint8, 64)  # a producer's writable view
        layout = SlotLayout(spec, ring.slot_buffer(slot.slot), ring.slot_bytes)
        layout.full[0][:] = 7
        slot.set_commit_bytes(layout.write_header(index=0, epoch=0, seq=0, worker=0, shapes=[(1000,)]))
    got = ring.acquire(timeout=5)
    array, memory = got.array(np.uint8, 64), got.memory
    _, (batch_x,), _ = SlotLayout(spec, ring.slot_buffer(got.slot), ring.slot_bytes).read(got.nbytes)
    before = float(batch_x.sum())
    got.release()
    ring.detach()

    def mapped():
        with open("/proc/self/maps") as f:
            return [line.split()[-1] for line in f if line.startswith(f"{base:x}-")]

    out = {"before": before, "mapped_after_detach": mapped()}
    try:
        ring.acquire(timeout=0)
    except RingClosed:
        out["acquire_after_detach"] = "RingClosed"
    # Every view outlived the ring: read them all, write the producer's.
    out["read"] = int(array.sum()) + float(batch_x.sum()) + sum(bytes(memory)) + int(layout.full[0].sum())
    written[:] = 1
    del array, memory, batch_x, written, layout, got, slot
    gc.collect()
    out["mapped_at_the_end"] = mapped()
    print(json.dumps(out))
"""


@pytest.mark.parametrize("backing", ["memfd", "named"])
def test_views_kept_past_detach_read_zeros_and_the_range_goes_with_the_last_view(backing):
    child = run_child(VIEWS_AFTER_DETACH, backing)
    assert child.returncode == 0, f"the interpreter died ({child.returncode}): {child.stderr[-2000:]}"
    out = json.loads(child.stdout)
    assert out["before"] == 7000.0
    # Detach gave the segment up at once (the range is private zero pages, no longer the segment)...
    assert out["mapped_after_detach"] and not any("memfd:" in m or "/dev/shm" in m
                                                 for m in out["mapped_after_detach"])
    assert out["acquire_after_detach"] == "RingClosed"
    assert out["read"] == 0  # ...so the views read zeros, not a batch that is no longer theirs
    assert out["mapped_at_the_end"] == []  # and the range went with the last view


def test_a_ring_without_views_is_unmapped_by_detach_itself():
    ring = Ring.create(2, 4096)
    base = int(ffi.cast("uintptr_t", ring._base))
    assert maps_lines(base)
    ring.detach()
    assert maps_lines(base) == []


# ---- fork --------------------------------------------------------------------------------

FORKED_CHILD = """
    import gc, json, os, sys
    from pyshmfeed import Ring, registry
    from pyshmfeed.errors import RingClosed

    backing, action = sys.argv[1], sys.argv[2]
    ring = Ring.create(2, 64, backing=backing)
    producer = Ring.attach(ring.handle)
    with producer.claim(0) as slot:
        slot.memory[:2] = b"p0"
    pid = os.fork()
    if pid == 0:  # the child, with copies of both Ring objects
        if action == "detach":
            ring.detach()
            producer.detach()
        elif action == "close":  # what Feed.close() does to its ring
            ring.close("closed by a forked child")
            ring.detach()
        elif action == "drop":
            del ring, producer, slot
            gc.collect()
        elif action == "use":
            for call in (lambda: producer.claim(1, timeout=0), lambda: ring.acquire(timeout=0)):
                try:
                    call()
                    os._exit(3)  # the child used its parent's claim token and consumer position
                except RingClosed:
                    pass
        sys.exit(0)  # a normal exit: the interpreter finalizes what is left ("exit": everything)
    _, status = os.waitpid(pid, 0)
    out = {"child_status": status, "closed": ring.closed, "name_exists": os.path.exists(ring.handle.path),
           "records": sum(e["ring"] is not None and e["ring"]["pid"] == os.getpid() for e in registry.rings())}
    late = Ring.attach(ring.handle)  # what a new producer does: the segment must still be there
    with late.claim(1) as slot:
        slot.memory[:2] = b"p1"
    out["delivered"] = []
    for _ in range(2):
        with ring.acquire(timeout=5) as got:
            out["delivered"].append(bytes(got.memory[:2]).decode())
    late.detach()
    producer.detach()
    ring.detach()
    out["name_after_detach"] = os.path.exists(ring.handle.path)
    print(json.dumps(out))
"""


@pytest.mark.parametrize("action", ["detach", "close", "drop", "use", "exit"])
@pytest.mark.parametrize("backing", ["memfd", "named"])
def test_a_forked_child_never_closes_unlinks_or_frees_its_parents_ring(backing, action, tmp_path):
    env = dict(os.environ, **{registry.REGISTRY_ENV: str(tmp_path / "registry")})
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(FORKED_CHILD), backing, action],
                           capture_output=True, text=True, timeout=120, check=False, env=env)
    assert child.returncode == 0, f"exit {child.returncode}: {child.stderr[-2000:]}"
    out = json.loads(child.stdout)
    assert out["child_status"] == 0, f"the forked child exited with {out['child_status']:#x}"
    assert not out["closed"], "the child's copy closed the parent's ring"
    assert out["name_exists"], "the child's copy unlinked or freed the parent's segment"
    assert out["records"] == 1, "the child's copy removed the parent's registry record"
    assert out["delivered"] == ["p0", "p1"]
    if backing == "named":
        assert not out["name_after_detach"]  # the parent itself still removes the name


# ---- Ctrl-C inside detach ------------------------------------------------------------------


class InterruptAtLine:
    """A tracer that raises KeyboardInterrupt at the n-th line run by detach() and what it calls in ring.py
    and registry.py (n = 0: never; ``lines`` counts them), the way a Ctrl-C's handler raises it there."""

    def __init__(self, n: int) -> None:
        self.n, self.lines = n, 0
        self.files = {sys.modules[Ring.__module__].__file__, registry.__file__}

    def __call__(self, frame, event, arg):
        return self.local if frame.f_code.co_filename in self.files else None

    def local(self, frame, event, arg):
        if event == "line":
            self.lines += 1
            if self.lines == self.n:
                raise KeyboardInterrupt
        return self.local


def detach_interrupted(ring: Ring, n: int) -> tuple[bool, int]:
    """detach() with a KeyboardInterrupt at its n-th line: (interrupted?, lines run)."""
    tracer = InterruptAtLine(n)
    sys.settrace(tracer)
    try:
        ring.detach()
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    finally:
        sys.settrace(None)
    return interrupted, tracer.lines


def waiting_thread(ring: Ring) -> threading.Thread:
    """A producer thread inside a C wait (its batch's slot is never freed), so detach() has to wait for it."""
    def wait():
        try:
            ring.claim(1)  # a 1-slot ring whose batch 0 is never consumed: waits until detached
        except RingClosed:
            pass

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not ring._in_wait and time.monotonic() < deadline:
        time.sleep(0.001)
    assert ring._in_wait, "the waiting thread never entered its wait"
    return thread


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def ring_to_detach(backing: str, waiter: bool) -> tuple[Ring, threading.Thread | None]:
    ring = Ring.create(1, 4096, backing=backing)
    ring.claim(0).commit(8)
    return ring, waiting_thread(ring) if waiter else None


@pytest.mark.parametrize("waiter", [False, True], ids=["idle", "with-a-waiter"])
@pytest.mark.parametrize("backing", ["memfd", "named"])
def test_ctrl_c_at_any_line_of_detach_leaves_it_attached_or_finished_by_the_next_detach(
        backing, waiter, tmp_path, monkeypatch):
    monkeypatch.setenv(registry.REGISTRY_ENV, str(tmp_path / "registry"))
    ring, thread = ring_to_detach(backing, waiter)
    _, total = detach_interrupted(ring, 0)  # how many lines an uninterrupted detach runs
    if thread is not None:
        thread.join(10)
    outcomes = {"still attached": 0, "detached": 0, "not reached": 0}
    for n in range(1, total + 1):
        open_before = fds()
        ring, thread = ring_to_detach(backing, waiter)
        base, path = int(ffi.cast("uintptr_t", ring._base)), ring.handle.path
        interrupted, _ = detach_interrupted(ring, n)
        if not interrupted:  # the waiter left sooner this time: fewer lines in detach's wait loop
            outcomes["not reached"] += 1
        elif ring.attached:  # interrupted before anything was given up: the ring works as before
            outcomes["still attached"] += 1
            assert not ring.closed and ring.counters()["commits"] == 1
            with ring.acquire(timeout=5) as got:
                assert bytes(got.memory) == bytes(8)
        else:
            outcomes["detached"] += 1
            with pytest.raises(RingClosed):
                ring.counters()
        ring.detach()  # finishes whatever the interrupted one left
        if thread is not None:
            thread.join(10)
            assert not thread.is_alive()
        where = f"Ctrl-C at line {n} of {total}"
        assert maps_lines(base) == [], f"{where}: the mapping is still there"
        assert fds() == open_before, f"{where}: a descriptor leaked"
        assert backing == "memfd" or not os.path.exists(path), f"{where}: the named segment is still there"
        assert registry.rings() == [], f"{where}: the registry record is still there"
    print(f"\n[{backing}, {'waiter' if waiter else 'idle'}] Ctrl-C at each of the {total} lines detach() runs: "
          f"{outcomes}")
    assert outcomes["detached"] > 0 and (outcomes["still attached"] > 0 or not waiter)


def test_a_handle_of_a_closed_ring_does_not_attach_the_ring_that_reused_its_path():
    """A memfd path is /proc/<creator>/fd/<n>: the creator's next ring may get the same fd number.
    A producer that attaches late with the old handle must not become a producer of the new ring."""
    old = Ring.create(2, 4096)
    handle = old.handle
    old.detach()
    new = Ring.create(2, 4096)
    try:
        with pytest.raises(SegmentNotFound):
            Ring.attach(handle)
        Ring.attach(new.handle).detach()  # the new ring's own handle attaches
    finally:
        new.detach()
