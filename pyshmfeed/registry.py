"""Records of the rings this user's processes hold, so ``pyshmfeed inspect`` and ``cleanup`` can find them.

A memfd ring has no name anywhere, so nothing outside its processes can list
it. Each ``Ring.create`` therefore writes one small JSON record, and each
``Ring.attach`` another, into a per-ring folder of the registry directory::

    $XDG_RUNTIME_DIR/pyshmfeed/          (or /tmp/pyshmfeed-<uid>/), mode 0700
        <creator pid>-<key>/             one folder per ring (key: hash of its path)
            ring.json                    creator: pid, start time, path, geometry, backing
            <pid>-<owner>.json           each attached process: pid, start time, owner token

The creator removes the whole folder when it detaches; an attached process
removes its own record, and a feed that replaced a dead producer removes that
one's (``forget_process``). A crash leaves records behind: ``pyshmfeed cleanup``
removes those whose process is gone (pid dead, or reused: the start time
differs), except while they still say something true about a live ring (see
``survey``). The registry is advisory. Writing a record never fails, never
raises and never blocks ring creation: if the directory cannot be made safe
(missing, not ours, group/world-accessible, a symlink) the ring is simply
not listed. ``PYSHMFEED_REGISTRY_DIR`` overrides the location (tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
import time
from typing import Any

REGISTRY_ENV = "PYSHMFEED_REGISTRY_DIR"
RECORD_VERSION = 1
RING_RECORD = "ring.json"


def registry_dir() -> str:
    """Where this user's records live (read at every call, so tests may redirect it)."""
    override = os.environ.get(REGISTRY_ENV)
    if override:
        return override
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "pyshmfeed")
    return f"/tmp/pyshmfeed-{os.getuid()}"


def _safe_dir(path: str, create: bool) -> bool:
    """The directory exists (made 0700 if ``create``), is a real directory, ours, and private."""
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError:
            return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    # Anyone else's directory (e.g. a planted /tmp/pyshmfeed-<uid>) is not trusted.
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks after boot (tells a live process from a reused pid)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])  # field 22 of stat(5); fields[0] is field 3
    except (OSError, IndexError, ValueError):
        return None


def is_alive(pid: int, start_time: int | None = None) -> bool:
    """``pid`` runs: it exists and is not a zombie (a SIGKILLed process stays one until its parent reaps it,
    and can do nothing more), and, given the ``start_time`` a record holds, it is the same process that
    wrote the record, not a reused pid. The package's one liveness check."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            tail = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return False
    if tail[0] in (b"Z", b"X"):
        return False
    return start_time is None or int(tail[19]) == start_time


def ring_key(creator_pid: int, path: str) -> str:
    return f"{creator_pid}-{hashlib.sha1(path.encode()).hexdigest()[:12]}"


def _write_json(folder: str, name: str, payload: dict[str, Any]) -> str:
    final = os.path.join(folder, name)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, final)  # readers never see half a record
    return final


def record(ring: Any, role: str, backing: str = "") -> str | None:
    """Record that this process created (``role="creator"``) or attached a ring.

    Returns the record's path (to pass to ``forget``), or None when the
    registry is unusable. Never raises: the registry must not break a ring.
    """
    try:
        root = registry_dir()
        if not _safe_dir(root, create=True):
            return None
        folder = os.path.join(root, ring_key(ring.creator_pid, ring.handle.path))
        if not _safe_dir(folder, create=role == "creator"):
            return None  # attached to a ring whose creator is not registered
        pid = os.getpid()
        st = os.stat(ring.handle.path)  # the segment itself: found again by inode once its creator is gone
        payload = {
            "version": RECORD_VERSION, "role": role, "pid": pid, "start_time": process_start_time(pid),
            "uid": os.getuid(), "owner": ring.owner, "path": ring.handle.path,
            "creator_pid": ring.creator_pid, "created": time.time(), "argv": sys.argv[:4],
            "dev": st.st_dev, "ino": st.st_ino,
        }
        if role == "creator":
            payload.update(backing=backing, slots=ring.slots, slot_bytes=ring.slot_bytes,
                           slot_stride=ring.slot_stride, segment_bytes=ring.segment_bytes, ordered=ring.ordered)
            return _write_json(folder, RING_RECORD, payload)
        return _write_json(folder, f"{pid}-{ring.owner:x}.json", payload)
    except Exception:  # noqa: BLE001 - advisory: an unusable registry only makes the ring unlisted
        return None


def forget(record_path: str | None) -> None:
    """Remove a record: a creator's removes its ring's whole folder. Never raises."""
    if not record_path:
        return
    try:
        if os.path.basename(record_path) == RING_RECORD:
            shutil.rmtree(os.path.dirname(record_path), ignore_errors=True)
        else:
            os.unlink(record_path)
    except OSError:
        pass


def forget_process(pid: int, ring: Any = None, root: str | None = None) -> int:
    """Remove the attached records process ``pid`` wrote (of ``ring`` only, if given); how many. Never raises.

    For a feed that replaced a dead producer: call it after ``reclaim`` took the producer's claims
    back, so that ``inspect`` and ``cleanup`` stop listing it. A creator's record (the ring itself)
    is never removed here: that is ``forget``'s, by the creator, at detach.
    """
    removed = 0
    for entry in rings(root):
        if ring is not None and os.path.basename(entry["dir"]) != ring_key(ring.creator_pid, ring.handle.path):
            continue
        for rec in entry["attached"]:
            if rec["pid"] == pid:
                try:
                    os.unlink(rec["record"])
                    removed += 1
                except OSError:
                    pass
    return removed


def segment_descriptor(pid: int, dev: int | None, ino: int | None) -> str | None:
    """``/proc/<pid>/fd/<n>`` of a descriptor process ``pid`` holds on the segment ``(dev, ino)``, or None.

    How a memfd ring is reached once its creator is gone: any process still attached to it holds
    a descriptor of the same anonymous file.
    """
    if dev is None or ino is None:
        return None
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        path = f"/proc/{pid}/fd/{fd}"
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (dev, ino):
            return path
    return None


def survey(root: str | None = None) -> list[dict[str, Any]]:
    """Every registered ring and who of it is alive: the one view ``inspect`` and ``cleanup`` share.

    Each entry of ``rings()`` gains ``creator_alive``, ``alive`` on each attached record, ``live``
    (some process of the ring runs, so the segment may still be in use) and ``path``: where to
    attach to read the ring now. That is the creator's path while the creator runs; once it is
    gone, an attached process's descriptor of the same segment (memfd), or the named segment's
    file if it is still there; None when nothing reaches it.
    """
    out = []
    for entry in rings(root):
        creator = entry["ring"]
        entry["creator_alive"] = creator is not None and is_alive(creator["pid"], creator.get("start_time"))
        for rec in entry["attached"]:
            rec["alive"] = is_alive(rec["pid"], rec.get("start_time"))
        live_attached = [rec for rec in entry["attached"] if rec["alive"]]
        entry["live"] = entry["creator_alive"] or bool(live_attached)
        entry["path"] = None
        if entry["creator_alive"]:
            entry["path"] = creator["path"]
        elif creator is not None and creator.get("backing") == "named" and os.path.exists(creator["path"]):
            entry["path"] = creator["path"]
        else:
            for rec in live_attached:
                entry["path"] = segment_descriptor(rec["pid"], rec.get("dev"), rec.get("ino"))
                if entry["path"]:
                    break
        out.append(entry)
    return out


def rings(root: str | None = None) -> list[dict[str, Any]]:
    """Every ring folder: ``{"dir", "ring": creator record or None, "attached": [records]}``."""
    root = root or registry_dir()
    if not _safe_dir(root, create=False):
        return []
    out = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder) or os.path.islink(folder):
            continue
        entry: dict[str, Any] = {"dir": folder, "ring": None, "attached": []}
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for fname in names:
            if not fname.endswith(".json") or fname.startswith("."):
                continue
            rec = _read(os.path.join(folder, fname))
            if rec is None:
                continue
            if fname == RING_RECORD:
                entry["ring"] = rec
            else:
                entry["attached"].append(rec)
        out.append(entry)
    return out


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("pid"), int):
        return None
    rec["record"] = path
    return rec
