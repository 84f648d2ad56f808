"""OpenAI's request and response shapes, as far as gpuvisor serves them.

Requests are pydantic models, so a wrong type or a missing field is a 400
naming the field before anything is queued. Fields a client may send that
gpuvisor does not implement (``n`` > 1, tools, logprobs, penalties...) are
refused with a 400 when set to anything but their neutral value, rather than
ignored: an answer computed without them would be silently wrong. Unknown
fields are let through, as OpenAI's own API lets new SDKs send them.

Responses are plain dicts: the embeddings of a large batch would take
longer to pass through a response model than to compute.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from supervisor.service.http.errors import ApiError

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


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str

    def refuse_unsupported(self) -> None:
        for key, neutral in _NEUTRAL.items():
            value = (self.model_extra or {}).get(key)
            if value not in neutral:
                raise ApiError(400, f"{key}={value!r} is not supported by this server", "unsupported", key)


class EmbeddingRequest(_Request):
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else self.input
        if not texts:
            raise ApiError(400, "input must not be empty", param="input")
        if not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "input as token ids is not supported here: send the text", "unsupported", "input")
        return texts  # type: ignore[return-value]  # every item is a str, checked above


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Generation(_Request):
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling(self, max_tokens: int | None) -> dict[str, Any]:
        """The generate task's payload keys. Sampling is greedy unless the
        request sets a temperature (OpenAI's default is 1; a local service
        answers the same question the same way unless asked otherwise)."""
        out: dict[str, Any] = {}
        if max_tokens is not None:
            out["max_new_tokens"] = max_tokens
        for key in ("temperature", "top_p", "seed"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop:
            if not all(stop):
                raise ApiError(400, "stop strings must not be empty", param="stop")
            out["stop"] = stop
        return out

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
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

    def payload(self) -> dict[str, Any]:
        messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]
        return {"messages": messages, **self.sampling(self.max_completion_tokens or self.max_tokens)}


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions

    def payload(self) -> dict[str, Any]:
        prompt = self.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be one string (a batch or token ids is not supported)", "unsupported",
                           "prompt")  # fmt: skip
        return {"prompt": prompt, **self.sampling(self.max_tokens)}


# ------------------------------------------------------------ responses


def embeddings(model: str, result: Any, encoding: str, dimensions: int | None) -> dict[str, Any]:
    """The embed task's answer (the details map, or just the array) as
    OpenAI's list. ``dimensions`` is only accepted when it is the width the
    model has: cutting vectors short is right for a few models only."""
    tokens = result.get("tokens", []) if isinstance(result, dict) else []
    array = np.asarray(result["embeddings"] if isinstance(result, dict) else result, dtype="<f4")
    if array.ndim != 2:
        raise ApiError(500, f"the embeddings task answered with an array of shape {array.shape}, not (texts, width)")
    if dimensions is not None and dimensions != array.shape[1]:
        raise ApiError(400, f"dimensions={dimensions}: this model's vectors have {array.shape[1]} values",
                       "unsupported", "dimensions")  # fmt: skip
    if encoding == "base64":
        data = [base64.b64encode(row.tobytes()).decode("ascii") for row in array]
    else:
        data = array.tolist()
    used = int(sum(tokens))
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": vector} for i, vector in enumerate(data)],
        "model": model,
        "usage": {"prompt_tokens": used, "total_tokens": used},
    }


def finish_reason(result: dict[str, Any]) -> str:
    return "length" if result.get("finish_reason") == "length" else "stop"


def usage(result: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(result.get("prompt_tokens", 0)), len(result.get("tokens", ()))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Reply:
    """One chat or completion answer, whole or as chunks, under one id."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _envelope(self, obj: str, choices: list, extra: dict | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **(extra or {})}  # fmt: skip

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
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])

    def usage_chunk(self, result: dict[str, Any]) -> dict[str, Any]:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [],
                              {"usage": usage(result)})  # fmt: skip
