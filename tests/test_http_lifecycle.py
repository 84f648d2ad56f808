"""The HTTP door through a daemon's life, one daemon per case: /health while
the first mode loads, after the default mode failed to load, during a later
switch, a stop that drains both doors, a failed supervisor, a job past its
timeout, a model without a chat template, and the addresses and installs
that must stop the daemon before it starts."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from supervisor import ModeLoadError, ShuttingDown, WorkerCrashed
from tests.helpers import T, repo_pythonpath, wait_until
from tests.helpers.config import DIAG
from tests.helpers.daemon import free_port
from tests.test_http import GATE_MODELS, assert_error, curl, gates, http_config, http_socket, sdk

pytestmark = pytest.mark.daemon


def gates_config(folder, *, modes=None, models=None, http=None, **supervisor) -> str:
    return http_config(modes or {"gates": gates(folder)}, models or GATE_MODELS, http=http,
                       supervisor={"loader_path": [str(folder / "modes")], "warm_standby": False, **supervisor})  # fmt: skip


def health(unix: str) -> tuple[int, dict]:
    return curl("http://gpuvisor/health", unix=unix)


def test_health_is_503_while_the_first_mode_loads_and_200_during_a_later_switch(daemon, tmp_path):
    loaders = gates(tmp_path)
    modes = {"gated": {**loaders, "args": {**loaders["args"], "opens": "open-1"}},
             "later": {**loaders, "args": {**loaders["args"], "opens": "open-2"}}}  # fmt: skip
    d = daemon(config_text=gates_config(tmp_path, modes=modes, models={"m": {"mode": "gated", "completions": "hold"}},
                                        default_mode="gated"))  # fmt: skip
    unix = http_socket(d)
    code, body = health(unix)
    assert code == 503 and body["status"] == "loading" and body["switching_to"] == "gated", body
    assert "first mode" in body["reason"]
    (tmp_path / "open-1").touch()
    wait_until(lambda: health(unix)[0] == 200, T, "/health to say 200 once the mode has loaded")
    assert health(unix)[1]["mode"] == "gated"
    with d.client() as c:
        switch = c.switch_mode("later")
        wait_until(lambda: health(unix)[1]["switching_to"] == "later", T, "the switch to begin")
        code, body = health(unix)
        assert code == 200 and body["status"] == "ok", "a later switch still serves: jobs wait in the queue"
        (tmp_path / "open-2").touch()
        assert switch.result(T)["status"] == "loaded"


def test_health_is_503_when_the_default_mode_fails_to_load_and_200_once_a_mode_loads(daemon, tmp_path):
    modes = {"broken": {"loader": DIAG, "args": {"x": 1}}, "diag": {"loader": DIAG, "idle_unload_s": 0.5}}
    d = daemon(config_text=http_config(modes, {}, supervisor={"default_mode": "broken", "warm_standby": False,
                                                              "max_restarts": 10}))  # fmt: skip
    unix = http_socket(d)
    wait_until(lambda: health(unix)[1]["status"] == "load_failed", T, "/health to say the default mode failed")
    code, body = health(unix)
    assert code == 503 and body["mode"] is None and body["switching_to"] is None, body
    assert "'broken'" in body["reason"] and "diag takes no arguments" not in body["reason"], body
    error_id = body["reason"].rpartition("error id ")[2].rstrip(")")
    wait_until(lambda: f"HTTP error {error_id}" in d.output() and "diag takes no arguments" in d.output(), T,
               "the details in the daemon's log, under the error id")  # fmt: skip
    with d.client() as c:
        assert c.switch_mode("diag").result(T)["status"] == "loaded"
        code, body = health(unix)
        assert code == 200 and body["status"] == "ok" and body["mode"] == "diag", body
        wait_until(lambda: c.status()["idle_unloaded"] == "diag", T, "idle_unload_s to stop the worker")
        code, body = health(unix)
        assert code == 200 and body["mode"] is None, "a mode stopped while idle still serves: the next job loads it"
        with pytest.raises(WorkerCrashed):
            c.submit("crash", {"how": "kill"}, mode="diag").result(T)
        assert health(unix)[0] == 200, "a crash is respawned: jobs wait in the queue"
        with pytest.raises(ModeLoadError, match="diag takes no arguments"):
            c.switch_mode("broken").result(T)
        assert c.status()["last_error"] is not None and c.status()["mode"] is None
        code, body = health(unix)
        assert code == 200 and body["status"] == "ok", "a later switch that fails is the caller's answer, not the pod's"
        assert c.submit("echo", 7, mode="diag").result(T) == 7


def test_a_stop_drains_both_doors_and_the_http_socket_goes(daemon, tmp_path):
    d = daemon(config_text=gates_config(tmp_path, default_mode="gates"))
    unix = http_socket(d)
    client = sdk(unix=unix)
    with ThreadPoolExecutor(2) as pool, d.client() as zmq_client:
        running = pool.submit(client.completions.create, model="held", prompt="d1")
        wait_until(lambda: (tmp_path / "ran-d1").exists(), T, "the first job to run")
        queued = pool.submit(client.completions.create, model="held", prompt="d2")
        wait_until(lambda: zmq_client.status()["queued"] == 1, T, "the second job to be queued")
        d.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: health(unix)[0] == 503, T, "/health to say the daemon drains")
        code, body = health(unix)
        assert body["status"] == "draining"
        with pytest.raises(openai.InternalServerError) as refused:
            client.completions.create(model="held", prompt="d3")
        assert refused.value.status_code == 503
        assert_error(refused.value.response.json(), 503, "shutting_down", "draining")
        with pytest.raises(ShuttingDown):
            zmq_client.submit("hold", {"prompt": "d4"}).result(T)
        (tmp_path / "release-d1").touch()
        (tmp_path / "release-d2").touch()
        assert running.result(T).choices[0].text == "d1", "a request accepted before the stop is answered"
        assert queued.result(T).choices[0].text == "d2", "and so is one that was queued"
    assert d.wait() == 0
    assert not os.path.exists(unix)
    assert not (tmp_path / "ran-d3").exists() and not (tmp_path / "ran-d4").exists()


def test_a_failed_supervisor_is_503_and_health_says_why(daemon, tmp_path):
    """Its one mode broken (max_restarts = 0), no mode can serve: the
    supervisor is failed, the mode's requests get 503 mode_broken with a
    Retry-After, and /health says so without the worker's words."""
    d = daemon(config_text=gates_config(tmp_path, default_mode="gates", max_restarts=0))
    unix = http_socket(d)
    with d.client() as c:
        wait_until(lambda: c.status()["mode"] == "gates", T, "the mode to load")
    code, body = curl("http://gpuvisor/v1/completions", {"model": "crash", "prompt": "x"}, unix=unix)
    assert code == 500
    assert_error(body, 500, "worker_crashed", "the worker died while running this job (error id ")
    assert "SECRET" not in json.dumps(body) and "/srv" not in json.dumps(body), "the worker's stderr stays home"
    crash_id = body["error"]["message"].rpartition("(error id ")[2].rstrip(")")
    wait_until(
        lambda: f"HTTP error {crash_id}: worker_crashed" in d.output(), T, "the details in the log, under the id"
    )
    with d.client() as c:
        wait_until(lambda: c.status()["state"] == "failed", T, "the supervisor to give up")
    code, body = curl("http://gpuvisor/v1/completions", {"model": "held", "prompt": "x"}, unix=unix,
                      args=("-D", str(tmp_path / "headers")))  # fmt: skip
    assert code == 503
    assert_error(body, 503, "mode_broken")
    assert "retry-after:" in (tmp_path / "headers").read_text().lower()
    code, body = health(unix)
    assert code == 503 and body["status"] == "failed" and "gpuvisor restart" in body["reason"], body
    assert list(body["broken"]) == ["gates"] and 0 < body["broken"]["gates"]["retry_in_s"] <= 30, body
    assert "SECRET" not in json.dumps(body) and "/srv" not in json.dumps(body), body


def test_a_model_whose_loader_raises_breaks_alone_and_the_others_serve_on(daemon, tmp_path):
    """The issue's case: six requests for a model whose loader raises spent
    the global restart budget at its defaults, and every other model then
    answered 503 supervisor_failed, /health 503, until an operator ran
    gpuvisor restart. Now that model's mode is broken alone."""
    modes = {"gates": gates(tmp_path), "broken": {"loader": DIAG, "args": {"x": 1}}}  # diag takes no args: it raises
    models = {**GATE_MODELS, "bad": {"mode": "broken", "completions": "echo"}}
    d = daemon(config_text=gates_config(tmp_path, modes=modes, models=models))  # the defaults: max_restarts = 5
    unix = http_socket(d)
    codes = [curl("http://gpuvisor/v1/completions", {"model": "bad", "prompt": "x"}, unix=unix)[0] for _ in range(7)]
    assert codes == [500] * 6 + [503], codes  # six loads fail (mode_load_error), then the mode is broken
    code, body = curl("http://gpuvisor/v1/completions", {"model": "bad", "prompt": "x"}, unix=unix)
    assert_error(body, 503, "mode_broken")
    (tmp_path / "release-ok").touch()
    code, body = curl("http://gpuvisor/v1/completions", {"model": "held", "prompt": "ok"}, unix=unix)
    assert code == 200 and body["choices"][0]["text"] == "ok", body
    code, body = health(unix)
    assert code == 200 and body["status"] == "ok" and list(body["broken"]) == ["broken"], body
    assert "unexpected keyword" not in json.dumps(body), "why is in the log, under the error id"
    said = f"HTTP error {body['broken']['broken']['error_id']}: mode 'broken' is broken"
    wait_until(lambda: said in d.output(), T, "the error id in the daemon's log (written through its log queue)")


def test_a_job_past_its_timeout_is_a_504(daemon, tmp_path):
    d = daemon(config_text=gates_config(tmp_path, default_mode="gates"))
    with pytest.raises(openai.InternalServerError) as timed_out:
        sdk(unix=http_socket(d)).completions.create(model="slow", prompt="x")
    assert timed_out.value.status_code == 504
    assert_error(timed_out.value.response.json(), 504, "job_timeout")
    code, body = curl("http://gpuvisor/v1/completions", {"model": "slow", "prompt": "x", "stream": True},
                      unix=http_socket(d))  # fmt: skip
    assert code == 504, "a stream that times out before its first chunk still gets its own status"


@pytest.mark.slow
def test_chat_with_a_model_that_has_no_chat_template_is_a_400(daemon, tmp_path):
    """A model folder whose tokenizer has none (the tiny model, saved
    without the template the built-in config gives it)."""
    folder = tmp_path / "no-template"
    save = "import sys\nfrom worker.modes.generate import build_tiny\nfor part in build_tiny(): part.save_pretrained(sys.argv[1])"
    subprocess.run([sys.executable, "-c", save, str(folder)], env={**os.environ, "PYTHONPATH": repo_pythonpath()},
                   capture_output=True, timeout=T, check=True)  # fmt: skip
    models = {"tiny": {"mode": "generate", "chat": "chat", "completions": "generate"}}
    generate = {"loader": "worker.modes.generate:load", "args": {"model_path": str(folder)}}
    d = daemon(config_text=http_config({"generate": generate}, models,
                                       supervisor={"default_mode": "generate", "warm_standby": False}))  # fmt: skip
    client = sdk(unix=http_socket(d))
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], stream=stream)
        assert "no chat template" in refused.value.message
    assert client.completions.create(model="tiny", prompt="Hi", max_tokens=3).usage.completion_tokens == 3


def test_an_address_off_loopback_without_tokens_stops_the_daemon_before_it_starts(daemon, tmp_path):
    d = daemon(config_text=http_config({"diag": DIAG}, {}, http={"listen": [f"0.0.0.0:{free_port()}"]}),
               wait_ready=False)  # fmt: skip
    assert d.wait() == 6
    assert "[http] key 'listen'" in d.output() and "token_file" in d.output()


def test_a_bad_token_file_or_a_port_in_use_stops_the_daemon_before_it_starts(daemon, tmp_path):
    empty = tmp_path / "tokens"
    empty.write_text("# nobody yet\n")
    d = daemon(config_text=http_config({"diag": DIAG}, {}, http={"token_file": str(empty)}), wait_ready=False)
    assert d.wait() == 6 and "holds no token" in d.output()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = daemon(config_text=http_config({"diag": DIAG}, {}, http={"listen": [f"127.0.0.1:{port}"],
                                                                      "allow_unauthenticated_tcp": True}),
                   wait_ready=False)  # fmt: skip
        assert d.wait() == 6 and "cannot serve" in d.output()


def test_the_http_socket_is_private_and_a_live_one_is_never_taken_over(daemon, tmp_path):
    shared = str(tmp_path / "run" / "http.sock")
    text = http_config({"diag": DIAG}, {}, http={"listen": [f"unix:{shared}"]})
    first = daemon(config_text=text)
    mode = os.stat(shared).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o700
    second = daemon(config_text=text, wait_ready=False)
    assert second.wait() == 1 and "another gpuvisor daemon is serving" in second.output()
    assert health(shared)[0] == 200, "the first daemon keeps its socket"
    first.stop()
    assert not os.path.exists(shared)


def test_without_the_http_extra_a_configured_listener_is_refused_and_the_built_in_one_skipped(daemon, tmp_path):
    hidden = tmp_path / "hidden"
    (hidden / "uvicorn").mkdir(parents=True)
    (hidden / "uvicorn" / "__init__.py").write_text("raise ImportError(\"No module named 'uvicorn'\")\n")
    env = {"PYTHONPATH": os.pathsep.join([str(hidden), repo_pythonpath()])}
    config = tmp_path / "g.toml"
    config.write_text(http_config({"diag": DIAG}, {}))
    done = subprocess.run([sys.executable, "-m", "supervisor.service.cli", "--endpoint", f"ipc://{tmp_path}/run/g.sock",
                           "--config", str(config), "serve"], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=T)  # fmt: skip
    assert done.returncode == 6, done.stderr
    assert "pip install 'gpuvisor[http]'" in done.stderr and "No module named 'uvicorn'" in done.stderr
    built_in = daemon(env=env)
    with built_in.client() as c:
        assert c.submit("echo", 1, mode="diag").result(T) == 1
    assert "no HTTP listener" in built_in.output() and not os.path.exists(http_socket(built_in))


def test_sighup_takes_new_models_and_tokens_without_a_restart(daemon, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("first-token-0123456789\n")
    http = {"token_file": str(tokens)}
    d = daemon(config_text=http_config({"diag": DIAG}, {"a": {"mode": "diag", "completions": "echo"}}, http=http))
    unix = http_socket(d)
    assert [m.id for m in sdk(unix=unix, token="first-token-0123456789").models.list()] == ["a"]
    assert d.config is not None
    with open(d.config, "w") as f:
        f.write(http_config({"diag": DIAG}, {"b": {"mode": "diag", "completions": "echo"}}, http=http))
    tokens.write_text("second-token-0123456789\n")
    after = len(d.notes)
    d.proc.send_signal(signal.SIGHUP)
    d.wait_note("READY=1", after=after)
    assert curl("http://gpuvisor/v1/models", unix=unix, token="first-token-0123456789")[0] == 401
    assert [m.id for m in sdk(unix=unix, token="second-token-0123456789").models.list()] == ["b"]


def test_a_token_over_its_share_of_the_queue_gets_429_while_another_token_is_served(daemon, tmp_path):
    """Each token is a client with its share of the queue (a quarter of
    max_queue here: 2 of 8): the one that floods gets 429 queue_full, the
    other's request is still admitted and answered."""
    tokens = tmp_path / "tokens"
    tokens.write_text("token-of-the-flooder-0001\ntoken-of-the-polite-one-02\n")
    os.chmod(tokens, 0o600)
    d = daemon(config_text=gates_config(tmp_path, default_mode="gates", max_queue=8,
                                        http={"token_file": str(tokens)}))  # fmt: skip
    unix = http_socket(d)
    with d.client() as c:
        wait_until(lambda: c.status()["mode"] == "gates", T, "the mode to load")

    def ask(token: str, prompt: str) -> tuple[int, Any]:
        return curl("http://gpuvisor/v1/completions", {"model": "held", "prompt": prompt}, unix=unix, token=token)

    flooder, polite = "token-of-the-flooder-0001", "token-of-the-polite-one-02"
    with ThreadPoolExecutor(4) as pool:
        held = [pool.submit(ask, flooder, f"f{i}") for i in range(2)]
        with d.client() as c:
            wait_until(lambda: c.status()["queued"] + c.status()["in_flight"] == 2, T, "its two jobs to be taken")
        code, body = ask(flooder, "f2")
        assert code == 429, body
        assert_error(body, 429, "queue_full", "max_queue_per_client")
        answer = pool.submit(ask, polite, "p0")
        with d.client() as c:
            wait_until(lambda: c.status()["queued"] + c.status()["in_flight"] == 3, T, "the other token's job")
        for name in ("f0", "f1", "p0"):
            (tmp_path / f"release-{name}").touch()
        assert [f.result(T)[0] for f in held] == [200, 200]
        assert answer.result(T)[0] == 200
