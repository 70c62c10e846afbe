"""Runs the chosen pipelines one after the other on one workload and collects every figure.

Order: pipelines that fork producer processes run first, before Ray's (or
tf.data's) threads exist in this process; the Ray-based ones then share one
Ray start-up, timed and reported apart. A pipeline whose framework is missing
becomes a row saying how to install it; one that fails becomes a row with the
error; neither stops the others. Ray is shut down at the end if the bench
started it.
"""

from __future__ import annotations

import importlib.metadata
import os
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .pipelines import Pipeline, RunContext
from .progress import Progress
from .workload import Workload, machine, measure, summarize, wait_quiet, wake_floor

# The article's figures (Intel laptop, (4, 1_000_000, 3) float32 batches, 0.5 s I/O, 0.1 s step):
# mean wait per batch. Quoted, never measured here.
PUBLISHED = {
    "sequential": 0.57,
    "mpqueue": 0.08,
    "ray-actors": 0.02,
}

_FRAMEWORKS = ("numpy", "ray", "torch", "tensorflow", "tensorflow-cpu", "pandas", "pyarrow", "matplotlib")


@dataclass
class Row:
    key: str
    label: str
    how: str
    status: str = "pending"  # ok | missing | error
    message: str = ""
    batches_run: int = 0
    import_s: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    waits: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "how": self.how, "status": self.status,
                "message": self.message, "batches_run": self.batches_run, "import_s": self.import_s,
                **self.figures, "extra": self.extra, "waits_s": self.waits}


def _versions() -> dict[str, str]:
    out = {}
    for name in _FRAMEWORKS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


class RayHost:
    """Starts Ray once for the Ray-based pipelines (unless it runs already) and stops it if it started it."""

    def __init__(self, w: Workload) -> None:
        self.w = w
        self.started = False
        self.start_s: float | None = None
        self.cpus = 0.0

    def ensure(self) -> float:
        import ray

        if not ray.is_initialized():
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            # Room for every batch in flight (2 per producer, Ray Data's prefetch) with a margin.
            store = max(512 << 20, 8 * self.w.workers * self.w.batch_bytes)
            t0 = time.perf_counter()
            # address="local": always a fresh instance of our own, never another process's cluster.
            ray.init(address="local", num_cpus=os.cpu_count() or 1, num_gpus=0, include_dashboard=False,
                     object_store_memory=store, logging_level="ERROR", log_to_driver=False)
            self.start_s = time.perf_counter() - t0
            self.started = True
        self.cpus = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        return self.cpus

    def settle(self, timeout: float = 15.0) -> None:
        """Wait until the previous pipeline's actors and tasks have given their CPUs back.

        Ray frees a killed actor's resources asynchronously; without this the next
        pipeline's start-up would be charged for the previous one's shutdown.
        """
        import ray

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ray.available_resources().get("CPU", 0.0) >= self.cpus - 1e-6:
                return
            time.sleep(0.1)

    def stop(self) -> None:
        if self.started:
            import ray

            from .. import hosts

            hosts.forget()  # the warm producer hosts go with Ray: no thread of the pool may call it after
            ray.shutdown()
            self.started = False


def _run_one(p: Pipeline, w: Workload, run: RunContext, progress: Progress, row: Row) -> None:
    t0 = time.perf_counter()
    opener = p.load()
    row.import_s = time.perf_counter() - t0
    length = w.length(p.serial)
    progress.begin(p.label, length)
    start = time.perf_counter()
    with opener(w, length, run) as batches:
        trace = measure(batches, w, length, start, on_batch=progress.update)
    row.batches_run = len(trace.waits)
    row.waits = trace.waits
    row.figures = summarize(trace, w)
    row.extra = run.extra
    row.status = "ok"


FRESH_RAY_SETTLE_S = 3.0  # after ray.init, for the worker processes Ray prestarts to come up


def run_bench(w: Workload, pipelines: list[Pipeline], progress: Progress | None = None,
              cold_start: bool = True) -> dict[str, Any]:
    """Run ``pipelines`` on ``w``; returns the report (what ``report`` prints and ``--json`` writes)."""
    progress = progress or Progress(enabled=False)
    rows = {p.key: Row(p.key, p.label, p.how) for p in pipelines}
    runnable = []
    for p in pipelines:
        missing = p.missing()
        if missing:
            rows[p.key].status = "missing"
            rows[p.key].message = f"not installed ({', '.join(missing)}): {p.install}"
        else:
            runnable.append(p)
    # Forking pipelines first (no Ray/tf.data threads yet), then the rest without Ray, then Ray's.
    runnable.sort(key=lambda p: (p.uses_ray, p.run_last, not p.forks))
    ray_host = RayHost(w)
    ray_info: dict[str, Any] = {"started_by_bench": False, "start_s": None}
    cold: dict[str, Any] | None = None
    fresh: dict[str, Any] | None = None
    started = datetime.now(UTC)
    machine_start = machine()
    t_all = time.perf_counter()
    floor = wake_floor(w.step) if w.step > 0 else None
    try:
        for p in runnable:
            row = rows[p.key]
            run = RunContext(cpus=os.cpu_count() or 1)
            try:
                if p.uses_ray:
                    run.ray_cpus = ray_host.ensure()
                    ray_host.settle()
                run.extra["quiet_wait_s"] = wait_quiet()  # a machine at rest for every row
                _run_one(p, w, run, progress, row)
                f = row.figures
                progress.end(f"first batch {f['time_to_first_batch_s']:.2f} s, "
                             f"wait {1e3 * f['wait_mean_s']:.1f} ms/batch")
            except ImportError as e:
                row.status, row.message = "missing", f"cannot import: {e}: {p.install}"
                progress.end(row.message)
            except Exception as e:  # noqa: BLE001 -- a failing pipeline is a row, the others still run
                row.status = "error"
                row.message = f"{type(e).__name__}: {e}"
                row.extra = {"traceback": traceback.format_exc()}
                progress.end(f"failed: {row.message}")
        ray_info = {"started_by_bench": ray_host.started, "start_s": ray_host.start_s, "cpus": ray_host.cpus}
        fill_ok = rows.get("pyshmfeed-fill") is not None and rows["pyshmfeed-fill"].status == "ok"
        if cold_start and fill_ok and ray_host.started:
            # The honest other half of pyshmfeed's start-up: no Ray running, the feed starts its own.
            ray_host.stop()
            progress.note("  pyshmfeed cold start (the feed starts Ray itself) ...")
            from .pipelines.shmfeed import first_batch

            try:
                cold = first_batch(w)
            except Exception as e:  # noqa: BLE001 -- reported beside the table
                cold = {"error": f"{type(e).__name__}: {e}"}
            # A script that calls ray.init() and then makes a Feed: Ray has just started the worker
            # processes it keeps ready (one per CPU), where the rows above ran after other Ray rows
            # had used them up. Not timed: Ray's start and those workers' start.
            progress.note("  pyshmfeed on a Ray just started (its prestarted workers idle) ...")
            try:
                ray_host.ensure()
                time.sleep(FRESH_RAY_SETTLE_S)
                fresh = first_batch(w)
            except Exception as e:  # noqa: BLE001 -- reported beside the table
                fresh = {"error": f"{type(e).__name__}: {e}"}
    finally:
        ray_host.stop()
    total_s = time.perf_counter() - t_all
    load_end = machine()["load_average_1m"]
    result = {
        "date": started.isoformat(timespec="seconds"),
        "machine": {**machine_start, "load_average_1m_end": load_end},
        "versions": _versions(),
        "workload": w.as_dict(),
        "total_s": total_s,
        "ray": ray_info,
        "cold_start": cold,
        "fresh_ray": fresh,
        "wake_floor": floor,
        "published_wait_mean_s": PUBLISHED,
        "rows": [rows[p.key].as_dict() for p in pipelines],
    }
    add_ratios(result)
    return result


def _ok(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in result["rows"] if r["status"] == "ok"}


def reference_key(result: dict[str, Any]) -> str | None:
    """The pyshmfeed row peers are judged against: the copying ``make`` source, which runs the same
    producer code as every peer (float64 random numbers, then ``astype``) and copies once into the
    slot. The in-place ``fill`` row also draws float32 directly, so part of its lead is cheaper
    random numbers, not the ring; it is the reference only when ``make`` did not run."""
    ok = _ok(result)
    for key in ("pyshmfeed-make", "pyshmfeed-fill"):
        if key in ok:
            return key
    return None


def add_ratios(result: dict[str, Any]) -> None:
    """Each row's steady-state mean wait divided by sequential's and by pyshmfeed's; the targets."""
    ok = _ok(result)
    seq = ok.get("sequential", {}).get("wait_mean_s")
    limit = ok.get("bare-ring")
    ref_key = reference_key(result)
    ref = ok[ref_key]["wait_mean_s"] if ref_key else None
    for r in result["rows"]:
        if r["status"] != "ok":
            r["wait_vs_sequential"] = r["wait_vs_pyshmfeed"] = None
            continue
        r["wait_vs_sequential"] = r["wait_mean_s"] / seq if seq else None
        r["wait_vs_pyshmfeed"] = r["wait_mean_s"] / ref if ref else None
        # Against the bare ring, the limit of this machine: throughput, and the whole run's wall time.
        r["rate_vs_limit"] = r["batches_per_s"] / limit["batches_per_s"] if limit else None
        r["wall_vs_limit"] = r["wall_s"] / limit["wall_s"] if limit else None
    result["reference"] = ref_key
    result["targets"] = targets(result)


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the figures it was judged on (None when a row is missing)."""
    ok = _ok(result)
    others = {k: r for k, r in ok.items() if not k.startswith("pyshmfeed") and k != "bare-ring"}
    out: list[dict[str, Any]] = []
    preset = result.get("workload", {}).get("preset")
    if preset:
        return transport_targets(ok, preset)
    ref_key = reference_key(result)
    if not ref_key or not others:
        return out
    ref = ok[ref_key]
    best_wait_key = min(others, key=lambda k: others[k]["wait_mean_s"])
    best_wait = others[best_wait_key]["wait_mean_s"]
    out.append({
        "target": "steady-state mean wait <= 1/10 of the best other pipeline's", "workload": "default",
        "pyshmfeed": ref["wait_mean_s"], "best_other": best_wait, "best_other_key": best_wait_key,
        "ratio": ref["wait_mean_s"] / best_wait if best_wait else None,
        "met": ref["wait_mean_s"] <= best_wait / 10,
    })
    out.append({
        "target": "stall fraction near 0 (< 0.02) when producers keep up", "workload": "default",
        "pyshmfeed": ref["stall_fraction"], "met": ref["stall_fraction"] < 0.02,
    })
    out.extend(first_batch_targets(ok, result.get("fresh_ray")))
    best_rate_key = max(others, key=lambda k: others[k]["batches_per_s"])
    best_rate = others[best_rate_key]["batches_per_s"]
    out.append({
        "target": "batches/s >= the best other pipeline's", "workload": "--article",
        "pyshmfeed": ref["batches_per_s"], "best_other": best_rate, "best_other_key": best_rate_key,
        "ratio": ref["batches_per_s"] / best_rate if best_rate else None,
        "met": ref["batches_per_s"] >= best_rate,
    })
    if "pyshmfeed-fill" in ok and "pyshmfeed-make" in ok:
        fill, make = ok["pyshmfeed-fill"], ok["pyshmfeed-make"]
        busy = [r.get("extra", {}).get("feed_stats", {}).get("producer_busy_fraction") for r in (fill, make)]
        out.append({
            "target": "in-place fill ahead of the copying make source", "workload": "--article",
            "fill_wait_mean_s": fill["wait_mean_s"], "make_wait_mean_s": make["wait_mean_s"],
            "fill_batches_per_s": fill["batches_per_s"], "make_batches_per_s": make["batches_per_s"],
            "fill_producer_busy_fraction": busy[0], "make_producer_busy_fraction": busy[1],
            "met": fill["batches_per_s"] >= make["batches_per_s"] and fill["wait_mean_s"] <= make["wait_mean_s"],
        })
    return out


def transport_targets(ok: dict[str, dict[str, Any]], preset: str) -> list[dict[str, Any]]:
    """The data-plane issue's targets for the transport presets (ratios within this one run)."""
    feed, limit = ok.get("pyshmfeed-fill"), ok.get("bare-ring")
    if feed is None:
        return []
    out: list[dict[str, Any]] = []
    if preset == "small":
        for key, factor in (("bare-ring", 0.5), ("mpqueue", 2.0), ("torch", 5.0)):
            if key in ok:
                ratio = feed["batches_per_s"] / ok[key]["batches_per_s"]
                out.append({"target": f"batches/s >= {factor:g} x {key}", "workload": "--preset small",
                            "pyshmfeed": feed["batches_per_s"], "other": ok[key]["batches_per_s"],
                            "ratio": ratio, "met": ratio >= factor})
        out.append({"target": "training-process CPU <= 60 ms per 1,000 batches", "workload": "--preset small",
                    "pyshmfeed": feed["cpu_ms_per_1000"], "met": feed["cpu_ms_per_1000"] <= 60})
    elif preset == "large" and limit is not None:
        ratio = feed["wall_s"] / limit["wall_s"]
        out.append({"target": "wall time, start-up included, <= 1.15 x the bare ring's", "workload": "--preset large",
                    "pyshmfeed": feed["wall_s"], "other": limit["wall_s"], "ratio": ratio, "met": ratio <= 1.15})
        warm = feed.get("extra", {}).get("warm_feed_wall_s")
        if warm is not None:
            ratio = warm / limit["wall_s"]
            out.append({"target": "the same, a new Feed on warm producers (the pool's)", "workload": "--preset large",
                        "pyshmfeed": warm, "other": limit["wall_s"], "ratio": ratio, "met": ratio <= 1.15})
    return out


def first_batch_targets(ok: dict[str, dict[str, Any]], fresh: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Time to first batch with Ray running <= torch DataLoader's + 0.3 s: cold producers (the row),
    warm ones (a new feed right after, in the pool's processes), and a fill feed on a Ray just started."""
    torch = ok.get("torch")
    out: list[dict[str, Any]] = []
    if torch is not None and fresh and "time_to_first_batch_s" in fresh:
        value, other = fresh["time_to_first_batch_s"], torch["time_to_first_batch_s"]
        out.append({"target": "pyshmfeed-fill: first batch with Ray running <= torch's + 0.3 s (new producer "
                              "processes, on a Ray just started: its prestarted workers idle)",
                    "workload": "default", "pyshmfeed": value, "other": other,
                    "ratio": value / max(other, 1e-9), "met": value <= other + 0.3})
    for key in ("pyshmfeed-make", "pyshmfeed-fill"):
        r = ok.get(key)
        if r is None or torch is None:
            continue
        bound = torch["time_to_first_batch_s"] + 0.3
        for label, value in (("new producer processes", r["time_to_first_batch_s"]),
                             ("warm producers from the pool", r.get("extra", {}).get(
                                 "warm_feed_time_to_first_batch_s"))):
            if value is not None:
                out.append({"target": f"{key}: first batch with Ray running <= torch's + 0.3 s ({label})",
                            "workload": "default", "pyshmfeed": value, "other": bound - 0.3,
                            "ratio": value / max(bound - 0.3, 1e-9), "met": value <= bound})
    return out
