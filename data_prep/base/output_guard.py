"""Output paths that must not be written: a training run, its checkpoints, or their insides.

Every command declares its user-named outputs with :func:`output_option` (instead of a plain
``add_argument``) and calls :func:`guard_outputs` before it writes or loads anything, so an output
path that *is*, *contains* or *lies inside* a run or checkpoint directory is refused (a run's
``eval/`` or ``tensorboard/`` may be allowed for results that belong there). A path under a
regular file, or of the wrong kind (a directory where a file is written, or the reverse), is
refused too. ``tests/unit/test_hostile_inputs_unit.py`` enumerates every command's parser and
checks that each output option is declared this way and refuses a run's insides.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
    kind: Literal["file", "dir", "any"],
    *,
    error: type[Exception] = DataPrepError,
    allow_eval_dir: bool = False,
    allow_in_run: tuple[str, ...] = (),
) -> Path:
    """Raise ``error`` (naming ``what``, e.g. ``--out``, and the path) unless ``path`` is a safe
    place to write a ``kind``; returns it. ``allow_in_run``: subdirectories of a run directory
    that may hold this output (``allow_eval_dir``: ``("eval",)``, where evaluation results go by
    default)."""
    allowed = set(allow_in_run) | ({"eval"} if allow_eval_dir else set())
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
        below = chain[i - 1].name if i > 0 else None
        if found == "run directory" and below in allowed:
            continue
        where = "is" if ancestor == out else "lies inside"
        hint = ", ".join(f"{ancestor}/{d}/" for d in sorted(allowed))
        raise error(
            f"{what} {given} {where} the {found} {ancestor}: refusing to write there (it could "
            "overwrite or delete training outputs); choose a path outside it"
            + (
                f", or inside its own results subdirectory ({hint}…)"
                if allowed and found == "run directory"
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


def check_run_dir(
    path: str | os.PathLike, what: str = "run_dir", error: type[Exception] = DataPrepError
) -> Path:
    """Raise ``error`` unless ``path`` can be a training run's directory: new, empty, or an
    earlier run (which resumes). Refused: an existing file, a path under a regular file, a
    checkpoint or checkpoint directory given in place of its run, and a path inside another
    run's or checkpoint directory."""
    given = Path(path)
    out = given.resolve()
    if out.exists() and not out.is_dir():
        raise error(
            f"{what} {given} is an existing file, not a directory: give a new directory or the "
            "directory of an earlier run (to resume it)"
        )
    for ancestor in out.parents:
        if ancestor.exists() and not ancestor.is_dir():
            raise error(f"{what} {given}: {ancestor} is a regular file, not a directory")
    kind = protected_kind(out)
    if kind in ("checkpoint", "checkpoint directory"):
        raise error(
            f"{what} {given} is a {kind}, not a run directory: give the run directory that "
            f"holds it ({out.parent if kind == 'checkpoint directory' else out.parent.parent})"
        )
    for ancestor in out.parents:
        kind = protected_kind(ancestor)
        if kind is not None:
            raise error(
                f"{what} {given} lies inside the {kind} {ancestor}: a run there would write "
                "among its files; choose a directory outside it"
            )
    return given


@dataclass(frozen=True)
class OutputOption:
    """An output path option of a command: its flag, where argparse stores it, what it is."""

    flag: str
    dest: str
    kind: Literal["file", "dir", "any"]
    allow_in_run: tuple[str, ...] = ()


def output_option(
    parser: argparse.ArgumentParser,
    flag: str,
    *,
    kind: Literal["file", "dir", "any"],
    allow_in_run: tuple[str, ...] = (),
    registry: argparse.ArgumentParser | None = None,
    **kwargs: Any,
) -> argparse.Action:
    """``parser.add_argument(flag, **kwargs)`` for an output path, recorded on ``registry``
    (default: ``parser``; a subcommand's parser records on its top parser) so that
    :func:`guard_outputs` checks it."""
    action = parser.add_argument(flag, **kwargs)
    owner = registry if registry is not None else parser
    options = owner.__dict__.setdefault("output_options", [])
    option = OutputOption(flag, action.dest, kind, allow_in_run)
    if option not in options:
        options.append(option)
    return action


def declared_outputs(parser: argparse.ArgumentParser) -> list[OutputOption]:
    """The output options :func:`output_option` recorded on ``parser``."""
    return list(parser.__dict__.get("output_options", []))


def guard_outputs(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    error: type[Exception] = DataPrepError,
) -> None:
    """Refuse (``error``) any given output path of ``args`` that :func:`check_output` refuses;
    call it before anything is loaded or written."""
    for option in declared_outputs(parser):
        value = getattr(args, option.dest, None)
        if value:
            check_output(value, option.flag, option.kind, error=error,
                         allow_in_run=option.allow_in_run)  # fmt: skip
