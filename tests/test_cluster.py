"""Producers on other nodes (placement="cluster"): exactly once, in order, through node and ingest loss.

The multi-node scenarios run on a Ray cluster simulated on this machine
(``ray.cluster_utils.Cluster``: a head node, where the loop, the ring and the
ingest live, and a "far" node) in a subprocess, tests/cluster_scenarios.py,
so that cluster never meets the suite's session-wide Ray. The subprocess runs
once per module and prints its results as JSON; each test asserts on one
scenario. Every batch's contents are computed from (index, epoch) and checked
in the loop. Placement on one node (no cluster) runs in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import pyshmfeed as sf

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SCENARIOS_TIMEOUT_S = 300  # a cluster start is ~15 s on an idle 2-core machine, minutes on a busy one
pytestmark = pytest.mark.timeout(SCENARIOS_TIMEOUT_S + 60)  # the first test also waits for the fixture


@pytest.fixture(scope="module")
def scenarios():
    """Run every scenario of cluster_scenarios.py in one subprocess (one cluster start)."""
    ray_tmp = tempfile.mkdtemp(prefix="sfc-", dir="/tmp")  # its Ray's address file and logs: see the script
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=ray_tmp)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, os.path.join(TESTS_DIR, "cluster_scenarios.py")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=SCENARIOS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the script and the cluster it started
        out, err = proc.communicate()
        pytest.fail(f"cluster scenarios ran past {SCENARIOS_TIMEOUT_S} s; stderr tail:\n{err[-3000:]}")
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C, pytest-timeout): take the cluster down too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(f"cluster scenarios exited {proc.returncode}; stderr tail:\n{err[-3000:]}")
    return json.loads(lines[-1])


def scenario(results: dict, name: str) -> dict:
    r = results[name]
    if "error" in r:
        pytest.fail(f"scenario {name} raised:\n{r['error']}")
    return r


# ---- on a simulated two-node cluster ------------------------------------------


def test_producers_on_another_node_deliver_every_batch_once_in_order_with_correct_contents(scenarios):
    r = scenario(scenarios, "remote_ordered")
    assert r["bad"] == 0
    for delivered, expected in zip(r["orders"], r["expected_orders"]):
        assert delivered == expected  # the shuffled order, batch for batch
        assert sorted(delivered) == list(range(r["length"]))
    assert r["orders"][0] != r["orders"][1]  # two shuffled epochs, two orders


def test_stats_count_the_batches_that_came_from_other_nodes(scenarios):
    s = scenario(scenarios, "remote_ordered")["stats"]
    assert s["remote_producers"] == 2
    assert s["remote_batches"] == s["batches"] == 2 * 60
    assert s["remote_bytes"] >= s["remote_batches"] * 64 * 1024 * 4
    assert s["ingest_copy_s"] > 0 and 0 < s["ingest_copy_mean_s"] < 1
    assert s["restarts"] == 0 and s["ingest_restarts"] == 0 and s["ingest_duplicates"] == 0


def test_local_and_remote_producers_together_deliver_exactly_once_unordered(scenarios):
    r = scenario(scenarios, "mixed_unordered")
    assert r["bad"] == 0
    assert sorted(r["indices"]) == list(range(r["length"]))
    s = r["stats"]
    assert s["remote_producers"] == 2  # of four: two landed on the consumer's node and write slots directly
    assert 0 < s["remote_batches"] < r["length"]


def test_removing_the_producers_node_mid_epoch_reissues_its_work(scenarios):
    r = scenario(scenarios, "node_removed")
    assert r["stats_before"]["remote_producers"] == 2
    assert r["bad"] == 0
    assert r["indices"] == r["expected"]  # exactly once, in order, across the loss
    assert r["indices2"] == r["expected"]  # and the next epoch runs on the replacements
    s = r["stats"]
    assert s["restarts"] >= 2  # both producers were on the removed node
    assert s["reissued"] >= 1  # they had work in flight
    assert s["remote_producers"] == 0  # the replacements started on the head node (soft affinity)
    assert 0 < s["remote_batches"] < r["length"]


def test_ingest_death_mid_epoch_is_survived_exactly_once(scenarios):
    r = scenario(scenarios, "ingest_killed")
    assert r["bad"] == 0
    assert sorted(r["indices"]) == list(range(r["length"]))
    assert sorted(r["indices2"]) == list(range(r["length"]))
    s = r["stats"]
    assert s["ingest_restarts"] == 1
    assert s["restarts"] >= 1  # remote producers exit when their ingest is gone
    assert s["remote_producers"] == 2  # replacements still run on the far node, via the new ingest


# ---- one node: placement must not change anything -----------------------------

SPEC = sf.BatchSpec(x=((16, 8), "float32"))


def fill(index, out, ctx):
    out["x"][:] = index + ctx.epoch / 10


def test_autotune_adds_producers_on_another_node_when_the_consumers_node_is_short_of_cpu(scenarios):
    r = scenario(scenarios, "autotune_elsewhere")
    assert sorted(r["indices"]) == list(range(r["length"])) and r["bad"] == 0
    adds = [d for d in r["decisions"] if d["change"] > 0]
    assert adds, r["decisions"]
    assert all(d["change"] == 1 for d in adds)  # no idle core: each add is a single probe
    assert any(f"asked onto node {r['far'][:8]}" in d["reason"] for d in adds), r["decisions"]


def test_cluster_placement_on_a_single_node_writes_slots_directly(ray_session):
    with sf.Feed(SPEC, fill=fill, length=12, workers=2, placement="cluster") as feed:
        got = [(b.index, float(b["x"][0, 0]), bool(np.all(b["x"] == b["x"][0, 0]))) for b in feed.epoch(1)]
        s = feed.stats()
    assert got == [(i, np.float32(i + 0.1), True) for i in range(12)]
    assert s["remote_producers"] == 0 and s["remote_batches"] == 0  # nothing went through the object store
    assert s["placement"] == "cluster"


@pytest.mark.parametrize("placement", ["everywhere", [], [""], 3])
def test_an_unknown_placement_is_refused_before_anything_starts(placement):
    with pytest.raises(sf.InvalidArgument, match="placement"):
        sf.Feed(SPEC, fill=fill, length=4, placement=placement)
