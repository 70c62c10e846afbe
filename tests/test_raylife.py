"""One Ray per process (pyshmfeed/raylife.py), and a feed whose Ray dies under it.

Each test runs a training script in a fresh interpreter with no Ray running, so
that pyshmfeed starts Ray itself — the case where its lifecycle matters: a
feed's close must not take Ray from another feed, feeds made and dropped in a
loop must share it, and it must stop with the last one. Killing Ray's raylet or
GCS under a live feed must end the loop with a clear error, not a hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(240)

PRELUDE = textwrap.dedent("""
    import gc, json, os, signal, sys, time
    import ray
    from pyshmfeed import BatchSpec, Feed, raylife
    from pyshmfeed.errors import ShmfeedError

    def fill(index, out, ctx):
        out["x"][...] = index

    SPEC = BatchSpec(x=((16,), "int64"))
""")

SHARED = PRELUDE + textwrap.dedent("""
    out = {}
    a = Feed(SPEC, fill=fill, length=10, workers=1)
    b = Feed(SPEC, fill=fill, length=10, workers=1)
    out["a"] = [int(x["x"][0]) for x in a.epoch(0)]
    a.close()  # pyshmfeed started Ray for `a`; `b` still uses it
    out["b_after_a_closed"] = [int(x["x"][0]) for x in b.epoch(0)]
    out["ray_up_while_b_open"] = ray.is_initialized()
    b.close()
    out["ray_up_after_last_close"] = ray.is_initialized()
    firsts = []
    for i in range(4):  # made and dropped in a loop: the garbage collector closes the old one
        feed = Feed(SPEC, fill=fill, length=5, workers=1)
        batches = feed.epoch(0)  # held: a batch is valid until its iterator moves on or goes
        firsts.append(int(next(batches)["x"][0]))
    del feed, batches
    gc.collect()
    out["firsts"] = firsts
    out["leases_at_end"] = raylife.leases()
    out["ray_up_at_end"] = ray.is_initialized()
    print(json.dumps(out), flush=True)
""")

RAY_DIES = PRELUDE + textwrap.dedent("""
    def slow_fill(index, out, ctx):
        out["x"][...] = index
        time.sleep(0.01)

    feed = Feed(SPEC, fill=slow_fill, length=10**6, workers=2)
    victim = ray._private.worker._global_node.all_processes[sys.argv[1]][0].process.pid
    batches = feed.epoch(0)
    for _ in range(10):
        next(batches)
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    try:
        for _ in batches:
            pass
        result = {"raised": None}
    except ShmfeedError as e:
        result = {"raised": type(e).__name__, "message": str(e), "after_s": time.monotonic() - t0}
    t1 = time.monotonic()
    feed.close()
    result["close_s"] = time.monotonic() - t1
    print(json.dumps(result), flush=True)
""")


def run_script(tmp_path, text: str, *args: str) -> dict:
    script = tmp_path / "train.py"
    script.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=200,
                          env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"the script failed (rc {proc.returncode}): {proc.stderr[-3000:]}"
    return json.loads(lines[-1])


def test_feeds_share_one_ray_that_stops_with_the_last(tmp_path):
    out = run_script(tmp_path, SHARED)
    assert out["a"] == list(range(10))
    assert out["b_after_a_closed"] == list(range(10))
    assert out["ray_up_while_b_open"] is True
    assert out["ray_up_after_last_close"] is False  # pyshmfeed started it: it stops it
    assert out["firsts"] == [0, 0, 0, 0]
    assert out["leases_at_end"] == 0 and out["ray_up_at_end"] is False


@pytest.mark.parametrize("victim", ["raylet", "gcs_server"])
def test_ray_killed_under_a_live_feed_raises_within_30_s(tmp_path, victim):
    out = run_script(tmp_path, RAY_DIES, victim)
    assert out["raised"] == "ShmfeedError", out
    assert "Ray" in out["message"]
    print(f"\n[{victim} killed] error after {out['after_s']:.2f} s, close {out['close_s']:.2f} s")
    assert out["after_s"] < 30  # the bound, generous on purpose: this is not a timing test
