"""Atomic file writes for the whole project: a temporary file beside the target, then
``os.replace`` (readers see the old file or the whole new one, also after a kill).

``fsync`` (durability against power loss, including the directory entry) is off by default in
data_prep because it costs seconds per file on a busy disk (``DATA_PREP_FSYNC=1`` turns it on);
``write_bytes`` / ``write_text``, used for checkpoint metadata, sync by default.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TMP_TAG = ".tmp-"


def tmp_path(path: Path) -> Path:
    """A process-unique temporary name in the target's directory (same file system)."""
    return path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "wb", fsync: bool | None = None
) -> Iterator[IO]:
    """Write to a temporary file that replaces ``path`` on success and is removed on error.

    ``fsync`` None: as ``DATA_PREP_FSYNC`` says (off by default)."""
    path = Path(path)
    tmp = tmp_path(path)
    sync = os.environ.get("DATA_PREP_FSYNC") == "1" if fsync is None else fsync
    kwargs = {} if "b" in mode else {"encoding": "utf-8"}
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if sync:
            _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    """Replace ``path`` (parents created) with ``data`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb", fsync) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> None:
    write_bytes(path, text.encode(), fsync)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def remove_stale_tmp(directory: Path) -> None:
    """Delete temporary files left by a killed run."""
    if directory.is_dir():
        for p in directory.iterdir():
            if TMP_TAG in p.name and p.name.startswith("."):
                p.unlink(missing_ok=True)
