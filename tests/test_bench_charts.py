"""The benchmarks' charts, drawn from a results file made here: one PNG each,
a chart without its rows skipped with a message, and docs/performance.md
showing every committed chart. No benchmark runs: the rows are written by
``bench.report.write``, in the format ``make bench`` writes them."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.image
import pytest

from bench import charts, report
from bench.report import Row

pytestmark = pytest.mark.unit

DOCS = Path(__file__).resolve().parents[1] / "docs"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _switch(seconds: float, stop: float, spawn: float, load: float) -> dict:
    return {
        "seconds": seconds,
        "stop_seconds": stop,
        "reclaim_seconds": stop,
        "spawn_seconds": spawn,
        "load_seconds": load,
        "warmup_seconds": None,
        "standby": True,
    }


def _rows() -> dict[str, list[Row]]:
    """Rows shaped as each benchmark makes them, by the chart they feed."""
    raw, pool, pipe = "raw pyzmq+msgpack echo", "ProcessPoolExecutor(1)", "multiprocessing.Pipe echo"
    warm = _switch(0.13, 0.003, 0.002, 0.12)
    load = "32 HTTP clients x 15 embeddings, TCP (req/s)"
    embed = "8 callers x 250 embed, batched (jobs/s)"
    return {
        "roundtrip.png": [
            Row("round trip p50, Supervisor", 310.0, f"{raw} p50", 55.0, "us", limit=2),
            Row("round trip p99, Supervisor", 4076.0, f"{raw} p99", 330.0, "us"),
            Row("round trip p50, AsyncSupervisor", 356.0, f"{raw} p50", 55.0, "us", limit=1.5),
            Row("round trip p50, Supervisor", 310.0, f"{pool} p50", 103.0, "us", limit=0.33),
            Row("round trip p50, Supervisor", 310.0, f"{pipe} p50", 22.0, "us"),
        ],
        "switch_phases.png": [
            Row(
                "switch diag -> embed right after start",
                4.1,
                "the same, cold (no standby)",
                4.1,
                "s",
                extra={"result": _switch(4.1, 0.003, 3.99, 0.13), "cold": _switch(4.1, 0.003, 0.1, 4.0)},
            ),
            Row(
                "switch diag -> embed, later (median of 3)",
                0.13,
                "embed load in a warm process",
                0.06,
                "s",
                limit=0.3,
                on="excess",
                extra={"results": [warm, warm, _switch(0.17, 0.003, 0.002, 0.16)]},
            ),
            Row(
                "switch embed -> diag (median of 2)",
                0.15,
                "first diag start (no stop)",
                0.12,
                "s",
                extra={"results": [_switch(0.15, 0.04, 0.1, 0.002)] * 2},
            ),
        ],
        "alternating.png": [
            Row(
                "2 callers x 40 jobs alternating diag/embed (s)",
                0.29,
                "the same jobs grouped by mode",
                0.3,
                "s",
                limit=1.3,
                extra={"alternating_s": [0.44, 0.29], "grouped_s": [0.3, 0.31], "switches_alternating": 1},
            ),
        ],
        "batching.png": [
            Row(
                embed,
                264.0,
                "unbatched",
                82.0,
                "jobs/s",
                limit=5.0,
                higher_is_better=True,
                extra={"count": 32, "jobs": 2000, "largest": 64, "direct_64": 314.0, "direct_1": 95.0},
            ),
            Row(embed, 264.0, "the model called directly, batches of 64", 314.0, "jobs/s", limit=0.7),
        ],
        "door.png": [
            Row("HTTP over TCP, 1 client sequential: p50 (ms)", 14.5, "the naive FastAPI server, p50", 11.0, "ms"),
            Row("HTTP over TCP, 1 client sequential: p99 (ms)", 23.8, "the naive FastAPI server, p99", 16.3, "ms"),
            Row(load, 229.0, "the model directly, batches of 64", 296.0, "req/s", limit=0.85),
            Row(load, 229.0, "the same through 32 ZeroMQ Clients", 252.0, "req/s", limit=0.9),
            Row(load, 229.0, "the naive FastAPI server, same load", 71.0, "req/s"),
        ],
    }


def _results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: list[Row]) -> Path:
    path = tmp_path / "results.json"
    monkeypatch.setattr(report, "RESULTS", path)
    report.write(rows, 1.0, ["synthetic"])
    return path


def test_every_chart_is_one_readable_png(tmp_path, monkeypatch, capsys):
    every = [row for rows in _rows().values() for row in rows]
    written = charts.draw_all(_results(tmp_path, monkeypatch, every), tmp_path / "img")
    assert sorted(p.name for p in written) == sorted(charts.CHARTS)
    assert "skipped" not in capsys.readouterr().out
    for path in written:
        assert path.read_bytes()[:8] == PNG_SIGNATURE, path
        assert path.stat().st_size < 120_000, f"{path.name}: {path.stat().st_size} bytes, too heavy for the docs"
        height, width, _ = matplotlib.image.imread(path).shape
        assert width == charts.WIDTH * charts.DPI and 300 <= height <= 900, (path.name, width, height)


def test_the_same_figures_draw_the_same_bytes(tmp_path, monkeypatch):
    """No date or version in the PNG: a redraw leaves git nothing to commit."""
    results = _results(tmp_path, monkeypatch, _rows()["door.png"])
    first = charts.draw_all(results, tmp_path / "a")
    second = charts.draw_all(results, tmp_path / "b")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_a_chart_without_its_rows_is_skipped_and_says_what_to_run(tmp_path, monkeypatch, capsys):
    failed = report.failed_row("door", RuntimeError("the naive server never answered"))
    results = _results(tmp_path, monkeypatch, [*_rows()["roundtrip.png"], failed])
    written = charts.draw_all(results, tmp_path / "img")
    assert [p.name for p in written] == ["roundtrip.png"]
    out = capsys.readouterr().out
    for name in set(charts.CHARTS) - {"roundtrip.png"}:
        assert re.search(rf"chart {re.escape(name)} skipped: .*python -m bench \w+", out), out
    assert "python -m bench door" in out  # a failed row has no figures: it is no row for the chart
    assert not (tmp_path / "img" / "door.png").exists()


def test_the_docs_show_every_committed_chart():
    text = (DOCS / "performance.md").read_text()
    shown = set(re.findall(r"\]\((img/bench/[^)\s]+\.png)\)", text))
    committed = {str(p.relative_to(DOCS)) for p in (DOCS / "img" / "bench").glob("*.png")}
    assert committed, "no chart committed under docs/img/bench"
    assert shown == committed, f"not shown: {sorted(committed - shown)}; shown but absent: {sorted(shown - committed)}"
    assert committed == {f"img/bench/{name}" for name in charts.CHARTS}
