"""A sentence-transformers model folder, read as sentence-transformers reads
it: which steps turn a text into a vector, and with what settings. Pure
JSON, no torch: ``embed`` runs what this reads.

A folder says how its vectors are made, and a model run any other way gives
vectors that look fine and compare wrongly: a CLS-pooled model that is
mean-pooled scores 0.5 cosine against its own reference. So the folder's own
files decide:

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
does ``embed``, saying so on stderr.
"""

from __future__ import annotations

import json
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


def refuse(path: Path, key: str, why: str) -> ValueError:
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
            raise refuse(path, key, f"embed does not implement it (it reads {', '.join(known)})")
    return config


def _require(path: Path, config: dict, key: str, allowed: tuple) -> None:
    if key in config and config[key] not in allowed:
        raise refuse(path, key, f"is {config[key]!r}; embed runs only {' or '.join(map(repr, allowed))}")


def _optional_positive_int(path: Path, config: dict, key: str) -> int | None:
    return None if config.get(key) is None else _positive_int(path, config, key)


def _positive_int(path: Path, config: dict, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise refuse(path, key, f"must be a positive whole number, got {value!r}")
    return value


def _bool(path: Path, config: dict, key: str, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise refuse(path, key, f"must be true or false, got {value!r}")
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
    return _optional_positive_int(path, config, "max_seq_length"), _bool(path, config, "do_lower_case", False)


def _read_pooling(path: Path) -> tuple[tuple[str, ...], int | None]:
    keys = ("pooling_mode", "embedding_dimension", "word_embedding_dimension", "include_prompt", *LEGACY_POOLING_KEYS)
    config = _read_map(path, keys)
    key = "embedding_dimension" if "embedding_dimension" in config else "word_embedding_dimension"
    width = _optional_positive_int(path, config, key)
    _bool(path, config, "include_prompt", True)
    if "pooling_mode" in config:
        value = config["pooling_mode"]
        modes = tuple(value) if isinstance(value, list) else (value,)
    else:
        for legacy in LEGACY_POOLING_KEYS:
            _bool(path, config, legacy, False)
        modes = tuple(mode for legacy, mode in LEGACY_POOLING_KEYS.items() if config.get(legacy)) or ("mean",)
    if not modes or not all(mode in POOLING_MODES for mode in modes):
        raise refuse(
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
        raise refuse(path, "activation_function", f"must name a torch.nn module class, got {activation!r}")
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
        pooling: tuple[str, ...] = ("lasttoken",) if _is_causal_lm(root / "config.json") else ("mean",)
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
