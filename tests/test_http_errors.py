"""The HTTP door's refusals and a caller that leaves, on one daemon that
asks for a bearer token on every address: its unix socket, loopback TCP,
and an address of this machine that is not loopback (where one exists).

The mode's tasks wait for files the test makes, so "running", "queued" and
"released" are states the test sets, never moments it guesses."""

from __future__ import annotations

import os
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import psutil
import pytest

from tests.helpers import T, wait_until
from tests.helpers.config import secret_file
from tests.helpers.daemon import RunningDaemon, free_port, serving
from tests.test_http import GATE_MODELS, assert_error, curl, gates, http_config, http_socket, sdk

pytestmark = pytest.mark.daemon

TOKEN = "s3cret-token-for-the-http-tests"
PORT, OUTSIDE_PORT = free_port(), free_port()


def outside_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, if it has one."""
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family.name == "AF_INET" and not a.address.startswith("127."):
                return a.address
    return None


OUTSIDE = outside_address()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("gates")


@pytest.fixture(scope="module")
def served(folder):
    tokens = secret_file(folder / "tokens", "# who may call", "", "an-older-token-still-valid", TOKEN)
    listen = ["unix:http.sock", f"127.0.0.1:{PORT}"] + ([f"{OUTSIDE}:{OUTSIDE_PORT}"] if OUTSIDE else [])
    text = http_config(
        {"gates": gates(folder)},
        GATE_MODELS,
        http={"listen": listen, "token_file": str(tokens)},
        supervisor={"loader_path": [str(folder / "modes")], "default_mode": "gates", "max_queue": 2, "max_queue_per_client": 2,
                    "warm_standby": False},
    )  # fmt: skip
    with serving(text, "gates") as d:
        yield d


@pytest.fixture(scope="module")
def unix(served) -> str:
    return http_socket(served)


def status(d: RunningDaemon) -> dict:
    with d.client() as c:
        return c.status()


def release(folder, prompt: str) -> None:
    (folder / f"release-{prompt}").touch()


def assert_token_wanted(base: str, socket: str | None) -> None:
    for token in (None, "wrong-token-of-enough-length", TOKEN[:-1]):
        code, body = curl(f"{base}/v1/models", unix=socket, token=token)
        assert code == 401, (base, token, body)
        assert_error(body, 401, "invalid_api_key", "bearer token")
    with pytest.raises(openai.AuthenticationError):
        sdk(unix=socket, base=base, token="wrong-token-of-enough-length").models.list()
    assert {m.id for m in sdk(unix=socket, base=base, token=TOKEN).models.list()} == set(GATE_MODELS)
    assert curl(f"{base}/v1/models", unix=socket, token="an-older-token-still-valid")[0] == 200
    code, body = curl(f"{base}/health", unix=socket)
    assert code == 200 and body["status"] == "ok", "a load balancer's probe needs no token"


def test_the_unix_socket_and_loopback_want_the_token_once_a_file_names_tokens(served, unix):
    assert_token_wanted("http://gpuvisor", unix)
    assert_token_wanted(f"http://127.0.0.1:{PORT}", None)


@pytest.mark.skipif(OUTSIDE is None, reason="this machine has no IPv4 address but loopback to serve on")
def test_an_address_off_loopback_is_served_with_the_token_only(served):
    assert_token_wanted(f"http://{OUTSIDE}:{OUTSIDE_PORT}", None)


def test_a_full_queue_is_a_429(served, unix, folder):
    client = sdk(unix=unix, token=TOKEN)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.completions.create, model="held", prompt="q1")
        wait_until(lambda: (folder / "ran-q1").exists(), T, "the first held job to run")
        second = pool.submit(client.completions.create, model="held", prompt="q2")
        wait_until(lambda: status(served)["queued"] == 1, T, "the second job to wait in the queue")
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(model="held", prompt="q3")
        assert refused.value.status_code == 429
        assert_error(refused.value.response.json(), 429, "queue_full", "max_queue")
        release(folder, "q1")
        release(folder, "q2")
        assert first.result(T).choices[0].text == "q1" and second.result(T).choices[0].text == "q2"
    assert not (folder / "ran-q3").exists()


def test_a_client_that_leaves_cancels_its_queued_job(served, unix, folder):
    client = sdk(unix=unix, token=TOKEN)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.completions.create, model="held", prompt="c1")
        wait_until(lambda: (folder / "ran-c1").exists(), T, "the first job to run")
        leaver = subprocess.Popen(["curl", "-sS", "--unix-socket", unix, "-H", f"Authorization: Bearer {TOKEN}",
                                   "--json", '{"model": "held", "prompt": "c2"}', "http://gpuvisor/v1/completions"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            wait_until(lambda: status(served)["queued"] == 1, T, "the leaver's job to wait in the queue")
        finally:
            leaver.kill()
            leaver.wait(T)
        wait_until(lambda: "its job was cancelled before it ran" in served.output(), T, "the daemon to see it leave")
        release(folder, "c1")
        release(folder, "c3")  # c3 runs at once when its turn comes: after c2, had c2 not been cancelled
        assert running.result(T).choices[0].text == "c1"
        assert client.completions.create(model="held", prompt="c3").choices[0].text == "c3"
    assert not (folder / "ran-c2").exists(), "the job of a client that left ran anyway"


def test_a_client_that_leaves_a_stream_stops_the_worker_producing(served, unix, folder):
    chunks = folder / "chunks-s1"
    transport = httpx2.HTTPTransport(uds=unix)
    with httpx2.Client(transport=transport, timeout=T) as http:
        with http.stream("POST", "http://gpuvisor/v1/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                         json={"model": "trickle", "prompt": "s1", "max_tokens": 100, "stream": True}) as response:  # fmt: skip
            assert response.status_code == 200
            lines = response.iter_lines()
            got = 0
            for line in lines:
                got += line.startswith("data: ")
                if got == 3:
                    break
    # The connection is closed: the reader has left after three chunks.
    at_leaving = len(chunks.read_text().splitlines())
    wait_until(lambda: status(served)["in_flight"] == 0, T, "the stream's job to end")
    after = len(chunks.read_text().splitlines()) - at_leaving
    assert after <= 2, f"the worker produced {after} chunks after its reader left (it had made {at_leaving})"


def test_a_task_that_does_not_stream_still_answers_a_stream_with_its_text(served, unix, folder):
    release(folder, "whole")
    chunks = list(sdk(unix=unix, token=TOKEN).completions.create(model="held", prompt="whole", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "whole"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_concurrent_requests_are_each_answered_once(served, unix):
    client = sdk(unix=unix, token=TOKEN)
    results: list[str] = []
    lock = threading.Lock()

    def one(n: int) -> None:
        for i in range(5):
            text = "".join(c.choices[0].text for c in client.completions.create(
                model="trickle", prompt=f"p{n}-{i}", max_tokens=2, stream=True))  # fmt: skip
            with lock:
                results.append(text)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    assert results == ["0 1 "] * 10
    assert os.path.exists(unix)
