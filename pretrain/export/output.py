"""Where an export may be written (no torch: checked before anything loads)."""

from __future__ import annotations

from pathlib import Path

from data_prep.base.errors import ConfigError

METADATA = "twicing_export.json"


def check_export_dir(out: str | Path) -> Path:
    """``out`` if it may receive an export: not a run/checkpoint dir nor inside or above one,
    and either absent, empty, or an earlier export (the only thing ever replaced)."""
    from data_prep.base.output_guard import check_output

    out = check_output(out, "--out", "dir", error=ConfigError)
    if out.is_dir() and any(out.iterdir()) and not (out / METADATA).is_file():
        raise ConfigError(
            f"--out {out} exists and is not an earlier Hugging Face export (no {METADATA}): "
            "not replaced; choose a new or empty directory"
        )
    return out
