"""The user tools: ``pyshmfeed doctor``, ``inspect`` and ``cleanup``, and the registry they read.

The registry is redirected to a private directory per test, so these tests see
only the rings they make (other programs on the machine keep their own).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys

import pytest

from pyshmfeed import Ring, cleanup, doctor, inspect_rings, registry
from pyshmfeed.cli import main as cli_main

_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["numpy", "pyshmfeed"])


@pytest.fixture(autouse=True)
def private_registry(tmp_path, monkeypatch):
    path = tmp_path / "registry"
    monkeypatch.setenv(registry.REGISTRY_ENV, str(path))
    return path


def claim_and_die(handle, conn, registry_dir: str) -> None:
    """Attach, claim batch 1, report, then wait to be SIGKILLed while holding the claim."""
    os.environ[registry.REGISTRY_ENV] = registry_dir  # the forkserver's environment may be older
    ring = Ring.attach(handle)
    ring.claim(1, timeout=10)
    conn.send(os.getpid())
    signal.pause()


def named_creator(conn, registry_dir: str, backing: str = "named") -> None:
    os.environ[registry.REGISTRY_ENV] = registry_dir
    ring = Ring.create(2, 4096, backing=backing)
    conn.send(ring.handle.path)
    signal.pause()


PRODUCER = ("import sys, time; from pyshmfeed import Ring\n"
            "r = Ring.attach(sys.argv[1]); r.claim(0).commit(100); print('attached', flush=True); time.sleep(60)")


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = cli_main(list(argv))
    return rc, capsys.readouterr().out


# ---- registry -----------------------------------------------------------------------------


def test_create_and_attach_are_recorded_and_detach_removes_the_records(private_registry):
    with Ring.create(2, 64) as ring:
        with Ring.attach(ring.handle) as producer:
            (entry,) = registry.rings()
            assert entry["ring"]["pid"] == os.getpid() and entry["ring"]["path"] == ring.handle.path
            assert entry["ring"]["slots"] == 2 and entry["ring"]["backing"] == "memfd"
            assert [a["owner"] for a in entry["attached"]] == [producer.owner]
        assert registry.rings()[0]["attached"] == []
    assert registry.rings() == []
    assert os.stat(private_registry).st_mode & 0o777 == 0o700


@pytest.mark.parametrize("problem", ["a file", "group-writable", "a symlink", "unwritable"])
def test_an_unusable_registry_never_stops_a_ring(private_registry, tmp_path, problem):
    if problem == "a file":
        private_registry.write_text("not a directory")
    elif problem == "group-writable":
        private_registry.mkdir(mode=0o770)
        os.chmod(private_registry, 0o770)
    elif problem == "a symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        private_registry.symlink_to(tmp_path / "elsewhere")
    else:
        private_registry.mkdir(mode=0o500)
    with Ring.create(2, 64) as ring, Ring.attach(ring.handle) as producer:
        producer.claim(0).commit(1)
        with ring.acquire(timeout=1):
            pass
    if problem in ("a symlink", "group-writable"):
        assert not any(os.scandir(tmp_path / "elsewhere" if problem == "a symlink" else private_registry))


def test_a_forked_copy_does_not_remove_its_parents_record(private_registry):
    with Ring.create(2, 64) as ring:
        pid = os.fork()
        if pid == 0:
            ring.detach()  # the child's copy of the object: the record is the parent's
            os._exit(0)
        os.waitpid(pid, 0)
        assert len(registry.rings()) == 1


# ---- inspect ------------------------------------------------------------------------------


def test_inspect_shows_slots_owners_and_a_claim_held_by_a_dead_producer(capsys):
    with Ring.create(4, 4096) as ring:
        ring.claim(0).commit(100)
        parent, child = _CTX.Pipe()
        victim = _CTX.Process(target=claim_and_die, args=(ring.handle, child, registry.registry_dir()))
        victim.start()
        assert parent.poll(60)
        victim_pid = parent.recv()
        os.kill(victim_pid, signal.SIGKILL)
        victim.join(10)
        rc, out = run_cli(capsys, "inspect", "--json")
        assert rc == 0
        (desc,) = json.loads(out)["rings"]
        rc, text = run_cli(capsys, "inspect")
    assert desc["pid"] == os.getpid() and desc["slots"] == 4 and not desc["closed"]
    assert desc["occupancy"] == {"free": 2, "claimed": 1, "ready": 1, "acquired": 0}
    ready, claimed = desc["slot_states"][0], desc["slot_states"][1]
    assert (ready["state"], ready["payload_len"]) == ("ready", 100)
    assert (claimed["state"], claimed["owner_pid"], claimed["owner_alive"]) == ("claimed", victim_pid, False)
    assert claimed["needs_reclaim"] and claimed["claim_age_s"] >= 0
    assert "owner is dead: needs reclaim" in text and f"pid {victim_pid} (DEAD)" in text


def test_inspect_without_rings_says_so(capsys):
    rc, out = run_cli(capsys, "inspect")
    assert rc == 0 and "no live pyshmfeed ring" in out


# ---- cleanup ------------------------------------------------------------------------------


def test_cleanup_removes_a_dead_creators_named_segment_and_records_and_nothing_live(capsys):
    parent, child = _CTX.Pipe()
    creator = _CTX.Process(target=named_creator, args=(child, registry.registry_dir()))
    creator.start()
    assert parent.poll(60)
    dead_path = parent.recv()
    os.kill(creator.pid, signal.SIGKILL)
    creator.join(10)
    with Ring.create(2, 64, backing="named") as live:
        rc, out = run_cli(capsys, "cleanup", "--dry-run")
        assert rc == 0 and f"would remove segment {dead_path}" in out
        assert os.path.exists(dead_path)  # a dry run changes nothing
        rc, out = run_cli(capsys, "cleanup")
        assert rc == 0 and f"removed segment {dead_path}" in out
        assert not os.path.exists(dead_path)
        assert os.path.exists(live.handle.path), "cleanup touched a live ring"
        assert [e["ring"]["pid"] for e in registry.rings()] == [os.getpid()]
        rc, out = run_cli(capsys, "cleanup")
        assert "nothing to clean up" in out


def test_cleanup_leaves_a_segment_that_is_not_a_ring_alone(capsys):
    path = f"/dev/shm/pyshmfeed-{os.getuid()}-{'0' * 32}"
    with open(path, "wb") as f:
        f.write(b"\0" * 100)
    try:
        rc, out = run_cli(capsys, "cleanup")
        assert rc == 0 and f"left {path}: not a pyshmfeed ring" in out
        assert os.path.exists(path)
    finally:
        os.unlink(path)


def test_cleanup_reports_an_orphaned_producer_and_stops_it_when_asked(capsys):
    parent, child = _CTX.Pipe()
    creator = _CTX.Process(target=named_creator, args=(child, registry.registry_dir()))
    creator.start()
    assert parent.poll(60)
    path = parent.recv()
    code = ("import sys, time; from pyshmfeed import Ring\n"
            "r = Ring.attach(sys.argv[1]); print('attached', flush=True); time.sleep(60)")
    producer = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE, text=True)
    try:
        assert producer.stdout.readline().strip() == "attached"
        os.kill(creator.pid, signal.SIGKILL)
        creator.join(10)
        _, out = run_cli(capsys, "cleanup", "--dry-run")
        assert f"orphaned: producer pid {producer.pid}" in out
        _, out = run_cli(capsys, "cleanup", "--kill-orphans")
        assert f"sent SIGTERM to producer pid {producer.pid}" in out
        assert producer.wait(10) == -signal.SIGTERM
        assert not os.path.exists(path)
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait()


def dead_claimer(ring: Ring) -> int:
    """A producer process that claimed batch 1 of ``ring`` and was SIGKILLed holding it: its pid."""
    parent, child = _CTX.Pipe()
    victim = _CTX.Process(target=claim_and_die, args=(ring.handle, child, registry.registry_dir()))
    victim.start()
    assert parent.poll(60)
    pid = parent.recv()
    os.kill(pid, signal.SIGKILL)
    victim.join(10)
    return pid


def test_cleanup_keeps_a_dead_claimers_record_until_reclaim_so_inspect_still_flags_it(capsys):
    with Ring.create(4, 4096) as ring:
        victim_pid = dead_claimer(ring)
        rc, out = run_cli(capsys, "cleanup")
        assert rc == 0 and f"pid {victim_pid} is gone but still holds slot(s) [1]" in out
        rc, out = run_cli(capsys, "inspect", "--json")
        claimed = json.loads(out)["rings"][0]["slot_states"][1]
        assert (claimed["owner_pid"], claimed["owner_alive"], claimed["needs_reclaim"]) == (victim_pid, False, True)
        (owner,) = [a["owner"] for a in registry.rings()[0]["attached"]]
        assert ring.reclaim(owner) == [1]  # what the feed does: now the record says nothing true any more
        rc, out = run_cli(capsys, "cleanup")
        assert "removed registry record" in out and registry.rings()[0]["attached"] == []


def test_forget_process_removes_the_record_of_a_replaced_producer(capsys):
    with Ring.create(4, 4096) as ring, Ring.create(2, 64) as other:
        victim_pid = dead_claimer(ring)
        (owner,) = [a["owner"] for e in registry.rings() for a in e["attached"] if a["pid"] == victim_pid]
        assert ring.reclaim(owner) == [1]
        assert registry.forget_process(victim_pid, other) == 0  # another ring's records only
        assert registry.forget_process(victim_pid, ring) == 1
        assert registry.forget_process(victim_pid, ring) == 0
        assert all(e["attached"] == [] and e["ring"] is not None for e in registry.rings())
        rc, out = run_cli(capsys, "inspect")
        assert "DEAD" not in out and "dead" not in out


def test_inspect_lists_an_orphaned_memfd_ring_and_agrees_with_cleanup(capsys):
    parent, child = _CTX.Pipe()
    creator = _CTX.Process(target=named_creator, args=(child, registry.registry_dir(), "memfd"))
    creator.start()
    assert parent.poll(60)
    path = parent.recv()
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER, path], stdout=subprocess.PIPE, text=True)
    try:
        assert producer.stdout.readline().strip() == "attached"
        os.kill(creator.pid, signal.SIGKILL)
        creator.join(10)
        for _ in range(2):  # before and after a cleanup, which must not hide a ring that still lives
            rc, out = run_cli(capsys, "inspect", "--json")
            (desc,) = json.loads(out)["rings"]
            assert desc["orphaned"] and not desc["creator_alive"] and desc["pid"] == creator.pid
            assert desc["occupancy"]["ready"] == 1 and desc["slot_states"][0]["payload_len"] == 100
            assert [(p["pid"], p["alive"]) for p in desc["producers"]] == [(producer.pid, True)]
            rc, out = run_cli(capsys, "cleanup")
            assert f"orphaned: producer pid {producer.pid}" in out
        rc, text = run_cli(capsys, "inspect")
        assert f"ORPHANED: creator pid {creator.pid} is gone" in text
    finally:
        producer.kill()
        producer.wait()
    rc, out = run_cli(capsys, "inspect", "--json")
    assert json.loads(out)["rings"] == []  # nothing maps it any more: it is gone, for both tools
    run_cli(capsys, "cleanup")
    assert registry.rings() == []


# ---- doctor -------------------------------------------------------------------------------


def test_doctor_gives_every_check_a_verdict_and_advice_where_it_is_not_ok(capsys):
    rc, out = run_cli(capsys, "doctor", "--json")
    verdicts = json.loads(out)
    checks = {v["check"] for v in verdicts}
    assert {"core", "memfd", "memory", "memlock", "ray", "ray cluster", "cuda", "leftovers"} <= checks
    assert all(v["status"] in ("ok", "warn", "fail", "info") for v in verdicts)
    assert all(v["advice"] for v in verdicts if v["status"] in ("warn", "fail"))
    assert rc == (1 if any(v["status"] == "fail" for v in verdicts) else 0)
    assert next(v for v in verdicts if v["check"] == "core")["status"] == "ok"
    rc, text = run_cli(capsys, "doctor")
    assert "[ ok ] core:" in text


def test_doctor_reports_leftovers_of_a_crash(capsys):
    parent, child = _CTX.Pipe()
    creator = _CTX.Process(target=named_creator, args=(child, registry.registry_dir()))
    creator.start()
    assert parent.poll(60)
    path = parent.recv()
    os.kill(creator.pid, signal.SIGKILL)
    creator.join(10)
    try:
        verdict = doctor.check_leftovers()
        assert verdict.status == "warn" and "1 named segment" in verdict.detail
        assert "pyshmfeed cleanup" in verdict.advice
    finally:
        cleanup.remove(cleanup.find_leftovers())
    assert not os.path.exists(path)


def test_inspect_module_runs_standalone(capsys):
    assert inspect_rings.main([]) == 0
