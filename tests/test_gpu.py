"""Staging onto a real GPU: the correctness part of bench/gpu_check.py, and the CUDA front ends.

Marked ``gpu``; skipped cleanly where CUDA is not available (the development
machines). ``python bench/gpu_check.py`` runs the same checks with figures.
One test runs everywhere: gpu_check's dry run, so the script itself cannot rot.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.timeout(300)

GPU_CHECK = pathlib.Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    # Not registered in sys.modules, on purpose: its sources then travel to producers by value.
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SIZES = dict(rows=64, cols=1024, workers=2)


@pytest.mark.parametrize("register", [True, False], ids=["registered-ring", "pinned-pool"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_checksums_equal_the_producers_over_thousands_of_batches(ray_session, gpu_check, register):
    r = gpu_check.check_correctness(device="cuda", batches=2000 if register else 500, register=register,
                                    **SIZES)
    assert r["batches"] == (2000 if register else 500)
    assert r["mismatches"] == 0, r
    # The path this case names, or a failure: a registration that fell back to the pinned pool is not
    # a registered ring (the fallback itself is the pinned-pool case).
    assert r["staging_path"] == ("cuda-registered" if register else "cuda-pinned-pool"), r


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_late_copy_is_safe_and_an_early_release_is_caught(ray_session, gpu_check):
    late = dict(batches=40, hold_s=0.005, delay_cycles=50_000_000, **SIZES)
    assert gpu_check.check_correctness(device="cuda", **late)["mismatches"] == 0
    assert gpu_check.check_correctness(device="cuda", release_early=True, **late)["mismatches"] > 0


def fill(index, out, ctx):
    out["x"][...] = index + ctx.epoch * 100
    out["y"][...] = np.arange(4) + index


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_feed_with_a_cuda_device_yields_cuda_tensors_that_stay_valid(ray_session):
    from pyshmfeed import BatchSpec, Feed

    spec = BatchSpec(x=((4, 3), "float32"), y=((4,), "int64"))
    with Feed(spec, fill=fill, length=20, workers=2, slots=4, prefetch=2, device="cuda") as feed:
        kept = list(feed.epoch(1))
        assert all(b["x"].is_cuda and b["y"].is_cuda for b in kept)
        assert [float(b["x"][0, 0]) for b in kept] == [i + 100.0 for i in range(20)]
        stats = feed.stats()
    assert stats["staging_path"] in ("cuda-registered", "cuda-pinned-pool")
    assert stats["stage_released"] == 20


def test_gpu_check_dry_run_exercises_every_path_on_the_cpu(ray_session, gpu_check, tmp_path):
    args = gpu_check.parse_args(["--dry-run", "--json", str(tmp_path / "gpu_check.json")])
    results = {"device": "cpu", "dry_run": True}
    gpu_check.correctness(args, "cpu", results)
    c = results["correctness"]
    assert c["ok"], c  # no mismatch when releases are right, and the early release was caught
    assert c["registered"]["batches"] == args.batches and c["early_release"]["mismatches"] > 0
    bw = gpu_check.h2d_bandwidth("cpu", args.bw_bytes, 1)
    assert all(bw[k] > 0 for k in ("ring", "pinned tensor", "pageable"))
    args.steps = 3
    results["idle"] = {"pyshmfeed": gpu_check.idle_pyshmfeed("cpu", args)}
    assert 0 <= results["idle"]["pyshmfeed"]["idle_fraction"] <= 1
    assert "correctness" in gpu_check._table(results)
