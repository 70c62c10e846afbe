"""``pyshmfeed inspect``: the live rings of this user, their slots' states, owners and occupancy.

Rings are found through the registry (``registry.py``): every ``Ring.create``
and ``Ring.attach`` leaves a record there. ``registry.survey`` says which
rings still live and who of them is dead, for inspect and ``cleanup`` alike.
For each ring some process of which is alive (its creator, or, for an
*orphaned* ring whose creator is gone, a producer still attached to it),
inspect maps the segment read-only in spirit (it attaches, reads the header,
counters and slot descriptors, and writes nothing) and shows:

- who created it (pid, command line), its backing, geometry and size;
- whether it is closed, and why;
- counters: claims, commits, acquires, reclaims, stale commits, waits;
- occupancy (free / claimed / ready / acquired), and per slot: state,
  sequence, generation, owner (with the pid and liveness of the process
  holding that owner token), payload length and claim age. A claim held by a
  dead owner is flagged: the feed (or ``Ring.reclaim``) must take it back.
  (``cleanup`` keeps the record of a dead process while it holds a claim, so
  the flag outlives a cleanup.)

Records of dead processes are counted and left for ``pyshmfeed cleanup``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from . import errors, registry
from ._ffi import lib
from .ring import Ring

HELP = "list this user's live rings: geometry, counters, slot states, owners, occupancy"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def held_claims(path: str) -> dict[int, list[int]]:
    """Owner token -> the slots it holds (claimed, or its owner lock on a free slot) in the ring at ``path``."""
    ring = Ring.attach(path, register=False)  # an observer: no registry record
    try:
        held: dict[int, list[int]] = {}
        for i in range(ring.slots):
            info = ring.slot_info(i)
            if info["owner"] and info["state"] in ("claimed", "free"):
                held.setdefault(info["owner"], []).append(i)
        return held
    finally:
        ring.detach()


def describe(entry: dict[str, Any], now_ns: int) -> dict[str, Any] | None:
    """What one live ring (a ``registry.survey`` entry) looks like now; None if no process of it is alive."""
    rec = entry["ring"]
    if not entry["live"] or rec is None and not entry["attached"]:
        return None
    rec = rec or entry["attached"][0]  # a ring whose creator record is gone: its producers know its path
    owners = {att["owner"]: {"pid": att["pid"], "alive": att["alive"]} for att in entry["attached"]}
    if entry["ring"] is not None:  # the creator claims with its own token too
        owners.setdefault(rec["owner"], {"pid": rec["pid"], "alive": entry["creator_alive"]})
    out: dict[str, Any] = {"pid": rec["pid"] if entry["ring"] else rec.get("creator_pid"),
                           "command": _cmdline(rec["pid"]) if entry["creator_alive"] else "(gone)",
                           "path": rec["path"], "backing": rec.get("backing", "?"), "registry": entry["dir"],
                           "creator_alive": entry["creator_alive"], "orphaned": not entry["creator_alive"]}
    if entry["path"] is None:
        out["error"] = "no live process of this ring holds a descriptor of it that this user can open"
        return out
    try:
        ring = Ring.attach(entry["path"], register=False)
    except errors.ShmfeedError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    try:
        code, reason = ring.close_reason()
        out.update(slots=ring.slots, slot_bytes=ring.slot_bytes, segment_bytes=ring.segment_bytes,
                   ordered=ring.ordered, closed=bool(code), close_code=code, close_reason=reason,
                   counters=ring.counters(), occupancy=ring.occupancy(), producers=[
                       {"pid": a["pid"], "owner": f"{a['owner']:#x}", "alive": a["alive"]} for a in entry["attached"]])
        slots = []
        for i in range(ring.slots):
            info = ring.slot_info(i)
            holder = owners.get(info["owner"]) if info["owner"] else None
            slot = {"slot": i, "state": info["state"], "seq": info["seq"], "generation": info["generation"],
                    "owner": f"{info['owner']:#x}" if info["owner"] else "",
                    "owner_pid": holder["pid"] if holder else None,
                    "owner_alive": holder["alive"] if holder else None,
                    "payload_len": info["payload_len"]}
            if info["state"] == "claimed" and info["claim_ns"]:
                slot["claim_age_s"] = round(max(0, now_ns - info["claim_ns"]) / 1e9, 3)
            slot["needs_reclaim"] = info["state"] == "claimed" and holder is not None and not holder["alive"]
            slots.append(slot)
        out["slot_states"] = slots
    finally:
        ring.detach()
    return out


def inspect_all() -> tuple[list[dict[str, Any]], int]:
    """Descriptions of every live ring, and how many records belong to dead processes."""
    live, dead = [], 0
    now_ns = lib.shmfeed_now_ns()
    for entry in registry.survey():
        desc = describe(entry, now_ns)
        if desc is None:
            dead += 1
        else:
            live.append(desc)
    return live, dead


def _print(rings: list[dict[str, Any]], dead: int, max_slots: int) -> None:
    if not rings:
        print(f"no live pyshmfeed ring of uid {os.getuid()} (registry: {registry.registry_dir()})")
    for r in rings:
        creator = f"creator pid {r['pid']}: {r['command'][:100]}" if r["creator_alive"] else \
            f"ORPHANED: creator pid {r['pid']} is gone, producers keep it alive"
        print(f"ring {r['path']}  {creator}")
        if "error" in r:
            print(f"  cannot read it: {r['error']}")
            continue
        mode = "ordered" if r["ordered"] else "unordered"
        state = f"closed (code {r['close_code']}: {r['close_reason'] or 'no reason'})" if r["closed"] else "open"
        print(f"  {r['backing']}, {mode}, {r['slots']} slots x {r['slot_bytes']} B = {r['segment_bytes'] / 2**20:.1f} MiB, "
              f"{state}")
        occ = r["occupancy"]
        print("  occupancy: " + ", ".join(f"{k} {v}" for k, v in occ.items()))
        c = r["counters"]
        print(f"  counters: claims {c['claims']}, commits {c['commits']}, acquires {c['acquires']}, releases "
              f"{c['releases']}, reclaims {c['reclaims']}, stale commits {c['stale_commits']}, aborts {c['aborts']}; "
              f"consumer waited {c['consumer_waits']} times ({c['consumer_wait_ns'] / 1e9:.3f} s), producers "
              f"{c['producer_waits']} times ({c['producer_wait_ns'] / 1e9:.3f} s)")
        producers = r["producers"]
        if producers:
            print("  attached: " + ", ".join(f"pid {p['pid']} ({'alive' if p['alive'] else 'DEAD'}) owner {p['owner']}"
                                             for p in producers))
        print(f"  {'slot':>4} {'state':<9} {'seq':>10} {'gen':>4} {'owner':<20} {'pid':>7} {'bytes':>10} claim age")
        for s in r["slot_states"][:max_slots]:
            pid = "" if s["owner_pid"] is None else str(s["owner_pid"])
            age = f"{s['claim_age_s']:.3f} s" if "claim_age_s" in s else ""
            flag = "  <- owner is dead: needs reclaim" if s["needs_reclaim"] else ""
            print(f"  {s['slot']:>4} {s['state']:<9} {s['seq']:>10} {s['generation']:>4} {s['owner']:<20} {pid:>7} "
                  f"{s['payload_len']:>10} {age}{flag}")
        if len(r["slot_states"]) > max_slots:
            print(f"  ... {len(r['slot_states']) - max_slots} more slots (--all shows them)")
    if dead:
        print(f"{dead} registry record(s) of processes that are gone: `pyshmfeed cleanup` removes them")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--all", action="store_true", help="show every slot (default: the first 32)")


def run(args: argparse.Namespace) -> int:
    rings, dead = inspect_all()
    if args.json:
        print(json.dumps({"rings": rings, "dead_records": dead}, indent=2))
    else:
        _print(rings, dead, 10**9 if args.all else 32)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyshmfeed inspect", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))
