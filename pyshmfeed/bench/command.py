"""The ``bench`` subcommand: options, defaults (printed), the run, the outputs."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .pipelines import KEYS, PIPELINES, select
from .workload import ARTICLE_SHAPE, DEFAULT_SHAPE, Workload

HELP = "run the published comparison live: every installed pipeline on the same workload, side by side"

# The default finishes in under 3 minutes on a 2-core machine, with producers able to keep up:
# 6 I/O-bound producers and (4, 250_000, 3) batches (12 MB). --article uses the article's 48 MB
# batches, for which 2 cores are the bottleneck: fewer batches keep its run to a few minutes.
ARTICLE_BATCHES = 60

# Transport-bound workloads: no I/O, no compute, no training step, so the figures are the cost of
# moving batches. "small": 64 KiB batches, where a per-batch control-plane cost shows; "large": 48 MiB
# batches the loop reads page by page, where start-up and copies show.
PRESETS = {
    "small": dict(shape=(16_384,), label_shape=(1,), batches=5_000, serial_batches=500, warmup=100,
                  io_sleep=0.0, work=0, step=0.0, data="index", workers=2),
    "large": dict(shape=(4, 1_000_000, 3), batches=60, serial_batches=12, warmup=4, io_sleep=0.0, work=0,
                  step=0.0, data="index", touch=True, workers=2),
}


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").replace("(", "").replace(")", "").split(",")
                      if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is integers separated by commas, like 4,250000,3; got {text!r}")
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"a shape needs positive dimensions; got {text!r}")
    return shape


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Workload()
    parser.add_argument("--workers", type=int, default=None, help=f"producers per pipeline (default {d.workers})")
    parser.add_argument("--batches", type=int, default=None,
                        help=f"batches per run (default {d.batches}; {ARTICLE_BATCHES} with --article)")
    parser.add_argument("--serial-batches", type=int, default=None,
                        help="batches for single-producer pipelines (sequential, tf.data from_generator), "
                             f"whose steady state shows sooner (default {d.serial_batches}, at most --batches)")
    parser.add_argument("--warmup", type=int, default=d.warmup,
                        help=f"first batches left out of the steady-state figures (default {d.warmup})")
    parser.add_argument("--shape", type=_shape, default=None,
                        help=f"shape of x, float32 (default {','.join(map(str, DEFAULT_SHAPE))})")
    parser.add_argument("--article", action="store_true",
                        help=f"the article's exact shape {ARTICLE_SHAPE} (48 MB batches)")
    parser.add_argument("--io-sleep", type=float, default=d.io_sleep,
                        help=f"simulated I/O per batch in seconds (default {d.io_sleep})")
    parser.add_argument("--work", type=int, default=d.work,
                        help=f"iterations of the Python loop per batch (default {d.work})")
    parser.add_argument("--step", type=float, default=d.step,
                        help=f"simulated training step in seconds (default {d.step})")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the batches' random data")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="a transport-bound workload (no I/O, no step; the options above still override): "
                             "small = 64 KiB x 5,000 batches, large = 48 MiB x 60 read page by page; "
                             "2 producers")
    parser.add_argument("--only", type=_names, action="extend", default=None, metavar="NAMES",
                        help=f"run only these pipelines (comma-separated; a family prefix works): {', '.join(KEYS)}")
    parser.add_argument("--skip", type=_names, action="extend", default=None, metavar="NAMES",
                        help="skip these pipelines (same names)")
    parser.add_argument("--json", metavar="PATH", help="write every figure (and each batch's wait) to PATH")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the waits per batch to PATH")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown too")
    parser.add_argument("--no-cold-start", action="store_true",
                        help="skip the extra pyshmfeed start with no Ray running (saves a Ray restart)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--list", action="store_true", help="list the pipelines, how each is set up, and exit")
    parser.add_argument("--autotune", action="store_true",
                        help="instead of the comparison: workers='auto' against hand-set workers 1..16 on an "
                             "I/O-bound and a CPU-bound workload, and a mid-run workload change (see --plot)")
    parser.add_argument("--autotune-seconds", type=float, default=4.0,
                        help="seconds each --autotune configuration is measured, after its producers run "
                             "(+1 s warm-up; auto: +8 s for the controller to converge)")


def workload_from(args: argparse.Namespace) -> Workload:
    if getattr(args, "preset", None):
        p: dict[str, Any] = dict(PRESETS[args.preset])
        d = Workload()
        # An option given on the command line wins over the preset (defaults do not).
        for name in ("workers", "batches", "serial_batches"):
            if getattr(args, name):
                p[name] = getattr(args, name)
        for name in ("io_sleep", "work", "step", "warmup"):
            if getattr(args, name) != getattr(d, name):
                p[name] = getattr(args, name)
        if args.shape:
            p["shape"] = args.shape
        return Workload(seed=args.seed, preset=args.preset, **p)
    d = Workload()
    shape = args.shape or (ARTICLE_SHAPE if args.article else DEFAULT_SHAPE)
    batches = args.batches or (ARTICLE_BATCHES if args.article else d.batches)
    serial = args.serial_batches or min(d.serial_batches, batches)
    return Workload(workers=args.workers or d.workers, batches=batches, serial_batches=serial,
                    warmup=args.warmup, shape=shape, io_sleep=args.io_sleep, work=args.work, step=args.step,
                    seed=args.seed)


def run(args: argparse.Namespace) -> int:
    # TensorFlow's C++ log lines (here and in producer processes, which inherit the environment) would
    # land in the middle of the progress bar and the tables. Not silenced by this: the two lines TF 2.21
    # writes before absl's logging is initialised (oneDNN's notice), which go to stderr at import.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from . import report
    from .progress import Progress
    from .runner import run_bench

    if args.autotune:
        from . import autotune_bench

        return autotune_bench.run(args)
    if args.list:
        for p in PIPELINES:
            missing = p.missing()
            state = f"  [not installed: {p.install}]" if missing else ""
            print(f"{p.key:<18} {p.label}{state}\n{'':<18} {p.how}")
        return 0
    try:
        w = workload_from(args)
        pipelines = select(args.only, args.skip)
    except ValueError as e:
        print(f"pyshmfeed bench: {e}", file=sys.stderr)
        return 2
    if not pipelines:
        print("pyshmfeed bench: --only/--skip left no pipeline to run", file=sys.stderr)
        return 2
    print(f"pyshmfeed bench: {w.describe()}.", flush=True)
    progress = Progress(enabled=not args.no_progress)
    result = run_bench(w, pipelines, progress=progress, cold_start=not args.no_cold_start)
    print()
    print(report.table(result))
    print()
    print(report.notes(result))
    if args.markdown:
        print()
        print(report.markdown_table(result))
    if args.json:
        report.write_json(result, args.json)
        print(f"\nfigures: {args.json}")
    if args.plot:
        try:
            report.plot(result, args.plot)
            print(f"plot: {args.plot}")
        except ImportError as e:
            print(f"plot not written: {e}", file=sys.stderr)
    m = result["machine"]
    print(f"total: {result['total_s']:.0f} s on {m['cores']} cores ({m['cpu']}); load average "
          f"{m['load_average_1m']:.1f} at the start, {m['load_average_1m_end']:.1f} at the end")
    return 1 if any(r["status"] == "error" for r in result["rows"]) else 0
