"""The consolidated checkpoint: one TP=1 weights file (for evaluation and sharing).

The TP shards (ZeRO 0–2: DeepSpeed's module states; ZeRO-3: rebuilt from the fp32 partitions)
are merged with the TP layout saved in the checkpoint. The output is a single ``torch.save`` file
that loads with ``torch.load(path, weights_only=True)``::

    {
      "format": "twicing-lm/consolidated", "format_version": 2,
      "step": int, "consumed_samples": int, "source": "<step dir>",
      "dtype": "float32" | "bfloat16",
      "trainer_state": {...},          # the source's trainer_state.json (config, topology, …)
      "state_dict": {name: tensor},    # megatron-core GPT parameter names at TP=1
      "tokenizer_files": {name: uint8 tensor},  # the tokenizer's files, byte for byte, under
                                       # the names a step directory gives them (tokenizer.model,
                                       # or tokenizer/tokenizer.json, …)
      "tokenizer_model": uint8 tensor, # sentencepiece runs only, as in version 1
    }

Written by ``python -m pretrain.consolidate``; read by ``pretrain.checkpoint.reader``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from data_prep.base.errors import CheckpointError
from pretrain.checkpoint.layout import TOKENIZER_FILE, torch_save
from pretrain.checkpoint.state import TrainerState

FORMAT = "twicing-lm/consolidated"
FORMAT_VERSION = 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def is_consolidated(path: str | Path) -> bool:
    return Path(path).is_file()


def save(
    out: str | Path,
    *,
    weights: dict[str, torch.Tensor],
    state: TrainerState,
    source: str,
    tokenizer_files: dict[str, Path],
    dtype: str = "fp32",
) -> Path:
    """Write the consolidated file: TP=1 ``weights`` of the checkpoint ``source`` with its
    trainer ``state`` and tokenizer files (``{name in a step directory: source}``),
    atomically."""

    def as_tensor(path: Path) -> torch.Tensor:
        return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)

    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": state.step,
        "consumed_samples": state.consumed_samples,
        "source": source,
        "dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype],
        "trainer_state": state.to_json(),
        "state_dict": {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in weights.items()},
        "tokenizer_files": {name: as_tensor(src) for name, src in tokenizer_files.items()},
    }
    if list(tokenizer_files) == [TOKENIZER_FILE]:  # version 1 readers find it here
        payload["tokenizer_model"] = payload["tokenizer_files"][TOKENIZER_FILE]
    out = Path(out)
    torch_save(payload, out, fsync=True)
    return out


def load(path: str | Path) -> dict[str, Any]:
    """Read and check a consolidated file (``CheckpointError`` when it is not one)."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        called = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), None)
        if called is None:  # not a pickle at all, or a damaged one
            raise CheckpointError(
                f"{path} is not a readable consolidated checkpoint: {e}"
            ) from None
        raise CheckpointError(
            f"{path}: refused to unpickle ({called.split(' was not')[0]}): a consolidated "
            "checkpoint holds only tensors and plain containers, so this file was altered or "
            "written by other code; nothing in it was run"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable consolidated checkpoint: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a twicing-lm consolidated checkpoint")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {payload['format_version']}; this code reads up to "
            f"{FORMAT_VERSION}"
        )
    tokenizer_key = (
        ("tokenizer_files", dict)
        if payload.get("format_version", 1) >= 2
        else ("tokenizer_model", torch.Tensor)
    )
    for key, kind in (("trainer_state", dict), ("state_dict", dict), tokenizer_key):
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(
                f"{path}: key {key!r} is missing or not a {kind.__name__}: the file is not a "
                "complete consolidated checkpoint (write it again with pretrain.consolidate)"
            )
    return payload


def tokenizer_payload(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tokenizer's files of a loaded consolidated file, ``{name: bytes as a tensor}``."""
    if "tokenizer_files" in payload:
        return dict(payload["tokenizer_files"])
    return {TOKENIZER_FILE: payload["tokenizer_model"]}
