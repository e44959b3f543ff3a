"""A Hugging Face model directory's weights, read one tensor at a time.

Formats, in the order ``transformers`` prefers them: ``model.safetensors``, sharded safetensors
(``model.safetensors.index.json`` naming each tensor's file), ``pytorch_model.bin`` and its
sharded index. Safetensors files are memory-mapped (``safetensors.safe_open``): a tensor's bytes
are read when it is taken, so a model larger than memory streams through. Every file is opened
up front, so a truncated or damaged one is refused (``CheckpointError`` naming it, exit 4)
before anything is written. ``.bin`` files load with ``torch.load(weights_only=True,
mmap=True)``: a pickle that holds more than tensors is refused as unsafe to unpickle, and
nothing in it runs.

Tensor names may lack the model's base prefix (``transformer.``, ``model.``: checkpoints saved
from the base model, such as GPT-2's own); :meth:`HFWeights.take` finds either spelling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from data_prep.base.errors import CheckpointError
from pretrain.checkpoint.unsafe_pickle import refused_global, unsafe_pickle_error

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
#: buffers some checkpoints carry that are no parameters (GPT-2's causal mask, RoPE's table)
NOT_PARAMETERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


class HFWeights:
    """The tensors of ``model_dir``: ``names()``, ``take(name)``, ``file_of(name)``."""

    def __init__(self, model_dir: Path) -> None:
        self.dir = model_dir
        self.where: dict[str, Path] = {}
        self._files: dict[Path, Any] = {}
        for path, names in self._layout().items():
            self._files[path] = self._open(path)
            for name in names if names is not None else self._keys(path):
                self.where[name] = path

    # ------------------------------------------------------------------ files
    def _layout(self) -> dict[Path, list[str] | None]:
        """``{file: its tensor names (None: all it holds)}`` of the first format present."""
        for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (BIN, BIN_INDEX)):
            if (self.dir / single).is_file():
                return {self.dir / single: None}
            if (self.dir / index).is_file():
                return self._index(self.dir / index)
        raise CheckpointError(
            f"{self.dir}: no weights ({SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or {BIN_INDEX})"
        )

    def _index(self, path: Path) -> dict[Path, list[str] | None]:
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a weights index with a weight_map ({e})") from None
        files: dict[Path, list[str] | None] = {}
        for name, file in weight_map.items():
            target = self.dir / str(file)
            if Path(str(file)).name != str(file):
                raise CheckpointError(f"{path}: {name} names {file!r}, not a file beside it")
            files.setdefault(target, []).append(name)  # type: ignore[union-attr]
        return files

    def _open(self, path: Path) -> Any:
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (named by the weights index)")
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                return safe_open(str(path), framework="pt")
            except SafetensorError as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        return self._load_bin(path)

    @staticmethod
    def _load_bin(path: Path) -> dict[str, torch.Tensor]:
        try:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
        except Exception as e:
            called = refused_global(e)
            if called is not None:
                raise unsafe_pickle_error(path, called) from None
            raise CheckpointError(f"{path}: not a readable PyTorch weights file ({e})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
        return sd

    def _keys(self, path: Path) -> list[str]:
        handle = self._files[path]
        return list(handle.keys())

    # ------------------------------------------------------------------ tensors
    def names(self) -> set[str]:
        return set(self.where)

    def resolve(self, name: str) -> str | None:
        """The stored spelling of ``name`` (with or without its base prefix), or None."""
        if name in self.where:
            return name
        bare = name.partition(".")[2]
        return bare if bare in self.where else None

    def file_of(self, name: str) -> Path:
        stored = self.resolve(name)
        return self.where[stored] if stored is not None else self.dir

    def take(self, name: str) -> torch.Tensor:
        """Tensor ``name`` (read now), or ``CheckpointError`` naming it and the files."""
        stored = self.resolve(name)
        if stored is None:
            files = sorted({p.name for p in self.where.values()})
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing from {files}")
        path = self.where[stored]
        handle = self._files[path]
        if isinstance(handle, dict):
            return handle[stored]
        try:
            return handle.get_tensor(stored)
        except Exception as e:  # noqa: BLE001 - safetensors raises plain errors
            raise CheckpointError(f"{path}: tensor {stored!r} is unreadable ({e})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` without reading it."""
        stored = self.resolve(name)
        if stored is None:
            return ()
        handle = self._files[self.where[stored]]
        if isinstance(handle, dict):
            return tuple(handle[stored].shape)
        return tuple(handle.get_slice(stored).get_shape())
