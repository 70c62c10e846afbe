#!/usr/bin/env python
"""GPU checks of pyshmfeed's staging: correctness first, then figures. Under 5 minutes on one H100/H200.

    python bench/gpu_check.py --json gpu_check.json   # a CUDA machine
    python bench/gpu_check.py --dry-run                # anywhere (CI): tiny sizes, on the CPU

1. Correctness. Producers write batches of random int32 plus the checksum
   they computed and the batch index; the moment a producer claims a slot
   (right after the consumer released it) it overwrites the slot with poison,
   then writes the next batch. Over thousands of batches, a checksum computed
   on the GPU from the staged tensors must equal the producer's, and the
   index must be the batch's: a slot released while its copy may still read
   it is caught. Run on the registered-ring path and on the pinned-pool
   fallback. Then the check proves it can fail: with a GPU sleep queued before
   each copy, a stage that releases right after queueing the copy (a test
   hook, deliberately wrong) must be caught, and the correct stage under the
   same sleep must not be (which also shows the training stream waits for
   the copy's event).
2. Figures, in the same run: host-to-device GB/s from the page-locked ring,
   a torch pinned tensor and pageable memory; and the GPU idle fraction of
   the published workload (0.5 s of simulated I/O per batch, float32 batches
   of (4, 1_000_000, 3), a real training step of a point-wise MLP on the GPU)
   fed by pyshmfeed (``Feed(device="cuda")``) and by
   ``torch.utils.data.DataLoader(pin_memory=True)``. Idle fraction = 1 -
   (GPU time inside training steps) / (GPU time from the first measured step's
   start to the last one's end), from CUDA events.
3. A short table last; every figure in the JSON file (written after each
   section, so a run cut short still leaves what it measured).

``--dry-run`` (or no CUDA) runs the same code paths with tiny sizes on the
CPU: torch CPU views instead of CUDA copies, a CPU stand-in for the early
release (a stage that releases before the loop reads), CPU memcpy for the
bandwidth rows, wall-clock time for the idle fraction. Exit status: 0 when
every correctness check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import platform
import sys
import time
from typing import Any

import numpy as np
import torch

import pyshmfeed as sf
from pyshmfeed.stage import HostRegistration, NumpyTarget, Stage, _Staged, cuda_target, torch_cpu_target

POISON = -7
BUDGET_S = 290  # stacks are dumped and the process exits if a run ever gets this far (the limit is 5 min)


# ---- sources (module level: producers unpickle them) ---------------------------------------


class PoisonFill:
    """Poison the slot as soon as it is claimed, hold the poison ``hold_s``, then write batch ``index``."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s

    def __call__(self, index, out, ctx):
        x = out["x"]
        x[...] = POISON
        out["sum"][0] = -1
        out["idx"][0] = -1
        if self.hold_s:
            time.sleep(self.hold_s)
        x[...] = np.random.default_rng(index).integers(0, 1000, size=x.shape, dtype=np.int32)
        out["sum"][0] = x.sum(dtype=np.int64)
        out["idx"][0] = index


class WorkloadFill:
    """The published workload: simulated I/O, then a float32 batch written in place."""

    def __init__(self, io_sleep: float) -> None:
        self.io_sleep = io_sleep

    def __call__(self, index, out, ctx):
        time.sleep(self.io_sleep)
        rng = ctx.rng(index)
        rng.random(out=out["x"], dtype=np.float32)
        rng.random(out=out["y"], dtype=np.float32)


class WorkloadDataset(torch.utils.data.Dataset):
    """The same workload for torch's DataLoader (one item = one batch, batch_size=None)."""

    def __init__(self, length: int, shape: tuple[int, ...], io_sleep: float) -> None:
        self.length, self.shape, self.io_sleep = length, shape, io_sleep

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        time.sleep(self.io_sleep)
        rng = np.random.default_rng([0, index])
        x = np.empty(self.shape, dtype=np.float32)
        rng.random(out=x, dtype=np.float32)
        y = rng.random((self.shape[0], 1), dtype=np.float32)
        return torch.from_numpy(x), torch.from_numpy(y)


class _EarlyReleaseCPU(NumpyTarget):
    """CPU stand-in for the deliberately wrong release: the slot goes back before the loop reads it."""

    path = "cpu-early-release (wrong on purpose)"

    def stage(self, core, slot, batch):
        core.release(slot, time.perf_counter())
        return _Staged(batch, None, slot.nbytes)


# ---- 1. correctness ----------------------------------------------------------------------------


def _batch_is_bad(batch, dev) -> Any:
    """Whether the staged batch differs from what its producer wrote (a GPU bool tensor on CUDA)."""
    x, s, idx = batch["x"], batch["sum"], batch["idx"]
    if isinstance(x, np.ndarray):
        return bool(x.sum(dtype=np.int64) != s[0] or idx[0] != batch.index)
    return (x.to(torch.int64).sum() != s[0]) | (idx[0] != batch.index)


def check_correctness(*, device: str, batches: int, rows: int, cols: int, workers: int, register: bool = True,
                      hold_s: float = 0.0, read_delay_s: float = 0.0, delay_cycles: int = 0,
                      release_early: bool = False) -> dict[str, Any]:
    """Stage ``batches`` poisoned batches and count those whose staged contents are not the producer's."""
    spec = sf.BatchSpec(x=((rows, cols), "int32"), sum=((1,), "int64"), idx=((1,), "int64"))
    cuda = device != "cpu"
    t0 = time.perf_counter()
    with sf.Feed(spec, fill=PoisonFill(hold_s), length=batches, workers=workers, slots=max(8, 2 * workers),
                 prefetch=2) as feed:
        if cuda:
            hooks = {"_delay_cycles": delay_cycles, "_release_early": release_early} \
                if (delay_cycles or release_early) else {}
            target = cuda_target(feed, device, register=register, **hooks)
        else:
            target = _EarlyReleaseCPU() if release_early else (
                NumpyTarget() if read_delay_s else torch_cpu_target(feed))
        flags = torch.zeros(batches, dtype=torch.bool, device=device) if cuda else np.zeros(batches, bool)
        n = 0
        with Stage(feed, 0, target) as stage:
            for k, batch in enumerate(stage):
                if read_delay_s:
                    time.sleep(read_delay_s)  # CPU stand-in for a late DMA
                flags[k] = _batch_is_bad(batch, device)
                n += 1
        if cuda:
            torch.cuda.synchronize()
        bad = [int(i) for i in (flags.nonzero().flatten().tolist() if cuda else np.flatnonzero(flags))]
        stats = feed.stats()
    return {"batches": n, "bytes_per_batch": spec.batch_bytes, "mismatches": len(bad), "first_bad": bad[:10],
            "staging": stats.get("staging"), "staging_path": stats.get("staging_path"),
            "host_copies": stats.get("staging_host_copies"),
            "register_error": stats.get("staging_register_error"),
            "seconds": time.perf_counter() - t0}


def correctness(args, dev: str, results: dict) -> None:
    cuda = dev != "cpu"
    c = results.setdefault("correctness", {})
    big = dict(rows=args.rows, cols=args.cols, workers=args.workers)
    c["registered"] = check_correctness(device=dev, batches=args.batches, **big)
    if cuda:
        c["pinned_pool"] = check_correctness(device=dev, batches=max(args.batches // 4, 100), register=False,
                                             **big)
    # Proving the check can fail: the copy runs late (a GPU sleep first, or the loop reading late on CPU).
    late = dict(batches=args.late_batches, rows=args.rows, cols=args.cols, workers=args.workers,
                hold_s=args.hold_s)
    if cuda:
        late["delay_cycles"] = args.delay_cycles
    else:
        late["read_delay_s"] = args.read_delay_s
    c["early_release"] = check_correctness(device=dev, release_early=True, **late)
    c["late_copy_correct_release"] = check_correctness(device=dev, **late)
    c["ok"] = (c["registered"]["mismatches"] == 0
               and c.get("pinned_pool", {"mismatches": 0})["mismatches"] == 0
               and c["late_copy_correct_release"]["mismatches"] == 0
               and c["early_release"]["mismatches"] > 0)


# ---- 2a. host-to-device bandwidth -----------------------------------------------------------------


def h2d_bandwidth(dev: str, nbytes: int, reps: int) -> dict[str, Any]:
    """GB/s of ``reps`` copies of ``nbytes`` from the page-locked ring, a pinned tensor, pageable memory."""
    cuda = dev != "cpu"
    out: dict[str, Any] = {"bytes": nbytes, "reps": reps}
    ring = sf.Ring.create(1, nbytes)
    reg = None
    try:
        ring_src = torch.from_numpy(np.frombuffer(ring.slot_buffer(0), dtype=np.uint8, count=nbytes))
        ring_src.fill_(1)
        if cuda:
            reg = HostRegistration(ring.data_address, ring.data_nbytes)
            out["ring_registered"] = reg.ok
            out["register_error"] = reg.error
            out["register_s"] = reg.seconds
        sources = {"ring (page-locked)" if cuda else "ring": ring_src,
                   "pinned tensor": torch.ones(nbytes, dtype=torch.uint8, pin_memory=cuda),
                   "pageable": torch.ones(nbytes, dtype=torch.uint8)}
        dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        for name, src in sources.items():
            for _ in range(2):
                dst.copy_(src, non_blocking=True)
            if cuda:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(reps):
                    dst.copy_(src, non_blocking=True)
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                for _ in range(reps):
                    dst.copy_(src)
                seconds = time.perf_counter() - t0
            out[name] = reps * nbytes / seconds / 1e9
        del ring_src, sources
    finally:
        if reg is not None:
            reg.close()
        ring.detach()
    return out


# ---- 2b. GPU idle fraction of the published workload ----------------------------------------------


class PointMLP(torch.nn.Module):
    """A per-point MLP over (batch, points, 3), averaged to one prediction per sample."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        nn = torch.nn
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x).mean(dim=1)


class Trainer:
    """One real training step per batch; CUDA events (or wall clock on CPU) time the steps."""

    def __init__(self, dev: str, hidden: int) -> None:
        torch.manual_seed(0)
        self.dev = dev
        self.cuda = dev != "cpu"
        self.model = PointMLP(hidden).to(dev)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.marks: list[tuple[Any, Any]] = []

    def step(self, x, y, measure: bool) -> None:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()  # on the current stream: after its wait for the batch's copy
        else:
            start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        if measure:
            self.marks.append((start, end))

    def idle(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            busy = sum(s.elapsed_time(e) for s, e in self.marks) / 1e3
            span = self.marks[0][0].elapsed_time(self.marks[-1][1]) / 1e3
        else:
            busy = sum(e - s for s, e in self.marks)
            span = self.marks[-1][1] - self.marks[0][0]
        n = len(self.marks)
        return {"steps": n, "step_mean_s": busy / n, "span_s": span,
                "idle_fraction": max(0.0, 1 - busy / span)}


def idle_pyshmfeed(dev: str, args) -> dict[str, Any]:
    shape = tuple(args.shape)
    spec = sf.BatchSpec(x=(shape, "float32"), y=((shape[0], 1), "float32"))
    trainer = Trainer(dev, args.hidden)
    n = args.warmup + args.steps
    waits = []
    with sf.Feed(spec, fill=WorkloadFill(args.io_sleep), length=n, workers=args.idle_workers,
                 slots=2 * args.idle_workers, device=dev if dev != "cpu" else "cpu") as feed:
        batches = feed.epoch(0) if dev != "cpu" else (b.map(torch.from_numpy) for b in _views(feed))
        t = time.perf_counter()
        for k, batch in enumerate(batches):
            waits.append(time.perf_counter() - t)
            trainer.step(batch["x"], batch["y"], measure=k >= args.warmup)
            t = time.perf_counter()
        out = trainer.idle()
        stats = feed.stats()
    out.update({"wait_mean_s": float(np.mean(waits[args.warmup:])), "staging": stats.get("staging"),
                "staging_register_s": stats.get("staging_register_s"), "workers": args.idle_workers})
    return out


def _views(feed):
    for b in feed.epoch(0):
        yield b.map(lambda a: _writable(a))


def _writable(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = True
    return v


def idle_torch_dataloader(dev: str, args) -> dict[str, Any]:
    shape = tuple(args.shape)
    trainer = Trainer(dev, args.hidden)
    n = args.warmup + args.steps
    loader = torch.utils.data.DataLoader(WorkloadDataset(n, shape, args.io_sleep), batch_size=None,
                                         num_workers=args.idle_workers, pin_memory=dev != "cpu",
                                         prefetch_factor=2)
    waits = []
    it = iter(loader)
    try:
        t = time.perf_counter()
        for k, (x, y) in enumerate(it):
            waits.append(time.perf_counter() - t)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            trainer.step(x, y, measure=k >= args.warmup)
            t = time.perf_counter()
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    out = trainer.idle()
    out.update({"wait_mean_s": float(np.mean(waits[args.warmup:])), "workers": args.idle_workers,
                "pin_memory": dev != "cpu"})
    return out


# ---- the run ------------------------------------------------------------------------------------


def _save(path: str, results: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2, default=str)
    os.replace(tmp, path)


def _table(results: dict) -> str:
    rows: list[tuple[str, str]] = []
    c = results.get("correctness", {})
    for key, label in (("registered", "checksums, staging path"),
                       ("pinned_pool", "checksums, pinned-pool fallback"),
                       ("late_copy_correct_release", "late copy, correct release"),
                       ("early_release", "late copy, early release (must be caught)")):
        if key in c:
            r = c[key]
            rows.append((label, f"{r['mismatches']} bad of {r['batches']} ({r['staging_path']})"))
    if "ok" in c:
        rows.append(("correctness", "PASS" if c["ok"] else "FAIL"))
    bw = results.get("h2d", {})
    for name in ("ring (page-locked)", "ring", "pinned tensor", "pageable"):
        if name in bw:
            rows.append((f"H2D GB/s from {name}", f"{bw[name]:.1f}"))
    for key, label in (("pyshmfeed", "pyshmfeed Feed(device=...)"),
                       ("torch_dataloader", "torch DataLoader(pin)")):
        r = results.get("idle", {}).get(key)
        if r:
            figures = (f"{100 * r['idle_fraction']:.1f}%  (step {1e3 * r['step_mean_s']:.0f} ms, "
                       f"wait {1e3 * r['wait_mean_s']:.1f} ms/batch)")
            rows.append((f"GPU idle, {label}", figures))
    width = max((len(a) for a, _ in rows), default=10)
    head = f"pyshmfeed gpu_check on {results['device']} ({'dry run' if results['dry_run'] else 'full'})"
    return "\n".join([head, "-" * len(head)] + [f"{a:<{width}}  {b}" for a, b in rows])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes on the CPU (also the default without CUDA)")
    p.add_argument("--json", default="gpu_check.json", help="where to write every figure")
    p.add_argument("--skip-idle", action="store_true", help="skip the idle-fraction comparison")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    args.dry_run = not cuda
    if cuda:
        args.batches, args.rows, args.cols, args.workers = 4000, 64, 1024, 4
        # Producers outrun the loop and wait for slots; each copy waits ~30 ms behind a GPU sleep, so a slot
        # released early is claimed, poisoned and rewritten before its copy reads it.
        args.late_batches, args.hold_s, args.delay_cycles, args.read_delay_s = 40, 0.005, 50_000_000, 0.0
        args.bw_bytes, args.bw_reps = 256 << 20, 10
        args.shape, args.io_sleep, args.idle_workers, args.hidden = (4, 1_000_000, 3), 0.5, 12, 256
        args.warmup, args.steps = 6, 30
    else:
        args.batches, args.rows, args.cols, args.workers = 300, 8, 64, 2
        args.late_batches, args.hold_s, args.delay_cycles, args.read_delay_s = 40, 0.002, 0, 0.02
        args.bw_bytes, args.bw_reps = 4 << 20, 3
        args.shape, args.io_sleep, args.idle_workers, args.hidden = (4, 1000, 3), 0.01, 2, 8
        args.warmup, args.steps = 2, 6
    return args


def main(argv=None) -> int:
    faulthandler.dump_traceback_later(BUDGET_S, exit=True)
    args = parse_args(argv)
    dev = "cuda" if not args.dry_run else "cpu"
    results: dict[str, Any] = {
        "device": (torch.cuda.get_device_name(0) if dev == "cuda"
                   else f"CPU ({platform.processor() or 'cpu'})"),
        "dry_run": args.dry_run, "torch": torch.__version__, "cuda": torch.version.cuda,
        "pyshmfeed": sf.__version__, "python": sys.version.split()[0], "cpus": os.cpu_count(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
    }
    t0 = time.perf_counter()
    # Sections without Ray first: torch's DataLoader forks its workers before any Ray thread exists.
    results["h2d"] = h2d_bandwidth(dev, args.bw_bytes, args.bw_reps)
    _save(args.json, results)
    if not args.skip_idle:
        results.setdefault("idle", {})["torch_dataloader"] = idle_torch_dataloader(dev, args)
        _save(args.json, results)
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=max(os.cpu_count() or 2, 2), include_dashboard=False,
             logging_level="warning")
    try:
        correctness(args, dev, results)
        _save(args.json, results)
        if not args.skip_idle:
            results["idle"]["pyshmfeed"] = idle_pyshmfeed(dev, args)
    finally:
        ray.shutdown()
    results["seconds"] = time.perf_counter() - t0
    _save(args.json, results)
    faulthandler.cancel_dump_traceback_later()
    print(_table(results))
    print(f"(all figures: {args.json}; {results['seconds']:.0f} s)")
    return 0 if results["correctness"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
