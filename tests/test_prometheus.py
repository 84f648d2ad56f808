"""contrib/prometheus and contrib/grafana, checked by Prometheus itself.

The files are read as their users' tools read them: ``promtool check
rules``, ``promtool test rules`` (the rules' own unit tests: series that fire
each alert and series that must not), ``promtool check config`` on the
example ``prometheus.yml`` (its token file moved to a temporary one).

Then the real thing: one ``gpuvisor serve`` with an HTTP listener on a
loopback port and a bearer token, one Debian ``prometheus`` scraping it
every second through a copy of the example ``prometheus.yml`` (the rules
loaded, the token from a ``credentials_file``), and work that makes every
figure move: jobs that end ok and that fail, batches, a worker killed by its
job (a restart), switches between two modes, a mode whose loader fails until
it is broken, jobs left waiting behind a long one. Then every panel query of
the dashboard (Grafana's variables replaced by values PromQL takes) and
every alert's expression go to Prometheus's ``/api/v1/query``: each must
succeed and return data. An alert's expression is empty while it does not
fire, so it is queried with its comparisons against a number removed
(``gpuvisor_queue_oldest_seconds > 120`` is queried as
``gpuvisor_queue_oldest_seconds``): the series the alert watches must be
there, whether or not it fires. The only series allowed to be missing is
the worker's VRAM on a machine with no GPU, where the daemon exports none.

Without Debian's ``prometheus`` and ``promtool`` these tests skip, saying so."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from supervisor.metrics import Metrics
from tests.helpers import ROOT, T, wait_until
from tests.helpers.config import DIAG, config_text, secret_file
from tests.helpers.daemon import RunningDaemon, free_port

PROMETHEUS_DIR = ROOT / "contrib" / "prometheus"
RULES = PROMETHEUS_DIR / "gpuvisor.rules.yml"
RULES_TEST = PROMETHEUS_DIR / "gpuvisor.rules.test.yml"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "gpuvisor.json"

NOT_INSTALLED = "Debian's prometheus is not installed: make test installs it with apt-get as root"
TOKEN = "a-token-for-the-prometheus-scrape"

# What Grafana puts in a panel's query before Prometheus sees it, as values PromQL takes:
# a window for the rates, and "every value" for the dashboard's variables (their allValue).
GRAFANA_VALUES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$instance": ".*",
    "$mode": ".*",
    "$device": ".*",
}
# Without a GPU the daemon exports no VRAM figures (they would be a lie): a query of them alone may be empty.
ABSENT_WITHOUT_GPU = {
    "gpuvisor_worker_vram_bytes",
    "gpuvisor_device_memory_total_bytes",
    "gpuvisor_device_memory_used_bytes",
}
# A comparison against a number, wherever it stands in an expression: what stops an alert's series
# from showing while it does not fire. A label matcher (`state="failed"`, `outcome!="ok"`) compares
# with a quoted string, never a bare number, so it is left alone.
COMPARISON = re.compile(r"\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?-?\d[\d.eE+-]*")
METRIC_NAME = re.compile(r"\bgpuvisor_[a-z0-9_]+")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(NOT_INSTALLED)
    return path


def run_promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], input=stdin, capture_output=True, text=True, timeout=T)


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    """Every panel that queries, rows' nested panels included."""
    found = []
    for panel in dashboard()["panels"]:
        found += [panel, *panel.get("panels", [])]
    return [panel for panel in found if panel["type"] != "row"]


def grafana_to_promql(expr: str) -> str:
    """A panel's query as Grafana sends it, with the values of ``GRAFANA_VALUES``."""
    for name, value in sorted(GRAFANA_VALUES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace("${" + name[1:] + "}", value).replace(name, value)
    assert "$" not in expr, f"a Grafana variable this test has no value for: {expr}"
    return expr


def without_comparisons(expr: str) -> str:
    """An alert's expression with its comparisons against numbers removed."""
    stripped = COMPARISON.sub("", expr)
    assert stripped != expr, f"no comparison against a number to remove in {expr!r}"
    return stripped


def exported_samples() -> dict[str, str]:
    """Every sample name the daemon's metrics can have (``gpuvisor_jobs_total``,
    ``gpuvisor_job_duration_seconds_bucket`` ...), and its family's name: read
    from the registry of a supervisor's own metrics, as the daemon builds it."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    names = {}
    for family in Metrics(lambda: {}).registry.collect():
        for suffix in suffixes[family.type]:
            names[family.name + suffix] = family.name
    return names


def prometheus_config(target: str, token_file: Path, every: str | None = None) -> str:
    """The example ``prometheus.yml`` as a user adapts it: their daemon's
    address, their token file, the rules file by its full path; ``every``: a
    scrape and evaluation interval."""
    config = yaml.safe_load(CONFIG.read_text())
    assert config["rule_files"] == [RULES.name], "the example loads the rules file beside it"
    config["rule_files"] = [str(RULES)]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "gpuvisor" and job["metrics_path"] == "/metrics"
    assert job["authorization"]["type"] == "Bearer" and "credentials_file" in job["authorization"]
    job["authorization"]["credentials_file"] = str(token_file)
    job["static_configs"] = [{"targets": [target]}]
    if every is not None:
        config["global"].update(scrape_interval=every, evaluation_interval=every)
    return yaml.safe_dump(config, sort_keys=False)


# ---------------------------------------------------------------- the files themselves


@pytest.mark.unit
def test_every_alert_can_be_routed_and_says_what_to_do():
    found = rules()
    assert {rule["alert"] for rule in found} == {
        "GpuvisorDown",
        "GpuvisorFailed",
        "GpuvisorModeBroken",
        "GpuvisorWorkerRestarts",
        "GpuvisorWorkerMemoryHigh",
        "GpuvisorWorkerHostMemoryHigh",
        "GpuvisorQueueStuck",
        "GpuvisorWorkerOutOfMemory",
    }
    for rule in found:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule
        assert rule["labels"]["severity"] in ("critical", "warning"), rule
        assert rule["annotations"]["summary"].strip() and len(rule["annotations"]["description"]) > 80, rule
        without_comparisons(rule["expr"])  # each has a threshold the live test can take off


@pytest.mark.unit
def test_the_rules_and_the_dashboard_name_only_metrics_the_daemon_exports():
    exported = exported_samples()
    named = {rule["alert"]: set(METRIC_NAME.findall(rule["expr"])) for rule in rules()}
    for panel in panels():
        for target in panel["targets"]:
            named[f"panel {panel['title']!r}"] = set(METRIC_NAME.findall(target["expr"]))
    for variable in dashboard()["templating"]["list"]:
        named[f"variable {variable['name']}"] = set(METRIC_NAME.findall(json.dumps(variable.get("query", ""))))
    unknown = {where: sorted(names - exported.keys()) for where, names in named.items() if names - exported.keys()}
    assert not unknown, f"names the daemon does not export: {unknown}"


@pytest.mark.unit
def test_the_dashboard_charts_every_metric_and_reads_its_data_source_from_a_variable():
    board = dashboard()
    assert board["uid"] == "gpuvisor" and 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids, charted = set(), set()
    for panel in panels():
        assert panel["id"] not in ids, f"two panels with id {panel['id']}"
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"] and panel.get("description"), panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"], panel["title"]
            charted |= set(METRIC_NAME.findall(target["expr"]))
    exported = exported_samples()
    families = {exported[name] for name in charted if name in exported}
    missing = set(exported.values()) - families
    assert not missing, f"metrics with no panel: {sorted(missing)}"


@pytest.mark.unit
def test_taking_the_threshold_off_an_alert_keeps_its_label_matchers():
    assert without_comparisons('up{job="gpuvisor"} == 0') == 'up{job="gpuvisor"}'
    assert without_comparisons('increase(x{a!="1"}[15m]) >= 3') == 'increase(x{a!="1"}[15m])'
    assert without_comparisons("a > 0.9 or b < bool 1e9") == "a or b"
    assert grafana_to_promql('rate(x{m=~"$mode"}[$__rate_interval])') == 'rate(x{m=~".*"}[1m])'
    assert grafana_to_promql('x{d=~"${device}"}[$__range]') == 'x{d=~".*"}[5m]'


@pytest.mark.process
def test_promtool_accepts_the_rules():
    done = run_promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


@pytest.mark.process
def test_the_rules_unit_tests_pass():
    done = run_promtool("test", "rules", str(RULES_TEST))
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text()))
    assert tested == {rule["alert"] for rule in rules()}, "every alert has its unit tests"


@pytest.mark.process
def test_promtool_accepts_the_example_config_with_a_token_file_of_its_own(tmp_path):
    token = tmp_path / "gpuvisor.token"
    token.write_text(TOKEN + "\n")
    config = tmp_path / "prometheus.yml"
    config.write_text(prometheus_config("127.0.0.1:8080", token))
    done = run_promtool("check", "config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout


# ---------------------------------------------------------------- a real Prometheus scraping a real daemon


class Prometheus:
    """Debian's ``prometheus`` on a loopback port, its data and log in ``folder``."""

    def __init__(self, folder: Path, config_text: str):
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip(NOT_INSTALLED)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = folder / "prometheus.yml"
        config.write_text(config_text)
        self.log_path = folder / "prometheus.log"
        self._log = open(self.log_path, "w")
        argv = [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._ready, T, "prometheus to be ready")
        except BaseException:
            self.close()
            raise

    def _ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited with {self.proc.returncode}: {self.log()}"
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """An answer of the HTTP API, its error body included (a bad query is a 400 that says why)."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=T) as answer:
                return json.load(answer)
        except urllib.error.HTTPError as error:
            return json.load(error)

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.api("query", query=expr)
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(T)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(T)
        self._log.close()


def fails(future) -> str:
    """The error a job or switch ended with: here each is meant to fail."""
    try:
        future.result(T)
    except Exception as error:  # noqa: BLE001 - any failure is what was asked for; its name is returned
        return type(error).__name__
    raise AssertionError("it was meant to fail")


class Scene:
    """The daemon, the Prometheus scraping it, and the daemon's own exposition at the end."""

    def __init__(self, daemon: RunningDaemon, prometheus: Prometheus, port: int):
        self.daemon, self.prometheus, self.port = daemon, prometheus, port
        self.exposition = ""

    def scrape(self) -> str:
        """``GET /metrics`` with the token, as Prometheus sends it."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/metrics")
        request.add_header("Authorization", f"Bearer {TOKEN}")
        with urllib.request.urlopen(request, timeout=T) as answer:
            return answer.read().decode()

    def seen(self, expr: str, value: float) -> None:
        """Wait until Prometheus has scraped what the daemon counted."""
        wait_until(lambda: self.prometheus.value(expr) == value, T, f"prometheus to see {expr} == {value}")


def work(client, scene: Scene, jobs_so_far: int) -> int:
    """Jobs that end ok, fail and crash their worker (a restart), a batch,
    and two switches; the jobs ended so far, once Prometheus has seen them."""
    for i in range(3):
        assert client.submit("echo", i).result(T) == i
    batch = [client.submit("batch_echo", i) for i in range(8)]
    assert [future.result(T)["payload"] for future in batch] == list(range(8))
    assert fails(client.submit("fail", None)) == "JobFailed"
    assert fails(client.submit("crash", None)) == "WorkerCrashed"
    for mode in ("other", "diag"):
        assert client.switch_mode(mode).result(T)["status"] == "loaded"
        assert client.submit("echo", mode).result(T) == mode
    jobs_so_far += 3 + 8 + 2 + 2
    scene.seen('sum(gpuvisor_jobs_total{mode!="bad"})', jobs_so_far)
    return jobs_so_far


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        pytest.skip(NOT_INSTALLED)
    folder = tmp_path_factory.mktemp("prometheus")
    tokens, credentials = folder / "tokens", folder / "gpuvisor.token"
    for path in (tokens, credentials):
        secret_file(path, TOKEN)
    port = free_port()
    text = config_text(
        {"diag": DIAG, "other": DIAG, "bad": "tests.helpers.loaders:raises"},
        supervisor={"default_mode": "diag", "max_restarts": 3, "restart_backoff": 0.05, "broken_retry_s": 0},
    )
    http = {"listen": [f"127.0.0.1:{port}"], "token_file": str(tokens), "access_log": False}
    text += "[http]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in http.items())
    daemon = RunningDaemon(config_text=text)
    prometheus = None
    try:
        with daemon.client() as client:
            wait_until(lambda: client.status()["mode"] == "diag", T, "the diag mode to load")
            prometheus = Prometheus(folder, prometheus_config(f"127.0.0.1:{port}", credentials, every="1s"))
            scene = Scene(daemon, prometheus, port)
            scene.seen('up{job="gpuvisor"}', 1)
            # Twice, each seen by Prometheus before the next: a series' first value gives no rate.
            work(client, scene, work(client, scene, 0))
            assert fails(client.switch_mode("bad")) == "ModeLoadError"
            for _ in range(10):  # each try to load it fails and counts, until its breaker opens
                if "bad" in client.status()["broken_modes"]:
                    break
                fails(client.submit("echo", 1, mode="bad"))
            assert "bad" in client.status()["broken_modes"], client.status()
            scene.seen('gpuvisor_mode_broken{mode="bad"}', 1)
            # Jobs left waiting behind a long one, for the queue's figures; the daemon stops without draining.
            client.submit("sleep", {"seconds": 3 * T}, mode="diag")
            for i in range(3):
                client.submit("echo", i, mode="diag")
            scene.seen('gpuvisor_queue_depth{mode="diag"}', 3)
            scene.exposition = scene.scrape()
            yield scene  # with the client still open: its jobs stay queued
    finally:
        if prometheus is not None:
            prometheus.close()
        daemon.close()


@pytest.mark.daemon
def test_prometheus_scrapes_the_daemon_with_its_token_and_evaluates_every_rule(scene):
    (target,) = scene.prometheus.api("targets")["data"]["activeTargets"]
    assert target["health"] == "up" and target["scrapeUrl"] == f"http://127.0.0.1:{scene.port}/metrics", target
    wait_until(
        lambda: not any(rule["lastEvaluation"].startswith("0001-") for rule in _alerting_rules(scene)),
        T,
        "every rule to be evaluated once",
    )
    for rule in _alerting_rules(scene):
        assert rule["health"] == "ok", rule
    assert {rule["name"] for rule in _alerting_rules(scene)} == {rule["alert"] for rule in rules()}


def _alerting_rules(scene: Scene) -> list[dict[str, Any]]:
    groups = scene.prometheus.api("rules", type="alert")["data"]["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _unanswered(scene: Scene, expr: str) -> str | None:
    """Why ``expr`` fails the test, or None: it must succeed, and return data
    unless each of its metrics the daemon leaves out is one it may leave out."""
    result = scene.prometheus.query(expr)
    if result:
        return None
    left_out = {name for name in METRIC_NAME.findall(expr) if not re.search(rf"^{name}[{{ ]", scene.exposition, re.M)}
    if left_out and left_out <= ABSENT_WITHOUT_GPU:
        return None  # no GPU here: the daemon exports no VRAM, and a query of it is rightly empty
    return f"{expr}: empty (not in the daemon's exposition: {sorted(left_out)})"


@pytest.mark.daemon
def test_every_panel_of_the_dashboard_has_data(scene):
    problems = []
    for panel in panels():
        for target in panel["targets"]:
            why = _unanswered(scene, grafana_to_promql(target["expr"]))
            if why:
                problems.append(f"{panel['title']!r} {target['refId']}: {why}")
    assert not problems, "\n".join(problems)


@pytest.mark.daemon
def test_every_dashboard_variable_has_values(scene):
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
        assert match, variable
        selector, label = grafana_to_promql(match[1]), match[2]
        answer = scene.prometheus.api(f"label/{label}/values", **{"match[]": selector})
        assert answer["status"] == "success" and answer["data"], (variable["name"], answer)


@pytest.mark.daemon
def test_every_alert_watches_series_that_are_there(scene):
    """Each alert's expression, its thresholds taken off (see the module's
    docstring), has data: the alert can fire on this daemon's figures."""
    problems = [
        f"{rule['alert']}: {why}" for rule in rules() if (why := _unanswered(scene, without_comparisons(rule["expr"])))
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.daemon
def test_promtool_finds_no_problem_in_the_daemons_exposition(scene):
    for name in ("gpuvisor_switch_duration_seconds_bucket", "gpuvisor_batch_size_bucket", "gpuvisor_mode_broken"):
        assert name in scene.exposition, f"the work did not make {name}"
    done = run_promtool("check", "metrics", stdin=scene.exposition)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr
