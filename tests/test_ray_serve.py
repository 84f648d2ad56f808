"""gpuvisor on Ray Serve (contrib/ray/, the ``gpuvisor-ray`` distribution), on a
real local Ray with CPU replicas: two replicas of one deployment, each a
supervisor with its own worker, driven through one Serve handle.

Reaching each replica: a handle load-balances, and Serve never sends a
replica more calls at once than its ``max_ongoing_requests`` (1 here), so
two calls issued together land on the two replicas while they overlap.
Every answer names its replica; ``on_each_replica`` repeats such pairs (a
few rounds at most) until both replicas answered, which covers a call that
ended before its twin was routed.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import psutil
import pytest

from supervisor import ConfigError, JobFailed, UnknownMode
from tests.helpers import T, pid_gone, run_python, wait_until

# `make test` installs both (pip install ./contrib/ray); `make install` leaves Ray out.
WHY = "is not installed: `make test` installs it, or `pip install ./contrib/ray` (gpuvisor-ray, with Ray Serve)"
ray = pytest.importorskip("ray", reason=f"Ray {WHY}")
serve = pytest.importorskip("ray.serve", reason=f"Ray Serve {WHY}")
pytest.importorskip("gpuvisor_ray", reason=f"gpuvisor_ray {WHY}")
from gpuvisor_ray import GpuvisorDeployment  # noqa: E402  (after the skip: it needs ray)
from gpuvisor_ray.deployment import read_config  # noqa: E402

REPLICAS = 2
CONFIG = """
[modes.diag]
loader = "worker.modes.diag:load"

[modes.embed]
loader = "worker.modes.embed:load"
args = { device = "auto" }
preload = ["transformers.models.bert.modeling_bert"]
"""


def on_each_replica(send, replica_of) -> dict[str, object]:
    """{replica id: the first answer from it} once every replica answered a
    call made by ``send()`` (calls go out in overlapping groups, see above)."""
    answers: dict[str, object] = {}
    for _ in range(10):
        responses = [send() for _ in range(REPLICAS)]
        for response in responses:
            answer = response.result(timeout_s=3 * T)
            answers.setdefault(replica_of(answer), answer)
        if len(answers) == REPLICAS:
            return answers
    raise AssertionError(f"after 10 rounds only these replicas answered: {sorted(answers)}")


def maps_torch(pid: int) -> bool:
    return any("libtorch" in m.path for m in psutil.Process(pid).memory_maps())


@pytest.fixture
def local_ray(monkeypatch):
    """A local Ray of 2 CPUs, no GPU, no dashboard; shut down whatever the
    test did (conftest then checks that none of its processes is left).
    Yields Ray's session folder, where Serve keeps each replica's log."""
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # no report home from the test
    context = ray.init(num_cpus=2, num_gpus=0, include_dashboard=False)
    try:
        serve.start(proxy_location="Disabled")  # handles only: no HTTP port taken
        yield Path(context.address_info["session_dir"])
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.mark.process
@pytest.mark.slow
def test_two_replicas_each_run_their_own_worker_through_a_serve_handle(local_ray):
    app = GpuvisorDeployment.options(
        num_replicas=REPLICAS,
        max_ongoing_requests=1,
        ray_actor_options={"num_cpus": 1, "num_gpus": 0},
    ).bind(config_text=CONFIG, mode="diag")
    handle = serve.run(app, name="gpuvisor", route_prefix=None)
    spawned: set[int] = set()  # every worker and spare the replicas started, checked gone at the end

    def note(status: dict) -> None:
        spawned.update(pid for pid in (status["worker_pid"], status["standby_pid"]) if pid)

    # Each replica loaded diag before it took traffic, in a worker of its own.
    first = on_each_replica(lambda: handle.status.remote(), lambda s: s["replica"]["id"])
    for status in first.values():
        assert status["state"] == "running" and status["mode"] == "diag", status
        # Given no GPU by Ray, the replica's worker is on the CPU (by its
        # config's "auto", which otherwise takes the first GPU NVML sees).
        assert status["device"] == "cpu" and status["gpu_unavailable"].startswith("cpu:"), status
        note(status)
    diag_workers = {replica: status["worker_pid"] for replica, status in first.items()}
    replica_pids = {status["replica"]["pid"] for status in first.values()}
    assert len(set(diag_workers.values())) == REPLICAS and len(replica_pids) == REPLICAS, first

    # diag jobs through the handle: __call__ and submit, an array both ways.
    assert handle.remote("echo", {"x": 1}).result(timeout_s=T) == {"x": 1}
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(handle.submit.remote("echo", array, mode="diag").result(timeout_s=T), array)
    assert handle.remote("pid").result(timeout_s=T) in diag_workers.values()

    # A gpuvisor error reaches the caller as Ray's task error that is also the
    # gpuvisor class, its cause the error itself; the replica serves on.
    with pytest.raises(JobFailed) as failed:
        handle.remote("fail", {"message": "on purpose"}).result(timeout_s=T)
    assert isinstance(failed.value, ray.exceptions.RayTaskError)
    assert failed.value.cause.code == "job_failed" and failed.value.remote_type == "RuntimeError"
    assert "on purpose" in str(failed.value.cause)
    with pytest.raises(UnknownMode) as unknown:
        handle.switch_mode.remote("nope").result(timeout_s=T)
    assert unknown.value.cause.code == "unknown_mode"

    # A mode switch on each replica: its diag worker replaced by an embed one.
    switches = on_each_replica(lambda: handle.switch_mode.remote("embed"), lambda r: r["replica"])
    for replica, switch in switches.items():
        assert switch["status"] == "loaded" and switch["previous"] == "diag", switch
        assert switch["previous_pid"] == diag_workers[replica], (switch, diag_workers)
        spawned.add(switch["pid"])

    # embed jobs through the handle, several at once across the replicas.
    texts = [["hello", "hi"], ["a cat sat on the mat"], ["one", "two", "three"], ["hello"]]
    responses = [handle.remote("embed", {"texts": t}, mode="embed") for t in texts]
    for t, response in zip(texts, responses, strict=True):
        vectors = response.result(timeout_s=3 * T)
        assert vectors.dtype == np.float32 and vectors.shape == (len(t), 384)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    # The replica is the supervisor: it never maps torch; its embed worker does.
    second = on_each_replica(lambda: handle.status.remote(), lambda s: s["replica"]["id"])
    for replica, status in second.items():
        assert status["mode"] == "embed" and status["worker_pid"] == switches[replica]["pid"], status
        assert status["jobs_done"] >= 1, status
        note(status)
        assert maps_torch(status["worker_pid"]), "the embed worker runs torch (this proves the check can see it)"
        assert not maps_torch(status["replica"]["pid"]), f"replica {replica} (the supervisor) maps torch"

    # A mode whose loader raises fails a replica's start: Serve gives up on
    # the application and says why (the replicas above serve on). No CPU
    # asked for: the two replicas above hold the local Ray's two, and a
    # replica Ray cannot place would wait, never fail.
    broken = CONFIG + '[modes.broken]\nloader = "worker.modes.diag:load"\nargs = { x = 1 }\n'
    no_resources = {"num_cpus": 0, "num_gpus": 0}
    with pytest.raises(RuntimeError, match="Deploying application broken failed"):
        serve.run(
            GpuvisorDeployment.options(ray_actor_options=no_resources).bind(config_text=broken, mode="broken"),
            name="broken",
            route_prefix=None,
        )
    said = serve.status().applications["broken"].deployments["GpuvisorDeployment"].message
    assert "ModeLoadError" in said and "diag takes no arguments" in said, said
    assert handle.remote("embed", {"texts": ["still here"]}).result(timeout_s=T).shape == (1, 384)

    # Serve stops the replicas; each one's worker (and spare) goes with it.
    serve.shutdown()
    for pid in sorted(spawned | replica_pids):
        wait_until(lambda pid=pid: pid_gone(pid), T, f"process {pid} of a replica to be gone after serve.shutdown()")
    # ... drained through the replica's __del__, not killed with it: gpuvisor's
    # lines are in each replica's Serve log.
    for replica, status in second.items():
        (log,) = (local_ray / "logs" / "serve").glob(f"replica_*_{replica}.log")
        said = log.read_text()
        assert "shutting down (drain)" in said, said[-2000:]
        assert re.search(rf"pid {status['worker_pid']} drained and exited with code 0", said), said[-2000:]


@pytest.mark.unit
def test_the_config_is_a_path_or_text_never_both(tmp_path):
    path = tmp_path / "gpuvisor.toml"
    path.write_text(CONFIG)
    assert sorted(read_config(path, None).modes) == ["diag", "embed"]
    assert sorted(read_config(None, CONFIG).modes) == ["diag", "embed"]
    assert "diag" in read_config(None, None).modes  # the built-in default
    with pytest.raises(ValueError, match="not both"):
        read_config(path, CONFIG)
    with pytest.raises(ConfigError, match="config_text"):
        read_config(None, "[modes.diag")


@pytest.mark.process
def test_the_package_says_how_to_install_ray_when_it_is_missing():
    """Where ray is absent, importing gpuvisor_ray fails with the install line."""
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "try:\n    import gpuvisor_ray\nexcept ImportError as exc:\n    print(exc)\n"
    )
    assert "pip install 'ray[serve]>=2.9'" in run_python(code).stdout
