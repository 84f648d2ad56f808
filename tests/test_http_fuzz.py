"""The HTTP door fuzzed from its own OpenAPI schema: hypothesis draws request
bodies from the schema FastAPI makes of the routes (``app.openapi()``, which
the door does not serve; each body's schema is its request model's, with its
``$defs``), sends them with httpx to a real ``gpuvisor serve``
holding the embedding model, the tiny generator and the diag mode's tasks in
one mode (nothing starts during a case), and every answer must be
an answer: never a 5xx, never a hang, and every refusal OpenAI's error body.

Drawn bodies are valid and invalid alike: each field within its schema's
bounds or outside them, served model names and strangers, the fields the door
refuses (``n``, ``tools``...) and unknown ones, streams, and bytes that are
not JSON at all. The run is bounded and repeatable (``derandomize``: the
same requests every run, a fixed number of them)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.config_http import HttpSettings
from supervisor.service.http.admission import Door
from supervisor.service.http.app import create_app
from tests.helpers import T
from tests.helpers.daemon import serving
from tests.test_http import ASSISTANT, MODEL_T, assert_error, http_config, http_socket

pytestmark = [pytest.mark.daemon, pytest.mark.slow]

MODELS = {
    "minilm": {"mode": "assistant", "embeddings": "embed"},
    "tiny-chat": {"mode": "assistant", "chat": "chat", "completions": "generate", "max_tokens": 16},
    "diag-echo": {"mode": "assistant", "completions": "echo", "chat": "echo"},
}
ENDPOINTS = {"/v1/embeddings": "embeddings", "/v1/chat/completions": "chat", "/v1/completions": "completions"}
EXAMPLES = 150  # per test: about 550 requests in all, well under a minute on a loaded 2-core machine
# A chat body that reaches the model renders its template and generates: about 0.35 s each here, where the
# other paths take milliseconds, so fewer of them keep the suite's time (they draw from the same schema).
EXAMPLES_OF = {"/v1/chat/completions": 50}
SENT: Counter[str] = Counter()  # requests by path
STATUSES: Counter[int] = Counter()  # answers by status

SPEC = create_app(None, Door(HttpSettings())).openapi()  # type: ignore[arg-type]  # the schema needs no Supervisor
BODIES = {path: SPEC["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
          for path in ENDPOINTS}  # fmt: skip
DEFS = {name: schema for body in BODIES.values() for name, schema in body.get("$defs", {}).items()}

JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
JSON = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=3), max_leaves=8)  # fmt: skip
TEXT = st.text(max_size=40) | st.sampled_from(["", " ", "\x00", "💥" * 10, "<|user|>", "{{ 7*7 }}", "a" * 300])
REFUSED_OR_UNKNOWN = ["n", "best_of", "logprobs", "top_logprobs", "echo", "suffix", "presence_penalty",
                      "frequency_penalty", "logit_bias", "tools", "functions", "tool_choice", "response_format",
                      "user", "stream_options", "service_tier"]  # fmt: skip


def strategy(schema: dict[str, Any], strict: bool, name: str = "", served: tuple[str, ...] = tuple(MODELS)
             ) -> st.SearchStrategy[Any]:  # fmt: skip
    """Values for ``schema`` (the subset FastAPI writes): ``strict``, within
    its bounds, a served model and no field it does not name; else now and
    then out of its bounds, a stranger's model, refused and unknown fields."""
    if "$ref" in schema:
        ref = schema["$ref"].rpartition("/")[2]
        return st.deferred(lambda: strategy(DEFS[ref], strict, served=served))
    if name == "model":
        return st.sampled_from(served) if strict else st.sampled_from(sorted(MODELS)) | TEXT
    if "anyOf" in schema:
        return st.one_of([strategy(s, strict) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"]) if strict else st.sampled_from(schema["enum"]) | TEXT
    kind = schema.get("type")
    if kind == "string":
        return TEXT
    if kind == "integer":
        low, high = schema.get("minimum"), schema.get("maximum")
        within = st.integers(None if low is None else int(low), None if high is None else int(high))
        return within if strict else within | st.integers(-(2**70), 2**70)
    if kind == "number":
        low, high = schema.get("minimum", schema.get("exclusiveMinimum")), schema.get("maximum")
        within = st.floats(low, high, allow_nan=False, exclude_min="exclusiveMinimum" in schema)
        return within if strict else within | st.floats(allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(strategy(schema.get("items", {}), strict), min_size=schema.get("minItems", 0), max_size=6)
    if kind == "object":
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        known = st.fixed_dictionaries(
            {k: strategy(v, strict, k, served) for k, v in properties.items() if k in required},
            optional={k: strategy(v, strict, k, served) for k, v in properties.items() if k not in required},
        )
        if strict:
            return known
        extra = st.dictionaries(st.sampled_from(REFUSED_OR_UNKNOWN), JSON, max_size=2)
        return st.builds(lambda a, b: {**b, **a}, known, extra)
    return JSON


def body_strategy(path: str) -> st.SearchStrategy[Any]:
    """Half the bodies strict (to reach the worker), half wild, now and then not even an object."""
    schema = BODIES[path]
    served = tuple(name for name, table in MODELS.items() if ENDPOINTS[path] in table)
    return st.one_of(strategy(schema, True, served=served), strategy(schema, False), JSON)


FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))  # fmt: skip


@pytest.fixture(scope="module")
def http():
    text = http_config(
        {
            "assistant": {
                **ASSISTANT,
                "args": {"parts": [*ASSISTANT["args"]["parts"], {"loader": "worker.modes.diag:load"}]},
            }
        },
        MODELS,
        http={"max_body_bytes": 65536},
        supervisor={"default_mode": "assistant", "warm_standby": False, "max_queue": 64},
    )
    with serving(text, "assistant", MODEL_T) as d:
        transport = httpx2.HTTPTransport(uds=http_socket(d))
        with httpx2.Client(transport=transport, base_url="http://gpuvisor", timeout=T) as client:  # T: a hang guard
            yield client
    print(
        f"\nfuzz: {sum(SENT.values())} requests by path {dict(SENT)}, answers by status {dict(sorted(STATUSES.items()))}"
    )


def answered(response: httpx2.Response, path: str) -> None:
    SENT[path] += 1
    STATUSES[response.status_code] += 1
    # diag-echo's task answers its payload back, not text: by design the door says so (502 bad_task_result).
    wrong_shape = response.status_code == 502 and response.json()["error"]["code"] == "bad_task_result"
    assert response.status_code < 500 or wrong_shape, (response.status_code, response.text[:2000])
    if response.status_code >= 400:
        assert_error(response.json(), response.status_code)


def post(http: httpx2.Client, path: str, content: bytes) -> None:
    with http.stream("POST", path, content=content, headers={"Content-Type": "application/json"}) as response:
        response.read()  # a stream to its end: [DONE], or an error event
    answered(response, path)
    if response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in response.text.split("\n") if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]", response.text[-500:]


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/chat/completions", "/v1/completions"])
def test_no_body_drawn_from_the_schema_gets_a_5xx_or_hangs(http, path):
    @settings(FUZZ, max_examples=EXAMPLES_OF.get(path, EXAMPLES))
    @given(body=body_strategy(path))
    def one(body: Any) -> None:
        post(http, path, json.dumps(body).encode())

    one()


def test_no_bytes_that_are_not_a_request_body_get_a_5xx(http):
    @FUZZ
    @given(content=st.binary(max_size=200) | TEXT.map(str.encode), path=st.sampled_from(sorted(SPEC["paths"])))
    def one(content: bytes, path: str) -> None:
        post(http, path, content)

    one()


def test_no_get_of_the_schemas_paths_gets_a_5xx(http):
    @settings(FUZZ, max_examples=30)
    @given(path=st.sampled_from([*SPEC["paths"], "/", "/v1", "/docs", "/openapi.json", "/v1/models/x"]),
           query=st.text(st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=20))  # fmt: skip
    def one(path: str, query: str) -> None:
        answered(http.get(path, params={"q": query}), path)

    one()
    assert sum(SENT.values()) >= sum(EXAMPLES_OF.get(p, EXAMPLES) for p in ENDPOINTS) + EXAMPLES  # every case ran
