"""Sharded checkpoints that are complete or ignored, verified before they are loaded.

Layout under the checkpoint root::

    step_00000100/          one tag per saved step
        mp_rank_*/zero_*    DeepSpeed's per-rank model / optimizer shards
        rng/rank_00003.pt   each rank's RNG states (DeepSpeed keeps client state from one rank)
        tokenizer.model     the run's sentencepiece model (evaluation needs nothing else)
        trainer_state.json  step, consumed samples, config, topology, TP layout, tokenizer,
                            library versions
        checksums.json      size + xxh3-128 of every file above
        COMPLETE            written last, after every rank finished
    latest                  name of the newest complete tag, advanced only after COMPLETE
    universal/step_*/       a tag converted for a resume at another TP × DP layout
                            (``pretrain.universal``), pruned with its source tag

A directory without ``COMPLETE`` is never loaded (a save killed mid-way leaves one behind; the
next save of that tag or pruning removes it).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import xxhash

from data_prep.atomic import write_bytes
from pretrain.checkpoint.state import TrainerState
from pretrain.errors import CheckpointError

MARKER = "COMPLETE"
LATEST = "latest"
STATE = "trainer_state.json"
CHECKSUMS = "checksums.json"
TOKENIZER_FILE = "tokenizer.model"
_TAG_PREFIX = "step_"


def tag_of(step: int) -> str:
    return f"{_TAG_PREFIX}{step:08d}"


def step_of(tag: str) -> int:
    return int(tag[len(_TAG_PREFIX) :])


def file_digest(path: Path, fsync: bool = False) -> dict[str, Any]:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return {"size": path.stat().st_size, "xxh3_128": h.hexdigest()}


def complete_tags(root: Path) -> list[str]:
    """Tags with a completion marker, oldest first."""
    if not root.is_dir():
        return []
    tags = [
        p.name for p in root.iterdir() if p.name.startswith(_TAG_PREFIX) and (p / MARKER).is_file()
    ]
    return sorted(tags, key=step_of)


def latest_complete(root: Path) -> str | None:
    """The tag ``latest`` names if it is complete, else the newest complete tag, else None."""
    pointer = root / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (root / tag / MARKER).is_file():
            return tag
    tags = complete_tags(root)
    return tags[-1] if tags else None


def read_state(tag_dir: Path) -> TrainerState:
    """The typed ``trainer_state.json`` of a complete checkpoint."""
    path = tag_dir / STATE
    if not (tag_dir / MARKER).is_file():
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete (no {MARKER} marker)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint state {path} is unreadable: {e}") from None
    return TrainerState.from_json(data, path)


def verify_files(tag_dir: Path, names: list[str] | None = None) -> list[str]:
    """Problems (one line each, naming the file) with ``names`` (default: all listed files)."""
    listed = json.loads((tag_dir / CHECKSUMS).read_text())
    problems = []
    for name in listed if names is None else names:
        expected, path = listed[name], tag_dir / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != expected["size"]:
            problems.append(f"{path}: {size} bytes, expected {expected['size']} (truncated?)")
        elif file_digest(path)["xxh3_128"] != expected["xxh3_128"]:
            problems.append(f"{path}: checksum mismatch (corrupted)")
    return problems


def torch_save(obj: Any, path: Path, fsync: bool = False) -> None:
    """``torch.save`` to ``path`` atomically (the checkpoint's RNG files, consolidated files)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue(), fsync)
