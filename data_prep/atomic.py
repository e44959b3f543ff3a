"""Atomic file writes: a temporary file beside the target, then ``os.replace``.

That is atomic against killed processes. ``fsync`` (durability against power loss) is off by
default because it costs seconds per file on a busy disk; ``DATA_PREP_FSYNC=1`` turns it on.
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


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary file that replaces ``path`` on success and is removed on error."""
    path = Path(path)
    tmp = tmp_path(path)
    kwargs = {} if "b" in mode else {"encoding": "utf-8"}
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            if os.environ.get("DATA_PREP_FSYNC") == "1":
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
