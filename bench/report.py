"""One row format and one results file for every benchmark."""

from __future__ import annotations

import json
import platform
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results.json"


@dataclass
class Row:
    figure: str
    value: float
    baseline_name: str
    baseline: float
    unit: str
    goal: str = ""

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else float("nan")


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def machine() -> str:
    return f"{platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}"


def print_table(rows: list[Row]) -> None:
    print(f"\nmachine: {machine()}\n")
    header = f"{'figure':<44} {'value':>11} {'baseline':<34} {'base':>11} {'ratio':>7}  goal"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.figure:<44} {r.value:>9.3f}{r.unit:>2} {r.baseline_name:<34} {r.baseline:>9.3f}{r.unit:>2} {r.ratio:>7.2f}  {r.goal}"
        )


def write(rows: list[Row]) -> None:
    data = {"machine": machine(), "rows": [dict(asdict(r), ratio=r.ratio) for r in rows]}
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nwritten: {RESULTS}")
