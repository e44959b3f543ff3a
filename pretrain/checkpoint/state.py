"""``trainer_state.json``: the typed record of what a checkpoint holds, and its one schema.

Everything that writes or reads a checkpoint's state goes through :class:`TrainerState`::

    {
      "version": 3,                      # this schema; absent in checkpoints written before it
      "step": int, "consumed_samples": int, "skipped_steps": int,
      "origin": "train" | "import",      # version >= 3: an import holds weights only
      "config": {...},                   # the run's full TrainConfig as plain data
      "topology": {"tensor": T, "data": D, "zero_stage": Z, "pipeline": P, "context": C},
                                         # P: version >= 2, C: version >= 3 (1 before)
      "tp_layout": {param: {"dim": d|null, "stride": s}},
      "versions": {library: version},
      "tokenizer": {"file": "tokenizer.model", "sha256": …, "vocab_size": V, "eod": id}
    }

A newer ``version`` than this code knows, a missing key or a wrong type is a ``CheckpointError``
naming the file and the key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_prep.base.errors import CheckpointError

STATE_VERSION = 3  # 2: topology.pipeline; 3: topology.context, origin


@dataclass(frozen=True)
class Topology:
    """The parallel layout a checkpoint was saved at (the shards depend on it)."""

    tensor: int
    data: int
    zero_stage: int
    pipeline: int = 1
    context: int = 1

    def describe(self) -> str:
        pp = f"×PP{self.pipeline}" if self.pipeline > 1 else ""
        cp = f"×CP{self.context}" if self.context > 1 else ""
        return f"TP{self.tensor}{cp}×DP{self.data}{pp} ZeRO-{self.zero_stage}"


@dataclass(frozen=True)
class TokenizerInfo:
    file: str
    sha256: str
    vocab_size: int
    eod: int


@dataclass(frozen=True)
class TrainerState:
    step: int
    consumed_samples: int
    config: dict[str, Any]
    topology: Topology
    tp_layout: dict[str, dict[str, Any]]
    tokenizer: TokenizerInfo
    skipped_steps: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    #: ``"train"``: written by a run (resumable); ``"import"``: weights only
    #: (``pretrain.import_hf``), a starting point for ``checkpoint.init_from``
    origin: str = "train"
    version: int = STATE_VERSION

    @property
    def model_config(self) -> dict[str, Any]:
        """The ``model`` section of the saved config (plain data)."""
        return self.config["model"]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str | Path) -> TrainerState:
        """Parse ``data`` (read from ``where``); ``CheckpointError`` naming what is wrong."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: expected a JSON object, got {type(data).__name__}")
        version = data.get("version", 1)
        if not isinstance(version, int) or version > STATE_VERSION or version < 1:
            raise CheckpointError(
                f"{where}: trainer state version {version!r} is not supported by this code "
                f"(it reads versions 1..{STATE_VERSION}); use the twicing-lm release that wrote it"
            )
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise CheckpointError(
                f"{where}: key {missing[0]!r} is missing: not a complete twicing-lm trainer state"
            )
        try:
            return cls(
                step=_int(data, "step", where),
                consumed_samples=_int(data, "consumed_samples", where),
                skipped_steps=_int(data, "skipped_steps", where, default=0),
                config=_dict(data, "config", where),
                topology=_topology(data, where),
                tp_layout=_dict(data, "tp_layout", where),
                tokenizer=TokenizerInfo(**_tokenizer(data, where)),
                versions=_dict(data, "versions", where, default={}),
                origin=_origin(data, where),
                version=version,
            )
        except TypeError as e:
            raise CheckpointError(f"{where}: {e}") from None


_TOPOLOGY_KEYS = ("tensor", "data", "zero_stage")
_REQUIRED = ("step", "consumed_samples", "config", "topology", "tp_layout", "tokenizer")


def _int(data: dict, key: str, where, default: int | None = None) -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CheckpointError(f"{where}: key {key!r} must be an integer >= 0, got {value!r}")
    return value


def _dict(data: dict, key: str, where, default: dict | None = None) -> dict:
    value = data.get(key, default)
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: key {key!r} must be an object, got {value!r}")
    return value


def _ints(data: dict, key: str, names: tuple[str, ...], where) -> dict[str, int]:
    section = _dict(data, key, where)
    return {n: _int(section, n, f"{where} [{key}]") for n in names}


def _topology(data: dict, where) -> Topology:
    fields = _ints(data, "topology", _TOPOLOGY_KEYS, where)
    section = data["topology"]
    optional = {
        key: _int(section, key, f"{where} [topology]")
        for key in ("pipeline", "context")
        if key in section
    }
    return Topology(**fields, **optional)


def _origin(data: dict, where) -> str:
    origin = data.get("origin", "train")
    if origin not in ("train", "import"):
        raise CheckpointError(f"{where}: key 'origin' must be 'train' or 'import', got {origin!r}")
    return origin


def _tokenizer(data: dict, where) -> dict[str, Any]:
    section = _dict(data, "tokenizer", where)
    for key in ("file", "sha256"):
        if not isinstance(section.get(key), str):
            raise CheckpointError(f"{where}: key 'tokenizer.{key}' must be a string")
    return {
        "file": section["file"],
        "sha256": section["sha256"],
        "vocab_size": _int(section, "vocab_size", f"{where} [tokenizer]"),
        "eod": _int(section, "eod", f"{where} [tokenizer]"),
    }
