"""Where ``pretrain.import_hf`` may write its run directory (no torch: checked before anything
loads).

An import is a run directory that holds nothing but ``checkpoints/`` (``latest`` and one tag,
``step_00000000``), ``RECORD`` and ``PRESET`` (a training preset that starts from it).
``--out`` must be new, empty, or such an earlier import (replaced whole); a training run, a
checkpoint, or a path inside either is refused.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.base.errors import ConfigError

RECORD = "import_hf.json"
PRESET = "train.yaml"
_IMPORT_ENTRIES = {"checkpoints", RECORD, PRESET}


def is_earlier_import(out: str | Path) -> bool:
    """Whether ``out`` holds an import and nothing else (no training has written there)."""
    out = Path(out)
    if not (out / RECORD).is_file() or not (out / "checkpoints").is_dir():
        return False
    if {p.name for p in out.iterdir()} - _IMPORT_ENTRIES:
        return False
    tags = {p.name for p in (out / "checkpoints").iterdir()}
    return tags <= {"latest", "step_00000000"}


def check_import_dir(out: str | Path) -> Path:
    """``out`` if an import may be written there: an earlier import (not inside another run),
    else a path :func:`check_output` accepts that is absent or an empty directory."""
    from data_prep.base.output_guard import check_output, check_run_dir

    given = Path(out)
    if is_earlier_import(given):
        return check_run_dir(given, "--out", ConfigError)
    check_output(given, "--out", "dir", error=ConfigError)
    if given.is_dir() and any(given.iterdir()):
        raise ConfigError(
            f"--out {given} exists and is neither empty nor an earlier import (no {RECORD}): "
            "not replaced; choose a new or empty directory"
        )
    return given
