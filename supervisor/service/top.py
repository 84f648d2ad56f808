"""``gpuvisor top``: the status page's picture (``supervisor.service.glance``)
drawn in a terminal, for whoever reaches the daemon over SSH and not its
HTTP door; refreshed in place, or one frame when asked or piped.

``render`` is the whole of the drawing and reads nothing but the picture,
so the tests draw hand-made pictures without a daemon; ``run`` only asks
the daemon and hands the answer to it. Every name in a frame (modes,
devices, errors) comes from the configuration or a worker and goes in as
``Text``, never as rich markup: a mode called ``[red]x`` is shown as
written.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from supervisor.service import output
from supervisor.service.glance import PHASES
from supervisor.service.output import bytes_text as size
from supervisor.service.progress import seconds_text as seconds

if TYPE_CHECKING:
    from supervisor.client import Client

BLOCKS = "▁▂▃▄▅▆▇█"
MIN_SPREAD = 0.05  # of the highest value: what a sparkline's full height stands for, at least
SWITCHES_SHOWN = 5
ERRORS_SHOWN = 5
# The columns that give way (wrap) when the terminal is narrow; the others keep their width.
WRAPPED = ("PHASES, ERROR", "ERROR", "REASON", "BROKEN", "RSS", "VRAM", "GPU")
PHASE_BAR = 12  # cells of the longest switch shown; the others in proportion
PHASE_STYLE = {"stop": "red", "reclaim": "yellow", "spawn": "blue", "load": "green", "warmup": "magenta"}
PLAIN_WIDTH = 132  # a frame in a pipe: a wide terminal's; rich would take 80, too few for the switches
MEMORY = (("RSS", 1), ("VRAM", 2), ("GPU used", 3))  # a memory point is [t, rss, vram, gpu_used]


def sparkline(values: Sequence[float | None], width: int) -> str:
    """``values`` as at most ``width`` blocks from ``▁`` (the lowest) up to
    ``█``, a missing one a space. A spread under a twentieth of the highest
    value is drawn as that twentieth: a worker's steady memory reads flat,
    not as noise stretched to full height. More values than cells: each
    cell the highest of its share, so a peak is never averaged away."""
    if width <= 0 or not values:
        return ""
    if len(values) > width:
        cells: list[float | None] = []
        for i in range(width):
            share = [v for v in values[i * len(values) // width : (i + 1) * len(values) // width] if v is not None]
            cells.append(max(share) if share else None)
    else:
        cells = list(values)
    known = [v for v in cells if v is not None]
    if not known:
        return " " * len(cells)
    low, high = min(known), max(known)
    spread = max(high - low, abs(high) * MIN_SPREAD)
    top = len(BLOCKS) - 1
    return "".join(" " if v is None else BLOCKS[round((v - low) / spread * top) if spread else 0] for v in cells)


def render(picture: Mapping[str, Any], width: int = PLAIN_WIDTH) -> RenderableType:
    """One frame: the header, then devices, queue, switches, memory, broken
    modes and errors, each left out while it has nothing to say. ``width``:
    the console's, which the memory lines fill."""
    parts: list[RenderableType] = [_header(picture), _devices(picture.get("devices") or [])]
    waiting = picture.get("waiting") or {}
    if waiting:
        parts.append(_queue(waiting))
    switches = picture.get("switches") or []
    if switches:
        parts.append(_switches(switches[:SWITCHES_SHOWN], picture.get("at")))
    memory = picture.get("memory") or {}
    if memory:
        parts.append(_memory(memory, max(10, width - 52)))
    broken = picture.get("broken_modes") or {}
    if broken:
        parts.append(_broken(broken))
    errors = picture.get("errors") or []
    if errors:
        parts.append(_errors(errors[:ERRORS_SHOWN]))
    spaced: list[RenderableType] = []
    for part in parts:
        spaced += [Text(), part] if spaced else [part]
    return Group(*spaced)


def run(client: Client, args: argparse.Namespace) -> int:
    """``gpuvisor top``: the picture as JSON with ``--json``; one frame with
    ``--once`` or when stdout is not a terminal; else a frame every
    ``--interval`` seconds until Ctrl-C. A daemon that goes away ends it
    with the error every command gives (raised to the CLI), the last frame
    left on the screen."""
    try:
        if args.json:
            output.show(args, client.glance())
            return 0
        console = Console(highlight=False)
        if not console.is_terminal and not os.environ.get("COLUMNS"):
            console = Console(highlight=False, width=PLAIN_WIDTH)
        if args.once or not console.is_terminal:
            console.print(render(client.glance(), console.width))
            return 0
        _watch(client, console, args.interval)
    except KeyboardInterrupt:  # how a view is left: no traceback, no error
        pass
    return 0


def _watch(client: Client, console: Console, interval: float) -> None:
    from rich.live import Live

    with Live(console=console, auto_refresh=False, screen=False) as live:
        while True:
            due = time.monotonic() + interval
            live.update(render(client.glance(), console.width), refresh=True)
            time.sleep(max(0.0, due - time.monotonic()))


# ------------------------------------------------------------ the parts


def _header(p: Mapping[str, Any]) -> Text:
    state = str(p.get("state") or "-")
    line = Text("gpuvisor ", style="bold")
    line.append(state, style="green" if state == "running" else "bold red")
    if p.get("failed_reason"):
        line.append(f" ({p['failed_reason']})", style="red")
    line.append(f"  config {p.get('config') or '-'}  daemon time {_clock(p.get('at'))}")
    line.append(
        f"\nmodes {', '.join(map(str, p.get('modes') or [])) or '-'}  queued {p.get('queued', 0)}"
        f"  restarts {p.get('restarts', 0)}  jobs done {p.get('jobs_done', 0)}"
    )
    return line


def _table(title: str, *columns: str) -> Table:
    table = Table(title=Text(title, style="bold"), title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False, padding=(0, 1, 0, 0))  # fmt: skip
    for name in columns:
        table.add_column(name, no_wrap=name not in WRAPPED, min_width=len(name))  # a header whole, at least
    return table


def _devices(devices: Sequence[Mapping[str, Any]]) -> Table:
    table = _table("devices", "DEVICE", "MODE", "WORKER", "PID", "RUNNING", "DONE", "RESTARTS", "RSS", "VRAM", "GPU",
                   "BROKEN")  # fmt: skip
    for d in devices:
        mode = str(d.get("mode") or "-")
        if d.get("switching_to"):
            mode += f" → {d['switching_to']}"
        if d.get("idle_unloaded"):
            mode = f"- ({d['idle_unloaded']} unloaded, idle)"
        worker = str(d.get("worker_state") or "-") + (" +standby" if d.get("standby_ready") else "")
        cells = [str(d.get("name")), mode, worker, _or_dash(d.get("worker_pid")), str(d.get("in_flight", 0)),
                 str(d.get("jobs_done", 0)), str(d.get("restarts", 0)), _bytes(d.get("rss_bytes")),
                 _bytes(d.get("vram_bytes")), _gpu(d), ", ".join(map(str, d.get("broken") or {})) or "-"]  # fmt: skip
        row = [Text(cell) for cell in cells]
        if d.get("failed_reason"):
            row[2].stylize("red")
        if d.get("broken"):
            row[-1].stylize("red")
        table.add_row(*row)
    return table


def _queue(waiting: Mapping[str, Any]) -> Table:
    table = _table("queue", "MODE", "JOBS", "OLDEST")
    for mode, w in waiting.items():
        table.add_row(Text(str(mode)), Text(str(w.get("jobs", 0))), Text(seconds(w.get("oldest_s"))))
    return table


def _switches(switches: Sequence[Mapping[str, Any]], at: Any) -> Table:
    table = _table("last switches", "STARTED", "DEVICE", "MODE ← FROM", "WHY", "OUTCOME", "TOTAL", "PHASES, ERROR")
    longest = max((float(sw.get("seconds") or 0.0) for sw in switches), default=0.0)
    for sw in switches:
        outcome, total = str(sw.get("outcome")), sw.get("seconds")
        if outcome == "under way":
            outcome = f"under way: {sw.get('phase')}"
            total = at - sw["started"] if isinstance(at, (int, float)) and sw.get("started") is not None else None
        style = {"ready": "green", "failed": "red"}.get(str(sw.get("outcome")), "yellow")
        phases = _phases(sw.get("phases") or {}, longest)
        if sw.get("error"):  # a failed switch has no phase times: its error, where they would be
            phases = Text(str(sw["error"]), style="red")
        table.add_row(
            Text(_clock(sw.get("started"))),
            Text(str(sw.get("device"))),
            Text(f"{sw.get('mode')} ← {sw.get('previous') or '-'}"),
            Text(str(sw.get("why"))),
            Text(outcome, style=style),
            Text(seconds(total)),
            phases,
        )
    return table


def _phases(phases: Mapping[str, Any], longest: float) -> Text:
    """``███████ spawn 0.10 · load 0.00 s``: a bar of the phases in their
    order, coloured each, as long as the switch beside the longest shown;
    then each phase's seconds, which a pipe's plain text keeps."""
    text = Text()
    for name in PHASES:
        if phases.get(name) is not None and longest > 0:
            text.append("█" * round(float(phases[name]) / longest * PHASE_BAR), style=PHASE_STYLE[name])
    said = " · ".join(f"{name} {float(phases[name]):.2f}" for name in PHASES if phases.get(name) is not None)
    text.append((" " if text else "") + (f"{said} s" if said else "-"))
    return text


def _memory(memory: Mapping[str, Sequence[Sequence[Any]]], width: int) -> Table:
    span = [p[0] for points in memory.values() for p in points if p and isinstance(p[0], (int, float))]
    minutes = (max(span) - min(span)) / 60 if span else 0.0
    table = _table(f"memory, the last {minutes:.0f} min" if minutes >= 1 else "memory", "DEVICE", "", "OVER TIME",
                   "NOW", "LOWEST", "HIGHEST")  # fmt: skip
    for device, points in memory.items():
        shown = False
        for what, index in MEMORY:
            values = [p[index] if len(p) > index else None for p in points]
            known = [v for v in values if v is not None]
            if not known and (what != "RSS" or shown):
                continue  # no VRAM on a CPU device, no NVML figure: no line
            now = values[-1] if values else None
            lowest, highest = (min(known), max(known)) if known else (None, None)
            table.add_row(Text("" if shown else str(device)), Text(what), Text(sparkline(values, width), style="cyan"),
                          *(Text(_bytes(n)) for n in (now, lowest, highest)))  # fmt: skip
            shown = True
    return table


def _broken(broken: Mapping[str, Any]) -> Table:
    table = _table("broken modes", "MODE", "TRIED AGAIN", "REASON")
    for mode, entry in broken.items():
        entry = entry if isinstance(entry, Mapping) else {"reason": entry}
        retry = entry.get("retry_in_s")
        when = f"in {seconds(retry)}" if retry is not None else "by an operator's switch or restart"
        table.add_row(Text(str(mode), style="red"), Text(when), Text(str(entry.get("reason") or "-")))
    return table


def _errors(errors: Sequence[Mapping[str, Any]]) -> Table:
    table = _table("last errors", "WHEN", "DEVICE", "MODE", "ERROR")
    for e in errors:
        table.add_row(*map(Text, (_clock(e.get("t")), _or_dash(e.get("device")), _or_dash(e.get("mode")))),
                      Text(str(e.get("what")), style="red"))  # fmt: skip
    return table


# ------------------------------------------------------------ values


def _clock(t: Any) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else "-"


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _bytes(n: Any) -> str:
    return size(n) if isinstance(n, (int, float)) else "-"


def _gpu(d: Mapping[str, Any]) -> str:
    used, total = d.get("gpu_used_bytes"), d.get("gpu_total_bytes")
    if used is None and total is None:
        return "-"
    used_text, total_text = _bytes(used), _bytes(total)
    if used_text.split()[-1] == total_text.split()[-1]:  # one unit, said once: 3.0 / 80.0 GiB
        used_text = used_text.split()[0]
    return f"{used_text} / {total_text}"
