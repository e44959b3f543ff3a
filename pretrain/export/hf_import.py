"""What a Hugging Face import will write (the usage and the output layout are in
``pretrain.import_hf``), decided before any weight is read.

:func:`plan_import` reads ``config.json`` through the architecture's adapter (``model_type`` →
``llama``/``mistral``, ``qwen2``, ``gpt2``, or ``twicing_lm``: our own custom-code export),
applies the overrides (the retrofit keys, the TP × PP layout, the seed new parameters are drawn
from) and opens the tokenizer; everything it refuses names the file and key (``ConfigError``).
``pretrain.export.import_writer`` then writes the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from data_prep.base.errors import ConfigError, DataPrepError
from data_prep.base.strict_config import from_dict
from data_prep.tokenizer_kinds import Tokenizer, load_tokenizer
from model import ModelConfig
from pretrain.export import gpt2, llama, qwen2, remote
from pretrain.export.config_json import ConfigJson
from pretrain.train_config import ParallelConfig, apply_override

#: ``config.json``'s ``model_type`` -> the adapter that imports it
BY_MODEL_TYPE = {t: a for a in (llama, qwen2, gpt2, remote) for t in a.MODEL_TYPES}
#: model keys an import may override: the attention retrofit and training-only settings; the
#: others come from config.json (the architecture the weights were trained for)
RETROFIT_KEYS = ("attention", "attention_layers", "attention_options", "attention_backend",
                 "attention_dropout", "hidden_dropout", "init_std", "recompute", "seq_length",
                 "vocab_pad_multiple")  # fmt: skip
#: the other keys an import takes
LAYOUT_KEYS = ("parallel.tensor", "parallel.pipeline", "training.seed")
DEFAULT_SEED = 1234  # training.seed's default: the stream new parameters are drawn from


@dataclass
class ImportPlan:
    """What an import will write, decided and checked before any weight is read."""

    source: Path
    hf: ConfigJson
    adapter: ModuleType
    model: ModelConfig
    tensor: int
    pipeline: int
    seed: int
    tokenizer: Tokenizer
    overrides: list[str]


# ---------------------------------------------------------------------------- plan
def adapter_of(hf: ConfigJson) -> ModuleType:
    model_type = hf.get("model_type")
    if model_type not in BY_MODEL_TYPE:
        hf.refuse(
            "model_type",
            f"not an architecture this import maps exactly (supported: "
            f"{', '.join(sorted(BY_MODEL_TYPE))})",
        )
    return BY_MODEL_TYPE[model_type]


def plan_import(source: str | Path, overrides: list[str]) -> ImportPlan:
    """Read and check ``source``'s config and tokenizer with ``overrides`` applied."""
    source = Path(source)
    hf = ConfigJson.read(source)
    adapter = adapter_of(hf)
    fields = adapter.config_from_hf(hf)
    data = {"model": dict(fields), "parallel": {}, "training": {}}
    for assignment in overrides:
        key = assignment.partition("=")[0]
        if not key.startswith("model.") and key not in LAYOUT_KEYS:
            raise ConfigError(
                f"config key {key!r}: an import takes model.* overrides and "
                f"{', '.join(LAYOUT_KEYS)} (the seed new parameters are drawn from)"
            )
        apply_override(data, assignment)
    model = _model_config(data["model"], fields, hf)
    parallel = _layout(data)
    if model.padded_vocab_size % parallel.tensor:
        hf.refuse(
            "vocab_size",
            f"the embedding's rows do not split over parallel.tensor={parallel.tensor}, and an "
            "import keeps them exactly: use a tensor-parallel size that divides them",
        )
    model.check_tensor_parallel(parallel.tensor)
    model.check_pipeline_parallel(parallel.pipeline)
    adapter.check_import(hf, model)
    seed = data["training"].get("seed", DEFAULT_SEED)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"config key 'training.seed': expected an integer >= 0, got {seed!r}")
    tokenizer = _tokenizer(source, model, hf)
    return ImportPlan(
        source, hf, adapter, model, parallel.tensor, parallel.pipeline, seed, tokenizer, overrides
    )


def _model_config(given: dict, fields: dict, hf: ConfigJson) -> ModelConfig:
    for key, value in given.items():
        if key in fields and key not in RETROFIT_KEYS and value != fields[key]:
            raise ConfigError(
                f"config key 'model.{key}': {value!r} differs from {fields[key]!r}, which "
                f"{hf.path} implies; an import keeps the architecture the weights were trained "
                f"for (overridable: {', '.join(RETROFIT_KEYS)})"
            )
    model = from_dict(ModelConfig, given, "model")
    if model.padded_vocab_size != fields["vocab_size"]:
        raise ConfigError(
            f"config key 'model.vocab_pad_multiple': {model.vocab_pad_multiple} pads the "
            f"vocabulary to {model.padded_vocab_size} rows, but the model has "
            f"{fields['vocab_size']} ({hf.path} vocab_size); an import keeps them exactly"
        )
    return model


def _layout(data: dict) -> ParallelConfig:
    return from_dict(ParallelConfig, data["parallel"], "parallel")


def _tokenizer(source: Path, model: ModelConfig, hf: ConfigJson) -> Tokenizer:
    """The model directory's tokenizer: ``tokenizer.json`` (what ``AutoTokenizer`` reads) when
    present, else a sentencepiece ``tokenizer.model``."""
    kind = "hf" if (source / "tokenizer.json").is_file() else None
    if kind is None and not (source / "tokenizer.model").is_file():
        raise ConfigError(
            f"--hf-model {source}: no tokenizer (tokenizer.json or tokenizer.model): a "
            "checkpoint keeps its tokenizer"
        )
    try:
        tokenizer = load_tokenizer(source, kind)
    except DataPrepError as e:
        raise ConfigError(f"--hf-model {source}: {e}") from None
    if tokenizer.vocab_size > model.vocab_size:
        hf.refuse(
            "vocab_size",
            f"the tokenizer ({tokenizer!r}) has {tokenizer.vocab_size} tokens, more than the "
            "model's embedding rows",
        )
    return tokenizer
