"""One supervisor's Prometheus metrics, in a registry of its own.

An operator sees a restart loop or a thrashing queue here, not only in the
log. Two kinds of figures, kept apart on purpose:

* **Events** (a job ended, a job started after waiting, a switch, a batch)
  are counted and timed where they happen, on the core loop thread, into
  ``prometheus_client`` counters and histograms: a figure sampled at scrape
  time would miss what happened between scrapes.
* **State** (queue depth per mode, the worker's memory, restarts so far) is
  read from the published status when scraped: the status already owns
  those numbers, and a second copy could disagree with it.

Labels come from the configuration, never from what a caller sends: a
``mode`` is a configured mode, a ``task`` one its worker listed in READY,
and anything else is counted as ``other``. Five hundred made-up task names
sent by one client would otherwise add twelve thousand series to every
scrape.

Each supervisor has its own ``CollectorRegistry`` (not the global one), so
two in one process, as in tests, never collide. The exposition is the same
text through HTTP (``GET /metrics``) and through the ZeroMQ protocol
(``gpuvisor metrics``, for a node-exporter textfile collector).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

OTHER = "other"  # the label of a mode or task that is not known from the configuration and READY
# Jobs range from a no-op (~0.3 ms) to a long generation (minutes).
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# A switch: a warm one ~0.1 s, a cold import seconds, a large model's load minutes.
_SWITCH_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
# The phases of a switch, as its result names them: ``seconds`` is the whole.
SWITCH_PHASES = {
    "total": "seconds",
    "stop": "stop_seconds",
    "reclaim": "reclaim_seconds",
    "spawn": "spawn_seconds",
    "load": "load_seconds",
    "warmup": "warmup_seconds",
}


def outcome_of(future: Any) -> str:
    """A job's outcome label: ``ok``, ``cancelled``, or its error's code."""
    if future.cancelled():
        return "cancelled"
    error = future.exception()
    if error is None:
        return "ok"
    return str(getattr(error, "code", None) or type(error).__name__)


class Metrics:
    """The event figures of one supervisor (called on its loop thread), and
    its registry, which also reads the status at scrape time."""

    def __init__(
        self,
        status: Callable[[], Mapping[str, Any]],
        known: Callable[[], tuple[Collection[str], Mapping[str, Collection[str]]]] = lambda: ((), {}),
    ):
        """``known()``: the configured modes, and each mode's tasks as its
        worker listed them: the only label values there are."""
        self._known = known
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter(
            "gpuvisor_jobs",
            "Jobs ended, by mode, task and outcome (ok, cancelled or the error's code)",
            ["mode", "task", "outcome"],
            registry=r,
        )
        self.job_seconds = Histogram(
            "gpuvisor_job_duration_seconds",
            "From submit to the job's outcome",
            ["mode", "task"],
            buckets=_SECONDS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "gpuvisor_queue_wait_seconds",
            "From being queued to starting on a worker",
            ["mode"],
            buckets=_SECONDS,
            registry=r,
        )
        self.switches = Counter(
            "gpuvisor_switches",
            "Mode switches (a worker started for a mode), by outcome",
            ["mode", "outcome"],
            registry=r,
        )
        self.switch_seconds = Histogram(
            "gpuvisor_switch_duration_seconds",
            "Switches that loaded, by phase (total, stop, reclaim, spawn, load, warmup)",
            ["phase"],
            buckets=_SWITCH_SECONDS,
            registry=r,
        )
        self.reclaimed = Counter(
            "gpuvisor_reclaimed_bytes", "Device memory verified back after a worker was stopped", registry=r
        )
        self.batch_size = Histogram(
            "gpuvisor_batch_size",
            "Jobs per call of a batch handler",
            ["mode", "task"],
            buckets=_BATCH_SIZES,
            registry=r,
        )
        r.register(_StatusCollector(status))
        # The labelled series each event touches, by metric and label values:
        # ``labels()`` checks and locks on every call, and a job makes three.
        # Filled from whichever thread settles a job; a race only looks one up twice.
        self._series: dict[tuple[int, tuple[str, ...]], Any] = {}

    def _of(self, metric: Any, *values: str) -> Any:
        key = (id(metric), values)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = metric.labels(*values)
        return series

    # ------------------------------------------------------------ events

    def _labels(self, mode: str | None, task: str) -> tuple[str, str]:
        modes, tasks = self._known()
        if mode is None:  # a job that named none and never reached a worker: a task some mode has
            return "", task if any(task in listed for listed in tasks.values()) else OTHER
        if mode not in modes:
            return OTHER, OTHER
        return mode, task if task in tasks.get(mode, ()) else OTHER

    def job_ended(self, mode: str | None, task: str, outcome: str, seconds: float) -> None:
        mode_label, task_label = self._labels(mode, task)
        self._of(self.jobs, mode_label, task_label, outcome).inc()
        self._of(self.job_seconds, mode_label, task_label).observe(seconds)

    def job_started(self, mode: str | None, waited: float) -> None:
        self._of(self.queue_wait, self._labels(mode, "")[0]).observe(max(0.0, waited))

    def switched(self, mode: str, result: Mapping[str, Any]) -> None:
        self.switches.labels(mode, "loaded").inc()
        for phase, key in SWITCH_PHASES.items():
            value = result.get(key)
            if isinstance(value, (int, float)):
                self.switch_seconds.labels(phase).observe(value)
        reclaimed = result.get("reclaimed_bytes")
        if isinstance(reclaimed, int) and reclaimed > 0:
            self.reclaimed.inc(reclaimed)

    def switch_failed(self, mode: str) -> None:
        self.switches.labels(mode, "failed").inc()

    def batch(self, mode: str | None, task: str, size: int) -> None:
        self._of(self.batch_size, *self._labels(mode, task)).observe(size)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StatusCollector(Collector):
    """What the status owns, read when scraped."""

    def __init__(self, status: Callable[[], Mapping[str, Any]]):
        self._status = status

    def describe(self):
        return []  # read at scrape time only: nothing to check at registration

    def collect(self):
        s = self._status()
        devices = s.get("devices") or []
        state = GaugeMetricFamily("gpuvisor_state", "1 for the supervisor's state", labels=["state"])
        for name in ("not_started", "running", "draining", "failed", "stopped"):
            state.add_metric([name], 1.0 if s.get("state") == name else 0.0)
        yield state
        loaded = GaugeMetricFamily(
            "gpuvisor_mode_loaded", "1 for the mode each device's worker has loaded", labels=["device", "mode"]
        )
        for d in devices:
            if d.get("mode"):
                loaded.add_metric([d["name"], d["mode"]], 1.0)
        yield loaded
        depth = GaugeMetricFamily("gpuvisor_queue_depth", "Jobs waiting, by the mode they need", labels=["mode"])
        oldest = GaugeMetricFamily(
            "gpuvisor_queue_oldest_seconds", "How long the oldest job waiting for each mode has waited", labels=["mode"]
        )
        for mode, waiting in (s.get("waiting") or {}).items():
            depth.add_metric([mode or ""], float(waiting.get("jobs", 0)))
            oldest.add_metric([mode or ""], float(waiting.get("oldest_s", 0.0)))
        yield depth
        yield oldest
        broken = GaugeMetricFamily(
            "gpuvisor_mode_broken",
            "1 for each mode no device may run now (its breaker is open: it failed too often)",
            labels=["mode"],
        )
        for mode in s.get("broken_modes") or {}:
            broken.add_metric([mode], 1.0)
        yield broken
        yield _gauge("gpuvisor_queued", "Jobs and switches queued", [([], s.get("queued"))])
        yield _gauge(
            "gpuvisor_worker_generations",
            "Workers started so far, on every device",
            [([], s.get("generation"))],
            counter=True,
        )
        for name, text, key, counter, flag in _PER_DEVICE:
            values = [([d["name"]], (1.0 if d.get(key) else 0.0) if flag else d.get(key)) for d in devices]
            yield _gauge(name, text, values, labels=["device"], counter=counter)
        # What a worker's memory is measured against: a GPU's whole memory
        # (NVML; no sample for a CPU device) and the host's, for RSS.
        gpus = [([d["name"]], d.get("gpu") or {}) for d in devices]
        for name, key, text in _DEVICE_MEMORY:
            yield _gauge(name, text, [(labels, gpu.get(key)) for labels, gpu in gpus], labels=["device"])
        yield _gauge(
            "gpuvisor_host_memory_total_bytes", "The host's memory, for the workers' RSS", [([], _HOST_MEMORY)]
        )


# name, help, the device's status key, a counter (else a gauge), 1/0 for whether the key is set
_PER_DEVICE = (
    ("gpuvisor_in_flight", "Jobs handed to the device's worker", "in_flight", False, False),
    ("gpuvisor_worker_restarts", "Workers respawned after an unexpected death", "restarts", True, False),
    ("gpuvisor_oom_recycles", "Workers replaced after a job ran out of memory", "oom_recycles", True, False),
    ("gpuvisor_worker_rss_bytes", "The worker's host memory (RSS)", "worker_rss_bytes", False, False),
    ("gpuvisor_worker_vram_bytes", "The worker's device memory, through NVML", "worker_vram_bytes", False, False),
    ("gpuvisor_standby_ready", "1 while a warm standby has finished its imports", "standby_ready", False, True),
    ("gpuvisor_device_failed", "1 while the mode in force on the device is broken there", "failed_reason", False, True),
)


_DEVICE_MEMORY = (
    ("gpuvisor_device_memory_total_bytes", "total_bytes", "The device's total memory, through NVML (GPUs only)"),
    (
        "gpuvisor_device_memory_used_bytes",
        "used_bytes",
        "Memory in use on the whole device, every process's, through NVML",
    ),
)
_HOST_MEMORY = psutil.virtual_memory().total


def _gauge(
    name: str, text: str, values: list[tuple[list[str], Any]], labels: list[str] | None = None, counter: bool = False
) -> GaugeMetricFamily | CounterMetricFamily:
    """One family; samples whose value is unknown (None) are left out."""
    family_type = CounterMetricFamily if counter else GaugeMetricFamily
    family = family_type(name, text, labels=labels or [])
    for label_values, value in values:
        if isinstance(value, (int, float)):
            family.add_metric(label_values, float(value))
    return family
