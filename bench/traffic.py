"""A service's traffic: several callers, two modes, small jobs.

* **Alternating modes.** 2 callers each submit 40 jobs alternating ``diag``
  (echo) and ``embed`` (one sentence), at once, then wait for all; against
  the same 80 jobs grouped by mode (40 diag, then 40 embed) from one caller.
  Both start from diag loaded with the spare ready. Goal: <= 1.3 x. A strict
  FIFO pays a switch for nearly every job (30 to 40 x when measured). Best
  of ``ROUNDS`` interleaved runs of each.
* **Batched embedding.** 8 concurrent callers each submit 250 one-sentence
  ``embed`` jobs at once (a service's clients firing requests), against the
  same with the embed handler's batching turned off in the config
  (``batch = { embed = { max_batch = 1 } }``): throughput ratio, goal >= 5 x;
  and against calling the model directly in one process with batches of 64
  (the fastest any caller could do by hand): goal >= 0.7 x. The model
  called directly one sentence at a time is printed too: 64 at a time
  against one at a time is the most batching can give on this machine.
  Each the best of ``ROUNDS`` interleaved runs: one sentence at a time,
  torch's two threads wait for each other whenever another program takes
  a core (13 against 90 sentences/s measured), so a single run on a shared
  machine can be off by several times.
* **The starvation bound.** One caller keeps ``diag`` busy (4 jobs of 10 ms
  always waiting) while another sends one ``embed`` job at a time, pausing
  0.5 s between them; it stops first, so each of its jobs meets the load.
  The longest any job waited (submit to result) against ``max_wait_s`` + a
  warm switch to embed (the spare ready) + the first embed job after it,
  twice (the job ahead, and its own run), each measured alone. Swept over ``max_wait_s``
  to pick its default: a shorter bound switches more often, which costs the
  busy mode throughput (printed beside each, against diag's throughput with
  no embed caller).
  The note gives the switches to embed the load made (from the log: a
  switch the queue makes answers no caller), the slowest, and how many took
  over a second (a spare still importing, or none).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import subprocess
import threading
import time
from concurrent.futures import Future

from bench import lifecycle
from bench.common import child, config, run_callers
from bench.report import Row, progress
from supervisor import Supervisor

ALTERNATING_JOBS = 40  # per caller
CALLERS = 8
EMBED_JOBS = 250  # per caller
DIRECT_BATCH = 64
MIXED_SECONDS = 12.0
RARE_PAUSE = 0.5  # the rare caller's pause between one embed job's result and the next
MAX_WAITS = (0.5, 1.0, 2.0, 3.0, 5.0)
ROUNDS = 2  # interleaved repetitions of the alternating and the embedding runs; the best counts
DIRECT_ONE_SENTENCES = 500  # the one-at-a-time direct run: a rate, and 2,000 take a minute
SENTENCE = "the supervisor keeps GPU work in a child process it can kill"


def _job(n: int) -> tuple[str, object, str]:
    """The n-th job of the alternating load: (task, payload, mode)."""
    if n % 2:
        return "embed", {"texts": [f"{SENTENCE} ({n})"]}, "embed"
    return "echo", n, "diag"


def _ready(sup: Supervisor) -> None:
    """diag loaded and the spare done importing: the same start for every run."""
    sup.switch_mode("diag").result(600)
    lifecycle.wait_ready(sup)


def alternating() -> tuple[float, int]:
    """(seconds, switches) for 2 callers x 40 jobs alternating modes."""
    with Supervisor(config(max_queue=100_000)) as sup:
        _ready(sup)
        gen = sup.status()["generation"]

        def caller() -> list[Future]:
            return [sup.submit(task, payload, mode=mode) for task, payload, mode in map(_job, range(ALTERNATING_JOBS))]

        seconds, results = run_callers([caller, caller])
        assert len(results) == 2 * ALTERNATING_JOBS
        return seconds, sup.status()["generation"] - gen


def grouped() -> tuple[float, int]:
    """The same 80 jobs from one caller, 40 diag then 40 embed."""
    jobs = [_job(n) for _ in range(2) for n in range(ALTERNATING_JOBS)]
    jobs.sort(key=lambda job: job[2] != "diag")
    with Supervisor(config(max_queue=100_000)) as sup:
        _ready(sup)
        gen = sup.status()["generation"]
        t0 = time.perf_counter()
        futures = [sup.submit(task, payload, mode=mode) for task, payload, mode in jobs]
        for f in futures:
            f.result(600)
        return time.perf_counter() - t0, sup.status()["generation"] - gen


def _embed_config(batching: bool):
    base = config(max_queue=100_000)
    if batching:
        return base
    spec = base.modes["embed"]
    modes = {**base.modes, "embed": dataclasses.replace(spec, batch={"embed": {"max_batch": 1}})}
    return dataclasses.replace(base, modes=modes)


def embedding(batching: bool) -> tuple[float, dict]:
    """(jobs/s, the status' batch figures) for 8 callers x 250 sentences."""
    with Supervisor(_embed_config(batching)) as sup:
        sup.switch_mode("embed").result(600)
        sup.submit("embed", {"texts": ["warm"]}).result(60)

        def caller(c: int) -> list[Future]:
            return [sup.submit("embed", {"texts": [f"{SENTENCE} ({c}, {n})"]}) for n in range(EMBED_JOBS)]

        seconds, vectors = run_callers([functools.partial(caller, c) for c in range(CALLERS)])
        assert len(vectors) == CALLERS * EMBED_JOBS
        return len(vectors) / seconds, dict(sup.status()["batches"])


_DIRECT = """
import json, sys, time
import worker.modes.embed as e
texts, size = json.loads(sys.stdin.read()), int(sys.argv[1])
embed = e.load(device="cpu")["embed"]
call = (lambda p: embed([p])[0]) if hasattr(embed, "gpuvisor_batch") else embed
call({"texts": texts[:size]})
t = time.perf_counter()
for i in range(0, len(texts), size):
    call({"texts": texts[i:i + size]})
print(json.dumps(len(texts) / (time.perf_counter() - t)))
"""


def direct(size: int = DIRECT_BATCH, count: int = CALLERS * EMBED_JOBS) -> float:
    """Sentences/s calling the model in one warm process, ``size`` at a time."""
    texts = [f"{SENTENCE} ({c}, {n})" for c in range(CALLERS) for n in range(EMBED_JOBS)][:count]
    with child(_DIRECT, str(size), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        out, _ = proc.communicate(json.dumps(texts), timeout=600)
    return json.loads(out.strip().splitlines()[-1])


class _Switches(logging.Handler):
    """The switches the loop makes while attached: (mode, seconds), read from
    its "mode ... ready in" log line (a switch the queue makes answers no
    caller, and the status shows only the one under way)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[tuple[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if str(record.msg).startswith("mode %r ready in") and len(args) >= 2 and isinstance(args[1], float):
            self.seen.append((str(args[0]), args[1]))

    def __enter__(self) -> _Switches:
        self._log = logging.getLogger("gpuvisor")
        self._before = (self._log.level, self._log.propagate)
        self._log.setLevel(logging.INFO)
        self._log.propagate = False  # INFO lines would reach the root logger's handler
        self._log.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self._log.removeHandler(self)
        self._log.setLevel(self._before[0])
        self._log.propagate = self._before[1]


def mixed(max_wait: float, rare_caller: bool = True) -> dict:
    """The starvation load under ``max_wait``: the longest wait of each
    mode's jobs, diag's throughput, the switches made. Without
    ``rare_caller``: diag alone (the busy mode's throughput baseline)."""
    with Supervisor(config(max_wait_s=max_wait, max_queue=100_000)) as sup, _Switches() as switches:
        _ready(sup)
        switches.seen.clear()
        stop_busy, stop_rare = threading.Event(), threading.Event()
        waits: dict[str, list[float]] = {"diag": [], "embed": []}
        lock = threading.Lock()

        def timed(task: str, payload, mode: str) -> Future:
            t = time.perf_counter()
            future = sup.submit(task, payload, mode=mode)

            def done(_):
                with lock:
                    waits[mode].append(time.perf_counter() - t)

            future.add_done_callback(done)
            return future

        def busy() -> None:
            window: list[Future] = []
            while not stop_busy.is_set():
                window.append(timed("sleep", {"seconds": 0.01}, "diag"))
                if len(window) >= 4:
                    window.pop(0).result(600)
            for f in window:
                f.result(600)

        def rare() -> None:
            n = 0
            while not stop_rare.is_set():
                timed("embed", {"texts": [f"{SENTENCE} ({n})"]}, "embed").result(600)
                n += 1
                stop_rare.wait(RARE_PAUSE)

        # The rare caller stops first, and diag stays busy until its last job
        # is done: every embed job meets the load (with diag gone, the queue
        # would switch at once, spare ready or not).
        rarely, busily = threading.Thread(target=rare), threading.Thread(target=busy)
        t0 = time.perf_counter()
        busily.start()
        if rare_caller:
            rarely.start()
        time.sleep(MIXED_SECONDS)
        stop_rare.set()
        if rare_caller:
            rarely.join()
        stop_busy.set()
        seconds = time.perf_counter() - t0
        busily.join()
    to_embed = [took for mode, took in switches.seen if mode == "embed"]
    return {
        "max_wait": max_wait,
        "longest_diag": max(waits["diag"]),
        "longest_embed": max(waits["embed"], default=0.0),
        "diag_jobs_per_s": len(waits["diag"]) / seconds,
        "embed_jobs": len(waits["embed"]),
        "switches": len(switches.seen),
        "switches_to_embed": to_embed,
    }


def _switch_and_job() -> tuple[float, float]:
    """A warm switch diag -> embed (the spare ready) and the first job after
    it (one sentence: the job the rare caller meets), each alone; the least
    disturbed of ``ROUNDS + 1`` fresh supervisors."""
    switches, jobs = [], []
    for _ in range(ROUNDS + 1):
        with Supervisor(config()) as sup:
            _ready(sup)
            t = time.perf_counter()
            sup.switch_mode("embed").result(600)
            switches.append(time.perf_counter() - t)
            t = time.perf_counter()
            sup.submit("embed", {"texts": [SENTENCE]}).result(60)
            jobs.append(time.perf_counter() - t)
    return min(switches), max(min(jobs), 0.01)


def alternating_rows() -> list[Row]:
    rows = []
    progress(f"traffic: 2 callers x 40 jobs alternating diag and embed, {ROUNDS} rounds ...")
    alt, grp = [], []
    for _ in range(ROUNDS):
        alt.append(alternating())
        grp.append(grouped())
    (alt_s, alt_switches), (grouped_s, grouped_switches) = min(alt), min(grp)  # the least disturbed runs
    note = (
        f"switches: {alt_switches} alternating, {grouped_switches} grouped; best of {ROUNDS}: "
        f"{', '.join(f'{a:.3f}' for a, _ in alt)} s against {', '.join(f'{g:.3f}' for g, _ in grp)} s"
    )
    title = "2 callers x 40 jobs alternating diag/embed (s)"
    extra = {
        "alternating_s": [a for a, _ in alt],
        "grouped_s": [g for g, _ in grp],
        "switches_alternating": alt_switches,
        "switches_grouped": grouped_switches,
    }
    rows.append(Row(title, alt_s, "the same jobs grouped by mode", grouped_s, "s", limit=1.3, note=note, extra=extra))

    return rows


def batching_rows() -> list[Row]:
    rows = []
    progress(f"traffic: 8 callers x 250 one-sentence embed jobs, batched and not, {ROUNDS} rounds ...")
    runs: dict[str, list] = {"batched": [], "unbatched": [], "direct_64": [], "direct_1": []}
    for _ in range(ROUNDS):
        runs["batched"].append(embedding(True))
        runs["unbatched"].append(embedding(False)[0])
        runs["direct_64"].append(direct())
        runs["direct_1"].append(direct(1, DIRECT_ONE_SENTENCES))
    batched, batches = max(runs["batched"], key=lambda r: r[0])
    unbatched, by_hand, one_by_one = max(runs["unbatched"]), max(runs["direct_64"]), max(runs["direct_1"])
    each = {name: [r[0] if isinstance(r, tuple) else r for r in rs] for name, rs in runs.items()}
    mean = batches["jobs"] / batches["count"] if batches["count"] else 0.0
    each_run = "; ".join(f"{name} {', '.join(f'{x:.0f}' for x in xs)}" for name, xs in each.items())
    note = (
        f"{batches['count']} batches, mean {mean:.1f} jobs, largest {batches['largest']}; the most batching "
        f"can give here: the model directly, 64 at a time vs one, {by_hand / one_by_one:.2f}x "
        f"({by_hand:.0f} vs {one_by_one:.1f}/s); best of {ROUNDS}, each (jobs/s): {each_run}"
    )
    extra = {**batches, "direct_64": by_hand, "direct_1": one_by_one, "each": each}
    title = "8 callers x 250 embed, batched (jobs/s)"
    rows.append(
        Row(title, batched, "unbatched", unbatched, "jobs/s", limit=5.0, higher_is_better=True, note=note, extra=extra)
    )
    model_direct = "the model called directly, batches of 64"
    rows.append(Row(title, batched, model_direct, by_hand, "jobs/s", limit=0.7, higher_is_better=True))

    return rows


def starvation_rows() -> list[Row]:
    rows = []
    progress("traffic: the starvation bound, max_wait_s swept ...")
    switch, job = _switch_and_job()
    default = config().max_wait_s
    alone = mixed(default, rare_caller=False)["diag_jobs_per_s"]
    sweep = {w: mixed(w) for w in sorted({*MAX_WAITS, default})}
    for w, m in sweep.items():
        longest = max(m["longest_diag"], m["longest_embed"])
        to_embed = m["switches_to_embed"]
        slow = sum(took > 1.0 for took in to_embed)
        # A wait here runs from submit to result, so it holds the job's own run
        # too: the bound is max_wait_s + a switch + the job ahead + its own.
        as_came = w + max(to_embed, default=switch) + 2 * job
        met = "met" if m["longest_embed"] <= as_came else "missed"
        note = (
            f"diag {m['longest_diag']:.2f}s, embed {m['longest_embed']:.2f}s longest; "
            f"diag {m['diag_jobs_per_s']:.0f} jobs/s ({m['diag_jobs_per_s'] / alone:.2f}x of {alone:.0f} alone), "
            f"{m['embed_jobs']} embed jobs, {m['switches']} switches; to embed: "
            f"{', '.join(f'{x:.2f}' for x in to_embed)} s, {slow} over 1 s (a warm one: {switch:.2f} s); "
            f"with the slowest switch seen the bound is {as_came:.2f} s: {met} for embed"
            + (" (the default)" if w == default else "")
        )
        extra = {**m, "diag_alone_jobs_per_s": alone, "warm_switch": switch, "job": job}
        title = f"mixed load, max_wait_s={w:g}: longest wait (s)"
        bound = "max_wait_s + a switch + a job (+ its own)"
        rows.append(Row(title, longest, bound, w + switch + 2 * job, "s", limit=1.0, note=note, extra=extra))
    return rows


def run() -> list[Row]:
    return alternating_rows() + batching_rows() + starvation_rows()
