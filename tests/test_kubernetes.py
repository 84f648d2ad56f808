"""contrib/kubernetes as a cluster and gpuvisor would take it.

Every manifest is validated against the Kubernetes 1.30 schemas that the
``kubernetes-validate`` package ships (strict: an unknown field, a typo such
as ``readinesProbe``, fails), read from the package, with no network. The
ConfigMap's TOML is read by gpuvisor's own loader, and the manifests are
checked against it: the probes and the scrape point at the port and paths
the config serves, the grace period covers the drain, everything the daemon
writes lies on a writable volume (the root file system is read-only).

Then the pod is played here: each volume becomes a folder (an emptyDir as
the kubelet makes it, 0777; the ConfigMap's and the Secret's items as
files), every path of the config and of the containers' environment is moved
into the folder of the volume mounted over it, the TCP address becomes a
free loopback port, and the daemon container's own command line runs
through the console script. It is probed as the kubelet probes (no token),
scraped as Prometheus is told to (its token from the Secret), used by the
example client container's own script over the shared socket, and stopped
with SIGTERM, as the kubelet stops it."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from supervisor.config import ConfigError, load, parse
from supervisor.config_http import loopback_host, split_listen
from tests.helpers import ROOT, T, repo_pythonpath, wait_until
from tests.helpers.daemon import GPUVISOR, RunningDaemon, free_port
from tests.test_http import assert_error, curl

HERE = ROOT / "contrib" / "kubernetes"
KUBERNETES = "1.30"
"""The Kubernetes version the manifests are validated against (its schemas ship with kubernetes-validate)."""
MODEL_T = 3 * T  # the first mode loads the real embedding model on a shared CPU


def documents(name: str) -> list[dict[str, Any]]:
    with open(HERE / name) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


MANIFESTS = sorted(p.name for p in HERE.glob("*.yaml") if p.name != "kustomization.yaml")


def resource(kind: str) -> dict[str, Any]:
    found = [doc for name in MANIFESTS for doc in documents(name) if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in contrib/kubernetes, found {len(found)}"
    return found[0]


def pod() -> dict[str, Any]:
    return resource("Deployment")["spec"]["template"]


def container(name: str) -> dict[str, Any]:
    (found,) = [c for c in pod()["spec"]["containers"] if c["name"] == name]
    return found


def config_text() -> str:
    return resource("ConfigMap")["data"]["gpuvisor.toml"]


def tcp_port(listen: tuple[str, ...]) -> int:
    (port,) = [address[1] for address in map(split_listen, listen) if isinstance(address, tuple)]
    return port


def port_number(ref: int | str, of: dict[str, Any]) -> int:
    """A probe's or a Service's port, by number or by the container port's name."""
    if isinstance(ref, int):
        return ref
    (number,) = [p["containerPort"] for p in of.get("ports", []) if p.get("name") == ref]
    return number


def mounts(of: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in of.get("volumeMounts", [])}


def mount_of(path: str, of: dict[str, Any]) -> dict[str, Any] | None:
    """The volume mount a path lies on (the deepest), or None: the image's read-only root."""
    on = [m for where, m in mounts(of).items() if path == where or path.startswith(where.rstrip("/") + "/")]
    return max(on, key=lambda m: len(m["mountPath"]), default=None)


def config_paths(text: str) -> list[str]:
    """Every absolute path the config names (endpoints and sockets included)."""
    return [m.group(2) for m in re.finditer(r'"(ipc://|unix:)?(/[^"]*)"', text)]


# ---------------------------------------------------------------- the manifests, as the API server reads them


@pytest.mark.unit
@pytest.mark.parametrize("name", MANIFESTS)
def test_every_manifest_is_valid_kubernetes(name):
    docs = documents(name)
    assert docs, f"{name} holds no resource"
    for doc in docs:
        try:
            checked = kubernetes_validate.validate(doc, f"{KUBERNETES}.0", strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(map(str, exc.path))
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}")
        assert checked == KUBERNETES  # the 1.30 schema, not an older one standing in for it


@pytest.mark.unit
def test_kustomization_applies_every_manifest_but_the_example_secret():
    (kustomization,) = documents("kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == [n for n in MANIFESTS if n != "secret.example.yaml"]
    for doc in documents("secret.example.yaml"):
        assert doc["kind"] == "Secret"


@pytest.mark.unit
def test_one_pod_per_gpu_node_with_one_gpu_each():
    deployment = resource("Deployment")
    spec = pod()["spec"]
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert pod()["metadata"]["labels"].items() >= labels.items()
    (rule,) = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert rule["topologyKey"] == "kubernetes.io/hostname" and rule["labelSelector"]["matchLabels"] == labels
    assert container("gpuvisor")["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert all("nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}) for c in spec["containers"][1:])
    # No surge: with one pod per node, a surge pod finds no free GPU node and the rollout stalls.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


# ---------------------------------------------------------------- the ConfigMap, as gpuvisor reads it


@pytest.mark.unit
def test_the_configmap_is_a_configuration_gpuvisor_accepts():
    config = parse(config_text(), "contrib/kubernetes/configmap.yaml")
    assert config.default_mode in config.modes
    assert config.http is not None and config.http.models
    assert all(model.mode in config.modes for model in config.http.models.values())
    tcp = [a for a in map(split_listen, config.http.listen) if isinstance(a, tuple)]
    assert tcp and not any(loopback_host(host) for host, _ in tcp)  # reachable from the pod's network
    assert config.http.token_file
    # Off loopback, the token file is what lets the file in at all:
    without = re.sub(r"(?m)^\s*token_file\s*=.*$", "", config_text())
    with pytest.raises(ConfigError, match="not a loopback address.*token_file"):
        parse(without, "contrib/kubernetes/configmap.yaml")


@pytest.mark.unit
def test_the_daemon_reads_the_mounted_config_and_token_file():
    daemon = container("gpuvisor")
    args = daemon["args"]
    assert args[0] == "gpuvisor" and args[-1] == "serve"
    config_path = args[args.index("--config") + 1]
    volumes = {v["name"]: v for v in pod()["spec"]["volumes"]}

    def item_at(path: str) -> tuple[dict[str, Any], str]:
        mount = mount_of(path, daemon)
        assert mount is not None and mount["readOnly"], f"{path} is on no read-only volume"
        source = volumes[mount["name"]]
        files = {i["path"]: i["key"] for i in (source.get("configMap") or source.get("secret"))["items"]}
        return source, files[path[len(mount["mountPath"]) :].lstrip("/")]

    source, key = item_at(config_path)
    assert source["configMap"]["name"] == resource("ConfigMap")["metadata"]["name"] and key == "gpuvisor.toml"
    token_file = parse(config_text()).http.token_file
    source, key = item_at(token_file)
    secret = resource("Secret")
    assert source["secret"]["secretName"] == secret["metadata"]["name"] and key in secret["stringData"]
    assert source["secret"]["defaultMode"] & 0o004 == 0  # not readable by every user (gpuvisor warns)
    # Prometheus's token is one of the tokens the daemon accepts.
    lines = [line.strip() for line in secret["stringData"][key].splitlines()]
    assert secret["stringData"]["prometheus"].strip() in lines


@pytest.mark.unit
def test_probes_and_the_scrape_point_at_what_the_config_serves():
    config = parse(config_text())
    port = tcp_port(config.http.listen)
    daemon = container("gpuvisor")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = daemon[kind]["httpGet"]
        assert probe["path"] == "/health" and port_number(probe["port"], daemon) == port, kind
        assert "httpHeaders" not in probe, f"{kind}: /health needs no token, and a token in a probe is in the clear"
    annotations = pod()["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port) and annotations["prometheus.io/path"] == "/metrics"
    (service_port,) = resource("Service")["spec"]["ports"]
    assert port_number(service_port["targetPort"], daemon) == port
    assert resource("Service")["spec"]["selector"] == resource("Deployment")["spec"]["selector"]["matchLabels"]


@pytest.mark.unit
def test_the_network_policy_lets_in_only_clients_and_prometheus_on_the_http_port_and_nothing_out():
    policy = resource("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == resource("Deployment")["spec"]["selector"]["matchLabels"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"] and policy["egress"] == []
    (rule,) = policy["ingress"]
    (allowed,) = rule["ports"]
    daemon = container("gpuvisor")
    assert port_number(allowed["port"], daemon) == tcp_port(parse(config_text()).http.listen)
    sources = [(set(src.get("podSelector", {}).get("matchLabels", {}).items()), "namespaceSelector" in src)
               for src in rule["from"]]  # fmt: skip
    assert sources == [({("gpuvisor.io/client", "true")}, False), ({("app.kubernetes.io/name", "prometheus")}, True)]


@pytest.mark.unit
def test_the_grace_period_covers_prestop_drain_and_the_workers_stop():
    config = parse(config_text())
    daemon = container("gpuvisor")
    pause = daemon["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    grace = pod()["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(pause[1]) + config.daemon.drain_timeout + config.stop_timeout
    # The first load may take load_timeout before it fails: the startup probe waits that long.
    startup = daemon["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] > config.load_timeout


@pytest.mark.unit
def test_what_the_daemon_writes_lies_on_a_writable_volume_and_the_client_shares_its_socket():
    config = parse(config_text())
    daemon, client = container("gpuvisor"), container("example-client")
    assert pod()["spec"]["securityContext"]["runAsNonRoot"] is True
    for c in (daemon, client):
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
    endpoint = config.daemon.endpoint.removeprefix("ipc://")
    written = [endpoint, config.state_dir, "/tmp"]  # /tmp: the worker socket's private directory
    written += [split_listen(e) for e in config.http.listen if e.startswith("unix:")]
    written += [e["value"] for e in daemon["env"] if e["value"].startswith("/")]
    for path in written:
        mount = mount_of(path, daemon)
        assert mount is not None and not mount.get("readOnly"), f"{path}: the daemon writes there, read-only in the pod"
    for path in config_paths(config_text()):
        assert mount_of(path, daemon) is not None, f"the config names {path}, which is on no volume of the pod"
    # The client reaches the same socket file, through the same volume, by the runtime directory.
    assert mount_of(endpoint, client)["name"] == mount_of(endpoint, daemon)["name"]
    for c in (daemon, client):
        env = {e["name"]: e["value"] for e in c["env"]}
        assert f"{env['RUNTIME_DIRECTORY']}/gpuvisor.sock" == endpoint, c["name"]


# ---------------------------------------------------------------- the pod, played here


class Pod:
    """The pod's volumes as folders under one short temporary one (a socket
    path must stay under 108 bytes), and the pod's paths moved into them."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="gv-k8s-"))
        self.port = free_port()
        secret = resource("Secret")
        for volume in pod()["spec"]["volumes"]:
            folder = self.root / volume["name"]
            folder.mkdir()
            if "emptyDir" in volume:
                folder.chmod(0o777)  # as the kubelet makes an emptyDir: root's, open to all
            elif "configMap" in volume:
                data = resource("ConfigMap")["data"]
                for item in volume["configMap"]["items"]:
                    (folder / item["path"]).write_text(data[item["key"]])
            else:
                for item in volume["secret"]["items"]:
                    (folder / item["path"]).write_text(secret["stringData"][item["key"]])
                    (folder / item["path"]).chmod(volume["secret"]["defaultMode"])

    def path(self, path: str, of: dict[str, Any]) -> str:
        mount = mount_of(path, of)
        assert mount is not None, f"{path} is on no volume of {of['name']}"
        return str(self.root / mount["name"]) + path[len(mount["mountPath"]) :]

    def env(self, of: dict[str, Any]) -> dict[str, str]:
        return {e["name"]: self.path(e["value"], of) if e["value"].startswith("/") else e["value"] for e in of["env"]}

    def config(self) -> str:
        """The ConfigMap's file, rewritten in place: its paths here, its TCP address on loopback."""
        daemon = container("gpuvisor")
        config_path = self.path(daemon["args"][daemon["args"].index("--config") + 1], daemon)
        text = Path(config_path).read_text()
        tcp = f'"0.0.0.0:{tcp_port(parse(text).http.listen)}"'
        assert tcp in text
        text = text.replace(tcp, f'"127.0.0.1:{self.port}"')
        text = re.sub(r'"(ipc://|unix:)?(/[^"]*)"', lambda m: f'"{m.group(1) or ""}{self.path(m.group(2), daemon)}"',
                      text)  # fmt: skip
        Path(config_path).write_text(text)
        return config_path


@pytest.fixture(scope="module")
def served():
    """The daemon container's command line, in the pod played here, ready as
    the startup probe sees it, and with its warm standby started (nothing
    starts during a case, so each case's check for leftover processes holds)."""
    here = Pod()
    daemon = container("gpuvisor")
    config_path = here.config()
    config = load(config_path)  # what `gpuvisor serve` reads
    argv = [GPUVISOR if arg == "gpuvisor" else here.path(arg, daemon) if arg.startswith("/") else arg
            for arg in daemon["args"]]  # fmt: skip
    running = RunningDaemon(argv=argv, endpoint=config.daemon.endpoint, env=here.env(daemon), notify=False)

    def probe_passes() -> bool:
        status, body = curl(f"http://127.0.0.1:{here.port}/health")  # as the kubelet's httpGet: no header
        assert status == 200 or (status == 503 and body["status"] == "loading"), (status, body)
        return status == 200

    try:
        wait_until(probe_passes, MODEL_T, "/health to answer 200 (the startup probe)")
        with running.client() as c:
            wait_until(lambda: c.status()["standby_pid"], MODEL_T, "the warm standby to start")
        yield here, running, config
    finally:
        running.close()
        shutil.rmtree(here.root, ignore_errors=True)


def token(key: str) -> str:
    """The first token under ``key`` in the example Secret."""
    lines = resource("Secret")["stringData"][key].splitlines()
    return next(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))


@pytest.mark.daemon
@pytest.mark.slow
def test_health_answers_the_probe_without_a_token(served):
    here, _, config = served
    status, body = curl(f"http://127.0.0.1:{here.port}/health")
    assert status == 200 and body["status"] == "ok" and body["mode"] == config.default_mode, body
    # The unix socket in the shared volume serves the same (config: the file as rewritten here).
    unix = next(e for e in config.http.listen if e.startswith("unix:"))[len("unix:") :]
    assert curl("http://gpuvisor/health", unix=unix)[0] == 200


@pytest.mark.daemon
@pytest.mark.slow
def test_metrics_need_the_token_prometheus_is_given(served):
    here, _, config = served
    url = f"http://127.0.0.1:{here.port}/metrics"
    status, body = curl(url)
    assert_error(body, 401, "invalid_api_key")
    assert curl(url, token="not-a-token-of-this-pod-0123456789")[0] == 401
    status, body = curl(url, token=token("prometheus"))
    from prometheus_client.parser import text_string_to_metric_families

    assert status == 200, body
    assert list(text_string_to_metric_families(body)), body
    status, body = curl(f"http://127.0.0.1:{here.port}/v1/models", token=token("tokens"))
    assert status == 200 and {m["id"] for m in body["data"]} == set(config.http.models)


@pytest.mark.daemon
@pytest.mark.slow
def test_the_example_client_container_embeds_over_the_shared_socket(served):
    here, _, _ = served
    client = container("example-client")
    assert client["args"][:2] == ["python", "-c"]
    out = here.root / "example-client.out"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", client["args"][2]], stdout=f, stderr=subprocess.STDOUT,
                                env={**here.env(client), "PYTHONPATH": repo_pythonpath()})  # fmt: skip
    try:
        wait_until(lambda: "\n" in out.read_text() or proc.poll() is not None, MODEL_T, "the client's first line")
        assert out.read_text().splitlines()[0] == "embedded: float32 array (1, 384)", out.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)  # the kubelet's stop (through tini in the image)
        proc.wait(T)


@pytest.mark.daemon
@pytest.mark.slow
def test_sigterm_drains_what_was_queued_then_exits_and_removes_its_sockets(served):
    here, running, config = served
    with running.client() as c:
        jobs = [c.submit("embed", {"texts": [f"text {i}"] * 8}, mode="embed") for i in range(30)]
        c.ping()  # answered once the daemon has read every request sent before it: the 30 jobs are queued
        assert running.stop() == 0  # SIGTERM, as the kubelet sends it after preStop
        assert [job.result(T).shape for job in jobs] == [(8, 384)] * 30
    assert "draining" in running.output()
    sockets = [config.daemon.endpoint.removeprefix("ipc://")]
    sockets += [e[len("unix:") :] for e in config.http.listen if e.startswith("unix:")]
    assert not any(Path(path).exists() for path in sockets)
