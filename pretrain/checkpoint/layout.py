"""Sharded checkpoints that are complete or ignored, verified before they are loaded.

Layout under the checkpoint root::

    step_00000100/          one tag per saved step
        mp_rank_*/zero_*    DeepSpeed's per-rank model / optimizer shards
        rng/rank_00003.pt   each rank's RNG states (DeepSpeed keeps client state from one rank)
        tokenizer.model     the run's sentencepiece model (evaluation needs nothing else), or
        tokenizer/          a Hugging Face tokenizer's tokenizer.json and config
        trainer_state.json  step, consumed samples, config, topology, TP layout, tokenizer,
                            library versions
        checksums.json      size + xxh3-128 of every file above
        COMPLETE            written last, after every rank finished
    latest                  name of the newest complete tag, advanced only after COMPLETE
    universal/step_*/       a tag converted for a resume at another TP × DP layout
                            (``pretrain.universal``), pruned with its source tag

A directory without ``COMPLETE`` is never loaded (a save killed mid-way leaves one behind; the
next save of that tag or pruning removes it). Only exact tags count: ``latest`` must name one
(``../other-run/…`` is an error naming the file), ``checksums.json`` may only list files inside
its step directory, and other ``step_*`` names (a user's ``step_00000010.bak``) are ignored with a
warning.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import xxhash

from data_prep.base.atomic_write import write_bytes
from data_prep.base.errors import CheckpointError
from pretrain.checkpoint.state import TrainerState

MARKER = "COMPLETE"
LATEST = "latest"
STATE = "trainer_state.json"
CHECKSUMS = "checksums.json"
TOKENIZER_FILE = "tokenizer.model"  #: a sentencepiece run's tokenizer
TOKENIZER_DIR = "tokenizer"  #: a Hugging Face tokenizer's files (tokenizer.json, its config)
_TAG_PREFIX = "step_"
_TAG = re.compile(r"step_\d{8}")


def tokenizer_files(tokenizer: Any) -> tuple[str, dict[str, Path]]:
    """Where a checkpoint keeps ``tokenizer`` (what ``TokenizerInfo.file`` names) and its files,
    ``{name in the step directory: source}``."""
    if tokenizer.kind == "hf":
        return TOKENIZER_DIR, {f"{TOKENIZER_DIR}/{p.name}": p for p in tokenizer.files()}
    return TOKENIZER_FILE, {TOKENIZER_FILE: Path(tokenizer.model_path)}


def tokenizer_names(listed: dict[str, Any] | list[str], saved_as: str) -> list[str]:
    """The names among ``listed`` (a step's checksums) that make up the tokenizer ``saved_as``."""
    return [n for n in listed if n == saved_as or n.startswith(saved_as + "/")]


def tag_of(step: int) -> str:
    return f"{_TAG_PREFIX}{step:08d}"


def is_tag(name: str) -> bool:
    """Whether ``name`` is exactly ``step_XXXXXXXX`` (eight digits, nothing else)."""
    return _TAG.fullmatch(name) is not None


def step_of(tag: str) -> int:
    if not is_tag(tag):
        raise CheckpointError(f"{tag!r} is not a checkpoint tag (expected step_XXXXXXXX)")
    return int(tag[len(_TAG_PREFIX) :])


def check_tag(tag: str, where: str | Path) -> str:
    """``tag`` if it is an exact tag, else a ``CheckpointError`` naming ``where`` it came from."""
    if not is_tag(tag):
        raise CheckpointError(
            f"{where}: {tag!r} is not a checkpoint tag of this directory (expected a plain "
            "step_XXXXXXXX name; paths such as ../other-run/… are refused)"
        )
    return tag


def tag_names(root: Path) -> list[str]:
    """Exact tags of the directories under ``root``, oldest first; other ``step_*`` names (a
    backup ``step_00000010.bak``, a damaged copy moved aside) are ignored with a warning."""
    if not root.is_dir():
        return []
    tags = []
    for p in root.iterdir():
        if not p.name.startswith(_TAG_PREFIX):
            continue
        if is_tag(p.name) and p.is_dir() and not p.is_symlink():
            tags.append(p.name)
        elif p.name not in _WARNED:
            _WARNED.add(p.name)
            print(
                f"warning: ignoring {p} (not a checkpoint: only plain step_XXXXXXXX directories "
                "are)",
                file=sys.stderr,
                flush=True,
            )
    return sorted(tags, key=step_of)


_WARNED: set[str] = set()


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
    return [t for t in tag_names(root) if (root / t / MARKER).is_file()]


def latest_complete(root: Path) -> str | None:
    """The tag ``latest`` names if it is complete, else the newest complete tag, else None.

    An empty ``latest`` and one naming a step that is not complete (a save killed before its
    marker, a pruned step) both fall back to the newest complete tag, with a warning: neither
    can point outside the run. Anything else that is not an exact tag
    (``../../other-run/checkpoints/step_N``) is a ``CheckpointError`` naming the file, never
    followed."""
    pointer = root / LATEST
    tags = complete_tags(root)
    newest = f"the newest complete one, {tags[-1]}" if tags else "none is complete"
    if pointer.is_file():
        try:
            text = pointer.read_text().strip()
        except UnicodeDecodeError:
            raise CheckpointError(f"{pointer}: not a text file naming a tag") from None
        if not text:
            print(f"warning: {pointer} is empty; using {newest}", file=sys.stderr, flush=True)
        else:
            tag = check_tag(text, pointer)
            if (root / tag / MARKER).is_file() and not (root / tag).is_symlink():
                return tag
            print(
                f"warning: {pointer} names {tag}, which is not a complete checkpoint; using "
                f"{newest}",
                file=sys.stderr,
                flush=True,
            )
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


def read_checksums(tag_dir: Path) -> dict[str, dict[str, Any]]:
    """``checksums.json`` of ``tag_dir``, checked: an object of relative names of files inside
    the step directory (no ``..``, no absolute paths), each with ``size`` and ``xxh3_128``."""
    path = tag_dir / CHECKSUMS
    try:
        listed = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {tag_dir} has no {CHECKSUMS}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None
    if not isinstance(listed, dict):
        raise CheckpointError(f"{path}: expected a JSON object of file names")
    for name, entry in listed.items():
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or "\\" in name:
            raise CheckpointError(
                f"{path}: entry {name!r} is not a file inside the step directory (refused)"
            )
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("xxh3_128"), str)
        ):
            raise CheckpointError(f"{path}: entry {name!r} needs an integer size and xxh3_128")
    return listed


def verify_files(tag_dir: Path, names: list[str] | None = None) -> list[str]:
    """Problems (one line each, naming the file) with ``names`` (default: all listed files)."""
    listed = read_checksums(tag_dir)
    problems = []
    for name in listed if names is None else names:
        if name not in listed:
            problems.append(f"{tag_dir / name}: not listed in {CHECKSUMS}")
            continue
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
