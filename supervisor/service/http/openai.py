"""OpenAI's request and response shapes, as far as gpuvisor serves them.

Requests are pydantic models, so a wrong type or a missing field is a 400
naming the field before anything is queued; what is too much for the door
(inputs, messages, characters, stop strings, tokens: ``[http]``'s limits) is
refused here too, before any work. Fields a client may send that
gpuvisor does not implement (``n`` > 1, tools, logprobs, penalties...) are
refused with a 400 when set to anything but their neutral value, rather than
ignored: an answer computed without them would be silently wrong. Unknown
fields are accepted, as OpenAI's own API lets new SDKs send them, and
dropped as the body is read: nothing of them is kept while the job waits.

``parse`` reads a body: orjson (with the cyclic collector paused: parsing
makes no cycles, and a collection every few hundred new containers would
walk millions of them), then the lists whose length is bounded (inputs,
messages, stop strings) are counted before pydantic looks at one item.
Measured for the largest body (16 MiB) of the worst shapes: at most about
490 MB of memory, and 0.7 s of the event loop with freeing it, all of it
freed once the request is read (``json`` costs as much and up to 4 times as long, pydantic's own
JSON reader up to 800 MB once a field is refused, and a union of list types
tried item by item took gigabytes: so ``input`` is checked by hand).

Responses are plain dicts: the embeddings of a large batch would take
longer to pass through a response model than to compute. The embeddings
answer is encoded by orjson straight from the float32 array (each value as
the shortest text that reads back to the same float32), on a thread of its
own, so a large one never holds up the event loop.
"""

from __future__ import annotations

import base64
import gc
import reprlib
import time
import uuid
from typing import Any, Literal, TypeVar

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import SkipJsonSchema

from protocol import MAX_MESSAGE_BYTES
from supervisor.config_http import HttpSettings
from supervisor.service.http.errors import ApiError, incident, invalid, short

FRAME_MARGIN = 64 * 1024  # room in a frame for what travels beside an answer's array
GREEDY_BELOW = 1e-3  # a temperature under this samples as 0 does: dividing logits by less can overflow to inf

# field -> the values that mean "not used"; anything else is refused.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


_SHOWN = reprlib.Repr()  # a refused value, as the answer shows it: a few items of a long list, not all of them
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxstring, _SHOWN.maxother = 2, 4, 4, 60, 60


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are dropped, never kept while the job waits
    model: str
    # Read only to be refused unless neutral (_NEUTRAL), whatever their type; not in the schema.
    n: SkipJsonSchema[Any] = None
    best_of: SkipJsonSchema[Any] = None
    logprobs: SkipJsonSchema[Any] = None
    top_logprobs: SkipJsonSchema[Any] = None
    echo: SkipJsonSchema[Any] = None
    suffix: SkipJsonSchema[Any] = None
    presence_penalty: SkipJsonSchema[Any] = None
    frequency_penalty: SkipJsonSchema[Any] = None
    logit_bias: SkipJsonSchema[Any] = None
    tools: SkipJsonSchema[Any] = None
    functions: SkipJsonSchema[Any] = None
    tool_choice: SkipJsonSchema[Any] = None
    response_format: SkipJsonSchema[Any] = None

    @classmethod
    def bound(cls, data: dict[str, Any], limits: HttpSettings) -> None:
        """Refuse a list longer than the door allows before its items are
        validated one by one (``data`` is the body as read)."""

    def refuse_unsupported(self) -> None:
        for key, neutral in _NEUTRAL.items():
            value = getattr(self, key)
            if value not in neutral:
                message = f"{key}={_SHOWN.repr(value)} is not supported by this server"
                raise ApiError(400, short(message), "unsupported", key)


R = TypeVar("R", bound=BaseModel)


def parse(kind: type[R], raw: bytes, limits: HttpSettings) -> R:
    """The request of type ``kind`` in the body ``raw``, or the ApiError
    that refuses it. What is not a field of ``kind`` is gone once this
    returns."""
    enabled = gc.isenabled()
    gc.disable()  # parsing makes no cycles; a collection every 700 new containers would walk them all, again and again
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, short(f"the request body is not JSON: {exc}")) from None
    finally:
        if enabled:
            gc.enable()
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    bound = getattr(kind, "bound", None)
    if bound is not None:
        bound(data, limits)
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        raise invalid(exc.errors(include_url=False, include_input=False)) from None


class EmbeddingRequest(_Request):
    input: str | list[str] | list[int] | list[list[int]] = Field(union_mode="left_to_right")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)

    @classmethod
    def bound(cls, data: dict[str, Any], limits: HttpSettings) -> None:
        texts = data.get("input")
        if isinstance(texts, list) and len(texts) > limits.max_inputs:
            message = f"input has {len(texts)} items; at most {limits.max_inputs} (max_inputs) in one request"
            raise ApiError(413, f"{message}: split it", "request_too_large", "input")
        if isinstance(texts, list) and not all(type(t) is str for t in texts):
            raise ApiError(400, "input as token ids is not supported here: send the text", "unsupported", "input")

    def texts(self, limits: HttpSettings) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else self.input
        if not texts:
            raise ApiError(400, "input must not be empty", param="input")
        strings: list[str] = texts  # type: ignore[assignment]  # bound() let through lists of strings only
        too_long(sum(len(t) for t in strings), limits)
        return strings


def too_long(chars: int, limits: HttpSettings, param: str = "input") -> None:
    if chars > limits.max_input_chars:
        message = f"the {param} has {chars} characters; at most {limits.max_input_chars} (max_input_chars)"
        raise ApiError(413, f"{message} in one request", "request_too_large", param)


def answer_fits(inputs: int, width: int) -> bool:
    """Whether ``inputs`` float32 vectors of ``width`` values fit in one frame from the worker."""
    return inputs * width * 4 <= MAX_MESSAGE_BYTES - FRAME_MARGIN


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Generation(_Request):
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @classmethod
    def bound(cls, data: dict[str, Any], limits: HttpSettings) -> None:
        stop = data.get("stop")
        if isinstance(stop, list) and len(stop) > limits.max_stop:
            raise ApiError(400, f"stop has {len(stop)} strings; at most {limits.max_stop} (max_stop)", param="stop")

    def sampling(
        self, max_tokens: int | None, limits: HttpSettings, ceiling: int, param: str = "max_tokens"
    ) -> dict[str, Any]:
        """The generate task's payload keys. Sampling is greedy unless the
        request sets a temperature (OpenAI's default is 1; a local service
        answers the same question the same way unless asked otherwise).
        ``ceiling``: the most tokens the model's table allows; a request
        that asks for none leaves the count to the mode (whose own limit
        bounds it)."""
        out: dict[str, Any] = {}
        if max_tokens is not None:
            if max_tokens > ceiling:
                raise ApiError(400, f"{param}={max_tokens} is over this model's limit of {ceiling} tokens", param=param)
            out["max_new_tokens"] = max_tokens
        for key in ("temperature", "top_p", "seed"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if 0 < out.get("temperature", 0) < GREEDY_BELOW:
            out["temperature"] = 0.0  # the same tokens, near enough, without a division that ends in inf and nan
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop:
            if not all(stop):
                raise ApiError(400, "stop strings must not be empty", param="stop")
            if len(stop) > limits.max_stop:  # a single string counts one
                raise ApiError(400, f"stop has {len(stop)} strings; at most {limits.max_stop} (max_stop)", param="stop")
            if max(len(s) for s in stop) > limits.max_stop_chars:
                message = f"a stop string is over {limits.max_stop_chars} characters (max_stop_chars)"
                raise ApiError(400, message, param="stop")
            out["stop"] = stop
        return out

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None

    def text(self, index: int) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(part.type != "text" or part.text is None for part in self.content):
            raise ApiError(400, "only text content parts are supported", "unsupported", f"messages.{index}.content")
        return "".join(part.text or "" for part in self.content)


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @classmethod
    def bound(cls, data: dict[str, Any], limits: HttpSettings) -> None:
        super().bound(data, limits)
        messages = data.get("messages")
        if not isinstance(messages, list):
            return
        if len(messages) > limits.max_messages:
            message = f"messages has {len(messages)} items; at most {limits.max_messages} (max_messages)"
            raise ApiError(413, f"{message} in one request", "request_too_large", "messages")
        parts = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list))
        if parts > limits.max_messages:
            message = f"the messages have {parts} content parts; at most {limits.max_messages} (max_messages)"
            raise ApiError(413, f"{message} in one request", "request_too_large", "messages")

    def payload(self, limits: HttpSettings, ceiling: int) -> dict[str, Any]:
        messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]
        too_long(sum(len(m["role"]) + len(m["content"]) for m in messages), limits, "messages")
        asked: int | None
        if self.max_completion_tokens:
            asked, param = self.max_completion_tokens, "max_completion_tokens"
        else:
            asked, param = self.max_tokens, "max_tokens"
        return {"messages": messages, **self.sampling(asked, limits, ceiling, param)}


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions

    def payload(self, limits: HttpSettings, ceiling: int) -> dict[str, Any]:
        prompt = self.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            message = "prompt must be one string (a batch or token ids is not supported)"
            raise ApiError(400, message, "unsupported", "prompt")
        too_long(len(prompt), limits, "prompt")
        return {"prompt": prompt, **self.sampling(self.max_tokens, limits, ceiling)}


# ------------------------------------------------------------ responses


class Served:
    """Which model and task answered, at which endpoint: what a wrong
    answer's error names."""

    def __init__(self, model: str, task: str, path: str):
        self.model, self.task, self.path = model, task, path

    def wrong(self, got: Any, expected: str) -> ApiError:
        """A 502 for a task whose answer this endpoint cannot use: the
        mapping in ``[http.models]`` or the task is wrong, not the request.
        One line in the log, under the error id the answer carries."""
        what = f"the task {self.task!r} of the model {self.model!r} answered {describe(got)}"
        error_id = incident("bad_task_result", f"{self.path}: {what}; it needs {expected}")
        return ApiError(502, f"{what}; {self.path} needs {expected} (error id {error_id})", "bad_task_result")


def describe(value: Any) -> str:
    """A value's shape in a few words, never its content (it may be a caller's text)."""
    if isinstance(value, np.ndarray):
        return f"an array of {value.dtype.name} with shape {tuple(value.shape)}"
    if isinstance(value, dict):
        keys = [str(k)[:40] for k in list(value)[:6]]
        return f"a map with the keys {keys}{' ...' if len(value) > 6 else ''}" if value else "an empty map"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if value is None:
        return "nothing (null)"
    kind = type(value).__name__
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


GENERATED = "a map with 'text' (a string), and optionally 'tokens', 'prompt_tokens' and 'finish_reason'"
EMBEDDED = "a float array of one row an input, or a map with it under 'embeddings' (and optionally 'tokens')"


def generated(result: Any, served: Served) -> dict[str, Any]:
    """The chat or completions task's answer, if it has the shape OpenAI's answer is made from."""
    if isinstance(result, dict) and isinstance(result.get("text"), str):
        return result
    raise served.wrong(result, GENERATED)


def vectors(result: Any, inputs: int, served: Served) -> tuple[np.ndarray, list]:
    """The embed task's answer (the details map, or just the array) as a
    C-ordered little-endian float32 array of one row an input, and its token
    counts. Anything else is the task's fault: a 502."""
    tokens = result.get("tokens", []) if isinstance(result, dict) else []
    found = result.get("embeddings") if isinstance(result, dict) else result
    if not isinstance(found, np.ndarray | list) or isinstance(found, np.ndarray) and found.dtype.kind not in "biuf":
        raise served.wrong(result, EMBEDDED)
    try:
        array = np.ascontiguousarray(found, dtype="<f4")
    except (TypeError, ValueError):
        raise served.wrong(result, EMBEDDED) from None
    if array.ndim != 2 or array.shape[0] != inputs:
        raise served.wrong(array, f"{EMBEDDED}: {inputs} rows here")
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        tokens = []
    return array, tokens


ROWS_AT_ONCE = 128  # vectors encoded in one orjson call: it holds the GIL throughout, the event loop waits that long


def embeddings(model: str, array: np.ndarray, tokens: list, encoding: str) -> bytes:
    """OpenAI's list, as JSON bytes. Run it off the event loop: a large
    batch takes a while; and it is written ROWS_AT_ONCE vectors at a time,
    so the loop's thread gets the GIL back between them."""
    used = int(sum(tokens))
    parts = [b'{"object":"list","data":[']
    for start in range(0, len(array), ROWS_AT_ONCE):
        rows = array[start : start + ROWS_AT_ONCE]
        if encoding == "base64":
            vectors: Any = [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
        else:
            vectors = rows  # orjson writes each float32 as the shortest text that reads back to it
        data = [{"object": "embedding", "index": start + i, "embedding": v} for i, v in enumerate(vectors)]
        parts += [b"," if start else b"", orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1]]
    tail = {"model": model, "usage": {"prompt_tokens": used, "total_tokens": used}}
    parts += [b"],", orjson.dumps(tail)[1:]]
    return b"".join(parts)


def finish_reason(result: dict[str, Any]) -> str:
    return "length" if result.get("finish_reason") == "length" else "stop"


def usage(result: dict[str, Any]) -> dict[str, int]:
    """The counts, from what the task said of them; 0 for what it did not say (or said as something else)."""
    prompt, tokens = result.get("prompt_tokens", 0), result.get("tokens", ())
    prompt = prompt if type(prompt) is int and prompt >= 0 else 0
    completion = len(tokens) if isinstance(tokens, list) else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Reply:
    """One chat or completion answer, whole or as chunks, under one id."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _envelope(self, obj: str, choices: list, extra: dict | None = None) -> dict[str, Any]:
        head = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        return {**head, "choices": choices, **(extra or {})}

    def whole(self, result: dict[str, Any]) -> dict[str, Any]:
        text, reason = result.get("text", ""), finish_reason(result)
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return self._envelope(self.object, [choice], {"usage": usage(result)})

    def chunk(self, text: str | None, reason: str | None = None, first: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return self._envelope(self._chunk_object, [choice])

    def usage_chunk(self, result: dict[str, Any]) -> dict[str, Any]:
        return self._envelope(self._chunk_object, [], {"usage": usage(result)})

    @property
    def _chunk_object(self) -> str:
        """A streamed chunk's ``object``."""
        return "chat.completion.chunk" if self.chat else "text_completion"
