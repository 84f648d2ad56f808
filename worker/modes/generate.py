"""``generate`` and ``chat``: text generation from a causal language model,
streamed a token at a time.

``generate`` continues a prompt; ``chat`` renders a list of messages with
the tokenizer's chat template first (what an OpenAI-style chat endpoint
needs), and refuses with a ``ValueError`` when the model has none, since
guessing a format would make a chat model answer gibberish without saying
why. Both are generator handlers: each token is yielded the moment it
exists, so a caller that asked for a stream sees text while the model is still
working, and one that did not gets the same final result. The decoding loop is
our own (not ``model.generate``) because a streamer there runs the model in a
second thread, and a handler must own the only thread that touches the GPU.

With no ``model_path`` the mode builds a tiny GPT-2 with RANDOM weights and a
byte-level tokenizer, in memory: no files, no hub, loads in well under a
second on CPU. Its output is gibberish by design; it exists so the whole
streaming path, chat included, can be tried and tested anywhere, so it gets
``TINY_CHAT_TEMPLATE`` (a model built here has no template of its own to
respect). Give ``model_path`` (a local folder) for a real model, and
``chat_template`` (Jinja text) to give a model without a template one, or to
replace its own: a real model's format is never guessed.
"""

from __future__ import annotations

from typing import Any

from worker.modes.detokenize import Detokenizer

TINY_NAME = "tiny-random"
EOS = "<|endoftext|>"
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The built-in model's chat format, ChatML's layout: each message as
``<|im_start|>ROLE\nCONTENT<|im_end|>\n``, then ``<|im_start|>assistant\n``
for the reply. The markers are plain text to the byte-level tokenizer; with
random weights no format is more right than another, and this one is what
most chat models read, so a prompt rendered here looks like a real one."""
_DTYPES = ("float32", "float16", "bfloat16")


def _byte_symbols() -> list[str]:
    """GPT-2's byte-to-printable-character table, indexed by byte value, so
    the tiny vocabulary maps token id N to byte N and a saved tokenizer.json
    reads like any other byte-level BPE file."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


# The GPT-2 fields a ``size`` may set: the random model's shape, nothing that
# changes its vocabulary or its tokens.
SIZE_FIELDS = ("n_embd", "n_layer", "n_head", "n_positions", "n_inner")


def build_tiny(seed: int = 0, size: dict | None = None, device: str = "cpu") -> tuple[Any, Any]:
    """The built-in model and its tokenizer. Public so a test can save both
    to a folder and prove that loading through ``model_path`` behaves the same.
    ``size`` overrides the model's shape (e.g. ``{"n_embd": 2048, "n_layer":
    24}``, about 5 GB in float32): a model big enough to see on a GPU with
    nothing to download. It is built on ``device`` directly, so a large one
    is not first initialised on the CPU."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    vocab[EOS] = 256
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=EOS, eos_token=EOS)

    shape = {"n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 1024, **_size(size)}
    config = GPT2Config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **shape,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT2LMHeadModel(config)
    return model.eval(), tokenizer


def _size(size: Any) -> dict:
    if size is None:
        return {}
    if not isinstance(size, dict):
        raise TypeError(f"generate: size must be a table of GPT-2 fields {SIZE_FIELDS}, got {size!r}")
    for key, value in size.items():
        if key not in SIZE_FIELDS:
            raise ValueError(f"generate: size may set {SIZE_FIELDS}, not {key!r}")
        if not _is_int(value) or value < 1:
            raise ValueError(f"generate: size.{key} must be a whole number >= 1, got {value!r}")
    return dict(size)


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _max_positions(model: Any) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a reply: chat models often list several in their
    generation config, beside the tokenizer's own."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        ids.update([value] if isinstance(value, int) else value or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


GREEDY_BELOW = 1e-3
"""A temperature under this draws as greedy: logits divided by a subnormal
one overflow to inf and NaN (torch.multinomial then raises), and a softmax
that sharp is the argmax anyway."""
MAX_STOPS, MAX_STOP_CHARS = 4, 256
"""The stop strings a job may give, and the longest each may be, unless the
mode's args say otherwise (``max_stops``, ``max_stop_chars``): OpenAI's own
figures. Every token is checked against every stop, so the caller must not be
the one to choose what that costs."""


def _options(
    payload: Any,
    limit: int,
    max_positions: int | None,
    default_tokens: int | None,
    max_stops: int = MAX_STOPS,
    max_stop_chars: int = MAX_STOP_CHARS,
) -> dict:
    """Check a payload in full before anything runs, so a bad job fails with
    a message naming its key and never after a partial stream.
    ``default_tokens``: ``max_new_tokens`` when the payload gives none (None:
    as many as the limit allows)."""
    if not isinstance(payload, dict):
        raise TypeError(f"generate: payload must be a map, got {type(payload).__name__}")
    ceiling = limit if max_positions is None else min(limit, max_positions - 1)
    opts = {
        "max_new_tokens": payload.get("max_new_tokens", ceiling if default_tokens is None else default_tokens),
        "temperature": payload.get("temperature", 0),
        "top_k": payload.get("top_k", 0),
        "top_p": payload.get("top_p", 1.0),
        "seed": payload.get("seed"),
        "stop_at_eos": payload.get("stop_at_eos", True),
        "stop": payload.get("stop", []),
    }
    n = opts["max_new_tokens"]
    if not _is_int(n):
        raise TypeError(f"generate: 'max_new_tokens' must be an int, got {type(n).__name__}")
    if not 1 <= n <= ceiling:
        raise ValueError(f"generate: 'max_new_tokens' must be between 1 and {ceiling}, got {n}")
    for key, check, kind in (
        ("temperature", _is_number, "a number"),
        ("top_k", _is_int, "an int"),
        ("top_p", _is_number, "a number"),
        ("seed", lambda v: v is None or _is_int(v), "an int"),
        ("stop_at_eos", lambda v: isinstance(v, bool), "a bool"),
    ):
        if not check(opts[key]):
            raise TypeError(f"generate: {key!r} must be {kind}, got {type(opts[key]).__name__}")
    if not opts["temperature"] >= 0:  # also catches NaN
        raise ValueError(f"generate: 'temperature' must be >= 0, got {opts['temperature']}")
    if opts["top_k"] < 0:
        raise ValueError(f"generate: 'top_k' must be >= 0, got {opts['top_k']}")
    if not 0 < opts["top_p"] <= 1:
        raise ValueError(f"generate: 'top_p' must be in (0, 1], got {opts['top_p']}")
    stop = [opts["stop"]] if isinstance(opts["stop"], str) else opts["stop"]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise TypeError("generate: 'stop' must be a non-empty string or a list of them")
    if len(stop) > max_stops:
        raise ValueError(f"generate: 'stop' takes at most {max_stops} strings (the mode's max_stops), got {len(stop)}")
    longest = max(map(len, stop), default=0)
    if longest > max_stop_chars:
        raise ValueError(
            f"generate: a 'stop' string may be at most {max_stop_chars} characters (the mode's max_stop_chars), "
            f"got one of {longest}"
        )
    opts["stop"] = stop
    return opts


def _prompt(payload: dict) -> str:
    prompt = payload.get("prompt")
    if not isinstance(prompt, str):
        raise TypeError(f"generate: 'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError("generate: 'prompt' must not be empty")
    return prompt


def _messages(payload: Any) -> list[dict[str, str]]:
    messages = payload.get("messages") if isinstance(payload, dict) else None
    shape = "chat: 'messages' must be a non-empty list of {'role': str, 'content': str}"
    if not isinstance(messages, list) or not messages:
        raise TypeError(shape)
    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise TypeError(f"{shape}; message {index} is {message!r:.200}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _pick(logits: Any, opts: dict, rng: Any) -> int:
    """Next token: argmax at temperature 0, else a draw after top-k and
    top-p. The draw runs on the CPU with its own generator, so a seed gives the
    same tokens on any device and no other job's randomness can disturb it."""
    import torch

    if opts["temperature"] < GREEDY_BELOW:
        return int(logits.argmax())
    logits = logits.float().cpu() / opts["temperature"]
    if 0 < opts["top_k"] < logits.numel():
        logits[logits < torch.topk(logits, opts["top_k"]).values[-1]] = float("-inf")
    if opts["top_p"] < 1:
        ordered, order = torch.sort(logits, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        mass_before = probs.cumsum(-1) - probs
        logits[order[mass_before >= opts["top_p"]]] = float("-inf")  # the top token always survives
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=rng))


def load(
    model_path: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    max_new_tokens_limit: int = 512,
    seed: int = 0,
    chat_template: str | None = None,
    max_stops: int = MAX_STOPS,
    max_stop_chars: int = MAX_STOP_CHARS,
    size: dict | None = None,
) -> dict:
    """``chat_template``: Jinja text for the ``chat`` task, instead of the
    tokenizer's own (the built-in tiny model's is ``TINY_CHAT_TEMPLATE``; a
    ``model_path`` whose tokenizer has none refuses every chat job without it). ``max_stops``, ``max_stop_chars``: the most
    stop strings a job may give, and their longest length. ``size``: the
    random model's shape (see ``build_tiny``); only without ``model_path``."""
    import inspect

    for name, value in (("max_stops", max_stops), ("max_stop_chars", max_stop_chars)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"generate: {name} must be a whole number >= 1, got {value!r}")
    import torch

    if dtype not in _DTYPES:
        raise ValueError(f"generate: dtype must be one of {_DTYPES}, got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    target = _pick_device(device)
    if size is not None and model_path is not None:
        raise ValueError("generate: size shapes the built-in random model; a model_path brings its own")
    if model_path is None:
        model, tokenizer = build_tiny(seed, size, target)
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    else:
        from pathlib import Path

        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if not Path(model_path).is_dir():
            raise FileNotFoundError(f"generate: model_path {model_path!r} is not a folder")
        hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True, dtype=torch_dtype)
        except Exception as exc:
            raise RuntimeError(f"generate: cannot load a causal LM from {model_path!r}: {exc}") from exc
    if chat_template is not None:
        if not isinstance(chat_template, str) or not chat_template.strip():
            raise TypeError("generate: chat_template must be the template's Jinja text")
        tokenizer.chat_template = chat_template
    model = model.to(device=target, dtype=torch_dtype).eval()
    max_positions = _max_positions(model)
    stop_ids = _eos_ids(model, tokenizer)
    vocab = model.get_output_embeddings().weight.shape[0]
    known = len(tokenizer)  # ids past this (padding rows of the embedding) have no text: never pick them
    # Only the last position's logits are needed; on a long prompt the full
    # [prompt, vocab] float matrix can cost gigabytes. Remote-code models may lack the argument.
    accepts = inspect.signature(model.forward).parameters
    keep = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
    # The KV cache's name: ``cache`` in transformers 5.x (``past_key_values``
    # is deprecated there), ``past_key_values`` before; in and out alike.
    cache_arg = "cache" if "cache" in accepts else "past_key_values"

    def run(prompt_ids: list[int], opts: dict):
        """The decoding loop both tasks share: a chunk per token, then the result."""
        n = opts["max_new_tokens"]
        rng = torch.Generator()
        if opts["seed"] is None:
            rng.seed()
        else:
            rng.manual_seed(opts["seed"])
        if max_positions is not None:
            prompt_ids = prompt_ids[-(max_positions - n) :]
        detok = Detokenizer(tokenizer, opts["stop"])
        tokens: list[int] = []
        finish = "length"
        with torch.inference_mode():
            inputs, cache = torch.tensor([prompt_ids], device=target), None
            while len(tokens) < n:
                out = model(input_ids=inputs, use_cache=True, **{cache_arg: cache}, **keep)
                cache, logits = out[cache_arg], out.logits[0, -1]
                if known < vocab:
                    logits[known:] = float("-inf")
                token = _pick(logits, opts, rng)
                tokens.append(token)
                done = opts["stop_at_eos"] and token in stop_ids
                finish = "eos" if done else "length"
                text = detok.delta(tokens, final=done or len(tokens) == n)
                if detok.stopped:
                    finish, done = "stop", True
                yield {"token": token, "text": text}
                if done:
                    break
                inputs = torch.tensor([[token]], device=target)
        return {"text": detok.sent, "tokens": tokens, "prompt_tokens": len(prompt_ids), "finish_reason": finish}

    def generate(payload: Any):
        opts = _options(payload, max_new_tokens_limit, max_positions, 32, max_stops, max_stop_chars)
        prompt = _prompt(payload)
        return (yield from run(tokenizer(prompt)["input_ids"], opts))

    def chat(payload: Any):
        messages = _messages(payload)
        opts = _options(payload, max_new_tokens_limit, max_positions, None, max_stops, max_stop_chars)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"chat: the model {model_path or TINY_NAME!r} has no chat template (tokenizer.chat_template); "
                "send a plain prompt to 'generate' instead, or give the mode a chat_template"
            )
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - a template's own refusal (a role it does not know ...) is bad input
            raise ValueError(f"chat: the model's chat template refused the messages: {exc}") from exc
        # The template writes the special tokens itself: the tokenizer must not add them again.
        return (yield from run(tokenizer(text, add_special_tokens=False)["input_ids"], opts))

    def info(payload: Any = None) -> dict:
        return {
            "model": model_path or TINY_NAME,
            "random_weights": model_path is None,
            "device": target,
            "dtype": dtype,
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": vocab,
            "max_positions": max_positions,
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
            "max_stops": max_stops,
            "max_stop_chars": max_stop_chars,
        }

    return {"generate": generate, "chat": chat, "info": info}
