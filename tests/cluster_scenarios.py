"""Scenarios on a Ray cluster simulated on this machine; run as a script, prints one JSON line.

``python tests/cluster_scenarios.py [scenario ...]`` starts a head node (the
consumer's: the training loop, the ring and the ingest actor live there) and
one worker node ("far"), runs each scenario and prints ``{scenario: result}``
as the last line of stdout. It runs in its own process so that its cluster
never meets the suite's session-wide Ray (tests/conftest.py), and with its
own Ray temp dir (``RAY_TMPDIR``) so that no other ``ray.init()`` on this
machine finds and joins it; test_cluster.py asserts on the results.

Every batch carries data computed from ``(index, epoch)``, so a scenario
checks contents, not just indices.
"""

from __future__ import annotations

import faulthandler
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# A Cluster writes its address to <ray temp dir>/ray_current_cluster, where every plain ray.init()
# on this machine would find it and join it: keep ours in a private temp dir.
_OWN_TMPDIR = "RAY_TMPDIR" not in os.environ
if _OWN_TMPDIR:
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="sfc-", dir="/tmp")  # short: socket paths

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import pyshmfeed as sf  # noqa: E402

SPEC = sf.BatchSpec(x=((64, 1024), "float32"), y=((2,), "int64"))  # 256 KiB: through plasma, not inline
FAR = "far"  # the worker node's custom resource


def expected_x(index: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([index, epoch, 7]).standard_normal((64, 1024), dtype=np.float32)


def make_fill(delay_s: float):
    def fill(index, out, ctx):
        time.sleep(delay_s)  # stands for I/O; keeps an epoch long enough to disturb mid-way
        out["x"][:] = expected_x(index, ctx.epoch)
        out["y"][:] = (index, ctx.epoch)
    return fill


def consume(feed, epoch, on_batch=None):
    """Indices in delivery order, and how many batches had wrong contents."""
    indices, bad = [], 0
    for k, batch in enumerate(feed.epoch(epoch)):
        i = int(batch["y"][0])
        indices.append(batch.index)
        right = np.array_equal(batch["x"], expected_x(i, epoch))
        if i != batch.index or int(batch["y"][1]) != epoch or not right:
            bad += 1
        if on_batch is not None:
            on_batch(k)
    return indices, bad


class Watchdog:
    """Ends a scenario that hangs: records what the feed was waiting for, then closes its ring
    (the loop then raises) so that the other scenarios still run and report."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.feed = None
        self.report = None
        self._timer = None

    def watch(self, feed):
        self.cancel()
        self.feed = feed
        self._timer = threading.Timer(self.limit_s, self._fire)
        self._timer.daemon = True
        self._timer.start()
        return feed

    def cancel(self):
        if self._timer is not None:
            self._timer.cancel()

    def _fire(self):
        feed, d = self.feed, self.feed._dispatcher
        locked = d._lock.acquire(timeout=5)  # a dispatcher stuck holding it is worth knowing too
        try:
            self.report = {
                "dispatcher_lock_taken": locked,
                "counters": feed._ring.counters(),
                "slots": [feed._ring.slot_info(i) for i in range(feed._ring.slots)],
                "pending": [t[0] for t in d._pending][:50],
                "inflight": {p.worker: [[t[0] for t in ts] for ts, _ in p.inflight.values()]
                             for p in d.positions},
                "identities": {p.worker: p.identity for p in d.positions},
            }
        finally:
            if locked:
                d._lock.release()
        feed._ring.close(f"watchdog: the scenario ran past {self.limit_s} s")


WATCHDOG = Watchdog(limit_s=90)


def _stats(feed):
    keep = ("remote_batches", "remote_bytes", "ingest_copy_s", "ingest_copy_mean_s", "ingest_duplicates",
            "ingest_fenced", "ingest_restarts", "remote_producers", "restarts", "reissued", "batches",
            "placement")
    s = feed.stats()
    return {k: s.get(k) for k in keep}


# ---- scenarios ----------------------------------------------------------------


def remote_ordered(cluster, nodes):
    """Every producer on the far node; ordered and shuffled; two epochs."""
    length = 60
    with sf.Feed(SPEC, fill=make_fill(0.002), length=length, workers=2, shuffle=True, seed=3,
                 placement="cluster", _actor_options={"resources": {FAR: 1}}) as feed:
        WATCHDOG.watch(feed)
        out = {"orders": [], "expected_orders": [], "bad": 0}
        for epoch in range(2):
            indices, bad = consume(feed, epoch)
            out["orders"].append(indices)
            out["expected_orders"].append([int(i) for i in feed.epoch_order(epoch)])
            out["bad"] += bad
        out["stats"] = _stats(feed)
    out["length"] = length
    return out


def mixed_unordered(cluster, nodes):
    """Two producers on the consumer's node, two on the far node; first ready, first served."""
    length = 80
    with sf.Feed(SPEC, fill=make_fill(0.005), length=length, workers=4, ordered=False,
                 placement=[nodes["head"], nodes["far"]]) as feed:
        WATCHDOG.watch(feed)
        indices, bad = consume(feed, 0)
        out = {"indices": indices, "bad": bad, "stats": _stats(feed), "length": length}
    return out


def ingest_killed(cluster, nodes):
    """The ingest actor is killed mid-epoch (unordered: the harder case for exactly-once)."""
    length = 80
    with sf.Feed(SPEC, fill=make_fill(0.01), length=length, workers=2, ordered=False, placement="cluster",
                 _actor_options={"resources": {FAR: 1}}) as feed:
        WATCHDOG.watch(feed)
        ingest = feed._dispatcher._cluster.ingest

        def kill(k):
            if k == 20:
                ray.kill(ingest, no_restart=True)

        indices, bad = consume(feed, 0, kill)
        indices2, bad2 = consume(feed, 1)
        out = {"indices": indices, "bad": bad + bad2, "indices2": indices2, "stats": _stats(feed),
               "length": length}
    return out


def node_removed(cluster, nodes):
    """The far node (with both producers) is removed mid-epoch; replacements start on the head node."""
    length = 120
    with sf.Feed(SPEC, fill=make_fill(0.01), length=length, workers=2, placement=[nodes["far"]],
                 chunk=2) as feed:
        WATCHDOG.watch(feed)
        before = {}

        def remove(k):
            if k == 30:
                before.update(_stats(feed))  # where the producers are when their node goes
                cluster.remove_node(nodes["far_node"])

        t0 = time.perf_counter()
        indices, bad = consume(feed, 0, remove)
        epoch_s = time.perf_counter() - t0
        indices2, bad2 = consume(feed, 1)
        out = {"indices": indices, "expected": [int(i) for i in feed.epoch_order(0)], "bad": bad + bad2,
               "indices2": indices2, "stats_before": before, "stats": _stats(feed), "epoch_s": epoch_s,
               "length": length}
    return out


def autotune_elsewhere(cluster, nodes):
    """workers=(1, 3) on the cluster, the consumer's node short of CPU: autotune adds on the far node."""
    length = 150
    with sf.Feed(SPEC, fill=make_fill(0.03), length=length, workers=(1, 3), ordered=False,
                 placement="cluster") as feed:
        WATCHDOG.watch(feed)
        # Both simulated nodes are this machine: make its idle CPU never enough, as on a busy
        # consumer node, so every add is asked onto another node.
        feed._dispatcher._tuner.controller.idle_enough = float("inf")
        indices, bad = consume(feed, 0)
        s = feed.stats()
        out = {"indices": indices, "bad": bad, "length": length, "decisions": s["autotune"]["decisions"],
               "far": nodes["far"], "stats": _stats(feed)}
    return out


# node_removed last: it takes the far node away.
SCENARIOS = {f.__name__: f for f in (remote_ordered, mixed_unordered, ingest_killed, autotune_elsewhere,
                                     node_removed)}


def join_then_add_far_node(cluster, **node_args):
    """Connect this driver to the head node, then add the far node.

    Every node of a simulated cluster has this machine's address, and a driver
    that connects when several do may attach to any of them: it must attach
    while the head is the only one, or "far" may turn out to be the consumer's.
    """
    ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
    far = cluster.add_node(**node_args)
    cluster.wait_for_nodes()
    here = ray.get_runtime_context().get_node_id()
    if here != cluster.head_node.node_id or here == far.node_id:
        raise RuntimeError(f"the driver attached to node {here}, not to the head {cluster.head_node.node_id}")
    return far


def progress(t0: float, message: str) -> None:
    print(f"[cluster_scenarios {time.perf_counter() - t0:6.1f} s] {message}", file=sys.stderr, flush=True)


def main(names: list[str]) -> dict:
    t0 = time.perf_counter()
    # A hang outside a scenario's watchdog (start-up, shutdown) still says where it was.
    faulthandler.dump_traceback_later(float(os.environ.get("PYSHMFEED_SCENARIOS_DUMP_S", 200)), exit=False)
    progress(t0, "starting the cluster")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"consumer": 100}, "include_dashboard": False})
    results: dict = {}
    try:
        far = join_then_add_far_node(cluster, num_cpus=2, resources={FAR: 100})
        nodes = {"head": ray.get_runtime_context().get_node_id(), "far": far.node_id, "far_node": far}
        results["_startup_s"] = time.perf_counter() - t0
        for name in names:
            progress(t0, f"scenario {name}")
            t = time.perf_counter()
            WATCHDOG.report = None
            try:
                results[name] = SCENARIOS[name](cluster, nodes)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
                if WATCHDOG.report is not None:
                    results[name]["error"] += f"\nwatchdog report: {json.dumps(WATCHDOG.report)}"
            finally:
                WATCHDOG.cancel()
            results[name]["wall_s"] = time.perf_counter() - t
        progress(t0, "shutting down")
    finally:
        ray.shutdown()
        cluster.shutdown()
        if _OWN_TMPDIR:
            shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    faulthandler.cancel_dump_traceback_later()
    progress(t0, "done")
    return results


if __name__ == "__main__":
    names = sys.argv[1:] or list(SCENARIOS)
    print(json.dumps(main(names)), flush=True)
