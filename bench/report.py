"""One row format and one results file for every benchmark.

Every figure sits beside a baseline measured in the same run on the same
machine, because this machine is shared and absolute times are noise: the
ratio is what to read. A row may carry a goal, on one of three things:

* ``on="ratio"``: value / baseline against ``limit`` (e.g. <= 2x);
* ``on="value"``: the value itself against ``limit`` (e.g. <= 60 MB);
* ``on="excess"``: value - baseline against ``limit`` (e.g. <= floor + 0.3 s).

``higher_is_better`` turns "<=" into ">=" (throughput), so ``met`` is right.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

RESULTS = Path(__file__).resolve().parent / "results.json"
_T0 = time.monotonic()


@dataclass
class Row:
    figure: str
    value: float
    baseline_name: str
    baseline: float
    unit: str
    goal: str = ""  # shown as is; derived from limit/on when empty
    limit: float | None = None  # the goal's number; None: no goal
    on: str = "ratio"  # "ratio" | "value" | "excess"
    higher_is_better: bool = False
    note: str = ""  # one line printed under the row
    extra: dict[str, Any] = field(default_factory=dict)  # raw figures, for results.json only

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else float("nan")

    @property
    def measured(self) -> float:
        """What the goal is checked on."""
        return {"ratio": self.ratio, "value": self.value, "excess": self.value - self.baseline}[self.on]

    @property
    def met(self) -> bool | None:
        if self.limit is None:
            return None
        m = self.measured
        if math.isnan(m):
            return False
        return m >= self.limit if self.higher_is_better else m <= self.limit

    @property
    def goal_text(self) -> str:
        if self.goal or self.limit is None:
            return self.goal
        op = ">=" if self.higher_is_better else "<="
        if self.on == "ratio":
            return f"{op} {self.limit:g}x"
        if self.on == "value":
            return f"{op} {self.limit:,g} {self.unit.strip()}"
        return f"{op} base + {self.limit:g}{self.unit.strip()}"


def failed_row(name: str, error: BaseException) -> Row:
    """A benchmark that raised: one row that says so, and the run goes on."""
    return Row(
        f"{name}: FAILED",
        float("nan"),
        "-",
        float("nan"),
        "",
        goal="runs",
        limit=0.0,
        on="value",
        note=f"{type(error).__name__}: {error}",
    )


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def progress(message: str) -> None:
    """A progress line, with the seconds since the bench started."""
    print(f"  [{time.monotonic() - _T0:6.1f}s] {message}", flush=True)


def fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    a = abs(x)
    if a >= 10_000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.3f}"
    return f"{x:.4f}"


def machine() -> str:
    return (
        f"{platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"Python {platform.python_version()}, load average {', '.join(f'{x:.2f}' for x in psutil.getloadavg())}"
    )


def print_table(rows: list[Row], file: Any = None) -> None:
    out = file or sys.stdout
    print(f"\nmachine: {machine()}\n", file=out)
    fw = max([44] + [len(r.figure) for r in rows])
    bw = max([34] + [len(r.baseline_name) for r in rows])
    header = f"{'figure':<{fw}} {'value':>16} {'baseline':<{bw}} {'base':>16} {'ratio':>7}  {'goal':<18} met"
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in rows:
        met = {None: "", True: "yes", False: "NO"}[r.met]
        value = f"{fmt(r.value)} {r.unit.strip()}"
        base = f"{fmt(r.baseline)} {r.unit.strip()}"
        ratio = "n/a" if math.isnan(r.ratio) else f"{r.ratio:.2f}"
        print(
            f"{r.figure:<{fw}} {value:>16} {r.baseline_name:<{bw}} {base:>16} {ratio:>7}  {r.goal_text:<18} {met}",
            file=out,
        )
        if r.note:
            print(f"{'':4}- {r.note}", file=out)
    goals = [r for r in rows if r.met is not None]
    print(f"\ngoals met: {sum(bool(r.met) for r in goals)} of {len(goals)}", file=out)


def write(rows: list[Row], seconds: float | None = None, benchmarks: list[str] | None = None) -> None:
    """results.json holds the last run, whole or partial (``benchmarks`` says which)."""
    data = {
        "machine": machine(),
        "benchmarks": benchmarks,
        "seconds": seconds,
        "rows": [dict(asdict(r), ratio=r.ratio, goal=r.goal_text, measured=r.measured, met=r.met) for r in rows],
    }
    RESULTS.write_text(json.dumps(_clean(data), indent=2, allow_nan=False, default=str) + "\n")
    print(f"\nwritten: {RESULTS}")


def _clean(x: Any) -> Any:
    """NaN and infinities are not JSON: write null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x
