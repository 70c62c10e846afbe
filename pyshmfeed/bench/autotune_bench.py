"""``pyshmfeed bench --autotune``: workers="auto" against every hand-set worker count, in one run.

Two workloads on this machine (the issue's): I/O-bound (each batch waits 50 ms, then fills
1 MiB; the loop steps 5 ms) and CPU-bound (about 20 ms of numpy per batch, fills 1 MiB; the
loop does not step). For each: steady-state batches/s of ``workers`` in {1, 2, 4, 8, 16}
(slots = 2 × workers, at least 4: prefetch + 2) and of ``workers="auto"`` with ``memory_budget=256 MiB``; the ratio of
auto to the best hand-set row, auto's ring memory, and the controller's decisions. Then a
workload that changes mid-run (I/O per batch jumps from 5 ms to 50 ms): producers and the
loop's wait over time, and how long auto takes to reach 0.9 × the best hand-set rate of
the new phase (``--plot`` draws it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

import pyshmfeed as sf
from pyshmfeed.source import FillSource, SlotArrays, SourceContext

SPEC = sf.BatchSpec(x=((256, 1024), "float32"))  # 1 MiB
MANUAL = (1, 2, 4, 8, 16)
BUDGET = "256MiB"


class IOSource:
    def __init__(self, io_s: float, switch_at: float | None = None, io_after: float | None = None) -> None:
        self.io_s, self.switch_at, self.io_after = io_s, switch_at, io_after

    def __call__(self, index: int, out: SlotArrays, ctx: SourceContext) -> None:
        io = self.io_s
        if self.switch_at is not None and self.io_after is not None and time.time() >= self.switch_at:
            io = self.io_after
        time.sleep(io)
        out["x"].fill(index)


_CALIBRATE = """
import time
from pyshmfeed.bench.autotune_bench import CPUSource
CPUSource._work(2, 0)  # warm-up: numpy's first matmul sets up its BLAS
t0 = time.process_time()
CPUSource._work(16, 0)
print(max(1, round(0.020 / max((time.process_time() - t0) / 16, 1e-5))))
"""


class CPUSource:
    """About 20 ms of numpy per batch, the same work in every producer and every row.

    The rounds are calibrated once, in a one-off process set up as Ray sets up a producer (one
    BLAS thread), and travel with the source. Calibrating in each producer made the work per
    batch depend on what the process did first: a producer process reused from the pool
    (autotune's removals and re-adds) calibrated without start-up noise, chose more rounds, and
    ran 20 % slower than a new one.
    """

    def __init__(self) -> None:
        self.rounds = int(subprocess.run(
            [sys.executable, "-c", _CALIBRATE], check=True, capture_output=True, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        ).stdout)

    @staticmethod
    def _work(rounds: int, seed: int) -> float:
        a = np.random.default_rng(seed).random((256, 256))
        for _ in range(rounds):
            a = np.sin(a @ a / 256.0)
        return float(a[0, 0])

    def __call__(self, index: int, out: SlotArrays, ctx: SourceContext) -> None:
        out["x"].fill(self._work(self.rounds, index))


def _run(source, *, workers, step: float, seconds: float, warm: float, **options) -> dict[str, Any]:
    """Steady state: measured for ``seconds`` from ``warm`` seconds after every producer it started runs."""
    sf.release_producers()  # every configuration starts its own producer processes: none warm from the last
    with sf.Feed(SPEC, fill=source, length=10**7, workers=workers, warm_producers=True, **options) as feed:
        batches = feed.epoch(0)
        t0, t0_wall = time.perf_counter(), time.time()
        n_warm = n = 0
        t_up = t_warm = None
        trace = []
        while True:
            b = next(batches)
            del b
            now = time.perf_counter() - t0
            n += 1
            if t_up is None and feed.producers()["starting"] == 0:
                t_up = now  # every producer started (16 Ray actors take seconds on 2 cores)
            if t_warm is None and t_up is not None and now >= t_up + warm:
                t_warm, n_warm = now, n
            if step:
                time.sleep(step)
            if n % 10 == 0:
                trace.append((round(now, 3), feed.producers()["running"], n))
            if t_warm is not None and now >= t_warm + seconds:
                break
        batches.close()
        stats = feed.stats()
    rate = (n - n_warm) / (now - t_warm) if t_warm is not None and now > t_warm else 0.0
    return {"workers": workers if isinstance(workers, int) else "auto", "batches_per_s": rate,
            "started_s": t_up, "measured_from_s": t_warm, "t0_wall": t0_wall,
            "ring_bytes": stats["ring_bytes"], "slots": stats["slots"], "workers_at_end": stats["workers"],
            "decisions": stats.get("autotune", {}).get("decisions", []), "trace": trace}


def workload(name: str, source: FillSource, step: float, seconds: float, warm: float,
             auto_warm: float) -> dict[str, Any]:
    rows = [_run(source, workers=w, slots=max(2 * w, 4), step=step, seconds=seconds, warm=warm) for w in MANUAL]
    # auto's steady state comes once the controller converged (the decisions show when).
    auto = _run(source, workers="auto", memory_budget=BUDGET, step=step, seconds=seconds, warm=auto_warm)
    best = max(rows, key=lambda r: r["batches_per_s"])
    return {"workload": name, "manual": rows, "auto": auto, "best_manual": best["workers"],
            "ratio": auto["batches_per_s"] / best["batches_per_s"] if best["batches_per_s"] else None,
            "budget_bytes": sf.autotune.parse_bytes(BUDGET)}


def phase_change(seconds: float = 16.0, switch_after: float = 6.0) -> dict[str, Any]:
    switch_at = time.time() + 1.5 + switch_after  # start-up ~1.5 s
    run = _run(IOSource(0.005, switch_at, 0.05), workers="auto", memory_budget=BUDGET, step=0.005,
               seconds=seconds, warm=0.0)
    return {"switch_after_s": round(switch_at - run["t0_wall"], 2), **run}


def recovered_after(trace: list, switch_s: float, target: float, span: float = 1.0) -> float | None:
    """Seconds from ``switch_s`` until the rate over every later ``span`` of the trace stays >= ``target``.

    ``trace``: (seconds, producers, batches so far) every 10 batches. None: it never held.
    """
    points = [(t, n) for t, _, n in trace]
    held_from = None
    for i, (t, n) in enumerate(points):
        if t < switch_s:
            continue
        later = [(u, m) for u, m in points[i:] if u >= t + span]
        if not later:
            break  # the rest of the trace is shorter than a span
        u, m = later[0]
        if (m - n) / (u - t) >= target:
            held_from = t if held_from is None else held_from
        else:
            held_from = None
    return None if held_from is None else held_from - switch_s


def run(args: argparse.Namespace) -> int:
    seconds = args.autotune_seconds
    result = {"io": workload("I/O-bound: 50 ms wait + 1 MiB fill, loop step 5 ms", IOSource(0.05), 0.005,
                             seconds, 1.0, 8.0),
              "cpu": workload("CPU-bound: ~20 ms numpy + 1 MiB fill, no step", CPUSource(), 0.0, seconds, 1.0, 8.0),
              "phase": phase_change()}
    for key in ("io", "cpu"):
        r = result[key]
        print(f"\n{r['workload']}")
        print(f"{'workers':>8}  {'batches/s':>10}  {'ring MiB':>9}")
        for row in r["manual"] + [r["auto"]]:
            print(f"{str(row['workers']):>8}  {row['batches_per_s']:10.1f}  {row['ring_bytes'] / 2**20:9.1f}")
        a = r["auto"]
        verdict = "met" if r["ratio"] is not None and r["ratio"] >= 0.9 else "NOT met"
        print(f"auto / best hand-set (workers={r['best_manual']}): {r['ratio']:.2f}  (target >= 0.9: {verdict}); "
              f"auto ended with {a['workers_at_end']} producers, ring {a['ring_bytes'] / 2**20:.0f} MiB "
              f"<= budget {r['budget_bytes'] / 2**20:.0f} MiB")
        for d in a["decisions"]:
            print(f"  t={d['at_s']:5.1f} s  -> {d['workers']:2d}  {d['reason']}")
    p = result["phase"]
    # The new phase is the I/O-bound workload above (50 ms per batch, loop step 5 ms).
    best_io = max(r["batches_per_s"] for r in result["io"]["manual"])
    p["recovered_after_s"] = recovered_after(p["trace"], p["switch_after_s"], 0.9 * best_io)
    print(f"\nphase change (I/O 5 ms -> 50 ms at {p['switch_after_s']:.1f} s): producers over time "
          f"{[(t, w) for t, w, _ in p['trace'][::10]]}")
    took = p["recovered_after_s"]
    print(f"rate >= 0.9 x the best hand-set rate of the new phase ({0.9 * best_io:.1f} batches/s) "
          + (f"from {took:.1f} s after the change on" if took is not None else "never held to the end of the run"))
    for d in p["decisions"]:
        print(f"  t={d['at_s']:5.1f} s  -> {d['workers']:2d}  {d['reason']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nfigures: {args.json}")
    if args.plot:
        _plot(p, args.plot)
        print(f"plot: {args.plot}")
    return 0


def _plot(phase: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [x[0] for x in phase["trace"]]
    workers = [x[1] for x in phase["trace"]]
    n = [x[2] for x in phase["trace"]]
    rate = [0.0] + [(n[i] - n[i - 1]) / (t[i] - t[i - 1]) for i in range(1, len(t))]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.step(t, workers, where="post", label="producers (auto)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("producers")
    ax2 = ax.twinx()
    ax2.plot(t, rate, color="tab:orange", alpha=0.6, label="batches/s")
    ax2.set_ylabel("batches/s")
    ax.axvline(phase["switch_after_s"], color="grey", linestyle="--")
    fig.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
