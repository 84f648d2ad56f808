"""The HTTP door of a real ``gpuvisor serve``, driven as its users drive it:
the ``openai`` SDK and ``curl``, on the unix socket and on loopback TCP.

One daemon serves the whole module with one mode that holds the embedding
model and the tiny generator (with a chat template): every case leaves it
serving, and no case starts a process of its own. The helpers at the top
are shared by the other ``test_http_*`` modules."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tomllib
from typing import Any

import httpx2
import numpy as np
import openai
import psutil
import pytest

from tests.helpers import T
from tests.helpers.config import config_text
from tests.helpers.daemon import RunningDaemon, free_port, serving

pytestmark = [pytest.mark.daemon, pytest.mark.slow]
MODEL_T = 3 * T  # a wait that may include loading torch and a model on a shared CPU

TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# ---------------------------------------------------------------- helpers for every test_http_* module


def http_config(modes: dict[str, Any], models: dict[str, dict[str, Any]], *, http: dict[str, Any] | None = None,
                supervisor: dict[str, Any] | None = None, daemon: dict[str, Any] | None = None) -> str:  # fmt: skip
    """``config_text`` plus ``[http]`` (``http``, listening on ``http.sock``
    beside the daemon's socket unless it says otherwise) and a
    ``[http.models."NAME"]`` table per model."""
    text = config_text(modes, supervisor=supervisor, daemon=daemon)
    text += "[http]\n" + "".join(
        f"{k} = {json.dumps(v)}\n" for k, v in {"listen": ["unix:http.sock"], **(http or {})}.items()
    )
    for name, table in models.items():
        text += f"[http.models.{json.dumps(name)}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
    parsed = tomllib.loads(text)  # JSON's strings, numbers and lists are TOML's too: check that it read back
    assert parsed["http"].get("models", {}) == models, text
    return text


def http_socket(d: RunningDaemon) -> str:
    assert d.endpoint is not None
    return os.path.join(os.path.dirname(d.endpoint.removeprefix("ipc://")), "http.sock")


def sdk(*, unix: str | None = None, base: str = "http://gpuvisor", token: str = "no-token") -> openai.OpenAI:
    """The real SDK, on a unix socket (``unix``) or at ``base``; no retries,
    so a 429 or a 503 is seen as it is."""
    http_client = openai.DefaultHttpxClient(transport=httpx2.HTTPTransport(uds=unix)) if unix else None
    return openai.OpenAI(base_url=f"{base}/v1", api_key=token, max_retries=0, timeout=MODEL_T, http_client=http_client)


def curl(url: str, body: Any = None, *, unix: str | None = None, token: str | None = None,
         args: tuple[str, ...] = ()) -> tuple[int, Any]:  # fmt: skip
    """``curl`` as a user types it (``--json``, which says the body is JSON;
    a large body from standard input, ``--json @-``): the status and the
    body, parsed as JSON when it is."""
    argv = ["curl", "-sS", "-w", "\n%{http_code}", *(["--unix-socket", unix] if unix else [])]
    if token is not None:
        argv += ["-H", f"Authorization: Bearer {token}"]
    text = None if body is None else body if isinstance(body, str) else json.dumps(body)
    large = text is not None and len(text) > 65536  # past what one argument may hold
    if text is not None:
        argv += ["--json", "@-" if large else text]
    done = subprocess.run([*argv, *args, url], input=text if large else None, capture_output=True, text=True,
                          timeout=MODEL_T)  # fmt: skip
    assert done.returncode == 0, done.stderr
    text, _, status = done.stdout.rpartition("\n")
    try:
        return int(status), json.loads(text)
    except json.JSONDecodeError:
        return int(status), text


def sse(text: str) -> list[Any]:
    """The ``data:`` payloads of a server-sent event stream, JSON parsed, ``[DONE]`` as it is."""
    events = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def assert_error(body: Any, status: int, code: str | None = None, words: str = "") -> None:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    assert words in error["message"], error


# ---------------------------------------------------------------- the module's daemon

PORT = free_port()
MODELS = {
    "minilm": {"mode": "assistant", "embeddings": "embed"},
    "tiny-chat": {"mode": "assistant", "chat": "chat", "completions": "generate", "max_tokens": 1000},
    "diag-echo": {"mode": "diag", "completions": "echo"},
}
ASSISTANT = {
    "loader": "worker.modes.compose:load",
    "args": {"parts": [
        {"loader": "worker.modes.embed:load", "args": {"device": "cpu"}},
        {"loader": "worker.modes.generate:load", "args": {"device": "cpu", "chat_template": TEMPLATE}},
    ]},
}  # fmt: skip


@pytest.fixture(scope="module")
def served():
    """The daemon, its mode loaded before the first case (nothing starts
    during a case, so each case's check for leftover processes holds)."""
    text = http_config(
        {"assistant": ASSISTANT, "diag": "worker.modes.diag:load"},
        MODELS,
        http={
            "listen": ["unix:http.sock", f"127.0.0.1:{PORT}"],
            "allow_unauthenticated_tcp": True,
            "max_body_bytes": 65536,
        },
        supervisor={"default_mode": "assistant", "warm_standby": False},
    )
    with serving(text, "assistant", MODEL_T) as d:
        yield d


@pytest.fixture(scope="module")
def unix(served) -> str:
    return http_socket(served)


TEXTS = ["A man plays the guitar.", "Someone is playing a guitar.", "The stock market fell today."]


def test_embeddings_are_the_embed_tasks_vectors_as_floats_and_as_base64(served, unix):
    with served.client() as c:
        direct = c.submit("embed", {"texts": TEXTS, "details": True}, mode="assistant").result(MODEL_T)
    client = sdk(unix=unix)
    # Without encoding_format the SDK asks for base64 and decodes it to floats itself.
    decoded = client.embeddings.create(model="minilm", input=TEXTS)
    assert [d.index for d in decoded.data] == [0, 1, 2] and decoded.model == "minilm"
    got = np.array([d.embedding for d in decoded.data], dtype=np.float32)
    np.testing.assert_allclose(got, direct["embeddings"], rtol=0, atol=1e-6)
    assert decoded.usage.prompt_tokens == decoded.usage.total_tokens == sum(direct["tokens"]) > len(TEXTS)
    floats = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    np.testing.assert_array_equal(np.array([d.embedding for d in floats.data], dtype=np.float32), got)
    encoded = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="base64")
    raw = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in encoded.data]  # type: ignore[arg-type]
    np.testing.assert_array_equal(np.stack(raw), got)
    one = client.embeddings.create(model="minilm", input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(np.array(one.data[0].embedding, dtype=np.float32), got[0], rtol=0, atol=1e-6)


def test_embeddings_with_curl_on_loopback_tcp_and_base64_is_little_endian_float32(served):
    status, body = curl(f"http://127.0.0.1:{PORT}/v1/embeddings", {"model": "minilm", "input": TEXTS[:2]})
    assert status == 200 and body["object"] == "list"
    floats = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert floats.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(floats, axis=1), 1.0, atol=1e-5)
    status, body = curl(f"http://127.0.0.1:{PORT}/v1/embeddings",
                        {"model": "minilm", "input": TEXTS[:2], "encoding_format": "base64"})  # fmt: skip
    assert status == 200
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]])
    np.testing.assert_array_equal(decoded, floats)


def test_chat_whole_and_streamed_say_the_same_through_the_template(served, unix):
    client = sdk(unix=unix)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    whole = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=8)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("length", "stop")
    assert whole.usage.completion_tokens <= 8 and whole.usage.prompt_tokens > 10  # the template's markup counts
    with served.client() as c:
        direct = c.submit("chat", {"messages": messages, "max_new_tokens": 8}, mode="assistant").result(MODEL_T)
    assert choice.message.content == direct["text"]
    assert whole.usage.completion_tokens == len(direct["tokens"])
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_a_chat_stream_over_curl_is_server_sent_events_ending_in_done(served, unix):
    status, body = curl("http://gpuvisor/v1/chat/completions", unix=unix, args=("-N",), body={
        "model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True})  # fmt: skip
    assert status == 200
    events = sse(body)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] in ("length", "stop")


def test_completions_respect_max_tokens_and_stop(served, unix):
    client = sdk(unix=unix)
    whole = client.completions.create(model="tiny-chat", prompt="Once upon a time", max_tokens=12)
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 12
    assert whole.choices[0].finish_reason == "length"
    text = whole.choices[0].text
    stop = next((text[i : i + 2] for i in range(3, len(text) - 2) if text[i : i + 2].isprintable()), None)
    assert stop is not None, f"no printable pair in {text!r}"
    stopped = client.completions.create(model="tiny-chat", prompt="Once upon a time", max_tokens=12, stop=[stop])
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny-chat", prompt="Once upon a time", max_tokens=12, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text


def test_models_lists_the_configured_names_and_what_is_loaded(served, unix):
    listed = {m.id: m for m in sdk(unix=unix).models.list()}
    assert set(listed) == set(MODELS)
    assert listed["minilm"].model_extra["mode"] == "assistant" and listed["minilm"].model_extra["loaded"] is True
    assert listed["diag-echo"].model_extra["loaded"] is False
    assert listed["tiny-chat"].model_extra["endpoints"] == ["/v1/chat/completions", "/v1/completions"]


def test_the_daemon_serving_http_never_loads_torch(served, unix):
    """The HTTP door runs in the daemon's process, which must hold no CUDA
    context: after embeddings and chat have gone through it, no torch."""
    sdk(unix=unix).embeddings.create(model="minilm", input="hello")

    def torch_in(pid: int) -> list[str]:
        return [m.path for m in psutil.Process(pid).memory_maps() if "libtorch" in m.path or "libcuda" in m.path]

    with served.client() as c:
        worker = c.status()["worker_pid"]
    assert torch_in(worker), "the worker runs torch (this proves the check can see it)"
    assert torch_in(served.proc.pid) == []


def test_health_is_200_with_the_mode_while_serving(served, unix):
    status, body = curl("http://gpuvisor/health", unix=unix)
    assert status == 200 and body["status"] == "ok" and body["mode"] == "assistant"


def test_metrics_are_the_prometheus_text_format(served, unix):
    from prometheus_client.parser import text_string_to_metric_families

    status, body = curl("http://gpuvisor/metrics", unix=unix)
    assert status == 200, body
    names = {family.name for family in text_string_to_metric_families(body)}
    assert {"gpuvisor_jobs", "gpuvisor_queue_depth", "gpuvisor_switches", "gpuvisor_worker_rss_bytes"} <= names


BAD = [
    ("/v1/embeddings", {"input": "x"}, "model", None),
    ("/v1/embeddings", {"model": "minilm", "input": [[1, 2, 3]]}, "token ids", "unsupported"),
    ("/v1/embeddings", {"model": "minilm", "input": []}, "must not be empty", None),
    ("/v1/embeddings", {"model": "minilm", "input": "x", "dimensions": 3}, "384", "unsupported"),
    ("/v1/embeddings", {"model": "tiny-chat", "input": "x"}, "not served at /v1/embeddings", "model_not_supported"),
    ("/v1/chat/completions", {"model": "tiny-chat", "messages": []}, "messages", None),
    ("/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n=2",
     "unsupported"),
    ("/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}],
                              "temperature": "hot"}, "temperature", None),
    ("/v1/completions", {"model": "tiny-chat", "prompt": [1, 2]}, "one string", "unsupported"),
    ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": 100000}, "limit of 1000", None),
    # Input only the worker can judge (the mode's own limit is 512): the task refuses it, the caller's fault too.
    ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": 600}, "max_new_tokens", "job_failed"),
    ("/v1/completions", "{not json", "not JSON", None),
]  # fmt: skip


@pytest.mark.parametrize("path, body, words, code", BAD, ids=[f"{b[0]}-{b[2]}" for b in BAD])
def test_bad_input_is_a_400_with_openais_error_body(served, unix, path, body, words, code):
    status, answer = curl(f"http://gpuvisor{path}", body, unix=unix)
    assert status == 400, answer
    assert_error(answer, 400, code, words)


def test_an_unknown_model_is_a_404_and_the_sdk_raises_not_found(served, unix):
    status, answer = curl(f"http://127.0.0.1:{PORT}/v1/embeddings", {"model": "nope", "input": "x"})
    assert status == 404
    assert_error(answer, 404, "model_not_found", "'nope'")
    with pytest.raises(openai.NotFoundError):
        sdk(unix=unix).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_a_body_over_max_body_bytes_is_a_413(served, unix):
    status, answer = curl("http://gpuvisor/v1/embeddings", {"model": "minilm", "input": "x" * 70000}, unix=unix)
    assert status == 413
    assert_error(answer, 413, "request_too_large", "65536")


# ---------------------------------------------------------------- a mode for the fault tests

GATES = '''
"""Tasks that wait for the test: each answers in the generate task's shape
(a prompt in, text out) so the completions endpoint can drive it; and tasks
that answer or fail as the door's limits and error answers need."""
import json, os, sys, time

import numpy as np

from protocol import Forbidden, ModeBroken, RequestTooLarge

def _wait(path, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nobody made {path}")
        time.sleep(0.01)

def load(folder, opens=None):
    if opens:  # a mode whose load waits for the test: the daemon's first switch is under way meanwhile
        _wait(os.path.join(folder, opens))

    def hold(payload):
        """Mark that it runs, then wait for release-PROMPT."""
        prompt = payload["prompt"]
        open(os.path.join(folder, "ran-" + prompt), "w").close()
        _wait(os.path.join(folder, "release-" + prompt))
        return {"text": prompt, "tokens": [1], "prompt_tokens": 1, "finish_reason": "stop"}

    def trickle(payload):
        """max_new_tokens chunks, 50 ms apart, each written to chunks-PROMPT as it is made."""
        path = os.path.join(folder, "chunks-" + payload["prompt"])
        n = payload.get("max_new_tokens", 16)
        for i in range(n):
            with open(path, "a") as f:
                f.write(f"{i}\\n")
            yield {"token": i, "text": f"{i} "}
            time.sleep(0.05)
        return {"text": "", "tokens": list(range(n)), "prompt_tokens": 1, "finish_reason": "length"}

    def sleep(payload):
        time.sleep(60)

    def crash(payload):
        sys.stderr.write("SECRET in /srv/private/customers.csv\\n")  # what must never leave the machine
        sys.stderr.flush()
        os._exit(3)

    def say(payload):
        """The payload the door sent, as the text: the keys it set, the limits it kept."""
        keys = {k: v for k, v in payload.items() if k not in ("prompt", "messages")}
        return {"text": json.dumps(keys, sort_keys=True), "tokens": [1], "prompt_tokens": 1, "finish_reason": "stop"}

    def vectors(width):
        def embed(payload):
            with open(os.path.join(folder, f"calls-{width}"), "a") as f:
                f.write("1\\n")
            n = len(payload["texts"])
            rows = np.random.default_rng(n).standard_normal((n, width)).astype(np.float32)
            return {"embeddings": rows, "tokens": [len(t) for t in payload["texts"]]}
        return embed

    def refuse(payload):
        raise ValueError("refuse: the input is no good, see\\n" + "x" * 500 + "\\n  File /srv/private/handler.py")

    def explode(payload):
        raise RuntimeError("cannot open /srv/private/weights.bin")

    def broken(payload):
        raise ModeBroken("the mode failed 3 times in 60 s: /srv/private/loader.py", retry_in=7.2)

    def forbidden(payload):
        raise Forbidden("not yours")

    def too_large(payload):
        raise RequestTooLarge("too many jobs of yours are queued")

    return {"hold": hold, "trickle": trickle, "sleep": sleep, "crash": crash, "say": say, "vectors": vectors(384),
            "wide": vectors(16384), "refuse": refuse, "explode": explode, "broken": broken, "forbidden": forbidden,
            "too_large": too_large}
'''
GATE_MODELS = {
    "held": {"mode": "gates", "completions": "hold"},
    "trickle": {"mode": "gates", "completions": "trickle"},
    "slow": {"mode": "gates", "completions": "sleep", "timeout": 1},
    "crash": {"mode": "gates", "completions": "crash"},
}


def gates(folder) -> dict[str, Any]:
    """The fault tests' mode: its loader written into ``folder`` (also where
    its marks go), found through ``loader_path``."""
    (folder / "modes").mkdir(exist_ok=True)
    (folder / "modes" / "httpgates.py").write_text(GATES)
    return {"loader": "httpgates:load", "args": {"folder": str(folder)}}
