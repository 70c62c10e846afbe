"""`pyshmfeed bench` on a tiny workload: every installed pipeline runs, the outputs are complete,
and a missing framework or a failing pipeline becomes a row, never a crash."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pyshmfeed import cli
from pyshmfeed.bench import pipelines as bench_pipelines
from pyshmfeed.bench.command import workload_from
from pyshmfeed.bench.pipelines import PIPELINES
from pyshmfeed.bench.workload import Trace, Workload, summarize

# Small arrays, no sleeps: exercises every code path in seconds, measures nothing.
TINY = ["--workers", "2", "--batches", "10", "--serial-batches", "5", "--warmup", "2", "--shape", "2,64,3",
        "--io-sleep", "0", "--work", "10", "--step", "0", "--no-progress", "--no-cold-start"]

TOP_FIELDS = {"date", "machine", "versions", "workload", "total_s", "ray", "cold_start", "wake_floor",
              "published_wait_mean_s", "rows", "reference", "targets"}
ROW_FIELDS = {"key", "label", "how", "status", "message", "batches_run", "import_s", "extra", "waits_s",
              "batches", "steady_batches", "time_to_first_batch_s", "wall_s", "wait_mean_s", "wait_p50_s",
              "wait_p99_s", "wait_max_s", "wait_mean_all_s", "stall_fraction", "batches_per_s",
              "wait_vs_sequential", "wait_vs_pyshmfeed", "cpu_ms_per_1000", "rate_vs_limit", "wall_vs_limit"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _bench(tmp_path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "bench.json"
    status = cli.main(["bench", *TINY, "--json", str(out), *args])
    return status, json.loads(out.read_text())


@pytest.mark.timeout(240)
def test_every_installed_pipeline_runs_and_reports_every_figure(ray_session, tmp_path, capsys):
    plot = tmp_path / "waits.png"
    status, result = _bench(tmp_path, "--plot", str(plot))
    printed = capsys.readouterr().out

    assert status == 0, printed
    assert TOP_FIELDS <= set(result)
    assert result["ray"]["started_by_bench"] is False  # the session's Ray was reused, not restarted
    assert [r["key"] for r in result["rows"]] == [p.key for p in PIPELINES]
    for p, row in zip(PIPELINES, result["rows"]):
        if p.missing():
            assert row["status"] == "missing" and p.install in row["message"]
            continue
        assert row["status"] == "ok", f"{p.key}: {row['message']}\n{row['extra'].get('traceback', '')}"
        assert ROW_FIELDS <= set(row), f"{p.key} lacks {ROW_FIELDS - set(row)}"
        expected = 5 if p.serial else 10
        assert row["batches"] == row["batches_run"] == len(row["waits_s"]) == expected
        assert row["steady_batches"] == expected - 2
        assert row["time_to_first_batch_s"] > 0 and row["batches_per_s"] > 0
        assert row["wait_p50_s"] <= row["wait_p99_s"] <= row["wait_max_s"]
        assert row["label"] in printed
    fill = next(r for r in result["rows"] if r["key"] == "pyshmfeed-fill")
    make = next(r for r in result["rows"] if r["key"] == "pyshmfeed-make")
    assert make["wait_vs_pyshmfeed"] == pytest.approx(1.0)  # peers are judged on the same producer work
    assert fill["extra"]["feed_stats"]["batches"] == 10
    assert fill["extra"]["next_epoch_time_to_first_batch_s"] > 0
    assert result["reference"] == "pyshmfeed-make"
    assert {t["target"] for t in result["targets"]} >= {"in-place fill ahead of the copying make source"}

    data = plot.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    image = pytest.importorskip("matplotlib.image").imread(str(plot))
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_missing_framework_becomes_a_row_saying_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # as if tensorflow were not installed
    status, result = _bench(tmp_path, "--only", "sequential,tfdata")
    printed = capsys.readouterr().out

    assert status == 0
    rows = {r["key"]: r for r in result["rows"]}
    assert set(rows) == {"sequential", "tfdata", "tfdata-interleave"}
    assert rows["sequential"]["status"] == "ok"
    for key in ("tfdata", "tfdata-interleave"):
        assert rows[key]["status"] == "missing"
        assert "tensorflow" in rows[key]["message"] and "pip install 'pyshmfeed[tf]'" in rows[key]["message"]
        assert rows[key]["wait_vs_sequential"] is None
    assert "not installed (tensorflow): pip install 'pyshmfeed[tf]'" in printed


def test_a_failing_pipeline_becomes_an_error_row_and_the_others_still_run(monkeypatch, tmp_path, capsys):
    def broken(w, length, run):
        raise RuntimeError("producers could not start")

    real_load = bench_pipelines.Pipeline.load
    monkeypatch.setattr(bench_pipelines.Pipeline, "load",
                        lambda self: broken if self.key == "mpqueue" else real_load(self))
    status, result = _bench(tmp_path, "--only", "mpqueue,sequential")
    printed = capsys.readouterr().out

    assert status == 1  # an error is not success, but not a crash either
    rows = {r["key"]: r for r in result["rows"]}
    assert rows["mpqueue"]["status"] == "error"
    assert rows["mpqueue"]["message"] == "RuntimeError: producers could not start"
    assert rows["sequential"]["status"] == "ok"
    assert "error: RuntimeError: producers could not start" in printed


def test_steady_state_leaves_out_the_warmup_and_first_batch_time_is_apart():
    w = Workload(warmup=2, batches=5)
    trace = Trace(start=0.0, waits=[3.0, 1.0, 0.01, 0.02, 0.03], first=3.5, end=10.0, steady_start=8.0)
    f = summarize(trace, w)
    assert f["time_to_first_batch_s"] == 3.5
    assert f["steady_batches"] == 3
    assert f["wait_mean_s"] == pytest.approx(0.02)
    assert f["wait_max_s"] == pytest.approx(0.03)
    assert f["stall_fraction"] == pytest.approx(0.06 / 2.0)
    assert f["batches_per_s"] == pytest.approx(3 / 2.0)
    assert f["wait_mean_all_s"] == pytest.approx(sum(trace.waits) / 5)


@pytest.mark.parametrize("args, message", [
    (["--only", "nonesuch"], "unknown pipeline 'nonesuch'"),
    (["--skip", "bare-ring,sequential,tfdata,mpqueue,torch,ray,pyshmfeed"], "left no pipeline"),
])
def test_bad_selection_is_a_clear_error_before_anything_runs(args, message, capsys):
    assert cli.main(["bench", *TINY, *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.timeout(240)
def test_small_preset_judges_the_data_plane_targets_against_the_bare_ring(ray_session, tmp_path, capsys):
    out = tmp_path / "small.json"
    status = cli.main(["bench", "--preset", "small", "--batches", "300", "--warmup", "20", "--no-progress",
                       "--no-cold-start", "--only", "bare-ring,mpqueue,pyshmfeed-fill", "--json", str(out)])
    result = json.loads(out.read_text())
    assert status == 0, capsys.readouterr().out
    w = result["workload"]
    assert (w["preset"], w["shape"], w["io_sleep"], w["step"], w["data"]) == ("small", [16384], 0.0, 0.0, "index")
    rows = {r["key"]: r for r in result["rows"]}
    assert rows["bare-ring"]["rate_vs_limit"] == pytest.approx(1.0)
    assert rows["pyshmfeed-fill"]["cpu_ms_per_1000"] > 0
    targets = [t["target"] for t in result["targets"]]
    assert any("bare-ring" in t for t in targets) and any("CPU" in t for t in targets)
    assert all(isinstance(t["met"], bool) for t in result["targets"])  # judged, whatever the verdict here


def test_bad_shape_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--shape", "4,zero,3"])
    assert exc.value.code == 2
    assert "a shape is integers separated by commas" in capsys.readouterr().err


def test_article_option_selects_the_article_shape():
    w = workload_from(cli.build_parser().parse_args(["bench", "--article"]))
    assert w.shape == (4, 1_000_000, 3) and w.batch_bytes == 48_000_016


def test_module_entry_point_lists_the_pipelines():
    out = subprocess.run([sys.executable, "-m", "pyshmfeed", "bench", "--list"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    for p in PIPELINES:
        assert p.key in out and p.label in out
