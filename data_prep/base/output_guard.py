"""Output paths that must not be written: a training run, its checkpoints, or their insides.

Shared by every command that writes user-named outputs (``data_prep --out-dir``/``--out``,
``pretrain.export_hf --out``, ``pretrain.consolidate --out``, ``pretrain.evaluate --out``), so an
output path that *is*, *contains* or *lies inside* a run or checkpoint directory is refused
before anything is written (``export_hf`` used to replace its output directory wholesale). A
path under a regular file, or of the wrong kind (a directory where a file is written, or the
reverse), is refused too. Lives in data_prep because data_prep imports nothing of ``pretrain``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from data_prep.base.errors import DataPrepError

_TAG = re.compile(r"step_\d{8}")
#: files that only a checkpoint step directory holds
_STEP_FILES = ("trainer_state.json", "COMPLETE", "checksums.json")
#: how deep below an existing output directory to look for a run (``out/runs/x/checkpoints``)
_DEPTH = 3
_MAX_ENTRIES = 20_000


def protected_kind(d: Path) -> str | None:
    """``"checkpoint"``, ``"checkpoint directory"`` or ``"run directory"`` when ``d`` is one."""
    try:
        if not d.is_dir():
            return None
        if any((d / f).is_file() for f in _STEP_FILES):
            return "checkpoint"
        if (d / "latest").is_file() or any(
            _TAG.fullmatch(c.name) and c.is_dir() for c in d.iterdir()
        ):
            return "checkpoint directory"
        if (d / "metrics.jsonl").is_file() or protected_kind(d / "checkpoints") is not None:
            return "run directory"
    except OSError:
        return None
    return None


def _contained(d: Path) -> tuple[Path, str] | None:
    """A run/checkpoint directory at most ``_DEPTH`` levels below ``d``, if any."""
    seen = 0
    frontier = [d]
    for _ in range(_DEPTH):
        below = []
        for parent in frontier:
            try:
                children = [c for c in parent.iterdir() if c.is_dir() and not c.is_symlink()]
            except OSError:
                continue
            for c in children:
                kind = protected_kind(c)
                if kind is not None:
                    return c, kind
                seen += 1
                if seen > _MAX_ENTRIES:
                    return None
                below.append(c)
        frontier = below
    return None


def check_output(
    path: str | os.PathLike,
    what: str,
    kind: Literal["file", "dir"],
    *,
    error: type[Exception] = DataPrepError,
    allow_eval_dir: bool = False,
) -> Path:
    """Raise ``error`` (naming ``what``, e.g. ``--out``, and the path) unless ``path`` is a safe
    place to write a ``kind``; returns it. ``allow_eval_dir``: a run's ``eval/`` subdirectory
    (where evaluation results go by default) is allowed."""
    given = Path(path)
    out = given.resolve()
    if out.exists():
        if kind == "dir" and not out.is_dir():
            raise error(f"{what} {given} is an existing file; expected a directory")
        if kind == "file" and out.is_dir():
            raise error(f"{what} {given} is an existing directory; expected a file path")
    for ancestor in out.parents:
        if ancestor.exists() and not ancestor.is_dir():
            raise error(f"{what} {given}: {ancestor} is a regular file, not a directory")
    chain = [out, *out.parents] if out.is_dir() else list(out.parents)
    for i, ancestor in enumerate(chain):
        found = protected_kind(ancestor)
        if found is None:
            continue
        in_eval = i > 0 and chain[i - 1].name == "eval"
        if allow_eval_dir and found == "run directory" and in_eval:
            continue
        where = "is" if ancestor == out else "lies inside"
        raise error(
            f"{what} {given} {where} the {found} {ancestor}: refusing to write there (it could "
            "overwrite or delete training outputs); choose a path outside it"
            + (
                f", or inside its eval/ subdirectory ({ancestor}/eval/…), which holds only "
                "evaluation results"
                if allow_eval_dir and found == "run directory"
                else ""
            )
        )
    if out.is_dir():
        hit = _contained(out)
        if hit is not None:
            raise error(
                f"{what} {given} contains the {hit[1]} {hit[0]}: refusing to write there; "
                "choose a new, empty directory"
            )
    return given
