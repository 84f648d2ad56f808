"""``POST /v1/jobs`` (any task, in every answer form), OpenAI routes mapped
to a task that answers the wrong shape, ``GET /v1/models/{id}`` and the
access log, through one real ``gpuvisor serve`` with curl, httpx and the
``openai`` SDK.

The daemon serves one mode, ``kit``: the ``diag`` tasks (test hooks on, for
a stream that records what it produced) beside tasks written here that
answer arrays, bytes and maps with keys JSON cannot name; no torch, and no
process starts during a case."""

from __future__ import annotations

import io
import json
import math
import os

import httpx2
import msgpack
import numpy as np
import openai
import pytest

from tests.helpers import T, wait_until
from tests.helpers.config import DIAG, DIAG_HOOKS
from tests.helpers.daemon import free_port, serving
from tests.test_http import assert_error, curl, http_config, http_socket, sdk, sse

pytestmark = pytest.mark.daemon

PORT = free_port()
SHAPES = """
import numpy as np


def load():
    def array(payload):
        return np.arange(6, dtype=(payload or {}).get("dtype", "<f4")).reshape(2, 3)

    def mixed(payload):
        return {"vector": np.array([0.5, float("nan"), float("inf")], dtype=np.float32), "raw": b"\\x00\\xff",
                "pairs": np.array([1 + 2j], dtype=np.complex64), 7: "a key that is a number", "none": None}

    def bytes_keys(payload):
        return {b"k": 1}

    def rows(payload):
        for i in range(payload["n"]):
            yield np.full((2,), i, dtype=np.int16)
        return {"rows": payload["n"]}

    def bad_second_chunk(payload):
        yield {"step": 1}
        yield {b"step": 2}
        yield {"step": 3}

    return {"array": array, "mixed": mixed, "bytes_keys": bytes_keys, "rows": rows,
            "bad_second_chunk": bad_second_chunk}
"""
MODELS = {
    "pid-as-text": {"mode": "kit", "completions": "pid"},
    "echo-for-all": {"mode": "kit", "embeddings": "echo", "chat": "echo"},
    "org/with-a-slash": {"mode": "kit", "completions": "echo"},
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    made = tmp_path_factory.mktemp("jobs")
    (made / "modes").mkdir()
    (made / "modes" / "httpshapes.py").write_text(SHAPES)
    return made


@pytest.fixture(scope="module")
def served(folder):
    text = http_config(
        {"kit": {"loader": "worker.modes.compose:load",
                 "args": {"parts": [DIAG_HOOKS, {"loader": "httpshapes:load"}]}}, "spare": DIAG},
        MODELS,
        http={"listen": ["unix:http.sock", f"127.0.0.1:{PORT}"], "allow_unauthenticated_tcp": True},
        supervisor={"loader_path": [str(folder / "modes")], "default_mode": "kit", "warm_standby": False},
    )  # fmt: skip
    with serving(text, "kit") as d:
        yield d


@pytest.fixture(scope="module")
def unix(served) -> str:
    return http_socket(served)


def post(unix: str, body: dict, accept: str | None = None) -> httpx2.Response:
    headers = {"Accept": accept} if accept else {}
    with httpx2.Client(transport=httpx2.HTTPTransport(uds=unix), timeout=T) as client:
        return client.post("http://gpuvisor/v1/jobs", json=body, headers=headers)


def test_a_job_answers_its_result_as_json_with_curl(served, unix):
    status, body = curl("http://gpuvisor/v1/jobs", {"mode": "kit", "task": "echo", "payload": {"a": [1, 2.5, "x"]}},
                        unix=unix)  # fmt: skip
    assert (status, body) == (200, {"result": {"a": [1, 2.5, "x"]}})
    status, body = curl("http://gpuvisor/v1/jobs", {"task": "pid"}, unix=unix)  # the loaded mode's, as submit() does
    with served.client() as c:
        assert (status, body) == (200, {"result": c.status()["worker_pid"]})


def test_arrays_bytes_and_other_keys_have_a_documented_json_form(served, unix):
    answer = post(unix, {"mode": "kit", "task": "array"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    assert answer.json() == {"result": {"dtype": "float32", "shape": [2, 3], "data": [0, 1, 2, 3, 4, 5]}}
    big_endian = post(unix, {"mode": "kit", "task": "array", "payload": {"dtype": ">i8"}}).json()["result"]
    assert big_endian == {"dtype": "int64", "shape": [2, 3], "data": [0, 1, 2, 3, 4, 5]}
    mixed = post(unix, {"mode": "kit", "task": "mixed"}).json()["result"]
    assert mixed == {"vector": {"dtype": "float32", "shape": [3], "data": [0.5, None, None]},
                     "raw": {"base64": "AP8="}, "pairs": {"dtype": "complex64", "shape": [1], "data": [[1.0, 2.0]]},
                     "7": "a key that is a number", "none": None}  # fmt: skip
    refused = post(unix, {"mode": "kit", "task": "bytes_keys"})
    assert refused.status_code == 406
    assert_error(refused.json(), 406, "not_acceptable", "application/msgpack")
    assert msgpack.unpackb(post(unix, {"mode": "kit", "task": "bytes_keys"}, "application/msgpack").content,
                           strict_map_key=False) == {b"k": 1}  # fmt: skip


def test_accept_msgpack_and_npy_give_the_raw_forms(served, unix):
    packed = post(unix, {"mode": "kit", "task": "mixed"}, "application/msgpack")
    assert packed.status_code == 200 and packed.headers["content-type"] == "application/msgpack"
    value = msgpack.unpackb(packed.content, strict_map_key=False)
    vector = value["vector"]
    assert (vector["dtype"], vector["shape"]) == ("<f4", [3])
    got = np.frombuffer(vector["data"], dtype=vector["dtype"]).reshape(vector["shape"])
    np.testing.assert_array_equal(got, np.array([0.5, math.nan, math.inf], dtype=np.float32))
    assert value["raw"] == b"\x00\xff" and value[7] == "a key that is a number"
    older = post(unix, {"mode": "kit", "task": "echo", "payload": [1]}, "application/x-msgpack")
    assert older.headers["content-type"] == "application/x-msgpack" and msgpack.unpackb(older.content) == [1]

    npy = post(unix, {"mode": "kit", "task": "array", "payload": {"dtype": "<i4"}}, "application/x-npy")
    assert npy.status_code == 200 and npy.headers["content-type"] == "application/x-npy"
    np.testing.assert_array_equal(np.load(io.BytesIO(npy.content), allow_pickle=False),
                                  np.arange(6, dtype="<i4").reshape(2, 3))  # fmt: skip
    not_array = post(unix, {"mode": "kit", "task": "echo", "payload": {"a": 1}}, "application/x-npy")
    assert not_array.status_code == 406
    assert_error(not_array.json(), 406, "not_acceptable", "a map with the keys ['a']")
    fallback = post(unix, {"mode": "kit", "task": "echo", "payload": 1}, "application/x-npy, application/json;q=0.5")
    assert fallback.status_code == 200 and fallback.json() == {"result": 1}
    for accept in ("text/html", "application/msgpack;q=0, application/json;q=0"):
        refused = post(unix, {"mode": "kit", "task": "echo"}, accept)
        assert refused.status_code == 406, accept
        assert_error(refused.json(), 406, "not_acceptable", "application/json")


def test_a_stream_is_one_event_per_chunk_then_the_result_then_done(served, unix):
    status, text = curl("http://gpuvisor/v1/jobs", {"mode": "kit", "task": "rows", "payload": {"n": 3},
                                                    "stream": True}, unix=unix, args=("-N",))  # fmt: skip
    assert status == 200
    assert sse(text) == [*({"chunk": {"dtype": "int16", "shape": [2], "data": [i, i]}} for i in range(3)),
                         {"result": {"rows": 3}}, "[DONE]"]  # fmt: skip
    failed = sse(post(unix, {"mode": "kit", "task": "bad_second_chunk", "stream": True}).text)
    assert failed[0] == {"chunk": {"step": 1}} and failed[-1] == "[DONE]" and len(failed) == 3
    assert_error(failed[1], 406, "not_acceptable", "no JSON form")
    refused = post(unix, {"mode": "kit", "task": "count", "stream": True}, "application/msgpack")
    assert refused.status_code == 406
    assert_error(refused.json(), 406, "not_acceptable", "text/event-stream")


def test_a_caller_that_leaves_a_stream_stops_the_worker_producing(served, unix, folder):
    record = folder / "left"
    body = {"mode": "kit", "task": "count", "payload": {"n": 400, "delay": 0.02, "record": str(record)},
            "stream": True}  # fmt: skip
    with httpx2.Client(transport=httpx2.HTTPTransport(uds=unix), timeout=T) as client:
        with client.stream("POST", "http://gpuvisor/v1/jobs", json=body) as answer:
            assert json.loads(next(answer.iter_lines()).removeprefix("data: ")) == {"chunk": 0}
    wait_until(lambda: record.exists() and record.read_text().endswith("closed\n"), T, "the generator to be closed")
    assert len(record.read_text().splitlines()) < 400


def test_a_caller_that_leaves_a_stream_before_its_first_chunk_cancels_it_cleanly(served, unix, folder):
    record = folder / "never"
    body = {"mode": "kit", "task": "count", "payload": {"n": 3, "record": str(record)}, "stream": True}
    with served.client() as c:
        blocker = c.submit("sleep", {"seconds": 1.5}, mode="kit")  # the stream waits in the queue behind it
        wait_until(lambda: c.status()["in_flight"] == 1, T, "the sleep to run")
        with httpx2.Client(transport=httpx2.HTTPTransport(uds=unix), timeout=httpx2.Timeout(T, read=0.3)) as client:
            with pytest.raises(httpx2.ReadTimeout):
                with client.stream("POST", "http://gpuvisor/v1/jobs", json=body) as answer:
                    next(answer.iter_lines())
        assert blocker.result(T) == {"slept": 1.5}
        assert c.submit("echo", "after", mode="kit").result(T) == "after"  # the queue has moved past it
    assert not record.exists(), "the stream its caller left while it was queued never ran"
    assert "InvalidStateError" not in served.output() and "Traceback" not in served.output()


def test_a_wrong_request_is_a_clear_openai_shaped_error(served, unix):
    cases = [
        ({"mode": "kit", "task": "no_such_task"}, 404, "unknown_task", "its tasks are array, bad_second_chunk"),
        ({"mode": "no_such_mode", "task": "echo"}, 404, "unknown_mode", "the modes are kit, spare"),
        ({"task": 5}, 400, None, "task: Input should be a valid string"),
        ({"mode": "kit", "task": "echo", "timeout": "3"}, 400, None, "timeout"),
        ({"mode": "kit", "task": "echo", "retries": -1}, 400, None, "retries"),
        ({"mode": "kit", "task": "echo", "paylod": {}}, 400, None, "paylod: Extra inputs are not permitted"),
        ({"mode": "kit", "task": "count", "stream": True, "retries": 1}, 400, None, "cannot be retried"),
        ({"mode": "kit", "task": "sleep", "payload": {"seconds": -1}}, 400, "job_failed", "non-negative"),
    ]
    for body, status, code, words in cases:
        answer = post(unix, body)
        assert answer.status_code == status, (body, answer.text)
        assert_error(answer.json(), status, code, words)
    status, answer = curl("http://gpuvisor/v1/jobs", "[1, 2]", unix=unix)
    assert status == 400
    assert_error(answer, 400, None, "JSON object")


def test_a_callers_shorter_timeout_gives_up_without_killing_the_worker(served, unix):
    with served.client() as c:
        worker = c.status()["worker_pid"]
    answer = post(unix, {"mode": "kit", "task": "sleep", "payload": {"seconds": 1}, "timeout": 0.2})
    assert answer.status_code == 504
    assert_error(answer.json(), 504, "job_timeout")
    assert post(unix, {"mode": "kit", "task": "pid"}).json() == {"result": worker}


def test_an_openai_route_whose_task_answers_the_wrong_shape_names_the_shape(served, unix):
    client = sdk(unix=unix)
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model="pid-as-text", prompt="x")
    assert caught.value.status_code == 502
    assert_error({"error": caught.value.body}, 502, "bad_task_result", "answered an int")
    assert "needs a map with 'text'" in str(caught.value)
    status, text = curl("http://gpuvisor/v1/completions", {"model": "pid-as-text", "prompt": "x", "stream": True},
                        unix=unix)  # fmt: skip
    events = sse(text)
    assert status == 200 and events[-1] == "[DONE]"
    assert_error(events[-2], 502, "bad_task_result", "answered an int")
    status, body = curl("http://gpuvisor/v1/embeddings", {"model": "echo-for-all", "input": "x"}, unix=unix)
    assert status == 502
    assert_error(body, 502, "bad_task_result", "answered a map with the keys ['texts', 'details']")
    status, body = curl("http://gpuvisor/v1/chat/completions",
                        {"model": "echo-for-all", "messages": [{"role": "user", "content": "x"}]}, unix=unix)  # fmt: skip
    assert status == 502
    assert_error(body, 502, "bad_task_result", "/v1/chat/completions needs a map with 'text'")
    error_id = body["error"]["message"].rsplit("error id ", 1)[1].rstrip(")")
    line = wait_until(lambda: next((x for x in served.output().splitlines() if error_id in x), None), T,
                      "the error's line in the log")  # fmt: skip
    assert "bad_task_result" in line and "Traceback" not in served.output()


def test_models_retrieve_names_one_model_or_is_a_404(served, unix):
    client = sdk(unix=unix)
    model = client.models.retrieve("pid-as-text")
    assert model.id == "pid-as-text" and model.model_extra["endpoints"] == ["/v1/completions"]
    assert client.models.retrieve("org/with-a-slash").id == "org/with-a-slash"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.body["code"] == "model_not_found"


def test_the_admin_routes_are_open_on_the_unix_socket_to_the_daemons_user_only(served, unix):
    status, body = curl("http://gpuvisor/v1/admin/status", unix=unix)
    assert status == 200 and body["mode"] == "kit"
    status, body = curl(f"http://127.0.0.1:{PORT}/v1/admin/status")
    assert status == 403
    assert_error(body, 403, "forbidden", "admin_token_file")


def test_every_request_has_an_access_log_line(served, unix):
    curl("http://gpuvisor/v1/models/no-such-model", unix=unix)
    curl(f"http://127.0.0.1:{PORT}/v1/models/pid-as-text%0Afake-line")  # a line break, escaped as it was sent

    def line(words: str) -> str | None:
        return next((x for x in served.output().splitlines() if words in x), None)

    unix_line = wait_until(lambda: line("HTTP GET /v1/models/no-such-model 404 "), T, "the unix socket's line")
    assert unix_line.endswith(f"s unix uid {os.getuid()}"), unix_line
    tcp_line = wait_until(lambda: line("HTTP GET /v1/models/pid-as-text%0Afake-line 404 "), T, "the TCP line")
    assert " 127.0.0.1:" in tcp_line, tcp_line
