"""The benchmarks drawn: PNG charts of bench/results.json for docs/performance.md.

A table of ratios says whether a goal is met; a chart shows by how much, and
what the time is spent on. ``make bench`` ends by drawing them into
docs/img/bench/ (so the docs show the last run, as results.json holds it);
``python -m bench.charts`` redraws them from the results file alone, without
running anything. Each chart reads only the rows it needs: a benchmark that
did not run, or failed, leaves its chart as it was and says so.

The object API with the Agg canvas, never pyplot: no display, no backend
chosen for the whole process, no figure kept alive between charts. PNGs
carry no software version, so a redraw of the same figures leaves git with
nothing to commit.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from bench.report import RESULTS

DOCS_IMAGES = Path(__file__).resolve().parents[1] / "docs" / "img" / "bench"
DPI = 100
WIDTH = 8.0  # inches: 800 pixels, the width of a docs page
HEADER = 0.75  # inches above the panels for the title and the machine line

# gpuvisor in blues, every baseline grey and hatched: what is ours is seen first.
OURS = "#2b6cb0"
OURS_TOO = "#7fb2e5"  # a second gpuvisor way beside the first (AsyncSupervisor, ZeroMQ clients)
BASELINE: dict[str, Any] = {"facecolor": "#d4d4d4", "edgecolor": "#6b6b6b", "hatch": "///", "linewidth": 0.6}
GOAL: dict[str, Any] = {"color": "#c0392b", "linestyle": "--", "linewidth": 1.2}
FLOOR: dict[str, Any] = {"color": "#333333", "linestyle": "--", "linewidth": 1.2}  # a baseline drawn as a line
PHASES = (  # a switch's phases in the order they happen, as its result names them
    ("stop", "#e07b39"),
    ("reclaim", "#f2c14e"),
    ("spawn", "#8e6cc0"),
    ("load", OURS),
    ("warm-up", "#4aa37a"),
    ("the rest", "#bdbdbd"),
)


class MissingRows(LookupError):
    """The results hold no row a chart needs: its benchmark did not run in
    the last run, or failed. The chart is skipped, not drawn half empty."""


@dataclass(frozen=True)
class Results:
    """bench/results.json as the charts read it: rows with a value (a failed
    benchmark's row has none), and the machine they were measured on."""

    machine: str
    rows: list[dict[str, Any]]

    @classmethod
    def load(cls, path: Path) -> Results:
        data = json.loads(path.read_text())
        rows = [r for r in data.get("rows", []) if isinstance(r.get("value"), (int, float))]
        return cls(str(data.get("machine") or "machine not recorded"), rows)

    def find(self, figure: str, baseline: str = ".*") -> dict[str, Any] | None:
        """The first row whose figure and baseline name match these patterns
        whole (figures carry counts, "median of 3", that a rerun may change)."""
        for row in self.rows:
            if re.fullmatch(figure, row["figure"]) and re.fullmatch(baseline, row["baseline_name"]):
                return row
        return None

    def need(self, suite: str, figure: str, baseline: str = ".*") -> dict[str, Any]:
        row = self.find(figure, baseline)
        if row is None or not isinstance(row.get("baseline"), (int, float)):
            against = "" if baseline == ".*" else f" against {_readable(baseline)!r}"
            raise MissingRows(f"no row {_readable(figure)!r}{against} (python -m bench {suite} measures it)")
        return row


def _readable(pattern: str) -> str:
    """A row's pattern as the table would show it, for a message."""
    return re.sub(r"\\d\+", "N", pattern).replace(".*", "...").replace("\\", "")


# ------------------------------------------------------------ drawing helpers


def _figure(title: str, machine: str, height: float) -> Figure:
    """A figure with its title and the machine line under it; the panels are
    the chart's to lay out."""
    fig = Figure(figsize=(WIDTH, height), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.text(0.5, 1 - 0.12 / height, title, ha="center", va="top", fontsize=11, fontweight="bold")
    fig.text(0.5, 1 - 0.48 / height, f"machine: {machine}", ha="center", va="top", fontsize=7.5, color="#555555")
    return fig


def _panels(fig: Figure, nrows: int = 1, ncols: int = 1, **grid: Any) -> list[Axes]:
    axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw=grid or None).ravel().tolist()
    for ax in axes:
        _style(ax)
    return axes


def _style(ax: Axes) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=8)


def _save(fig: Figure, path: Path, footer: float = 0.0) -> Path:
    """``footer``: inches kept free below the panels (a figure-wide legend)."""
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, footer / height, 1, 1 - HEADER / height))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, metadata={"Software": None})  # no version stamp: the same figures, the same bytes
    return path


def _legend_ours_and_baseline(ax: Axes, ours: str = "gpuvisor", baseline: str = "baseline", **kw: Any) -> None:
    handles = [Patch(color=OURS, label=ours), Patch(label=baseline, **BASELINE)]
    ax.legend(handles=handles, fontsize=8, frameon=False, **kw)


def _times(ratio: float) -> str:
    return f"{ratio:.2f}×"


def _goal(row: dict[str, Any]) -> str:
    """The row's goal as report.py wrote it ("<= 2x"), in the chart's signs."""
    return re.sub(r"(\d)x\b", "\\1×", row.get("goal") or "").replace("<=", "≤").replace(">=", "≥")


def _wrap(text: str, width: int = 24) -> str:
    return "\n".join(textwrap.wrap(text, width))


def _hbars(
    ax: Axes, bars: Sequence[tuple[str, float, str, str | None]], unit: str, room: float = 1.45, names: bool = True
) -> None:
    """Horizontal bars, top to bottom: (name, value, label, colour or None
    for a baseline), each labelled at its end; ``room``: the axis' length
    against the longest bar, for the labels."""
    y = list(range(len(bars)))[::-1]
    for yi, (_, value, label, colour) in zip(y, bars, strict=True):
        style: dict[str, Any] = {"color": colour} if colour else BASELINE
        container = ax.barh(yi, value, height=0.65, **style)
        ax.bar_label(container, labels=[label], padding=3, fontsize=8)
    ax.set_yticks(y, [_wrap(name, 30) if names else "" for name, *_ in bars])
    ax.set_xlim(0, max(value for _, value, *_ in bars) * room)
    ax.set_xlabel(unit, fontsize=8)


# ------------------------------------------------------------ the charts


def draw_roundtrip(results: Results, path: Path) -> Path:
    """(1) One no-op job at a time, p50 and p99: gpuvisor's two faces against
    the raw pyzmq echo (the floor of its own stack) and the standard library."""
    suite = "roundtrip"
    results.need(suite, r"round trip p50, Supervisor", r"raw .* p50")
    fig = _figure(
        "Round trip of one no-op job, µs (lower is better), ratio to the raw pyzmq echo", results.machine, 6.2
    )
    axes = _panels(fig, nrows=2)
    for ax, q in zip(axes, (50, 99), strict=True):
        pattern = rf"round trip p{q}, (Supervisor|AsyncSupervisor)"
        rows = [r for r in results.rows if re.fullmatch(pattern, r["figure"]) and r.get("baseline") is not None]
        if not rows:
            ax.set_axis_off()
            continue
        baselines = list(dict.fromkeys(r["baseline_name"] for r in rows))
        raw = next((name for name in baselines if name.startswith("raw")), None)

        def goal(row: dict[str, Any]) -> str:
            return f" (goal {_goal(row)})" if row["goal"] else ""

        bars: list[tuple[str, float, str, str | None]] = []
        for way in dict.fromkeys(r["figure"].split(", ", 1)[1] for r in rows):
            mine = [r for r in rows if r["figure"].endswith(f", {way}")]
            value, label = mine[0]["value"], f"{mine[0]['value']:,.0f} µs"
            against_raw = next((r for r in mine if r["baseline_name"] == raw), None)
            if against_raw:
                label += f", {_times(value / against_raw['baseline'])} raw{goal(against_raw)}"
            bars.append((way, value, label, OURS if not bars else OURS_TOO))
        for name in baselines:
            row = next(r for r in rows if r["baseline_name"] == name)
            label = f"{row['baseline']:,.0f} µs"
            if name != raw:
                way = row["figure"].split(", ", 1)[1]
                label += f"; {way} {_times(row['value'] / row['baseline'])} this{goal(row)}"
            bars.append((name.removesuffix(f" p{q}"), row["baseline"], label, None))
        _hbars(ax, bars, "µs", room=1.6)
        ax.set_title(f"p{q}", fontsize=9, loc="left")
    _legend_ours_and_baseline(axes[0], loc="lower right")
    return _save(fig, path)


@dataclass(frozen=True)
class _Switch:
    name: str
    result: dict[str, Any]  # a switch result, or the median of each phase over several


def _phase_seconds(result: dict[str, Any]) -> dict[str, float]:
    """Each phase's own seconds. The result's ``reclaim_seconds`` counts from
    the old worker's stop, the kill included, so reclaim's own share is what
    it adds to the stop; what the phases leave of the switch is "the rest"
    (messages, the hand-over)."""

    def get(key: str) -> float:
        value = result.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0

    stop = get("stop_seconds")
    own = {
        "stop": stop,
        "reclaim": max(0.0, get("reclaim_seconds") - stop),
        "spawn": get("spawn_seconds"),
        "load": get("load_seconds"),
        "warm-up": get("warmup_seconds"),
    }
    own["the rest"] = max(0.0, get("seconds") - sum(own.values()))
    return own


def _median_result(results: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("seconds", "stop_seconds", "reclaim_seconds", "spawn_seconds", "load_seconds", "warmup_seconds")
    out: dict[str, Any] = {}
    for key in keys:
        values = [r[key] for r in results if isinstance(r.get(key), (int, float))]
        if values:
            out[key] = statistics.median(values)
    return out


def _switches(results: Results) -> tuple[list[_Switch], list[_Switch], dict[str, Any] | None]:
    """(switches that import in the switch, switches with a spare ready, the
    row whose baseline is the load floor)."""
    cold: list[_Switch] = []
    warm: list[_Switch] = []
    start = results.find(r"switch diag -> embed right after start")
    if start and start.get("extra", {}).get("cold"):
        cold.append(_Switch("diag → embed, cold (no standby)", start["extra"]["cold"]))
    if start and start.get("extra", {}).get("result"):
        cold.append(_Switch("diag → embed right after start (the spare still importing)", start["extra"]["result"]))
    later = results.find(r"switch diag -> embed, later.*")
    if later and later.get("extra", {}).get("results"):
        runs = later["extra"]["results"]
        warm.append(_Switch(f"diag → embed, spare ready (median of {len(runs)})", _median_result(runs)))
    first = results.find(r"first switch to embed after start")
    if first and first.get("extra", {}).get("results"):
        runs = first["extra"]["results"]
        best = min(runs, key=lambda r: r.get("seconds") or float("inf"))
        warm.append(_Switch(f"first switch to embed after start, spare ready (best of {len(runs)})", best))
    back = results.find(r"switch embed -> diag.*")
    if back and back.get("extra", {}).get("results"):
        runs = back["extra"]["results"]
        warm.append(_Switch(f"embed → diag (median of {len(runs)})", _median_result(runs)))
    return cold, warm, later or first


def draw_switch_phases(results: Results, path: Path) -> Path:
    """(2) Where a switch's time goes, phase by phase, for each kind of
    switch; the floor (loading the model in a warm process) as a line."""
    cold, warm, floor_row = _switches(results)
    if not cold and not warm:
        raise MissingRows(
            "no switch rows with their phases in extra (python -m bench lifecycle measures them, "
            "python -m bench standby the first switch after start)"
        )
    groups = [
        (title, switches)
        for title, switches in (
            ("with the imports in the switch", cold),
            ("with a spare ready: the imports done before", warm),
        )
        if switches
    ]
    heights = [len(switches) for _, switches in groups]
    fig = _figure(
        "Mode switches, seconds by phase (lower is better), against the model's load floor",
        results.machine,
        HEADER + 1.5 + 0.62 * sum(heights),
    )
    axes = _panels(fig, nrows=len(groups), height_ratios=heights)
    for ax, (title, switches) in zip(axes, groups, strict=True):
        totals = []
        y = list(range(len(switches)))[::-1]
        for yi, switch in zip(y, switches, strict=True):
            left = 0.0
            for phase, colour in PHASES:
                width = _phase_seconds(switch.result)[phase]
                ax.barh(yi, width, left=left, height=0.6, color=colour)
                left += width
            totals.append(left)
            ax.text(left, yi, f"  {left:.3f} s", va="center", fontsize=8)
        top = max(totals)
        for yi, switch in zip(y, switches, strict=True):  # a phase's value inside it where it fits
            left = 0.0
            for phase, _ in PHASES:
                width = _phase_seconds(switch.result)[phase]
                if width > 0.12 * top:
                    ax.text(left + width / 2, yi, f"{phase} {width:.2f}", ha="center", va="center", fontsize=7.5)
                left += width
        if floor_row is not None and floor_row["baseline"] <= top * 1.3:
            ax.axvline(floor_row["baseline"], **FLOOR)
        ax.set_yticks(y, [_wrap(s.name, 40) for s in switches])
        ax.set_xlim(0, top * 1.3)
        ax.set_ylim(-0.6, len(switches) - 0.2)
        ax.set_xlabel("s", fontsize=8)
        ax.set_title(title, fontsize=9, loc="left")
    handles: list[Artist] = [Patch(color=colour, label=phase) for phase, colour in PHASES]
    if floor_row is not None:
        floor = f"floor: {floor_row['baseline_name']}, {floor_row['baseline']:.3f} s"
        handles.append(Line2D([], [], label=floor, **FLOOR))
    fig.legend(handles=handles, fontsize=8, frameon=False, ncols=4, loc="lower center")
    return _save(fig, path, footer=0.5)


def draw_alternating(results: Results, path: Path) -> Path:
    """(3) Two modes' jobs mixed by two callers, against the same jobs
    grouped by mode: what the queue's grouping leaves of the switches."""
    row = results.need("traffic", r"\d+ callers x \d+ jobs alternating diag/embed \(s\)")
    extra = row.get("extra") or {}
    ratio = row["value"] / row["baseline"]
    fig = _figure(
        f"Jobs alternating two modes against the same jobs grouped, seconds: ratio {_times(ratio)}",
        results.machine,
        4.2,
    )
    (ax,) = _panels(fig)
    names = [row["figure"].removesuffix(" (s)"), row["baseline_name"]]
    switches = [extra.get("switches_alternating"), extra.get("switches_grouped")]
    rounds = [extra.get("alternating_s") or [], extra.get("grouped_s") or []]
    for x, (value, colour) in enumerate(((row["value"], OURS), (row["baseline"], None))):
        style: dict[str, Any] = {"color": colour} if colour else BASELINE
        container = ax.bar(x, value, width=0.55, **style)
        label = f"{value:.3f} s"
        if switches[x] is not None:
            label += f"\n{switches[x]} switch{'es' if switches[x] != 1 else ''}"
        on_bar = {"color": "white"} if colour else {"bbox": {"facecolor": "white", "edgecolor": "none", "pad": 2}}
        ax.bar_label(container, labels=[label], label_type="center", fontsize=9, **on_bar)
        if rounds[x]:
            ax.plot(
                [x] * len(rounds[x]),
                rounds[x],
                "o",
                color="black",
                markersize=3.5,
                label="each round (the best counts)" if x == 0 else None,
            )
    if row.get("limit"):
        goal = row["limit"] * row["baseline"]
        ax.axhline(goal, **GOAL, label=f"goal: {_goal(row)} grouped")
    ax.set_xticks([0, 1], [_wrap(n, 40) for n in names])
    top = max([row["value"], row["baseline"], *rounds[0], *rounds[1], (row.get("limit") or 0) * row["baseline"]])
    ax.set_ylim(0, top * 1.3)
    ax.set_ylabel("s (lower is better)", fontsize=8)
    ax.legend(fontsize=8, frameon=False, loc="upper right")
    return _save(fig, path)


def draw_batching(results: Results, path: Path) -> Path:
    """(4) Batching's gain in gpuvisor against the model's own: the model
    called directly one sentence at a time and in batches is the ceiling
    any batching can reach on this machine."""
    figure = r"\d+ callers x \d+ embed, batched \(jobs/s\)"
    row = results.need("traffic", figure, "unbatched")
    extra = row.get("extra") or {}
    direct = results.find(figure, r"the model called directly, batches of \d+")
    size = re.sub(r"\D", "", direct["baseline_name"]) if direct else "64"
    by_hand = extra.get("direct_64", direct["baseline"] if direct else None)
    one_by_one = extra.get("direct_1")
    gain = row["value"] / row["baseline"]
    title = f"Embedding jobs/s (higher is better): batching gains {_times(gain)} in gpuvisor"
    if by_hand and one_by_one:
        title += f", {_times(by_hand / one_by_one)} in the model"
    fig = _figure(title, results.machine, 4.6)
    (ax,) = _panels(fig)
    mean = extra["jobs"] / extra["count"] if extra.get("count") else None
    width = 0.36
    groups = (  # (ours, its label's second line, the model's, its label's second line)
        (row["baseline"], "", one_by_one, ""),
        (row["value"], f"\n(batches of {mean:.0f})" if mean else "", by_hand, f"\n(batches of {size})"),
    )
    for x, (ours, ours_how, model, model_how) in enumerate(groups):
        container = ax.bar(x - width / 2, ours, width, color=OURS)
        ax.bar_label(container, labels=[f"{ours:.0f}{ours_how}"], padding=3, fontsize=8)
        if model is not None:
            container = ax.bar(x + width / 2, model, width, **BASELINE)
            ax.bar_label(container, labels=[f"{model:.0f}{model_how}"], padding=3, fontsize=8)
    notes = [f"gpuvisor: batched {_times(gain)} unbatched (goal {_goal(row)})"]
    if by_hand and one_by_one:
        notes.append(f"the model itself: {size} at a time {_times(by_hand / one_by_one)} one at a time")
    if by_hand:
        notes.append(f"gpuvisor batched {_times(row['value'] / by_hand)} the model's batches of {size}")
    ax.text(0.01, 0.98, "\n".join(notes), transform=ax.transAxes, va="top", fontsize=8)
    ax.set_xticks([0, 1], ["one sentence at a time", "batched"])
    ax.set_ylim(0, max(v for v in (row["value"], row["baseline"], one_by_one, by_hand) if v is not None) * 1.45)
    ax.set_ylabel("jobs/s", fontsize=8)
    _legend_ours_and_baseline(
        ax,
        ours="gpuvisor, "
        + row["figure"].removesuffix(", batched (jobs/s)").replace(" embed", " one-sentence embed jobs"),
        baseline="the model called directly",
        loc="upper right",
    )
    return _save(fig, path)


def draw_door(results: Results, path: Path) -> Path:
    """(5) The HTTP door against the server a user would write by hand: one
    request at a time (latency), and many clients (requests per second),
    where the model called directly in batches is the ceiling."""
    sequential = [
        (q, results.find(rf"HTTP over TCP, 1 client sequential: p{q} \(ms\)", r"the naive .*")) for q in (50, 99)
    ]
    panels = [(q, row) for q, row in sequential if row is not None]
    load = r"\d+ HTTP clients x \d+ embeddings, TCP \(req/s\)"
    loads = [row for row in results.rows if re.fullmatch(load, row["figure"]) and row.get("baseline") is not None]
    if not panels and not loads:
        results.need("door", r"HTTP over TCP, 1 client sequential: p50 \(ms\)")
    top = [f"p{q}" for q, _ in panels]
    layout: list[Any] = [top or ["load"], ["load"] * max(1, len(top))] if loads else [top]
    fig = _figure(
        "The HTTP door against a naive FastAPI server: latency in ms (lower is better), load in req/s",
        results.machine,
        6.0,
    )
    axes = fig.subplot_mosaic(layout, height_ratios=[1, 1.5] if loads else None)
    for ax in axes.values():
        _style(ax)
    for q, row in panels:
        ax = axes[f"p{q}"]
        label = f"{row['value']:.1f} ms\n{_times(row['value'] / row['baseline'])} naive"
        label += f" (goal {_goal(row)})" if row["goal"] else ""
        _hbars(
            ax,
            [
                ("gpuvisor", row["value"], label, OURS),
                ("naive FastAPI", row["baseline"], f"{row['baseline']:.1f} ms", None),
            ],
            "ms",
            room=2.3,
            names=q == panels[0][0],
        )
        ax.set_title(f"1 client, a request at a time: p{q}" if q == 50 else f"p{q}", fontsize=9, loc="left")
    if loads:
        ax = axes["load"]
        bars: list[tuple[str, float, str, str | None]] = [
            ("gpuvisor, HTTP", loads[0]["value"], f"{loads[0]['value']:.0f} req/s", OURS)
        ]
        for row in loads:
            ratio = f"HTTP {_times(row['value'] / row['baseline'])} this" + (
                f" (goal {_goal(row)})" if row["goal"] else ""
            )
            ours = "ZeroMQ" in row["baseline_name"]
            name = row["baseline_name"].replace("the same through", "gpuvisor through").removesuffix(", same load")
            bars.append((name, row["baseline"], f"{row['baseline']:.0f} req/s; {ratio}", OURS_TOO if ours else None))
        _hbars(ax, bars, "req/s", room=1.9)
        title = loads[0]["figure"].removesuffix(" (req/s)")
        ax.set_title(f"{title}, a closed loop (higher is better)", fontsize=9, loc="left")
        _legend_ours_and_baseline(ax, loc="lower right")
    return _save(fig, path)


CHARTS: dict[str, Callable[[Results, Path], Path]] = {
    "roundtrip.png": draw_roundtrip,
    "switch_phases.png": draw_switch_phases,
    "alternating.png": draw_alternating,
    "batching.png": draw_batching,
    "door.png": draw_door,
}


def draw_all(results_path: Path, out_dir: Path) -> list[Path]:
    """Draw every chart whose rows the results hold; the others are named
    with what is missing and left as they were."""
    results = Results.load(Path(results_path))
    written = []
    for name, draw in CHARTS.items():
        try:
            written.append(draw(results, Path(out_dir) / name))
        except MissingRows as missing:
            print(f"chart {name} skipped: {missing}")
            continue
        print(f"chart: {written[-1]}")
    return written


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.charts", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results file (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DOCS_IMAGES, help="where the PNGs go (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.results.exists():
        print(f"no results at {args.results}: run make bench (or python -m bench NAME) first", file=sys.stderr)
        return 2
    draw_all(args.results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
