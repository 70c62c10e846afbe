"""``pyshmfeed doctor``: can this machine run a feed well? Each check gives a verdict and what to do.

Checks, cheapest first, none of them heavy (no framework is imported):

- the compiled core loads, and a ring round trip works (memfd, futex waits);
- shared-memory backing: memfd (the default) and the ``/dev/shm`` mount
  (only the named fallback depends on its size: Docker's 64 MB default);
- free memory for rings (MemAvailable, capped by a cgroup v1/v2 limit);
- the locked-memory limit (page-locking the ring for GPU DMA needs it);
- Ray: installed version, and whether a running cluster is reachable;
- CUDA: a driver and a device, through libcuda (no framework import);
- leftovers of crashed processes (``pyshmfeed cleanup`` removes them).

Exit status 1 if any check failed, else 0.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

HELP = "check shared memory, free memory, locked-memory limit, Ray and CUDA; say what to fix"

GiB = 2**30


@dataclass
class Verdict:
    check: str
    status: str  # "ok", "warn", "fail", "info"
    detail: str
    advice: str = ""


def _size(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def check_core() -> Verdict:
    try:
        from ._ffi import lib
        from .ring import Ring
    except ImportError as exc:
        return Verdict("core", "fail", f"the compiled core does not load: {exc}",
                       "reinstall: pip install pyshmfeed (or `make venv` in a checkout)")
    n = 2000
    with Ring.create(2, 4096) as ring, Ring.attach(ring.handle) as producer:
        t0 = time.perf_counter()
        for seq in range(n):
            producer.claim(seq).commit(64)
            ring.acquire(timeout=1).release()
        per = (time.perf_counter() - t0) / n
    return Verdict("core", "ok", f"ring round trip (claim, commit, acquire, release) works: {per * 1e6:.1f} µs "
                   f"per batch in one process, wait slice {lib.shmfeed_wait_slice_ns() / 1e6:.0f} ms")


def check_backing() -> list[Verdict]:
    from .errors import ShmfeedError
    from .ring import Ring

    out = []
    try:
        Ring.create(1, 4096).detach()
        out.append(Verdict("memfd", "ok", "memfd_create works: rings need no /dev/shm space and leave nothing "
                           "behind after a crash"))
    except ShmfeedError as exc:
        out.append(Verdict("memfd", "fail", f"memfd rings cannot be created: {exc}",
                           "use Feed(..., backing='named'), and run `pyshmfeed cleanup` after crashes"))
    try:
        st = os.statvfs("/dev/shm")
        size, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        status = "ok" if size >= 1 * GiB else "warn"
        advice = "" if status == "ok" else ("only backing='named' is limited by it; if you need named rings, "
                                            "enlarge it (docker run --shm-size=8g)")
        out.append(Verdict("/dev/shm", status, f"{_size(size)} mount, {_size(free)} free", advice))
    except OSError as exc:
        out.append(Verdict("/dev/shm", "info", f"not mounted ({exc.strerror}): named rings are unavailable, "
                           "memfd rings are not affected"))
    return out


def cgroup_memory_limit() -> tuple[int, int] | None:
    """(limit, usage) of this process's memory cgroup, v2 or v1; None when unlimited or unknown."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        hier, controllers, path = line.split(":", 2)
        if hier == "0" and controllers == "":  # v2
            top, files = "/sys/fs/cgroup", ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):  # v1
            top, files = "/sys/fs/cgroup/memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        # The process's own cgroup; in a container whose cgroup namespace hides the path, the mount root.
        for root in (os.path.join(top, path.lstrip("/")), top):
            try:
                with open(os.path.join(root, files[0])) as f:
                    raw = f.read().strip()
                with open(os.path.join(root, files[1])) as f:
                    usage = int(f.read().strip())
            except (OSError, ValueError):
                continue
            if raw.isdigit() and int(raw) < 2**62:  # "max" or a huge v1 number: unlimited
                return int(raw), usage
            break
    return None


def check_memory() -> Verdict:
    from ._ffi import ffi, lib

    avail = ffi.new("uint64_t *")
    lib.shmfeed_memory_available(0, avail)
    detail = f"{_size(avail[0])} available for rings"
    limit = cgroup_memory_limit()
    advice = ""
    if limit is not None:
        cap, used = limit
        detail += f"; memory cgroup limit {_size(cap)}, {_size(used)} used"
        if cap - used < avail[0]:
            advice = (f"this container's cgroup leaves only {_size(cap - used)}: a ring larger than that is killed "
                      "by the OOM killer, not refused; size rings below it or raise the container's memory limit")
    status = "ok" if avail[0] >= 2 * GiB and not advice else "warn"
    if status == "warn" and not advice:
        advice = "little free memory: use fewer or smaller slots (Feed(slots=...)), or free memory"
    return Verdict("memory", status, detail, advice)


def check_memlock() -> Verdict:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return Verdict("memlock", "ok", "locked-memory limit: unlimited (the ring can be page-locked for GPU DMA)")
    hard_text = _size(hard) if hard != resource.RLIM_INFINITY else "unlimited"
    detail = f"locked-memory limit {_size(soft)} (hard {hard_text})"
    if os.geteuid() == 0:
        return Verdict("memlock", "ok", detail + "; running as root, which may lock more (CAP_IPC_LOCK)")
    return Verdict("memlock", "warn", detail,
                   "page-locking a ring larger than this fails and the GPU path falls back to an extra copy: raise it "
                   "(`ulimit -l unlimited`, /etc/security/limits.conf, or docker run --ulimit memlock=-1)")


def _gcs_address() -> str | None:
    addr = os.environ.get("RAY_ADDRESS")
    if addr and addr not in ("auto", "local"):
        return addr.replace("ray://", "")
    try:
        with open("/tmp/ray/ray_current_cluster") as f:
            return f.read().strip() or None
    except OSError:
        return None


def check_ray() -> list[Verdict]:
    from importlib import metadata

    try:
        version = metadata.version("ray")
    except metadata.PackageNotFoundError:
        return [Verdict("ray", "fail", "Ray is not installed", "pip install 'ray>=2.40'")]
    major_minor = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    out = [Verdict("ray", "ok" if major_minor >= (2, 40) else "warn", f"Ray {version} installed",
                   "" if major_minor >= (2, 40) else "pyshmfeed is tested with Ray >= 2.40: upgrade")]
    addr = _gcs_address()
    if addr is None:
        out.append(Verdict("ray cluster", "info", "no running cluster found: a Feed starts a local Ray itself "
                           "(a few seconds of start-up)", "for repeated runs, `ray start --head` once and pass "
                           "Feed(address='auto')"))
        return out
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            pass
        out.append(Verdict("ray cluster", "ok", f"a cluster answers at {addr}"))
    except (OSError, ValueError) as exc:
        out.append(Verdict("ray cluster", "warn", f"a cluster was recorded at {addr} but does not answer ({exc})",
                           "`ray stop` to clear it, or `ray start --head`; with RAY_ADDRESS unset a Feed starts "
                           "its own"))
    return out


def check_cuda() -> Verdict:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        driver = os.path.exists("/proc/driver/nvidia/version")
        return Verdict("cuda", "info", "no CUDA driver library (libcuda.so.1)" + (" although an NVIDIA kernel "
                       "driver is loaded" if driver else ""), "CPU feeds work; for device='cuda' install the NVIDIA "
                       "driver and a CUDA build of PyTorch")
    count = ctypes.c_int(0)
    rc = cuda.cuInit(0)
    if rc != 0:
        return Verdict("cuda", "warn", f"libcuda loads but cuInit failed with CUDA error {rc}",
                       "check `nvidia-smi`; in a container, run with --gpus all")
    cuda.cuDeviceGetCount(ctypes.byref(count))
    if count.value == 0:
        return Verdict("cuda", "warn", "CUDA driver present but no device visible", "check CUDA_VISIBLE_DEVICES")
    return Verdict("cuda", "ok", f"{count.value} CUDA device(s) visible: device='cuda' can stage batches by DMA")


def check_leftovers() -> Verdict:
    from .cleanup import find_leftovers

    found = find_leftovers()
    n_seg, n_rec, n_orph = len(found.segments), len(found.records), len(found.orphans)
    if not (n_seg or n_rec or n_orph):
        return Verdict("leftovers", "ok", "nothing left by crashed pyshmfeed processes")
    size = sum(os.path.getsize(p) for p, _ in found.segments if os.path.exists(p))
    return Verdict("leftovers", "warn" if n_seg or n_orph else "info",
                   f"{n_seg} named segment(s) ({_size(size)}), {n_rec} registry record(s), "
                   f"{n_orph} orphaned producer(s) of dead processes", "run `pyshmfeed cleanup`")


CHECKS: list[Callable[[], Verdict | list[Verdict]]] = [
    check_core, check_backing, check_memory, check_memlock, check_ray, check_cuda, check_leftovers]


def diagnose() -> list[Verdict]:
    out: list[Verdict] = []
    for check in CHECKS:
        try:
            result = check()
        except Exception as exc:  # noqa: BLE001 - a broken check is a finding, not a crash of the doctor
            result = Verdict(check.__name__.removeprefix("check_"), "fail", f"the check itself failed: {exc!r}")
        out.extend(result if isinstance(result, list) else [result])
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the verdicts as JSON")


def run(args: argparse.Namespace) -> int:
    verdicts = diagnose()
    if args.json:
        print(json.dumps([asdict(v) for v in verdicts], indent=2))
    else:
        marks = {"ok": " ok ", "warn": "warn", "fail": "FAIL", "info": "info"}
        for v in verdicts:
            print(f"[{marks[v.status]}] {v.check}: {v.detail}")
            if v.advice:
                print(f"       -> {v.advice}")
    return 1 if any(v.status == "fail" for v in verdicts) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyshmfeed doctor", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))
