"""Suite-wide guards: every test runs under a timeout and must leave nothing behind.

Nothing behind means no pyshmfeed segment in /dev/shm (named backing) and no
live child process. Another program's ring, whose creator is alive outside
this session, is not this suite's leak and is left out. The check runs around
every test, so a leak is reported by the test that caused it. Session-scoped fixtures (a Ray cluster, say) are
set up before it and so are never counted as a test's leak.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time

import pytest

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "pyshmfeed-"
CREATOR_PID_OFFSET = 72  # shm_header.creator_pid, csrc/layout.h


def pytest_configure(config: pytest.Config) -> None:
    # pyproject.toml sets `timeout`; without the plugin that line is silently inert
    # and a hung wait would hang the whole suite.
    if not config.pluginmanager.hasplugin("timeout"):
        raise pytest.UsageError("the test suite needs pytest-timeout: pip install -e '.[test]'")


def _creator_pid(name: str) -> int:
    """The pid a segment's header names as its creator; 0 if unreadable or not written yet."""
    try:
        with open(os.path.join(SHM_DIR, name), "rb") as f:
            header = f.read(CREATOR_PID_OFFSET + 4)
    except OSError:
        return 0
    return int.from_bytes(header[CREATOR_PID_OFFSET:CREATOR_PID_OFFSET + 4], "little")


def _segments() -> set[str]:
    """Named segments this session may have leaked: not those a live process outside it still holds."""
    try:
        names = {n for n in os.listdir(SHM_DIR) if n.startswith(SEGMENT_PREFIX)}
    except FileNotFoundError:
        return set()
    ours = {os.getpid()} | _live_children()
    return {n for n in names
            if (pid := _creator_pid(n)) == 0 or pid in ours or not os.path.exists(f"/proc/{pid}")}


def _multiprocessing_helpers() -> set[int]:
    """The forkserver and resource tracker: started once on demand, meant to outlive tests."""
    from multiprocessing import forkserver, resource_tracker

    pids = {getattr(forkserver._forkserver, "_forkserver_pid", None),
            getattr(resource_tracker._resource_tracker, "_pid", None)}
    return {p for p in pids if p}


def _live_children() -> set[int]:
    """Running children of this process, and of the forkserver, which forks them for us.

    Zombies have exited and hold nothing, so they do not count; grandchildren
    belong to their parents (a Ray raylet keeps its own worker pool).
    """
    helpers = _multiprocessing_helpers()
    parents = {os.getpid()} | helpers
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # comm (field 2) may contain spaces and parentheses: split after the last ')'.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) in parents and state != "Z":
            children.add(int(entry))
    return children - helpers


def _wait_for(check, timeout: float = 10.0):
    """Children exit and get reaped asynchronously (slowly on a loaded machine): wait before blaming the test."""
    deadline = time.monotonic() + timeout
    found = check()
    while found and time.monotonic() < deadline:
        time.sleep(0.05)
        found = check()
    return found


@pytest.fixture(autouse=True)
def leaves_no_segment_or_child_behind():
    segments_before, children_before = _segments(), _live_children()
    yield
    leaked_segments = _wait_for(lambda: _segments() - segments_before)
    leaked_children = _wait_for(lambda: _live_children() - children_before)
    # Segments are only reported: /dev/shm is shared with every process of the
    # machine, so removing one is not this suite's call. Children are ours: stop
    # them so that one leak fails one test, not every test after it.
    for pid in leaked_children:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    problems = []
    if leaked_segments:
        problems.append(f"segments left in {SHM_DIR}: {sorted(leaked_segments)}")
    if leaked_children:
        problems.append(f"child processes left running (now killed): {sorted(leaked_children)}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture(autouse=True)
def starts_with_no_warm_producers():
    """Each test starts with Ray's CPUs free: the warm producer hosts an earlier test's feeds left in
    the pool (NOTE [warm producers] in pyshmfeed/hosts.py) are released after every test."""
    yield
    hosts = sys.modules.get("pyshmfeed.hosts")
    if hosts is not None:
        hosts.release_idle()


# ---- Ray: one local instance per test session, always shut down -----------------

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray (2 CPUs, no dashboard) shared by every test that needs one.

    Test modules are put on the workers' PYTHONPATH so that source functions
    defined in them unpickle inside producer actors.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    pythonpath = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH", "")) if p)
    # address="local": start our own instance even if another program on this machine ran
    # `ray start` (ray.init() would join that cluster, and refuse num_cpus).
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning",
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    try:
        yield ray
    finally:
        hosts = sys.modules.get("pyshmfeed.hosts")
        if hosts is not None:
            hosts.forget()  # the warm producer hosts go with Ray
        ray.shutdown()


# ---- child processes for the multi-process ring tests ----------------------------

FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["numpy", "pyshmfeed"])


@pytest.fixture
def start():
    """Start a forkserver child running ``target(*args)``; whatever a failed test leaves
    running is killed after it (a killed child can hold no claim the next test sees)."""
    started = []

    def start_process(target, *args):
        p = FORKSERVER.Process(target=target, args=args)
        p.start()
        started.append(p)
        return p

    yield start_process
    for p in started:
        if p.is_alive():
            p.kill()
        p.join(10)
