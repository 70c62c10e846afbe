"""Autotune: how many producers a feed runs, and how deep its ring is, within a memory budget.

NOTE [autotune]
  ring     Sized once, at creation, from the batch size and the budget: the
           ring is reserved (and page-locked for CUDA) up front, and growing it
           would mean a new segment and re-attaching every producer. Depth is
           what absorbs producer jitter; with ordered hand-out a producer also
           takes a task only once its slot is free, so ``slots`` bounds the
           batches in flight. We take 2 × max_workers slots (every producer
           one batch in the making and one ready), fewer if the budget says
           so, never fewer than prefetch + 2.
  workers  A controller, run by the supervisor's watch thread (the
           dispatcher's, for producers placed on the cluster) every
           ``AUTOTUNE_S`` (nothing per batch), compares what the loop
           and the producers did in that window:
             - the loop waited (more than ``wait_tolerance`` of its wall time)
               and producers are busy (> ``busy_high``): add producers, more
               at once while the gap is large if the machine has
               ``idle_enough`` idle cores, one (a probe) if it has not;
             - after a change, throughput is compared with the window before
               it (the judging window is longer, ``JUDGE_S``,
               and starts once the new producers run and a window has
               passed): an add that neither raised batches/s by ``gain`` nor
               cut the loop's wait, on a machine with less than ``idle_enough``
               idle cores, is taken back (CPU-bound work on too few cores:
               producers only steal CPU from each other), and adding pauses
               for ``hold`` windows; with a core idle it is kept (CPU was not
               the limit: the workload changed under the trial, as when an
               I/O phase slows down, and taking it back cost ~8 s of
               recovery in the mid-run-change bench);
             - after an add taken back for want of CPU, one fewer is tried
               and judged the same way: kept if throughput held (within
               ``gain``), put back otherwise (and not tried below that
               again). An add judged on a window that start-up had slowed
               can look paid; this is how such a count comes back down;
             - producers mostly idle (< ``busy_low``) while the loop does not
               wait: remove one (a clean stop after its current batch).
           Every decision is kept with its reason (``Controller.decisions``).
"""

from __future__ import annotations

import collections
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import errors

AUTOTUNE_S = 0.5  # the controller's window
JUDGE_S = 1.5     # ... and the window that judges a change: a 0.5 s one is noise on a busy machine
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(value: int | str, what: str = "memory_budget") -> int:
    """``256 * 2**20``, ``"256MiB"``, ``"2GiB"``, ``"1.5 GB"`` → bytes (``InvalidArgument`` otherwise)."""
    if isinstance(value, bool):
        raise errors.InvalidArgument(f"{what}={value!r}: give bytes (an int) or a size like '2GiB'")
    if isinstance(value, int):
        if value <= 0:
            raise errors.InvalidArgument(f"{what}={value!r} must be positive")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
            if n > 0:
                return n
    raise errors.InvalidArgument(f"{what}={value!r}: give bytes (an int) or a size like '256MiB' or '2GiB'")


class IdleCores:
    """Idle CPU of the whole machine between two readings, in cores (from /proc/stat)."""

    def __init__(self) -> None:
        self._last = self._read()

    @staticmethod
    def _read() -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [float(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        return idle, sum(fields)

    def sample(self) -> float:
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[1] <= last[1]:
            return float(os.cpu_count() or 1)  # unknown: do not hold producers back on this
        return (os.cpu_count() or 1) * (now[0] - last[0]) / (now[1] - last[1])


@dataclass(frozen=True)
class Window:
    """What happened in one controller window."""

    seconds: float
    batches: int          # delivered to the loop
    loop_wait_s: float    # the loop's total wait for those batches
    busy_s: float         # producers' time making batches (all of them)
    workers: int          # producers running through the window
    idle_cores: float     # machine-wide idle CPU, in cores

    @property
    def rate(self) -> float:
        return self.batches / self.seconds if self.seconds > 0 else 0.0

    @property
    def wait_fraction(self) -> float:
        # A wait is counted when its batch comes, so one begun before the window can make the sum
        # exceed the window: at most all of it.
        return min(1.0, self.loop_wait_s / self.seconds) if self.seconds > 0 else 0.0

    @property
    def busy_fraction(self) -> float:
        return min(1.0, self.busy_s / (self.seconds * self.workers)) if self.workers and self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Decision:
    at_s: float
    change: int
    workers: int  # after the change
    reason: str

    def as_dict(self) -> dict:
        return {"at_s": round(self.at_s, 2), "change": self.change, "workers": self.workers, "reason": self.reason}


class Controller:
    """Decides producer count changes from windows (NOTE [autotune]). Pure logic: no Ray, no ring."""

    def __init__(self, min_workers: int, max_workers: int, *, wait_tolerance: float = 0.02,
                 busy_high: float = 0.7, busy_low: float = 0.3, gain: float = 0.05, hold: int = 4,
                 min_batches: int = 4, idle_enough: float = 0.5) -> None:
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.wait_tolerance = wait_tolerance
        self.busy_high = busy_high
        self.busy_low = busy_low
        self.gain = gain
        self.hold = hold
        self.min_batches = min_batches
        self.idle_enough = idle_enough  # idle cores (machine-wide) that clear producers of stealing CPU
        self.decisions: collections.deque[Decision] = collections.deque(maxlen=12)
        self._t0 = time.monotonic()
        self._trial: tuple[int, float, float] | None = None  # (added, rate, wait fraction before): to judge
        self._cooldown = 0
        self._ceiling = max_workers  # lowered when adding stopped paying off
        self._failures = 0  # adds in a row that did not pay
        self._try_fewer = False  # an add was taken back for want of CPU: try one fewer next
        self._floor = min_workers  # raised when one fewer cost throughput
        self._idle_cores = float(os.cpu_count() or 1)  # in the last window

    @property
    def short_of_cpu(self) -> bool:
        """The last window had less than ``idle_enough`` idle cores (add producers elsewhere, if you can)."""
        return self._idle_cores < self.idle_enough

    def note(self, text: str) -> None:
        """Append ``text`` to the last decision's reason (where its producers went, say)."""
        if self.decisions:
            d = self.decisions.pop()
            self.decisions.append(Decision(d.at_s, d.change, d.workers, d.reason + text))

    @property
    def judging(self) -> bool:
        """A change is on trial: the next window judges it (the supervisor makes that one longer)."""
        return self._trial is not None

    def decide(self, w: Window, workers: int) -> int:
        """The change in producers to make now (0: none), given the last window and how many run."""
        self._idle_cores = w.idle_cores
        if w.batches < self.min_batches and w.wait_fraction < self.wait_tolerance:
            return 0  # too little seen: no verdict (or nothing asked for: the loop is elsewhere)
        if self._trial is not None:
            added, before, waited = self._trial
            self._trial = None
            if added < 0:
                return self._judge_removal(w, workers, -added, before)
            # It paid if throughput rose, or if the loop now waits clearly less (it may have
            # caught up with the producers, so the rate shows the loop's pace, not theirs).
            paid = w.rate >= before * (1 + self.gain) or w.wait_fraction <= 0.75 * waited
            if paid:
                self._failures = 0
            elif w.idle_cores >= self.idle_enough:
                # Not CPU: with a core idle, producers did not steal it from each other. The
                # workload changed under the trial (a slower phase began): keep them, go on.
                self._record(0, workers, (
                    f"+{added} producers: {before:.1f} -> {w.rate:.1f} batches/s, but with "
                    f"{w.idle_cores:.1f} idle cores CPU is not the limit (the workload changed?): kept"))
            else:
                self._ceiling = max(self.min_workers, workers - added)
                # Each failed try in a row waits twice as long before the next (CPU-bound work
                # would otherwise pay for starting producers over and over).
                self._cooldown = min(64, self.hold * 2 ** self._failures)
                self._failures += 1
                # Producers compete for CPU: fewer may do as well (an earlier add may have been
                # judged on a window that start-up had slowed). Try one fewer next.
                self._try_fewer = True
                return self._record(-added, workers, (
                    f"+{added} producers did not pay: {before:.1f} -> {w.rate:.1f} batches/s "
                    f"and the loop still waits ({w.idle_cores:.1f} idle cores): back to {workers - added}"))
        if self._try_fewer:
            self._try_fewer = False
            if workers > max(self.min_workers, self._floor):
                self._trial = (-1, w.rate, w.wait_fraction)
                return self._record(-1, workers, (
                    f"producers compete for CPU ({w.idle_cores:.1f} idle cores): trying one fewer "
                    f"({w.rate:.1f} batches/s with {workers})"))
        if self._cooldown:
            self._cooldown -= 1
            if self._cooldown == 0:
                self._ceiling = self.max_workers  # the workload may have changed: allow trying again
        waiting = w.wait_fraction > self.wait_tolerance
        if waiting and w.busy_fraction > self.busy_high and workers < min(self._ceiling, self.max_workers):
            # Whether more producers help (I/O-bound) or only compete for CPU (CPU-bound) is
            # decided by trying: the next window judges the add (above).
            room = min(self._ceiling, self.max_workers) - workers
            # The loop's wait says how far behind producers are: ask for that much more, capped.
            want = max(1, math.ceil(workers * w.wait_fraction / max(1e-3, 1 - w.wait_fraction)))
            # At most triple per step: a loop waiting most of its time gets there in two steps, and
            # a step that overshoots (CPU-bound) is judged and taken back like any other.
            add = min(room, want, max(1, 2 * workers))
            if w.idle_cores < self.idle_enough:
                add = 1  # no core to give: only a probe (CPU-bound work would start many for nothing)
            self._trial = (add, w.rate, w.wait_fraction)
            return self._record(add, workers, (
                f"loop waited {1e3 * w.loop_wait_s / max(1, w.batches):.1f} ms/batch "
                f"({100 * w.wait_fraction:.0f}% of its time) with {workers} producers "
                f"{100 * w.busy_fraction:.0f}% busy and {w.idle_cores:.1f} idle cores: +{add} producers"))
        if not waiting and w.busy_fraction < self.busy_low and workers > self.min_workers:
            return self._record(-1, workers, (
                f"producers {100 * w.busy_fraction:.0f}% busy and the loop did not wait "
                f"({100 * w.wait_fraction:.1f}% of its time): -1 producer"))
        return 0

    def _judge_removal(self, w: Window, workers: int, removed: int, before: float) -> int:
        """A removal on trial: kept if throughput held, else put back (and not tried below that again)."""
        if w.rate >= before * (1 - self.gain):
            return self._record(0, workers, (
                f"-{removed} producers kept: {before:.1f} -> {w.rate:.1f} batches/s with {workers}"))
        self._floor = workers + removed
        return self._record(removed, workers, (
            f"-{removed} producers cost throughput: {before:.1f} -> {w.rate:.1f} batches/s: "
            f"back to {workers + removed}"))

    def _record(self, change: int, workers: int, reason: str) -> int:
        self.decisions.append(Decision(time.monotonic() - self._t0, change, workers + change, reason))
        return change


class Tuner:
    """Runs a ``Controller`` on a feed's counters: cuts the windows, lets start-ups settle.

    Shared by the supervisor (producers on this node) and the dispatcher (producers placed on
    the cluster). ``loop_counts()``: the loop's (batches, total wait seconds) so far.
    """

    def __init__(self, controller: Controller, loop_counts: Callable[[], tuple[int, float]]) -> None:
        self.controller = controller
        self._loop_counts = loop_counts
        self._last: tuple[float, int, float, IdleCores] | None = None
        self._settle = 0  # windows to skip before judging a change

    def due(self) -> bool:
        """A window has passed (``JUDGE_S`` while a change is on trial, else ``AUTOTUNE_S``)."""
        now = time.monotonic()
        if self._last is None:
            batches, wait = self._loop_counts()
            self._last = (now, batches, wait, IdleCores())
            return False
        return now - self._last[0] >= (JUDGE_S if self.controller.judging else AUTOTUNE_S)

    def step(self, busy_s: float, running: int, starting: bool) -> int:
        """Close the window (``busy_s``: producers' busy time in it) and return the change to make."""
        now = time.monotonic()
        assert self._last is not None  # due() came first
        t0, b0, w0, idle = self._last
        batches, wait = self._loop_counts()
        self._last = (now, batches, wait, idle)
        window = Window(now - t0, batches - b0, wait - w0, busy_s, running, idle.sample())
        if starting:
            self._settle = 2  # starting Python processes costs CPU: let it pass before judging
            return 0  # producers still starting: judge the last change once they run
        if self._settle:
            self._settle -= 1  # a window for the new producers' start-up to leave the machine
            return 0
        change = self.controller.decide(window, running)
        if change:
            self._settle = 1
        return change

    def summary(self) -> dict:
        c = self.controller
        return {"min_workers": c.min_workers, "max_workers": c.max_workers,
                "decisions": [d.as_dict() for d in c.decisions]}


def ring_slots(*, slot_bytes: int, budget: int | None, want: int, at_least: int,
               size_for: Callable[[int], int]) -> int:
    """Slots for the ring: ``want``, fewer if ``budget`` bytes cannot hold them, never below ``at_least``.

    ``size_for(slots)`` is the segment size of a ring with that many slots (``Ring.size_for``).
    """
    slots = max(want, at_least)
    if budget is None:
        return slots
    while slots > at_least and size_for(slots) > budget:
        slots -= 1
    if size_for(slots) > budget:
        raise errors.InvalidArgument(
            f"memory_budget={budget} bytes cannot hold the smallest ring for this spec ({at_least} slots of "
            f"{slot_bytes} bytes = {size_for(slots)} bytes): raise the budget or lower prefetch")
    return slots
