"""The bench's outputs: the table on stdout, every figure as JSON, and a PNG of the waits."""

from __future__ import annotations

import json
import math
from typing import Any

from .pipelines import PIPELINES
from .runner import PUBLISHED

_COLUMNS = (
    # header, unit line, row key, format
    ("first batch", "s", "time_to_first_batch_s", "{:.2f}"),
    ("wait mean", "ms", "wait_mean_s", "ms"),
    ("wait p50", "ms", "wait_p50_s", "ms"),
    ("wait p99", "ms", "wait_p99_s", "ms"),
    ("stall", "%", "stall_fraction", "pct"),
    ("batches/s", "", "batches_per_s", "{:.2f}"),
    ("CPU/1000", "ms", "cpu_ms_per_1000", "{:.0f}"),
    ("wall", "s", "wall_s", "{:.2f}"),
    ("batches/s", "÷ limit", "rate_vs_limit", "ratio"),
    ("wall", "÷ limit", "wall_vs_limit", "ratio"),
    ("wait", "÷ seq", "wait_vs_sequential", "ratio"),
    ("wait", "÷ pyshmfeed", "wait_vs_pyshmfeed", "ratio"),
)


def _fmt(value: Any, how: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if how == "ms":
        ms = 1e3 * value
        return f"{ms:.3f}" if ms < 1 else f"{ms:.1f}"
    if how == "pct":
        return f"{100 * value:.1f}"
    if how == "ratio":
        if value == 0:
            return "0"
        return f"{value:.3g}" if value < 1000 else f"{value:.0f}"
    return how.format(value)


def table(result: dict[str, Any]) -> str:
    """The comparison as a fixed-width text table (also valid inside a Markdown code block)."""
    rows = result["rows"]
    name_w = max([len("pipeline")] + [len(r["label"]) for r in rows])
    widths = [max(len(h), len(u), 9) for h, u, _, _ in _COLUMNS]
    lines = [
        f"{'pipeline':<{name_w}}  " + "  ".join(f"{h:>{w}}" for (h, _, _, _), w in zip(_COLUMNS, widths)),
        f"{'':<{name_w}}  " + "  ".join(f"{u:>{w}}" for (_, u, _, _), w in zip(_COLUMNS, widths)),
    ]
    for r in rows:
        if r["status"] == "ok":
            cells = "  ".join(f"{_fmt(r.get(key), how):>{w}}" for (_, _, key, how), w in zip(_COLUMNS, widths))
            lines.append(f"{r['label']:<{name_w}}  {cells}")
        else:
            lines.append(f"{r['label']:<{name_w}}  {r['status']}: {r['message']}")
    return "\n".join(lines)


def markdown_table(result: dict[str, Any]) -> str:
    """The same table in Markdown, for BENCHMARKS.md."""
    head = "| pipeline | " + " | ".join(f"{h} ({u})" if u else h for h, u, _, _ in _COLUMNS) + " |"
    lines = [head, "| --- " * (len(_COLUMNS) + 1) + "|"]
    for r in result["rows"]:
        if r["status"] == "ok":
            cells = " | ".join(_fmt(r.get(key), how) for _, _, key, how in _COLUMNS)
        else:
            cells = f"{r['status']}: {r['message']}" + " |" * (len(_COLUMNS) - 1)
        lines.append(f"| {r['label']} | {cells} |")
    return "\n".join(lines)


def notes(result: dict[str, Any]) -> str:
    """What the table does not show: start-up costs, the published figures, the targets."""
    out = []
    ray = result.get("ray") or {}
    if ray.get("start_s") is not None:
        out.append(f"Ray start-up (once, shared by the Ray-based rows, not in their first-batch time): "
                   f"{ray['start_s']:.2f} s")
    elif any(r["status"] == "ok" and r["key"].startswith(("ray", "pyshmfeed")) for r in result["rows"]):
        out.append("Ray was already running: its start-up is not in any figure")
    for key, what in (("cold_start", "with no Ray running (the feed starts Ray)"),
                      ("fresh_ray", "on a Ray just started (its prestarted workers idle, as after a script's "
                                    "ray.init())")):
        first = result.get(key)
        if first:
            figure = f"failed: {first['error']}" if "error" in first else f"{first['time_to_first_batch_s']:.2f} s"
            out.append(f"pyshmfeed (in-place fill) time to first batch {what}: {figure}")
    for r in result["rows"]:
        nxt = r.get("extra", {}).get("next_epoch_time_to_first_batch_s")
        if r["status"] == "ok" and nxt is not None:
            out.append(f"{r['label']}: time to first batch of the next epoch (producers warm): {nxt:.3f} s")
        warm = r.get("extra", {}).get("warm_feed_time_to_first_batch_s")
        if r["status"] == "ok" and warm is not None:
            wall = r["extra"].get("warm_feed_wall_s")
            out.append(f"{r['label']}: a new Feed right after this one closed (its producer processes reused "
                       f"from the pool): first batch {warm:.3f} s" + (f", wall {wall:.2f} s" if wall else ""))
    floor = result.get("wake_floor")
    if floor:
        out.append(f"Wake-up floor of this machine: code that takes {1e6 * floor['hot_s']:.0f} µs back to back "
                   f"takes {1e6 * floor['after_step_s']:.0f} µs right after a {floor['step_s']:g} s step "
                   "(cold caches, vCPU scheduling); every row's wait includes this")
    published = ", ".join(f"{_label(k)} {v:.2f} s" for k, v in PUBLISHED.items())
    out.append(f"Published (article, Intel laptop, (4, 1000000, 3) batches), mean wait per batch: {published}")
    for t in result.get("targets", []):
        verdict = "met" if t["met"] else "NOT met"
        detail = ""
        if "best_other" in t:
            unit = "s" if "wait" in t["target"] else "batches/s"
            detail = (f": pyshmfeed {t['pyshmfeed']:.4g} {unit} vs {_label(t['best_other_key'])} "
                      f"{t['best_other']:.4g} {unit} (ratio {t['ratio']:.3g})")
        elif "other" in t:
            detail = f": pyshmfeed {t['pyshmfeed']:.4g} vs {t['other']:.4g} (ratio {t['ratio']:.3g})"
        elif "fill_batches_per_s" in t:
            detail = (f": fill {t['fill_batches_per_s']:.2f} batches/s, wait {1e3 * t['fill_wait_mean_s']:.2f} ms; "
                      f"make {t['make_batches_per_s']:.2f} batches/s, wait {1e3 * t['make_wait_mean_s']:.2f} ms")
        else:
            detail = f": {t['pyshmfeed']:.4g}"
        out.append(f"Target ({t['workload']}) {verdict} — {t['target']}{detail}")
    return "\n".join(out)


def _label(key: str) -> str:
    for p in PIPELINES:
        if p.key == key:
            return p.label
    return key


def write_json(result: dict[str, Any], path: str) -> None:
    def clean(v):  # JSON has no inf/nan
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    with open(path, "w") as f:
        json.dump(clean(result), f, indent=1)
        f.write("\n")


def plot(result: dict[str, Any], path: str) -> None:
    """A PNG: each pipeline's wait per batch over the run, and its steady-state mean and p99.

    Raises ImportError (with what to install) when matplotlib is missing.
    """
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install 'pyshmfeed[plot]'") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] == "ok"]
    w = result["workload"]
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(15, 7), gridspec_kw={"width_ratios": [3, 2]})
    floor = 1e-6  # log scale: a wait of 0 is drawn at 1 µs
    for r in rows:
        waits = [max(v, floor) for v in r["waits_s"]]
        ax_t.plot(range(1, len(waits) + 1), waits, marker=".", markersize=3, linewidth=1, label=r["label"])
    ax_t.axvline(w["warmup"] + 0.5, color="grey", linestyle="--", linewidth=1)
    ax_t.text(w["warmup"] + 0.7, 0.97, "steady state →", transform=ax_t.get_xaxis_transform(),
              va="top", fontsize=8, color="grey")
    ax_t.set_yscale("log")
    ax_t.set_xlabel("batch")
    ax_t.set_ylabel("wait for the batch (s, log)")
    ax_t.set_title("training loop's wait, batch by batch")
    ax_t.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax_t.grid(True, which="both", alpha=0.3)

    labels = [r["label"] for r in rows]
    means = [max(r["wait_mean_s"], floor) for r in rows]
    p99s = [max(r["wait_p99_s"], floor) for r in rows]
    y = range(len(rows))
    ax_b.barh(list(y), means, color="tab:blue", label="mean")
    ax_b.scatter(p99s, list(y), color="tab:red", marker="|", s=200, label="p99", zorder=3)
    ax_b.set_yticks(list(y), labels, fontsize=8)
    ax_b.invert_yaxis()
    ax_b.set_xscale("log")
    ax_b.set_xlabel("steady-state wait per batch (s, log)")
    ax_b.set_title("steady state")
    ax_b.legend(fontsize=8)
    ax_b.grid(True, axis="x", which="both", alpha=0.3)
    mb = w["batch_bytes"] / 1e6
    fig.suptitle(f"pyshmfeed bench — {w['workers']} producers, x {tuple(w['shape'])} float32 ({mb:.1f} MB), "
                 f"{w['io_sleep']:g} s I/O, {w['step']:g} s step — {result['machine']['cores']} cores, "
                 f"{result['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
