"""Throughput with producers on the consumer's node only vs local + remote producers (simulated cluster).

Run: ``.venv/bin/python bench/cluster_bench.py [--batches N] [--repeats R] [--json PATH]``

Starts a Ray cluster simulated on this machine (``ray.cluster_utils.Cluster``:
a head node, where the loop, the ring and the ingest actor live, and a "far"
node), then, for two workloads, measures what the training loop receives
per second with these producer placements:

- ``local 2``   two producers on the head node (writing slots directly);
- ``local 4``   four producers on the head node: the fair control here, since
                the "far" node shares this machine's cores;
- ``local 2 + remote 2``  two producers on each node; the far ones' batches
                travel through Ray's object store and the ingest actor;
- ``remote 2``  two producers on the far node only: what the object-store path
                costs per batch against ``local 2``.

Workloads (a batch is one float32 array of ``--mib`` MiB, default 4):

- ``io``   each batch waits ``--io-ms`` (default 40 ms: reading, decoding
           elsewhere) then fills its array with a constant: producers are
           mostly idle, so more producers means more batches, wherever they run;
- ``cpu``  each batch is computed (random normal numbers): producers compete
           for the same cores.

A simulated cluster shares one machine's cores and memory: "remote" costs
(serialising into the object store, the transfer, the ingest copy) are paid
on the same CPUs as everything else and the transfer is a local copy, not a
network. The figures show the mechanism's overhead and that it scales with
producers, not what a real second machine adds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
_OWN_TMPDIR = "RAY_TMPDIR" not in os.environ
if _OWN_TMPDIR:  # keep this cluster's address file away from every other ray.init() on the machine
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="sfb-", dir="/tmp")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import pyshmfeed as sf  # noqa: E402

MiB = 1 << 20


def make_fill(workload: str, io_s: float):
    if workload == "io":
        def fill(index, out, ctx):
            time.sleep(io_s)
            out["x"].fill(index)
    else:
        def fill(index, out, ctx):
            ctx.rng(index).standard_normal(out=out["x"], dtype=np.float32)
    return fill


def timed_epoch(feed, epoch: int, batches: int) -> float:
    """Batches per second the loop receives over one epoch."""
    t0 = time.perf_counter()
    n = 0
    for batch in feed.epoch(epoch):
        _ = float(batch["x"][0, 0])  # touch it, as a training step would
        n += 1
    assert n == batches
    return n / (time.perf_counter() - t0)


def run_workload(spec, workload, io_s, configs, args):
    """Every configuration's feed open at once; timed epochs taken round robin, so that the
    machine's load (shared with whatever else runs) weighs on every configuration alike."""
    feeds, rates = {}, {name: [] for name, _, _ in configs}
    try:
        for name, placement, workers in configs:
            kwargs = {} if placement == "node" else {"placement": placement}
            feeds[name] = sf.Feed(spec, fill=make_fill(workload, io_s), length=args.batches, workers=workers,
                                  slots=args.slots, chunk=args.chunk, num_cpus=0.1, **kwargs)
            timed_epoch(feeds[name], 0, args.batches)  # warm-up
        for epoch in range(1, args.repeats + 1):
            for name, _, _ in configs:
                rates[name].append(timed_epoch(feeds[name], epoch, args.batches))
        rows = []
        for name, _, workers in configs:
            s = feeds[name].stats()
            rows.append({"workload": workload, "config": name, "workers": workers,
                         "batches_per_s": statistics.median(rates[name]), "rates": rates[name],
                         "remote_fraction": s.get("remote_batches", 0) / max(1, s["batches"]),
                         "remote_producers": s.get("remote_producers", 0),
                         "ingest_copy_mean_ms": 1e3 * s.get("ingest_copy_mean_s", 0.0)})
        return rows
    finally:
        for feed in feeds.values():
            feed.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=120, help="batches per epoch")
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs per configuration (after a warm-up)")
    ap.add_argument("--mib", type=float, default=4.0, help="batch size in MiB")
    ap.add_argument("--io-ms", type=float, default=40.0, help="simulated I/O per batch in the io workload")
    ap.add_argument("--workloads", default="io,cpu")
    ap.add_argument("--slots", type=int, default=32,
                    help="ring slots (a remote batch is in flight longer: give it room)")
    ap.add_argument("--chunk", type=int, default=2,
                    help="batches per producer call (a remote call settles all its batches before returning)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    elements = int(args.mib * MiB) // 4
    spec = sf.BatchSpec(x=((elements // 1024, 1024), "float32"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    results = {"machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()},
               "batch_mib": args.mib, "io_ms": args.io_ms, "batches": args.batches, "slots": args.slots,
               "chunk": args.chunk, "rows": []}
    try:
        # Join while the head is the only node: every node here has this machine's address, and a
        # driver may attach to any of them (then "far" could be the consumer's own node).
        ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
        far = cluster.add_node(num_cpus=2, resources={"far": 100})
        cluster.wait_for_nodes()
        head = ray.get_runtime_context().get_node_id()
        assert head == cluster.head_node.node_id != far.node_id, "the driver is not on the head node"
        configs = [("local 2", "node", 2), ("local 4", "node", 4),
                   ("local 2 + remote 2", [head, far.node_id], 4), ("remote 2", [far.node_id], 2)]
        for workload in args.workloads.split(","):
            for r in run_workload(spec, workload, args.io_ms / 1e3, configs, args):
                r["mb_per_s"] = r["batches_per_s"] * args.mib * MiB / 1e6
                results["rows"].append(r)
                print(f"{workload:4} {r['config']:20} {r['batches_per_s']:7.1f} batches/s "
                      f"{r['mb_per_s']:8.0f} MB/s  remote {100 * r['remote_fraction']:3.0f}%  "
                      f"ingest copy {r['ingest_copy_mean_ms']:.2f} ms  (epochs: "
                      + ", ".join(f"{x:.0f}" for x in r["rates"]) + ")", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
        if _OWN_TMPDIR:
            shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    results["machine"]["load_after"] = os.getloadavg()
    m = results["machine"]
    print(f"load average before/after: {m['load_before']} / {m['load_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
