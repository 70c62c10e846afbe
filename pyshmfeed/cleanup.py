"""``pyshmfeed cleanup``: remove what crashed pyshmfeed processes of this user left behind.

A memfd ring (the default backing) leaves nothing: the kernel frees it with
the last process that maps it, however that process ended. What can be left:

- a **named segment** (``/dev/shm/pyshmfeed-<uid>-<random>``) whose creator
  ended without detaching: SIGKILL, an unhandled SIGTERM, a crash. It is
  removed when its creator (the pid in its header) is gone;
- **registry records** (see ``registry.py``) of processes that are gone. Two
  kinds stay, because they still describe something true that ``inspect``
  shows: the record of a dead producer whose claim a live ring still holds
  (until the feed reclaims it), and the folder of a ring whose creator is gone
  while producers still map it;
- **orphaned producers**: processes still attached to a ring whose creator is
  gone. They are listed; ``--kill-orphans`` sends them SIGTERM.

Which rings live and who is dead comes from ``registry.survey``, as for
``inspect``. Nothing that belongs to a live process is touched. When in doubt (the pid in
a header runs again, as the same user), the segment is left alone. Another
user's segments are never touched. ``--dry-run`` only lists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
from dataclasses import dataclass, field

from . import registry
from .ring import SEGMENT_FIELDS, SEGMENT_MAGIC

HELP = "remove segments and records that crashed pyshmfeed processes left behind"

SHM_DIR = "/dev/shm"
# Where the header says what a segment is and who made it: from the C core's layout table, which
# pins these fields across layout versions (csrc/layout.h), so a segment of another version is named too.
_IDENTITY = ("header.magic", "header.creator_pid", "header.creator_uid")


@dataclass
class Leftovers:
    """What cleanup found: paths to remove, processes to report."""

    segments: list[tuple[str, int]] = field(default_factory=list)       # (path, dead creator pid)
    records: list[str] = field(default_factory=list)                    # record files or ring folders
    orphans: list[tuple[int, str]] = field(default_factory=list)        # (pid, ring path)
    kept: list[tuple[str, str]] = field(default_factory=list)           # (path, why left alone)

    def as_dict(self) -> dict:
        return {"segments": [{"path": p, "creator_pid": pid} for p, pid in self.segments],
                "records": self.records, "orphans": [{"pid": pid, "ring": p} for pid, p in self.orphans],
                "kept": [{"path": p, "why": why} for p, why in self.kept]}


def segment_creator(path: str) -> tuple[int, int] | None:
    """``(creator pid, creator uid)`` from a named segment's header, or None if it is not a ring.

    Read from the file, not attached: the segment may be of another layout version, or half written.
    """
    fields = [SEGMENT_FIELDS[name] for name in _IDENTITY]
    end = max(offset + size for offset, size in fields)
    try:
        with open(path, "rb") as f:
            head = f.read(end)
    except OSError:
        return None
    if len(head) < end:
        return None
    magic, pid, uid = (int.from_bytes(head[offset: offset + size], "little") for offset, size in fields)
    return (pid, uid) if magic == SEGMENT_MAGIC else None


def _runs_as(pid: int, uid: int) -> bool:
    """A live (non-zombie) process ``pid`` runs with real uid ``uid``."""
    if not registry.is_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1]) == uid
    except OSError:
        return False
    return True


def find_leftovers(shm_dir: str = SHM_DIR) -> Leftovers:
    """Look, without changing anything."""
    found = Leftovers()
    uid = os.getuid()
    prefix = f"pyshmfeed-{uid}-"
    known_named: dict[str, dict] = {}
    for entry in registry.survey():
        creator = entry["ring"]
        if creator is not None and creator.get("backing") == "named":
            known_named[creator["path"]] = creator
        if not entry["live"]:  # nobody of this ring runs: all of it goes
            found.records.append(entry["dir"])
            continue
        if not entry["creator_alive"]:
            found.orphans.extend((rec["pid"], rec["path"]) for rec in entry["attached"]
                                 if rec["alive"] and rec["pid"] != os.getpid())
        dead = [rec for rec in entry["attached"] if not rec["alive"]]
        held = _held_claims(entry["path"]) if dead else {}
        for rec in dead:
            if rec["owner"] in held:
                found.kept.append((rec["record"], f"pid {rec['pid']} is gone but still holds slot(s) "
                                                  f"{held[rec['owner']]} of ring {rec['path']}: left until the "
                                                  "feed reclaims them, so that `pyshmfeed inspect` can name it"))
            else:
                found.records.append(rec["record"])
    try:
        names = sorted(os.listdir(shm_dir))
    except OSError:
        names = []
    for name in names:
        if not name.startswith(prefix):
            continue
        path = os.path.join(shm_dir, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid != uid:
            found.kept.append((path, f"owned by uid {st.st_uid}, not {uid}: not ours to remove"))
            continue
        ident = segment_creator(path)
        if ident is None:
            found.kept.append((path, "not a pyshmfeed ring (bad magic or truncated): left alone"))
            continue
        pid, seg_uid = ident
        rec = known_named.get(path)
        if rec is not None and rec["pid"] == pid:
            alive = registry.is_alive(pid, rec.get("start_time"))
        else:  # no record: alive unless the pid is gone or now runs as someone else
            alive = _runs_as(pid, seg_uid)
        if alive:
            continue
        found.segments.append((path, pid))
    return found


def _held_claims(path: str | None) -> dict[int, list[int]]:
    """Owner token -> slots it holds in the ring at ``path`` ({} if it cannot be read: then nothing is held back)."""
    if path is None:
        return {}
    from .errors import ShmfeedError
    from .inspect_rings import held_claims

    try:
        return held_claims(path)
    except ShmfeedError:
        return {}


def remove(found: Leftovers, kill_orphans: bool = False) -> list[str]:
    """Remove what ``find_leftovers`` found; returns what could not be removed, with why."""
    problems = []
    for path, _ in found.segments:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"{path}: {exc}")
    for path in found.records:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"{path}: {exc}")
    if kill_orphans:
        for pid, _ in found.orphans:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            except OSError as exc:
                problems.append(f"pid {pid}: {exc}")
    return problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    parser.add_argument("--kill-orphans", action="store_true",
                        help="send SIGTERM to producers still attached to a ring whose creator is gone")
    parser.add_argument("--json", action="store_true", help="print a JSON report")


def run(args: argparse.Namespace) -> int:
    found = find_leftovers()
    problems = [] if args.dry_run else remove(found, kill_orphans=args.kill_orphans)
    if args.json:
        print(json.dumps(dict(found.as_dict(), dry_run=args.dry_run, problems=problems), indent=2))
        return 1 if problems else 0
    verb = "would remove" if args.dry_run else "removed"
    for path, pid in found.segments:
        size = _size(path)
        print(f"{verb} segment {path} ({size}; its creator, pid {pid}, is gone)")
    for path in found.records:
        print(f"{verb} registry record {path} (its process is gone)")
    for pid, ring in found.orphans:
        action = "sent SIGTERM to" if args.kill_orphans and not args.dry_run else "orphaned:"
        print(f"{action} producer pid {pid}, still attached to {ring} whose creator is gone"
              + ("" if args.kill_orphans else " (stop it with --kill-orphans or `kill`)"))
    for path, why in found.kept:
        print(f"left {path}: {why}")
    for problem in problems:
        print(f"could not remove {problem}")
    if not (found.segments or found.records or found.orphans or found.kept):
        print("nothing to clean up: no segment or record of a dead pyshmfeed process was found")
    return 1 if problems else 0


def _size(path: str) -> str:
    try:
        return f"{os.stat(path).st_size / 2**20:.1f} MiB"
    except OSError:
        return "gone"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyshmfeed cleanup", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))
